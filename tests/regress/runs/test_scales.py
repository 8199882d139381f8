"""Multi-scale stacks: each run is fed test tiles of the physical size it was trained on (regress/runs/scales.py)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import cli
from conftest import at_tile_size, embedded_train_test, record_tile_size
from core.errors import RunError, TableError
from featurize.synthetic import make_synthetic_table
from regress.runs.predict import predict_table
from regress.runs.folder import open_result
from regress.runs.scales import assign_tables, distinct_sizes
from regress.runs.stack import load_stack


def run(argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def _table(tmp_path, name, tile_um):
    path = tmp_path / f"{name}.csv"
    pd.DataFrame({"ID": ["a"], "path": ["a.png"], "slide": ["S0"]}).to_csv(path, index=False)
    if tile_um is not None:
        record_tile_size(path, tile_um)
    return SimpleNamespace(source=path)


def test_each_run_gets_the_table_of_its_tile_size_and_mismatches_are_refused(tmp_path):
    t100, t200, t105 = (_table(tmp_path, f"t{s}", s) for s in (100, 200, 105))
    bare = _table(tmp_path, "bare", None)
    a, b, c = (SimpleNamespace(path=f"runs/{k}", info={"tile_um": s}) for k, s in (("a", 100.0), ("b", 200.0), ("c", 300.0)))
    unsized = SimpleNamespace(path="runs/u", info={})
    assert assign_tables([a, b], [t100, t200]) == [t100, t200]
    assert assign_tables([a, b, a], [t200, t100]) == [t100, t200, t100]  # by size, not by order
    assert assign_tables([a], [bare]) == [bare] and assign_tables([unsized], [t200]) == [t200]  # nothing to check
    assert assign_tables([a], [t200], force=True) == [t200]  # predict-slide --force
    refusals = [
        (([a, b], [t100]), TableError, "trained on 200 um tiles"),  # one table for a two-size stack
        (([a], [t200]), TableError, "trained on 100 um tiles"),  # a run fed another size
        (([a, b], [bare]), TableError, "one --data table per tile size"),
        (([a, b], [t100, t105]), TableError, "one --data table per tile size"),
        (([a, c], [t100, t200]), TableError, "trained on 300 um tiles"),
        (([a, b], [t100, bare]), TableError, "records no tile size"),
        (([unsized, a], [t100, t200]), RunError, "records no tile size"),
    ]
    for (runs, tables), exc, msg in refusals:
        with pytest.raises(exc, match=msg):
            assign_tables(runs, tables)
    assert distinct_sizes([None, 200.0, 100.0, 104.0, 205.0]) == [100.0, 200.0]


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """Ridge runs on the same spots at 100 and 200 um (the 200 um tiles: other pixels), stacked."""
    root = tmp_path_factory.mktemp("scales")
    train, test, cache = embedded_train_test(root, n_genes=5)
    record_tile_size(train, 100.0)
    record_tile_size(test, 100.0)
    train2, test2 = at_tile_size(train, "train_x2", 200.0), at_tile_size(test, "test_x2", 200.0)
    runs = {}
    for table in (train, train2):
        assert run(["embed", "--data", table, "--backbone", "timm:test_vit", "--random-init", "--quiet",
                    "--cache-dir", cache, "--workers", "0"]) == 0
        assert run(["fit", "--data", table, "--backbone", "timm:test_vit", "--head", "ridge", "--cache-dir",
                    cache, "--runs-dir", root / "runs", "--folds", "4", "--device", "cpu"]) == 0
        runs[table.stem] = root / "runs" / f"{table.stem}-timm_test_vit-ridge"
    assert run(["stack", "--all", train, "--all", train2, "--runs-dir", root / "runs", "--out", root / "stack"]) == 0
    return root, cache, test, test2, runs


def test_a_two_size_stack_predicts_each_run_on_its_own_tiles(two_sizes, capsys):
    root, cache, test, test2, runs = two_sizes
    base = ["--cache-dir", cache, "--device", "cpu"]
    assert run(["predict", root / "stack", "--data", test, "--data", test2, "--out", root / "p.csv", *base]) == 0
    got = pd.read_csv(root / "p.csv")
    # the same by hand: each run on the table of its size, then the stack's blend
    p1 = predict_table(runs["train"], test, cache_dir=cache, device="cpu", log=lambda *a: None)
    p2 = predict_table(runs["train_x2"], test2, cache_dir=cache, device="cpu", log=lambda *a: None)
    genes = [c for c in got.columns if c != "ID"]
    _, stack, _ = load_stack(root / "stack")
    want = stack.predict([p1[genes].to_numpy(np.float64), p2[genes].to_numpy(np.float64)], None)
    assert list(got["ID"]) == list(p1["ID"])
    np.testing.assert_allclose(got[genes].to_numpy(), want, rtol=1e-4, atol=1e-5)
    # the other size's pixels change the answer: feeding one table to both runs is not what the stack learned
    wrong = stack.predict([p1[genes].to_numpy(np.float64),
                           predict_table(runs["train_x2"], test, cache_dir=cache, device="cpu", force_size=True,
                                         log=lambda *a: None)[genes].to_numpy(np.float64)], None)
    assert np.abs(wrong - want).max() > 1e-3
    # the tables in the other order give the same rows and values
    assert run(["predict", root / "stack", "--data", test2, "--data", test, "--out", root / "q.csv", *base]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(root / "q.csv"), got)
    # refusals, nothing written: one size missing, a run fed the other size, tables of other tiles
    other = make_synthetic_table(root / "o", n=16, n_genes=5, size=32, name="other", seed=4)
    record_tile_size(other, 200.0)
    cases = [(["predict", root / "stack", "--data", test, "--out", root / "r.csv"], "trained on 200 um tiles"),
             (["predict", runs["train"], "--data", test2, "--out", root / "r.csv"], "trained on 100 um tiles"),
             (["predict", root / "stack", "--data", test, "--data", other, "--out", root / "r.csv"], "IDs differ")]
    for argv, msg in cases:
        capsys.readouterr()
        assert run([*argv, *base]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not (root / "r.csv").exists()
    res = open_result(root / "stack")
    assert res.kind == "stack" and sorted(res.info["runs"]) == sorted(str(p.resolve()) for p in runs.values())
    # the report says which table and tile size each run of the stack came from
    assert run(["report", root / "stack"]) == 0
    md = (root / "stack" / "report" / "report.md").read_text()
    rows = {line.split("|")[2].strip(" `"): line.split("|")[3].strip() for line in md.splitlines()
            if line.startswith("| `train")}
    assert rows == {"train.csv": "100", "train_x2.csv": "200"}, md
