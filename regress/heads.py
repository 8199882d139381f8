"""Named head presets; the CLI's ``--head`` choices."""
from __future__ import annotations

from typing import Callable

from sklearn.dummy import DummyRegressor

from regress.mlp import MLPHead
from regress.pls import PLSHead
from regress.ridge import RidgeHead
from featurize.errors import UsageError


def _mean(device: str, seed: int):
    return DummyRegressor(strategy="mean")


HEADS: dict[str, tuple[Callable[[str, int], object], str]] = {
    "ridge": (lambda device, seed: RidgeHead(device=device, random_state=seed),
              "ridge, standardised features, alpha per gene from 13 values by (grouped) 5-fold CV on MSE"),
    "ridge-pcc": (lambda device, seed: RidgeHead(scoring="pcc", device=device, random_state=seed),
                  "as ridge, alpha per gene chosen by out-of-fold Pearson r"),
    "hest": (lambda device, seed: RidgeHead(alphas="hest", n_components=256, fit_intercept=False, device=device,
                                            random_state=seed),
             "HEST-Benchmark protocol: StandardScaler -> PCA(256) -> Ridge(alpha=100/(256*genes), no intercept)"),
    "pls": (lambda device, seed: PLSHead(random_state=seed),
            "PLS, components per gene from (2,4,8,16,32) by (grouped) 5-fold CV"),
    "mlp": (lambda device, seed: MLPHead(device=device, random_state=seed),
            "MLP 512 hidden, SiLU, dropout 0.2, AdamW, early stopping"),
    "mean": (_mean, "baseline: predict the training mean of each gene"),
}


def list_heads() -> list[str]:
    return list(HEADS)


def make_head(name: str, device: str = "cpu", seed: int = 0):
    """A fresh, unfitted estimator for preset ``name``."""
    if name not in HEADS:
        raise UsageError(f"unknown head '{name}'; choose one of {', '.join(HEADS)}.")
    return HEADS[name][0](device, seed)
