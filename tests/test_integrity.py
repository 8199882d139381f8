"""Nothing silently wrong under damage, races or odd input (issue 25).

Every case here was reproducible on the code before this change (a command exiting 0 with wrong numbers, a
traceback, a hang); each test asserts the fixed behaviour: one ``error:`` line and exit 2, a refusal naming
the file, or a rebuild - never exit 0 with numbers from a damaged or foreign file.  Fault injection goes
through the named points of :mod:`core.faults` (SIGKILL or a pause inside the writers).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import rewrite_info, run, small_world

from featurize.synthetic import make_synthetic_table

ROOT = Path(__file__).resolve().parents[1]
BB = "timm:test_vit"




def sub(argv, env=None, timeout=120, **kw):
    """The CLI in its own process (what a kill or a race needs)."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT, **kw)


def one_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("integrity"))


def fit(world, runs, *extra, data=None):
    root, train, _, cache = world
    return run(["fit", "--data", data or train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", runs,
                "--folds", "4", "--device", "cpu", *extra])


def the_cache(cache: Path) -> Path:
    return next(p for p in cache.glob("train-*/*.h5") if ".shard-" not in p.name)


def copy_cache(world, tmp_path) -> tuple[Path, Path]:
    """A private copy of the cache dir (so a test may damage it) and its cache file."""
    dst = tmp_path / "cache"
    shutil.copytree(world[3], dst)
    return dst, the_cache(dst)


def data_offsets(path: Path, name: str) -> list[int]:
    """Byte offsets of a dataset's stored data in the file (first chunk or contiguous block)."""
    with h5py.File(path, "r") as fh:
        ds = fh[name]
        if ds.chunks:
            info = ds.id.get_chunk_info(0)
            return [info.byte_offset, info.byte_offset + info.size // 2, info.byte_offset + info.size - 1]
        off = ds.id.get_offset()
        size = ds.id.get_storage_size()
        return [off, off + size // 2, off + size - 1] if off is not None else []


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x5A]))


# ============================================================== 1. a stack whose member was refitted since
def test_stack_refuses_a_member_refitted_since_and_report_says_so(world, tmp_path, capsys):
    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0 and fit(world, runs, "--head", "pls") == 0
    assert run(["stack", "--all", train, "--runs-dir", runs]) == 0
    stack = runs / "stack-train"
    p1 = tmp_path / "p1.csv"
    assert run(["predict", stack, "--data", test, "--cache-dir", tmp_path / "tc", "--out", p1, "--device", "cpu"]) == 0
    assert fit(world, runs, "--head", "pls", "--head-param", "n_components=1", "--overwrite") == 0
    capsys.readouterr()
    p2 = tmp_path / "p2.csv"
    assert run(["predict", stack, "--data", test, "--cache-dir", tmp_path / "tc", "--out", p2, "--device", "cpu"]) == 2
    err = one_error(capsys.readouterr().err)
    assert "train-timm_test_vit-pls" in err and "refitted" in err and "rerun `python cli.py stack`" in err
    assert not p2.exists()
    assert run(["report", stack]) == 0
    assert "refitted since the stack was made" in (stack / "report" / "report.md").read_text()


def test_a_same_settings_refit_keeps_the_stack_usable(world, tmp_path):
    """A deterministic refit with the same settings writes the same predictions and model: the stack still serves."""
    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0 and fit(world, runs, "--head", "pls") == 0
    assert run(["stack", "--all", train, "--runs-dir", runs]) == 0
    assert fit(world, runs, "--head", "pls") == 0  # same identity, same bytes of oof.h5 and the model
    out = tmp_path / "p.csv"
    assert run(["predict", runs / "stack-train", "--data", test, "--cache-dir", tmp_path / "tc", "--out", out,
                "--device", "cpu"]) == 0


# ============================================================== 2. two fits of one name, different settings
def test_two_fits_of_one_name_never_replace_each_other(world, tmp_path):
    root, train, test, cache = world
    runs = tmp_path / "runs"
    base = ["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", runs, "--folds", "4",
            "--device", "cpu", "--name", "same"]
    slow = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, base), "--seed", "1"], cwd=ROOT,
                            env={**os.environ, "HEXPRESS_PAUSE": "run-before-swap:6"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    fast = sub(base + ["--seed", "2"])
    assert fast.returncode == 0, fast.stderr
    identity = json.loads((runs / "same" / "run.json").read_text())["identity"]
    _, err = slow.communicate(timeout=120)
    assert slow.returncode == 2 and "already holds a run with other settings" in one_error(err)
    assert json.loads((runs / "same" / "run.json").read_text())["identity"] == identity  # the finished run stays
    assert not [p for p in runs.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ============================================================== 3. a re-cut killed mid-way
def test_a_killed_re_cut_never_leaves_an_old_table_over_new_tiles(tmp_path):
    from conftest import fake_st as _fake_st

    from featurize.tables.table import read_table

    _fake_st(tmp_path / "st")
    out = tmp_path / "out"
    common = ["tiles", "st", tmp_path / "st", "--out", out, "--name", "t", "--out-px", "16", "--genes", "5",
              "--min-spots", "0"]
    assert run(common + ["--tile-px", "100"]) == 0
    before = read_table(out / "t.csv")
    pixels = {i: Path(p).read_bytes() for i, p in zip(before.ids, before.paths)}
    killed = sub(common + ["--tile-px", "200"], env={"HEXPRESS_FAULT": "table-after-tiles"})
    assert killed.returncode == -signal.SIGKILL
    again = read_table(out / "t.csv")  # the old table is still whole and its tiles untouched
    assert json.loads((out / "t.json").read_text())["slides"]["A1"]["tile_px"] == pytest.approx(100)
    assert all(Path(p).read_bytes() == pixels[i] for i, p in zip(again.ids, again.paths))
    killed = sub(common + ["--tile-px", "200"], env={"HEXPRESS_FAULT": "table-between-sidecar-and-table"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "t.csv").exists()  # no table that looks complete beside the new sidecar
    assert run(common + ["--tile-px", "200"]) == 0
    new = read_table(out / "t.csv")
    assert json.loads((out / "t.json").read_text())["slides"]["A1"]["tile_px"] == pytest.approx(200)
    assert {Path(p).parent for p in new.paths}.isdisjoint({Path(p).parent for p in before.paths})
    assert not any(p.exists() for p in before.paths)  # the old cut's tiles are removed once nothing points at them
    assert len(list((out / "tiles").iterdir())) == 1


# ============================================================== 4. checksums on every cache read
@pytest.mark.parametrize("dataset", ["features", "valid", "done", "digests", "ids", "stats", "paths"])
def test_a_flipped_byte_in_any_cache_dataset_is_refused_by_fit_and_verify_and_rebuilt_by_embed(world, tmp_path, dataset,
                                                                                              capsys):
    root, train, test, _ = world
    cache, f = copy_cache(world, tmp_path)
    offsets = data_offsets(f, dataset)
    assert offsets
    flip(f, offsets[1])
    capsys.readouterr()
    assert run(["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tmp_path / "r",
                "--folds", "4"]) == 2
    err = one_error(capsys.readouterr().err)
    assert str(f) in err and ("checksum" in err or "damaged" in err)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    assert run(["cache", "verify", f]) == 1
    out = capsys.readouterr().out
    assert "checksum" in out or "damaged" in out
    assert run(["embed", "--data", train, "--backbone", BB, "--random-init", "--cache-dir", cache, "--workers", "0",
                "--quiet"]) == 0
    assert "damaged" in capsys.readouterr().err
    assert run(["cache", "verify", the_cache(cache)]) == 0
    with h5py.File(the_cache(world[3])) as a, h5py.File(the_cache(cache)) as b:  # rebuilt to the same numbers
        assert np.array_equal(a["features"][()], b["features"][()])


def test_verify_and_fit_agree_on_a_damaged_attribute(world, tmp_path, capsys):
    root, train, _, _ = world
    cache, f = copy_cache(world, tmp_path)
    with h5py.File(f, "r+") as fh:
        fh.attrs["tta"] = 8  # edited by hand: the checksum over the attributes catches it
    assert run(["cache", "verify", f]) in (1, 2)
    out = capsys.readouterr()
    assert "attributes do not match their checksum" in out.out + out.err
    assert fit(world, tmp_path / "r", data=None) == 0  # the world's own cache is untouched
    assert run(["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tmp_path / "r2"]) == 2
    assert "checksum" in one_error(capsys.readouterr().err)


def test_a_damaged_complete_attribute_is_called_damaged_not_missing(world, tmp_path, capsys):
    root, train, _, _ = world
    cache, f = copy_cache(world, tmp_path)
    with h5py.File(f, "r+") as fh:
        fh.attrs["complete"] = False
    assert run(["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tmp_path / "r"]) == 2
    err = one_error(capsys.readouterr().err)
    assert "damaged" in err and "no cache" not in err


def test_a_cache_from_before_checksums_still_loads_with_a_warning_and_embed_seals_it(world, tmp_path, capsys):
    from core.integrity import CHECKSUMS

    root, train, _, _ = world
    cache, f = copy_cache(world, tmp_path)
    with h5py.File(f, "r+") as fh:
        del fh.attrs[CHECKSUMS]
    capsys.readouterr()
    assert run(["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tmp_path / "r",
                "--folds", "4"]) == 0
    assert "written before hexpress stored checksums" in capsys.readouterr().err
    assert run(["cache", "verify", f]) == 1
    assert run(["embed", "--data", train, "--backbone", BB, "--random-init", "--cache-dir", cache, "--workers", "0",
                "--quiet"]) == 0
    assert "copying its rows into a checksummed file" in capsys.readouterr().err
    assert run(["cache", "verify", the_cache(cache)]) == 0


# ============================================================== 5. storage outside the file
@pytest.mark.parametrize("how", ["external-link", "soft-link", "virtual", "external-raw"])
def test_hdf5_data_outside_the_file_is_refused(world, tmp_path, how, capsys):
    root, train, _, _ = world
    cache, f = copy_cache(world, tmp_path)
    with h5py.File(f, "r+") as fh:
        feats = fh["features"][()]
        del fh["features"]
        other = tmp_path / "other.h5"
        with h5py.File(other, "w") as o:
            o["features"] = feats
        if how == "external-link":
            fh["features"] = h5py.ExternalLink(str(other), "features")
        elif how == "soft-link":
            fh["real"] = feats
            fh["features"] = h5py.SoftLink("/real")
        elif how == "virtual":
            layout = h5py.VirtualLayout(shape=feats.shape, dtype=feats.dtype)
            layout[:] = h5py.VirtualSource(str(other), "features", shape=feats.shape)
            fh.create_virtual_dataset("features", layout)
        else:
            raw = tmp_path / "passwd.bin"
            raw.write_bytes(feats.tobytes())
            fh.create_dataset("features", shape=feats.shape, dtype=feats.dtype, external=[(str(raw), 0, feats.nbytes)])
    capsys.readouterr()
    assert run(["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tmp_path / "r"]) == 2
    assert "hexpress reads only plain datasets" in one_error(capsys.readouterr().err)
    assert run(["cache", "verify", f]) in (1, 2)
    out = capsys.readouterr()
    assert "plain datasets" in out.out + out.err


def test_an_oof_file_with_an_external_link_is_refused(world, tmp_path, capsys):
    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    folder = runs / "train-timm_test_vit-ridge"
    with h5py.File(folder / "oof.h5", "r+") as fh:
        y = fh["y"][()]
        del fh["y"]
        with h5py.File(tmp_path / "y.h5", "w") as o:
            o["y"] = y
        fh["y"] = h5py.ExternalLink(str(tmp_path / "y.h5"), "y")
    from core.errors import RunError
    from regress.runs.folder import load_run, manifest

    info = json.loads((folder / "run.json").read_text())
    info["files"] = manifest(folder)  # as a crafted folder would: the manifest agrees, the storage check refuses
    rewrite_info(folder, info)
    with pytest.raises(RunError, match="plain datasets"):
        load_run(folder).data()


# ============================================================== 6. garbage as targets or settings
def test_non_gene_columns_and_duplicate_headers_are_refused(tmp_path):
    from core.errors import TableError
    from featurize.tables.table import read_table

    t = make_synthetic_table(tmp_path, n=8, n_genes=3, size=16)
    df = pd.read_csv(t)
    for col, values, what in (("when", pd.date_range("2020-01-01", periods=8), "dates"),
                              ("flag", [True, False] * 4, "true/false")):
        pq = tmp_path / f"{col}.parquet"
        df.assign(**{col: values}).to_parquet(pq)
        with pytest.raises(TableError, match=f"column '{col}' holds {what}"):
            read_table(pq)
    text = t.read_text().splitlines()
    text[0] = text[0].replace("GENE001", "GENE000")
    dup = tmp_path / "dup.csv"
    dup.write_text("\n".join(text) + "\n")
    with pytest.raises(TableError, match="column 'GENE000' appears twice"):
        read_table(dup)
    big = tmp_path / "big.csv"
    df.assign(GENE000=[1e39] + [1.0] * 7).to_csv(big, index=False)
    with pytest.raises(TableError, match="beyond what float32 holds"):
        read_table(big)


@pytest.mark.parametrize("argv, words", [
    (["stack", "{a}", "{b}", "--method", "ridge", "--alpha", "-1"], "--alpha -1"),
    (["stack", "{a}", "{b}", "--method", "ridge", "--alpha", "nan"], "--alpha nan"),
    (["fit", "--data", "{train}", "--backbone", BB, "--cache-dir", "{cache}", "--context", "-1"], "--context -1"),
    (["fit", "--data", "{train}", "--backbone", BB, "--cache-dir", "{cache}", "--folds", "0"], "--folds 0"),
    (["fit", "--data", "{train}", "--backbone", BB, "--cache-dir", "{cache}", "--folds", "1"], "--folds 1"),
    (["fit", "--data", "{train}", "--backbone", BB, "--cache-dir", "{cache}", "--folds", "-3"], "--folds -3"),
    (["embed", "--data", "{train}", "--backbone", "efficientnet_lite0@0", "--cache-dir", "{tmp}/c"], "input size 0"),
    (["embed", "--data", "{train}", "--backbone", BB, "--random-init", "--workers", "-1", "--cache-dir", "{tmp}/c"],
     "--workers -1"),
    (["embed", "--data", "{train}", "--backbone", BB, "--random-init", "--cache-dir", "{train}"], "is a file"),
    (["fit", "--data", "{train}", "--backbone", BB, "--cache-dir", "{train}"], "is a file"),
    (["predict-slide", "{a}", "{train}", "--out", "{tmp}/s.h5ad", "--mpp", "nan"], "--mpp nan"),
])
def test_bad_values_are_one_error_line_and_write_nothing(world, tmp_path_factory, argv, words, capsys):
    root, train, test, cache = world
    runs = tmp_path_factory.mktemp("bv_runs")
    if not (runs / "a").exists():
        assert fit(world, runs, "--name", "a") == 0 and fit(world, runs, "--head", "pls", "--name", "b") == 0
    tmp = tmp_path_factory.mktemp("bv")
    subs = {"{a}": runs / "a", "{b}": runs / "b", "{train}": train, "{cache}": cache, "{tmp}": tmp}
    argv = [next((a.replace(k, str(v)) for k, v in subs.items() if k in a), a) for a in argv]
    capsys.readouterr()
    assert run(argv + ["--runs-dir", tmp / "r"] if argv[0] == "fit" else argv) == 2
    assert words in one_error(capsys.readouterr().err)
    assert not any(tmp.rglob("*.h5")) and not any(tmp.rglob("*.h5ad")) and not (tmp / "r").exists()


def test_context_needs_numeric_finite_positions(world, tmp_path, capsys):
    root, train, test, cache = world
    df = pd.read_csv(train)
    for name, x in (("text", ["left"] + df["x"].astype(str).tolist()[1:]), ("nan", [np.nan] + df["x"].tolist()[1:])):
        t = train.parent / f"train_{name}.csv"
        df.assign(x=x).to_csv(t, index=False)
        shutil.copytree(the_cache(cache).parent, cache / t.stem, dirs_exist_ok=True)  # same rows: the caches serve
        capsys.readouterr()
        assert run(["fit", "--data", t, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tmp_path / "r",
                    "--context", "2", "--folds", "4"]) == 2
        err = one_error(capsys.readouterr().err)
        assert ("holds text 'left'" in err) if name == "text" else ("has none (empty or NaN)" in err)


# ============================================================== 7. disk full
@pytest.fixture()
def tiny_disk(tmp_path):
    """A 12 MB tmpfs (root only; skipped otherwise)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a disk-full test mounts a small tmpfs, which needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int) -> None:
    """Fill the tmpfs up to ``leave`` bytes free."""
    free = shutil.disk_usage(mnt).free
    with open(mnt / "ballast", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_disk_full_is_one_error_line_for_embed_fit_and_predict(world, tiny_disk, tmp_path):
    root, train, test, cache = world
    big = make_synthetic_table(tmp_path / "big", n=300, n_genes=5, size=48, name="train", seed=4)
    # embed into a nearly full disk: one error line naming the file, no crash, nothing that looks complete
    shutil.copytree(cache, tiny_disk / "cache")
    fill(tiny_disk, 150_000)
    r = sub(["embed", "--data", big, "--backbone", BB, "--random-init", "--cache-dir", tiny_disk / "cache",
             "--workers", "0", "--quiet"])
    assert r.returncode == 2, r.stderr
    err = one_error(r.stderr)
    assert ".h5" in err and ("space" in err or "No space" in err)
    assert run(["cache", "verify", the_cache(tiny_disk / "cache")]) == 0  # the previous good cache is untouched
    (tiny_disk / "ballast").unlink()
    # fit with its run folder on the full disk
    fill(tiny_disk, 20_000)
    r = sub(["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tiny_disk / "runs",
             "--folds", "4"])
    assert r.returncode == 2, r.stderr
    assert "free disk space" in one_error(r.stderr)
    assert not [p for p in (tiny_disk / "runs").iterdir() if not p.name.endswith(".lock")] \
        if (tiny_disk / "runs").exists() else True
    (tiny_disk / "ballast").unlink()
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    for out in ("pred.csv", "pred.h5ad"):
        fill(tiny_disk, 2_000)
        r = sub(["predict", runs / "train-timm_test_vit-ridge", "--data", test, "--cache-dir", tmp_path / "tc",
                 "--out", tiny_disk / out, "--device", "cpu"])
        assert r.returncode == 2, r.stderr
        assert "free disk space" in one_error(r.stderr) and out in r.stderr
        assert not [p for p in tiny_disk.iterdir() if p.is_file() and p.name != "ballast"]  # no output, no temp file
        (tiny_disk / "ballast").unlink()


# ============================================================== 8. damaged HDF5 metadata
def test_damaged_hdf5_metadata_is_damaged_for_fit_and_verify_and_embed_rebuilds(world, tmp_path, capsys):
    root, train, _, _ = world
    cache, f = copy_cache(world, tmp_path)
    raw = bytearray(f.read_bytes())
    start = 96  # past the superblock: the root group's object header and the heaps
    raw[start:start + 512] = bytes(512)
    f.write_bytes(bytes(raw))
    capsys.readouterr()
    assert run(["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", tmp_path / "r"]) == 2
    assert "damaged" in one_error(capsys.readouterr().err)
    rc = run(["cache", "verify", f])
    out = capsys.readouterr()
    assert rc in (1, 2) and "damaged" in out.out + out.err and "Traceback" not in out.err
    assert run(["cache", "info", f]) == 2
    assert "damaged" in one_error(capsys.readouterr().err)
    assert run(["embed", "--data", train, "--backbone", BB, "--random-init", "--cache-dir", cache, "--workers", "0",
                "--quiet"]) == 0
    assert run(["cache", "verify", the_cache(cache)]) == 0


# ============================================================== 9. damaged run files
@pytest.fixture()
def one_run(world, tmp_path):
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    return runs / "train-timm_test_vit-ridge"


def reseal(folder: Path, info: dict | None = None) -> None:
    """Re-seal a run after a deliberate edit (as a crafted folder would), so the schema checks are what refuse it."""
    from regress.runs.folder import manifest

    info = info or json.loads((folder / "run.json").read_text())
    info["files"] = manifest(folder)
    rewrite_info(folder, info)


@pytest.mark.parametrize("damage, words", [
    ("truncate-npz", "does not match the checksum"),
    ("truncate-npz-resealed", "unreadable model arrays"),
    ("genes-5", "'genes' is int"),
    ("no-backbones", "has no 'backbones'"),
    ("no-table", "has no 'table'"),
    ("invalid-json", "is not valid JSON"),
    ("model-no-params", "'params' is missing"),
    ("model-unknown-param", "parameter 'bogus' is not one of RidgeHead's"),
    ("model-shadows-method", "state 'predict' is not a fitted attribute"),
    ("oof-nan", "holds NaN or inf"),
    ("oof-flipped", "does not match the checksum"),
])
def test_damaged_run_files_are_one_error_line(world, one_run, damage, words, capsys, tmp_path):
    root, train, test, cache = world
    f = one_run
    info = json.loads((f / "run.json").read_text())
    if damage.startswith("truncate-npz"):
        (f / "model.npz").write_bytes((f / "model.npz").read_bytes()[:100])
        if damage.endswith("resealed"):
            reseal(f)
    elif damage == "genes-5":
        reseal(f, {**info, "genes": 5})
    elif damage in ("no-backbones", "no-table"):
        info.pop(damage[3:])
        reseal(f, info)
    elif damage == "invalid-json":
        (f / "run.json").write_text((f / "run.json").read_text()[:-30])
    elif damage.startswith("model-"):
        doc = json.loads((f / "model.json").read_text())
        if damage == "model-no-params":
            doc.pop("params")
        elif damage == "model-unknown-param":
            doc["params"]["bogus"] = 1
        else:
            doc["state"]["predict"] = 1
        (f / "model.json").write_text(json.dumps(doc))
        reseal(f)
    elif damage == "oof-nan":
        with h5py.File(f / "oof.h5", "r+") as fh:
            fh["oof"][3, 1] = np.nan
        reseal(f)
    else:
        with h5py.File(f / "oof.h5", "r+") as fh:
            fh["y"][2, 0] += 1.0
    capsys.readouterr()
    commands = [["predict", f, "--data", test, "--cache-dir", tmp_path / "tc", "--out", tmp_path / "p.csv",
                 "--device", "cpu"], ["report", f], ["stack", f, f, "--out", tmp_path / "s"]]
    for argv in commands:
        rc = run(argv)
        err = capsys.readouterr().err
        if damage.startswith("model-") and argv[0] in ("report", "stack"):  # they never read the model
            continue
        if damage.startswith("truncate-npz") and argv[0] in ("report", "stack"):
            continue
        assert rc == 2, (argv[0], err)
        assert words in one_error(err), (argv[0], err)
        assert "format None" not in err
    assert not (tmp_path / "p.csv").exists()
    if not damage.startswith(("model-", "truncate-npz")):  # the stack never reads the model files
        assert not (tmp_path / "s").exists()


def test_stack_all_skips_and_names_a_damaged_run(world, tmp_path, capsys):
    root, train, test, cache = world
    runs = tmp_path / "runs"
    for head in ("ridge", "pls", "knn"):
        assert fit(world, runs, "--head", head) == 0
    (runs / "train-timm_test_vit-knn" / "run.json").write_text("{ not json")
    capsys.readouterr()
    assert run(["stack", "--all", train, "--runs-dir", runs]) == 0
    err = capsys.readouterr().err
    assert "skipped a damaged run" in err and "train-timm_test_vit-knn" in err
    members = json.loads((runs / "stack-train" / "stack.json").read_text())["runs"]
    assert len(members) == 2 and not any("knn" in m for m in members)


# ============================================================== 11. unbounded reads
def test_dev_zero_a_fifo_and_a_huge_pack_member_are_refused_by_row(world, tmp_path, capsys):
    root, train, test, cache = world
    df = pd.read_csv(train)
    fifo = tmp_path / "tile.png"
    os.mkfifo(fifo)
    for bad in ("/dev/zero", str(fifo)):
        t = train.parent / "odd.csv"
        df.assign(path=[bad] + df["path"].tolist()[1:]).to_csv(t, index=False)
        r = sub(["embed", "--data", t, "--backbone", BB, "--random-init", "--cache-dir", tmp_path / "c",
                 "--workers", "0", "--quiet"], timeout=60)
        assert r.returncode == 2, r.stderr
        err = one_error(r.stderr)
        assert bad in err and ("not a regular" in err)
        r = sub(["embed", "--data", t, "--backbone", BB, "--random-init", "--cache-dir", tmp_path / "c",
                 "--workers", "0", "--quiet", "--skip-bad"], timeout=60)
        assert r.returncode == 0, r.stderr
    # a packed row claiming a terabyte
    packed = tmp_path / "packed"
    assert run(["pack", "--data", train, "--out", packed, "--tiles-per-pack", "16"]) == 0
    pt = next(packed.glob("*.csv"))
    pdf = pd.read_csv(pt)
    pdf.loc[0, "pack_size"] = 10**12
    pdf.to_csv(pt, index=False)
    r = sub(["embed", "--data", pt, "--backbone", BB, "--random-init", "--cache-dir", tmp_path / "c2",
             "--workers", "0", "--quiet"], timeout=60)
    assert r.returncode == 2 and "over the" in one_error(r.stderr)


# ============================================================== 12. cache merge takes the lock
def test_cache_merge_waits_for_the_cache_lock(world, tmp_path):
    from featurize.engine.extract import final_cache_paths
    from featurize.tables.table import read_table

    root, train, test, cache = world
    c = tmp_path / "c"
    final = final_cache_paths(read_table(train), [BB], random_init=True, cache_dir=c)[0]
    final.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from pathlib import Path\nfrom core.lock import file_lock\n"
        "with file_lock(Path(%r)):\n    print('held', flush=True); time.sleep(10)") % (str(ROOT), str(final) + ".lock")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    for i in range(2):  # the last shard cannot merge while another process holds the cache: it leaves the shards
        assert run(["embed", "--data", train, "--backbone", BB, "--random-init", "--cache-dir", c, "--workers", "0",
                    "--quiet", "--shard", f"{i}/2", "--batch-size", "8"]) == 0
    assert not final.exists()
    shard = next(c.glob("train-*/*.shard-*.h5"))
    r = sub(["cache", "merge", shard])
    assert r.returncode == 2 and "another hexpress process" in one_error(r.stderr)
    holder.wait(timeout=30)
    r = sub(["cache", "merge", shard])
    assert r.returncode == 0, r.stderr
    assert run(["cache", "verify", final]) == 0


# ============================================================== 13. messages and leftovers
def test_image_errors_name_the_file_not_a_buffer(tmp_path):
    from core.errors import ImageError
    from featurize.tables.images import load_rgb

    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageError) as exc:
        load_rgb(bad, bad.read_bytes())
    assert str(bad) in str(exc.value) and "BytesIO" not in str(exc.value)


def test_a_directory_given_to_cache_info_is_named_as_a_directory(tmp_path, capsys):
    assert run(["cache", "info", tmp_path]) == 2
    assert "is a directory" in one_error(capsys.readouterr().err)


def test_no_cache_is_said_before_a_wide_table_is_read(tmp_path, monkeypatch, capsys):
    import regress.training

    t = make_synthetic_table(tmp_path, n=4, n_genes=2, size=16)
    monkeypatch.setattr(regress.training, "read_table", lambda *a, **k: pytest.fail("read the table first"))
    assert run(["fit", "--data", t, "--backbone", BB, "--cache-dir", tmp_path / "none", "--runs-dir", tmp_path / "r",
                "--folds", "2"]) == 2
    assert "no cache for backbone" in one_error(capsys.readouterr().err)


# -------------------------------------------------------------- fault injection inside the writers
@pytest.mark.parametrize("point", ["run-before-swap", "run-between-renames", "run-after-swap"])
@pytest.mark.parametrize("what", ["fit", "stack"])
def test_a_writer_killed_anywhere_leaves_the_old_or_the_new_result_never_none(world, tmp_path, point, what):
    from regress.runs.folder import open_result

    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0 and fit(world, runs, "--head", "pls") == 0
    if what == "stack":
        assert run(["stack", "--all", train, "--runs-dir", runs]) == 0
        folder = runs / "stack-train"
        argv = ["stack", "--all", train, "--runs-dir", runs, "--method", "select", "--overwrite"]
    else:
        folder = runs / "train-timm_test_vit-ridge"
        argv = ["fit", "--data", train, "--backbone", BB, "--cache-dir", cache, "--runs-dir", runs, "--folds", "4",
                "--seed", "5", "--overwrite"]
    before = json.loads((folder / f"{what if what == 'stack' else 'run'}.json").read_text())["identity"]
    r = sub(argv, env={"HEXPRESS_FAULT": point})
    assert r.returncode == -signal.SIGKILL
    res = open_result(folder)  # recovers a kill between the renames; always a finished result under the name
    res.data(), res.model()
    now = res.info["identity"]
    assert now != before if point in ("run-between-renames", "run-after-swap") else now == before
    assert not [p for p in runs.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_killed_merge_leaves_no_cache_and_the_next_merge_finishes(world, tmp_path):
    root, train, test, cache = world
    c = tmp_path / "c"
    env = {"HEXPRESS_FAULT": "merge-mid"}
    for i in range(2):
        r = sub(["embed", "--data", train, "--backbone", BB, "--random-init", "--cache-dir", c, "--workers", "0",
                 "--quiet", "--shard", f"{i}/2", "--batch-size", "8"], env=env)
    assert r.returncode == -signal.SIGKILL  # the last shard's process was merging
    assert not [p for p in c.glob("train-*/*.h5") if ".shard-" not in p.name]
    shard = next(c.glob("train-*/*.shard-*.h5"))
    assert run(["cache", "merge", shard]) == 0
    assert run(["cache", "verify", the_cache(c)]) == 0


# -------------------------------------------------------------- bit flips across every file a command reads
def test_bit_flips_in_a_cache_an_oof_and_a_model_never_give_numbers(world, tmp_path):
    """One byte flipped at a few offsets of each dataset (and anywhere in oof.h5 / model.npz): every command that
    reads the file refuses it or rebuilds it; a command that still exits 0 must give the original numbers."""
    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    folder = runs / "train-timm_test_vit-ridge"
    ref = tmp_path / "ref.csv"
    assert run(["predict", folder, "--data", test, "--cache-dir", tmp_path / "tc", "--out", ref, "--device", "cpu"]) == 0
    expected = pd.read_csv(ref)
    tried = refused = 0
    # the cache
    with h5py.File(the_cache(cache)) as fh:
        names = list(fh)
    for name in names:
        for k in range(3):
            c, f = copy_cache(world, tmp_path / f"{name}{k}")
            flip(f, data_offsets(f, name)[k])
            tried += 1
            rc = run(["fit", "--data", train, "--backbone", BB, "--cache-dir", c, "--runs-dir", tmp_path / f"r{name}{k}",
                      "--folds", "4"])
            assert rc == 2, (name, k)
            refused += 1
    # the run's own files
    for fname in ("oof.h5", "model.npz", "model.json", "metrics.json"):
        size = (folder / fname).stat().st_size
        for off in (0, size // 3, size // 2, size - 1):
            work = tmp_path / f"w-{fname}-{off}"
            shutil.copytree(folder, work)
            flip(work / fname, off)
            tried += 1
            out = tmp_path / f"p-{fname}-{off}.csv"
            rc = run(["predict", work, "--data", test, "--cache-dir", tmp_path / "tc", "--out", out, "--device", "cpu"])
            if rc == 0:
                got = pd.read_csv(out)
                assert fname in ("oof.h5",) and np.allclose(got.drop(columns="ID"), expected.drop(columns="ID"))
            else:
                refused += 1
                assert rc == 2 and not out.exists()
            assert run(["report", work]) == 2 or fname == "model.npz" or fname == "model.json"
    assert refused == tried
