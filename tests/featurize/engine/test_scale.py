"""Past one machine: shards, merge (same bytes as one process), refusals."""
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import cli
from featurize.cache import read_cache
from core.errors import CacheError
from featurize.engine.extract import embed
from featurize.engine.shards import final_of, merge_shards, parse_shard, shard_path, shard_rows
from featurize.tables.table import read_table

KW = dict(random_init=True, batch_size=16, progress=False, num_workers=0)
TIMING = {"created", "completed"}


def run(argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def _same_file(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for d in ("ids", "paths"):  # variable-length strings
            assert list(fa[d].asstr()[()]) == list(fb[d].asstr()[()]), d
        for d in ("digests", "stats", "features", "valid", "done"):
            assert fa[d][()].tobytes() == fb[d][()].tobytes(), d
            assert fa[d].dtype == fb[d].dtype and fa[d].chunks == fb[d].chunks, d
        aa = {k: v for k, v in fa.attrs.items() if k not in TIMING}
        ab = {k: v for k, v in fb.attrs.items() if k not in TIMING}
        # the checksums of the datasets agree; the one over the attributes covers the timings, which differ
        ca, cb = (json.loads(aa.pop("hexpress_checksums")), json.loads(ab.pop("hexpress_checksums")))
        assert {k: v for k, v in ca.items() if k != "__attrs__"} == {k: v for k, v in cb.items() if k != "__attrs__"}
        assert aa.keys() == ab.keys()
        for k in aa:
            assert np.array_equal(aa[k], ab[k]), k


def test_shard_rule_covers_the_rows_on_batch_boundaries():
    for n, b, count in [(48, 16, 3), (100, 16, 4), (7, 16, 3), (1000, 64, 7)]:
        parts = [shard_rows(n, b, i, count) for i in range(count)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(parts[k][1] == parts[k + 1][0] for k in range(count - 1))
        assert all(start % b == 0 for start, _ in parts)
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3"):
        with pytest.raises(Exception, match="I/N"):
            parse_shard(bad)


def test_a_shard_file_names_its_standard_cache():
    """The Ray driver merges the caches its actors name (their device decides the key), not ones it computes."""
    final = Path("/c/tiles/resnet50-0123456789abcdef.h5")
    assert final_of(shard_path(final, 3, 12)) == final
    assert final_of(final) == final


def test_shards_then_merge_give_the_bytes_of_one_process(syn_table, tmp_path):
    one = embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path / "one", **KW)[0]
    outs = [embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path / "sh", shard=(i, 3), **KW)[0] for i in (2, 0, 1)]
    merged = outs[-1]  # the process finishing the last shard merges
    assert merged.name == one.name and merged.exists()
    assert ".shard-" in outs[0].name and ".shard-" in outs[1].name
    _same_file(one, merged)
    assert not list(merged.parent.glob("*.shard-*"))  # merged: the shards (and their locks) are gone
    assert len(read_cache(merged).ids) == 48


def test_merge_refuses_missing_incomplete_foreign_and_mixed_shards(syn_table, tmp_path):
    d = tmp_path / "c"
    a = embed(syn_table, ["timm:test_vit"], cache_dir=d, shard=(0, 2), **KW)[0]
    final = a.with_name(a.name.split(".shard-")[0] + ".h5")
    with pytest.raises(CacheError, match="shard 1 of 2 is missing"):
        merge_shards(final)
    embed(syn_table, ["timm:test_vit"], cache_dir=d, shard=(1, 2), max_batches=1, **KW)
    with pytest.raises(CacheError, match="shard 1 of 2 is incomplete"):
        merge_shards(final)
    # a shard of another sharding left beside: refused, naming the counts
    embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path / "x", shard=(0, 3), **KW)
    other = next((tmp_path / "x").rglob("*.shard-0000-of-0003.h5"))
    shutil.copy(other, final.parent / other.name)
    with pytest.raises(CacheError, match="different counts"):
        merge_shards(final)
    (final.parent / other.name).unlink()
    # a shard cut from another version of the table (one row less) is foreign
    work = tmp_path / "w"
    shutil.copytree(syn_table.parent, work)
    df = pd.read_csv(work / syn_table.name)
    df.iloc[:-1].to_csv(work / syn_table.name, index=False)
    embed(work / syn_table.name, ["timm:test_vit"], cache_dir=tmp_path / "y", shard=(1, 2), **KW)
    foreign = next((tmp_path / "y").rglob("*.shard-0001-of-0002.h5"))
    for p in final.parent.glob("*.shard-0001-of-0002.h5*"):
        p.unlink()
    shutil.copy(foreign, final.parent / foreign.name)
    with pytest.raises(CacheError, match="another table"):
        merge_shards(final)
    assert not final.exists()


def test_cli_shards_and_merge(syn_table, tmp_path, capsys):
    base = ["embed", "--data", syn_table, "--backbone", "timm:test_vit", "--random-init", "--quiet",
            "--cache-dir", tmp_path, "--workers", "0", "--batch-size", "16"]
    assert run([*base, "--shard", "0/2"]) == 0
    assert run([*base, "--shard", "2/2"]) == 2 and "I/N" in capsys.readouterr().err
    # shard 1 interrupted: the manual merge names it; finishing it merges
    embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path, shard=(1, 2), max_batches=1, **KW)
    shard = next(tmp_path.rglob("*.shard-0000-of-0002.h5"))
    assert run(["cache", "merge", shard, "--data", syn_table]) == 2
    assert "shard 1 of 2 is incomplete" in capsys.readouterr().err
    assert run([*base, "--shard", "1/2"]) == 0
    merged = next(p for p in tmp_path.rglob("*.h5") if ".shard-" not in p.name)
    assert run(["cache", "verify", merged]) == 0 and not list(tmp_path.rglob("*.shard-*"))
    # --keep-shards: two complete shards made apart (so neither process merged), merged by hand and kept
    for i in (0, 1):
        embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path / f"part{i}", shard=(i, 2), **KW)
    import shutil as sh

    for f in tmp_path.glob("part*/train-*/*.shard-*.h5"):
        (tmp_path / "k" / f.parent.name).mkdir(parents=True, exist_ok=True)
        sh.copy(f, tmp_path / "k" / f.parent.name / f.name)
    assert run(["cache", "merge", next((tmp_path / "k").rglob("*.shard-0001-of-0002.h5")), "--keep-shards"]) == 0
    assert len(list((tmp_path / "k").rglob("*.shard-*.h5"))) == 2
    _same_file(merged, next(p for p in (tmp_path / "k").rglob("*.h5") if ".shard-" not in p.name))


# ------------------------------------------------------------------ packs
def test_packed_table_reads_the_same_bytes_and_shares_the_cache(syn_table, tmp_path, monkeypatch):
    import tarfile

    assert run(["pack", "--data", syn_table, "--out", tmp_path / "packs", "--tiles-per-pack", "20"]) == 0
    packed = tmp_path / "packs" / syn_table.name
    tars = sorted((tmp_path / "packs").glob("*.tar"))
    assert [t.name for t in tars] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with tarfile.open(tars[0]) as tf:  # WebDataset layout: <key>.<ext>
        names = tf.getnames()
        assert len(names) == 20 and all(n.count(".") == 1 and n.endswith(".png") for n in names)
    t = read_table(packed)
    assert t.packed is not None and len(t) == 48
    # fresh caches: the packed table gives the very bytes of the loose tiles
    loose = embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path / "a", **KW)[0]
    pk = embed(packed, ["timm:test_vit"], cache_dir=tmp_path / "b", **KW)[0]
    assert pk.name == loose.name
    assert read_cache(pk).features.tobytes() == read_cache(loose).features.tobytes()
    with h5py.File(loose) as fa, h5py.File(pk) as fb:
        assert fa["digests"][()].tobytes() == fb["digests"][()].tobytes()  # same content identity
    # the loose table's cache serves the packed table: its rows are copied into the packed table's own folder
    # (two tables never share one file), nothing is embedded
    import featurize.engine.extract as ex

    monkeypatch.setattr(ex, "create_backbone", lambda *a: pytest.fail("re-embedded"))
    shared = embed(packed, ["timm:test_vit"], cache_dir=tmp_path / "a", **KW)[0]
    assert shared.name == loose.name and shared.parent != loose.parent
    assert read_cache(shared).features.tobytes() == read_cache(loose).features.tobytes()
    from featurize.cache import verify_cache

    assert verify_cache(pk, deep=True) == []
    with pytest.raises(Exception, match="another folder"):
        from featurize.tables.pack import pack_table

        pack_table(syn_table, syn_table.parent)


# ------------------------------------------------------------------ heads that stream
def _stream_vs_memory(cls, kw, grouped, seed, attr, constant_gene=False):
    """fit_chunks against fit on the same data: predictions to rounding, the same per-gene choice."""
    rng = np.random.default_rng(seed)
    n, d, g = 540, 24, 9
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 4, d) + rng.uniform(-3, 3, d)
    Y = X[:, :5] @ rng.standard_normal((5, g)) + 2 * rng.standard_normal((n, g)) + 7
    if constant_gene:
        Y[:, 3] = 1.5
    groups = np.repeat(np.arange(6), 90) if grouped else None
    ref = cls(random_state=0, **kw).fit(X, Y, groups=groups)

    def chunks():
        for s in range(0, n, 64):
            yield s, X[s:s + 64], Y[s:s + 64]

    got = cls(random_state=0, **kw).fit_chunks(chunks, n, groups=groups)
    pr = ref.predict(X)
    assert np.abs(got.predict(X) - pr).max() <= 1e-5 * np.abs(pr).max()
    np.testing.assert_array_equal(np.atleast_1d(getattr(ref, attr)), np.atleast_1d(getattr(got, attr)))
    return got


@pytest.mark.parametrize("kw", [{}, {"scoring": "pcc"}, {"standardize": False}, {"alpha_per_target": False},
                                {"alphas": (3.0,)}, {"cv": 3}])
@pytest.mark.parametrize("grouped", [False, True])
def test_streaming_ridge_equals_the_in_memory_fit(kw, grouped):
    from regress.heads.ridge import RidgeHead

    got = _stream_vs_memory(RidgeHead, kw, grouped, 1, "alpha_", constant_gene=True)
    assert list(got.constant_targets_) == [3]


@pytest.mark.parametrize("kw", [{}, {"scoring": "pcc"}, {"n_components": 4}, {"scale": False}])
@pytest.mark.parametrize("grouped", [False, True])
def test_streaming_pls_equals_the_in_memory_fit(kw, grouped):
    from regress.heads.pls import PLSHead

    _stream_vs_memory(PLSHead, kw, grouped, 2, "n_components_")


def test_streaming_ridge_refuses_what_it_does_not_do():
    from core.errors import UsageError
    from regress.heads.ridge import RidgeHead

    X, Y = np.zeros((10, 20)), np.zeros((10, 2))
    chunks = lambda: iter([(0, X, Y)])  # noqa: E731
    for kw in ({"cv": "gcv"}, {"n_components": 5}, {"fit_intercept": False}):
        with pytest.raises(UsageError, match="streaming"):
            RidgeHead(**kw).fit_chunks(chunks, 10)
    with pytest.raises(UsageError, match="more rows than features"):
        RidgeHead().fit_chunks(chunks, 10)
    with pytest.raises(UsageError, match="hold 10 rows, not 11"):
        RidgeHead().fit_chunks(chunks, 11)


def test_fit_stream_writes_a_run_like_the_in_memory_fit(tmp_path):
    """fit --stream: the same folds, nested alphas, metrics from sums; the run folder has the usual contents."""
    from featurize.synthetic import make_synthetic_table
    from regress.runs.folder import load_run

    table = make_synthetic_table(tmp_path / "d", n=160, n_genes=6, size=32, name="train", seed=3)
    cache_dir = tmp_path / "cache"
    embed(table, ["timm:test_vit"], cache_dir=cache_dir, **KW)
    base = ["fit", "--data", table, "--backbone", "timm:test_vit", "--cache-dir", cache_dir, "--folds", "4",
            "--device", "cpu", "--groups", "none"]
    assert run([*base, "--runs-dir", tmp_path / "mem"]) == 0
    assert run([*base, "--runs-dir", tmp_path / "str", "--stream"]) == 0
    a = load_run(tmp_path / "mem" / "train-timm_test_vit-ridge")
    b = load_run(tmp_path / "str" / "train-timm_test_vit-ridge")
    assert b.info["streamed"] and b.info["genes"] == a.info["genes"]
    da, db = a.data(), b.data()
    np.testing.assert_array_equal(da.ids, db.ids)
    np.testing.assert_array_equal(da.fold, db.fold)  # the same outer folds
    np.testing.assert_allclose(da.y, db.y)
    # metrics from running sums equal metrics from arrays (on the streamed predictions)
    from regress.metrics import evaluate, evaluate_by_fold

    ref = evaluate(db.y, db.oof, b.genes)
    ref.update(evaluate_by_fold(db.y, db.oof, db.fold))
    for k in ("pcc_gene_mean", "pcc_gene_median", "pcc_tile_mean", "mse", "pcc_gene_mean_by_fold"):
        assert b.metrics[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    # the streamed refit = the in-memory ridge on all rows with its alphas chosen over the same (outer) folds
    from sklearn.model_selection import PredefinedSplit

    from regress.heads.ridge import RidgeHead

    X = read_cache(next(p for p in cache_dir.glob("train-*/timm_test_vit-*.h5") if ".shard-" not in p.name)).features
    ref_model = RidgeHead(cv=PredefinedSplit(db.fold)).fit(X, db.y)
    pr = ref_model.predict(X)
    assert np.abs(b.model().predict(X) - pr).max() <= 1e-4 * np.abs(pr).max()
    assert run(["report", tmp_path / "str" / "train-timm_test_vit-ridge"]) == 0
    assert run([*base, "--runs-dir", tmp_path / "p", "--stream", "--head", "pls"]) == 0
    assert run([*base, "--runs-dir", tmp_path / "x", "--stream", "--head", "mlp"]) == 2


def test_engine_ray_without_ray_is_one_line_saying_how_to_install(syn_table, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert run(["embed", "--data", syn_table, "--backbone", "timm:test_vit", "--random-init", "--engine", "ray",
                "--cache-dir", tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[ray]"' in err
    assert run(["embed", "--data", syn_table, "--backbone", "timm:test_vit", "--shards", "3", "--cache-dir",
                tmp_path]) == 2 and "--engine ray" in capsys.readouterr().err
