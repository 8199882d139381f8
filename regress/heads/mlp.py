"""One-hidden-layer MLP head (torch): Linear -> SiLU -> Dropout -> Linear to all genes.

The shape of the best fine-tuned head on the reference task, trained on
frozen features: AdamW, early stopping on an inner validation split,
seeded and deterministic on CPU.  Features and genes are standardised
inside; predictions are mapped back.
"""
from __future__ import annotations

import numpy as np
from numbers import Integral, Real

from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from core.device import resolve_device
from regress.heads.base import MultiOutputHead, standardizer


class MLPHead(MultiOutputHead, RegressorMixin, BaseEstimator):
    """Torch MLP regressor for many genes at once.

    Parameters
    ----------
    hidden : int
        Hidden width.
    dropout : float
        Dropout after the activation.
    lr, weight_decay : float
        AdamW settings.
    max_epochs, patience : int
        Early stopping on the inner validation split's MSE.
    batch_size : int
    val_fraction : float
        Share of training rows held out for early stopping (grouped when
        groups are given to ``fit``).
    device : "cpu" or "cuda"
    random_state : int
    """

    _head_name = "the MLP head"
    _parameter_constraints = {
        "hidden": [Interval(Integral, 1, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "val_fraction": [Interval(Real, 0, 1, closed="left")],
        "device": [str],
        "random_state": ["random_state"],
    }

    def __init__(self, hidden: int = 512, dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 1e-2,
                 max_epochs: int = 200, patience: int = 10, batch_size: int = 256, val_fraction: float = 0.15,
                 device: str = "cpu", random_state: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.device = device
        self.random_state = random_state

    def _net(self, d: int, g: int):
        import torch.nn as nn

        return nn.Sequential(nn.Linear(d, self.hidden), nn.SiLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, g))

    def fit(self, X, y, groups=None):
        import torch

        X, Y = self._validate_fit(X, y, dtype=np.float32)
        n, d = X.shape
        dev = resolve_device(self.device)
        rng = np.random.default_rng(self.random_state)
        torch.manual_seed(self.random_state)
        train, val = _inner_split(n, groups, self.val_fraction, rng)

        self.x_mean_, self.x_std_ = standardizer(X[train])
        self.y_mean_, self.y_std_ = standardizer(Y[train])
        Xt = torch.from_numpy(((X - self.x_mean_) / self.x_std_).astype(np.float32)).to(dev)
        Yt = torch.from_numpy(((Y - self.y_mean_) / self.y_std_).astype(np.float32)).to(dev)
        tr = torch.from_numpy(train).to(dev)
        va = torch.from_numpy(val).to(dev)

        net = self._net(d, Y.shape[1]).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator(device="cpu").manual_seed(self.random_state)
        best, best_state, bad, self.n_epochs_ = np.inf, None, 0, 0
        for epoch in range(self.max_epochs):
            net.train()
            order = tr[torch.randperm(len(tr), generator=gen).to(dev)]
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                loss = torch.nn.functional.mse_loss(net(Xt[idx]), Yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.inference_mode():
                v = float(torch.nn.functional.mse_loss(net(Xt[va]), Yt[va])) if len(va) else float(loss)
            self.n_epochs_ = epoch + 1
            if v < best - 1e-6:
                best, bad = v, 0
                best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
            else:
                bad += 1
                if bad >= self.patience:
                    break
        net.load_state_dict(best_state)
        self.best_val_mse_ = best
        self.state_ = {k: t.cpu() for k, t in net.state_dict().items()}
        self.n_targets_ = Y.shape[1]
        return self

    def predict(self, X):
        import torch

        check_is_fitted(self, "state_")
        X = self._validate_predict(X)
        net = self._net(X.shape[1], self.n_targets_)
        net.load_state_dict(self.state_)
        net.double().eval()  # float64 inference: a row's prediction does not depend on its batch
        with torch.inference_mode():
            out = net(torch.from_numpy((X - self.x_mean_) / self.x_std_)).numpy()
        out = out * self.y_std_ + self.y_mean_  # float64: the network ran in float64
        return out[:, 0] if self._y_1d else out


def _inner_split(n: int, groups, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows for training and for early stopping; whole groups go to validation."""
    if n < 5 or fraction <= 0:
        idx = np.arange(n)
        return idx, idx
    if groups is not None and len(np.unique(groups)) >= 3:
        groups = np.asarray(groups)
        uniq = rng.permutation(np.unique(groups))
        n_val = max(1, int(round(fraction * len(uniq))))
        mask = np.isin(groups, uniq[:n_val])
        return np.flatnonzero(~mask), np.flatnonzero(mask)
    perm = rng.permutation(n)
    n_val = max(1, int(round(fraction * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
