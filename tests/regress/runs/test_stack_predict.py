import numpy as np
import pandas as pd
import pytest

import cli
from core.errors import TableError
from featurize.synthetic import make_synthetic_table
from regress.metrics import evaluate_by_fold
from regress.runs.stack import Stack


def test_stack_beats_single_runs_on_complementary_signal():
    """Run A sees genes' first half well, run B the second half: a per-gene blend gets both."""
    rng = np.random.default_rng(0)
    n, g = 400, 10
    Y = rng.standard_normal((n, g))
    noise_small, noise_big = 0.3, 3.0
    A = Y + np.concatenate([noise_small * rng.standard_normal((n, 5)), noise_big * rng.standard_normal((n, 5))], 1)
    B = Y + np.concatenate([noise_big * rng.standard_normal((n, 5)), noise_small * rng.standard_normal((n, 5))], 1)
    fold = np.repeat(np.arange(4), 100)
    stacked = np.zeros_like(Y)
    for f in range(4):
        tr, va = fold != f, fold == f
        stacked[va] = Stack().fit([A[tr], B[tr]], Y[tr]).predict([A[va], B[va]])
    s = lambda P: evaluate_by_fold(Y, P, fold)["pcc_gene_mean_by_fold"]
    assert s(stacked) > max(s(A), s(B)) + 0.1
    assert s(stacked) >= s((A + B) / 2)
    w = Stack().fit([A, B], Y).weights_
    assert np.allclose(w.sum(0), 1) and (w >= 0).all()
    assert (w[0, :5] > 0.9).all() and (w[1, 5:] > 0.9).all()


def test_ridge_stacker_runs():
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((50, 3))
    st = Stack("ridge").fit([Y + 0.1, Y * 2], Y)
    assert st.predict([Y + 0.1, Y * 2]).shape == Y.shape


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    train = make_synthetic_table(root, n=40, n_genes=6, size=48, name="train", seed=0)
    test = make_synthetic_table(root, n=10, n_genes=6, size=48, name="test", seed=1)
    df = pd.read_csv(test)
    df[["ID", "path", "slide", "x", "y"]].to_csv(test, index=False)
    genes = [c for c in pd.read_csv(train, nrows=0).columns if c.startswith("GENE")]
    tmpl = root / "sample_submission.csv"
    pd.DataFrame({"ID": df.ID, **{g: 0.0 for g in reversed(genes)}}).to_csv(tmpl, index=False)
    common = ["--data", str(train), "--cache-dir", str(root / "cache"), "--runs-dir", str(root / "runs"), "--folds", "4"]
    assert cli.main(["embed", "--data", str(train), "--backbone", "timm:test_vit", "--random-init", "--quiet",
                     "--cache-dir", str(root / "cache"), "--workers", "0"]) == 0
    assert cli.main(["fit", "--backbone", "timm:test_vit", "--head", "ridge", *common]) == 0
    assert cli.main(["fit", "--backbone", "timm:test_vit", "--head", "pls", "--context", "3", *common]) == 0
    return root, train, test, tmpl, genes


def test_stack_predict_report_end_to_end(fitted):
    root, train, test, tmpl, genes = fitted
    runs = root / "runs"
    assert cli.main(["stack", "--all", str(train), "--runs-dir", str(runs)]) == 0
    stack = runs / "stack-train"
    assert (stack / "stack.json").is_file()
    out = root / "sub.csv"
    assert cli.main(["predict", str(stack), "--data", str(test), "--cache-dir", str(root / "cache"),
                     "--out", str(out), "--template", str(tmpl), "--device", "cpu"]) == 0
    sub = pd.read_csv(out)
    assert list(sub.columns) == list(pd.read_csv(tmpl, nrows=0).columns)  # template order (genes reversed)
    assert list(sub.ID) == list(pd.read_csv(test).ID)
    assert np.isfinite(sub[genes].to_numpy()).all()
    # single run, training gene order
    out2 = root / "sub2.csv"
    assert cli.main(["predict", str(runs / "train-timm_test_vit-ridge"), "--data", str(test),
                     "--cache-dir", str(root / "cache"), "--out", str(out2), "--device", "cpu"]) == 0
    assert list(pd.read_csv(out2, nrows=0).columns) == ["ID", *genes]
    assert cli.main(["report", str(stack)]) == 0
    md = (stack / "report" / "report.md").read_text()
    assert "RANDOM-INIT" in md and (stack / "report" / "pcc_hist.png").is_file()
    assert list((stack / "report").glob("spatial_*.png"))


def test_predict_refuses_bad_input_and_writes_nothing(fitted, tmp_path):
    root, train, test, tmpl, genes = fitted
    run = root / "runs" / "train-timm_test_vit-ridge"
    df = pd.read_csv(test)
    bad = df.copy()
    bad.loc[0, "path"] = "./test/missing.png"
    bad.to_csv(root / "bad_missing.csv", index=False)
    out = tmp_path / "s.csv"
    with pytest.raises(TableError, match="does not exist"):
        from regress.runs.predict import predict_table

        predict_table(run, root / "bad_missing.csv", cache_dir=root / "cache", device="cpu")
    rc = cli.main(["predict", str(run), "--data", str(root / "bad_missing.csv"), "--out", str(out),
                   "--cache-dir", str(root / "cache"), "--device", "cpu"])
    assert rc == 2 and not out.exists()
    # template with an unknown ID
    t = pd.read_csv(tmpl)
    t.loc[0, "ID"] = "NOPE"
    t.to_csv(tmp_path / "t.csv", index=False)
    rc = cli.main(["predict", str(run), "--data", str(test), "--out", str(out), "--template",
                   str(tmp_path / "t.csv"), "--cache-dir", str(root / "cache"), "--device", "cpu"])
    assert rc == 2 and not out.exists()
    # test IDs overlapping the training table
    tr = pd.read_csv(train)
    tr[["ID", "path", "slide", "x", "y"]].to_csv(root / "overlap.csv", index=False)
    rc = cli.main(["predict", str(run), "--data", str(root / "overlap.csv"), "--out", str(out),
                   "--cache-dir", str(root / "cache"), "--device", "cpu"])
    assert rc == 2 and not out.exists()


@pytest.mark.parametrize("method", ["select", "shrink"])
def test_stack_center_folds_from_the_cli_is_recorded_and_predicts(fitted, method):
    import json

    from regress.runs.stack import load_stack

    root, train, test, tmpl, genes = fitted
    out = root / "runs" / f"stack-centered-{method}"
    assert cli.main(["stack", "--all", str(train), "--runs-dir", str(root / "runs"), "--method", method,
                     "--center-folds", "--out", str(out)]) == 0
    info = json.loads((out / "stack.json").read_text())
    assert info["center_folds"] is True and info["identity_fields"]["center_folds"] is True
    assert info["method"] == method and info["shrink"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    _, model, _ = load_stack(out)
    assert model.center_folds is True and model.method == method  # the saved model keeps the options
    if method == "shrink":
        assert len(info["selected"]) == len(info["runs"])
    sub = root / f"sub-centered-{method}.csv"
    assert cli.main(["predict", str(out), "--data", str(test), "--cache-dir", str(root / "cache"),
                     "--out", str(sub), "--device", "cpu"]) == 0
    assert np.isfinite(pd.read_csv(sub)[genes].to_numpy()).all()
