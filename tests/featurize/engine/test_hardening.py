"""Faults: SIGKILL mid-embed, concurrent writers, disk full, interrupted fit; fuzzing the loaders."""
import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from featurize.cache import read_cache
from core.errors import CacheError, HexpressError, RunError
from featurize.engine.extract import embed
from featurize.tables.images import load_rgb
from featurize.synthetic import make_synthetic_table
from featurize.tables.table import read_table
from regress.runs.folder import load_run

ROOT = Path(__file__).resolve().parents[3]
KW = dict(batch_size=16, progress=False, num_workers=0)


@pytest.fixture(scope="module")
def big_table(tmp_path_factory):
    """160 tiles at 224 px: efficientnet_lite0 takes several seconds, long enough to kill mid-run."""
    return make_synthetic_table(tmp_path_factory.mktemp("big"), n=160, n_genes=3, size=224, name="big")


def _embed_cmd(table, cache_dir, *extra):
    return [sys.executable, str(ROOT / "cli.py"), "embed", "--data", str(table), "--backbone", "efficientnet_lite0",
            "--cache-dir", str(cache_dir), "--batch-size", "16", "--workers", "0", *extra]  # not --quiet: the tests read its lines


def _wait_for_progress(cache_dir: Path, proc, min_bytes: int = 200_000, timeout: float = 120) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        parts = list(cache_dir.rglob("*.partial"))
        if parts and parts[0].stat().st_size > min_bytes:
            return parts[0]
        if proc.poll() is not None:
            pytest.fail(f"embed ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("no progress seen")


def _wait_for_rows(cache_dir: Path, proc, rows: int = 16, timeout: float = 120) -> None:
    """Until the partial cache records ``rows`` written rows (read without HDF5's lock, retrying mid-write)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for part in cache_dir.rglob("*.partial"):
            try:
                with h5py.File(part, "r", locking=False) as fh:
                    if int(fh.attrs.get("rows_done", 0)) >= rows:
                        return
            except (OSError, KeyError):
                pass
        if proc.poll() is not None:
            pytest.fail(f"embed ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("no rows written")


def test_sigkill_then_rerun_gives_the_same_bytes(big_table, tmp_path):
    ref = embed(big_table, ["efficientnet_lite0"], cache_dir=tmp_path / "ref", **KW)[0]
    proc = subprocess.Popen(_embed_cmd(big_table, tmp_path / "c"), stderr=subprocess.PIPE, text=True)
    _wait_for_rows(tmp_path / "c", proc)
    part = next((tmp_path / "c").rglob("*.partial"))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert part.exists() and not list((tmp_path / "c").rglob("*.h5"))  # nothing looks complete
    out = subprocess.run(_embed_cmd(big_table, tmp_path / "c"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resuming at row" in out.stderr
    done = list((tmp_path / "c").rglob("*.h5"))
    assert len(done) == 1 and not list((tmp_path / "c").rglob("*.partial"))
    with h5py.File(ref) as a, h5py.File(done[0]) as b:
        assert a["features"][()].tobytes() == b["features"][()].tobytes()


@pytest.fixture(scope="module")
def big_jpeg_table(big_table, tmp_path_factory):
    """The same 160 tiles as JPEGs (quality 90): what the device decoder takes."""
    import pandas as pd
    from PIL import Image

    root = tmp_path_factory.mktemp("bigjpeg")
    df = pd.read_csv(big_table)
    (root / "t").mkdir()
    paths = []
    for i, rel in enumerate(df.path):
        Image.open(big_table.parent / rel).convert("RGB").save(root / "t" / f"{i:04d}.jpg", quality=90)
        paths.append(f"t/{i:04d}.jpg")
    df.assign(path=paths).to_csv(root / "big_jpeg.csv", index=False)
    return root / "big_jpeg.csv"


def test_sigkill_with_device_decoding_then_rerun_gives_the_same_bytes(big_jpeg_table, tmp_path):
    ref = embed(big_jpeg_table, ["efficientnet_lite0"], cache_dir=tmp_path / "ref", decode="device", device="cpu",
                **KW)[0]
    cmd = _embed_cmd(big_jpeg_table, tmp_path / "c", "--decode", "device", "--device", "cpu")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(tmp_path / "c", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resuming at row" in out.stderr
    done = list((tmp_path / "c").rglob("*.h5"))
    with h5py.File(ref) as a, h5py.File(done[0]) as b:
        assert b.attrs["decoder"] == "torchvision-cpu"
        assert a["features"][()].tobytes() == b["features"][()].tobytes()


def test_lock_dies_with_embed_even_while_its_decode_workers_live(big_table, tmp_path):
    """kill -9 of embed with decode workers; an immediate rerun (no --wait) gets the lock and resumes."""
    cmd = _embed_cmd(big_table, tmp_path / "c")
    cmd[cmd.index("--workers") + 1] = "2"
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(tmp_path / "c", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    again = subprocess.run(_embed_cmd(big_table, tmp_path / "c"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "another hexpress process" not in again.stderr and "resuming at row" in again.stderr


def test_second_writer_refuses_while_first_runs(big_table, tmp_path):
    first = subprocess.Popen(_embed_cmd(big_table, tmp_path / "c"), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_progress(tmp_path / "c", first, min_bytes=0)
        second = subprocess.run(_embed_cmd(big_table, tmp_path / "c"), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "another hexpress process" in second.stderr
    finally:
        assert first.wait(timeout=600) == 0
    assert read_cache(next((tmp_path / "c").rglob("*.h5"))).features.shape == (160, 1280)


def test_disk_full_is_a_clear_error_and_a_rerun_recovers(syn_table, tmp_path, monkeypatch):
    ref = embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "ref", **KW)[0]
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full(self, key, value):
        if self.name == "/features":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(CacheError, match="write failed at row 16.*free disk space"):
        embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    assert not list((tmp_path / "c").rglob("*.h5"))
    done = embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)[0]
    np.testing.assert_array_equal(read_cache(done).features, read_cache(ref).features)


def test_interrupted_fit_leaves_no_run_folder(syn_cache, tmp_path, monkeypatch):
    table, cache_dir = syn_cache
    import regress.runs.folder

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(regress.runs.folder, "save_model", boom)  # interrupted while writing the run folder
    rc = cli.main(["fit", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(cache_dir),
                   "--runs-dir", str(tmp_path), "--folds", "4"])
    assert rc == 130
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # neither the run nor its temporary folder


def test_old_or_partial_run_folders_are_refused(syn_cache, tmp_path):
    table, cache_dir = syn_cache
    assert cli.main(["fit", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(cache_dir),
                     "--runs-dir", str(tmp_path), "--folds", "4"]) == 0
    run = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    info = (run / "run.json").read_text()
    (run / "run.json").write_text(info.replace('"format": 2', '"format": 1'))
    with pytest.raises(RunError, match="refit it"):
        load_run(run)
    (run / "run.json").unlink()
    with pytest.raises(RunError, match="not a finished"):
        load_run(run)


# ----------------------------------------------------------------- fuzzing
_cell = st.one_of(st.text(max_size=6), st.integers(-5, 5).map(str), st.just(""), st.just("nan"), st.just("inf"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["ID", "path", "slide", "x", "y", "G1", "G2", "a,b", ""]), max_size=6),
       rows=st.lists(st.lists(_cell, min_size=0, max_size=7), max_size=5))
def test_fuzz_tables_give_a_table_or_our_error(tmp_path_factory, header, rows):
    d = tmp_path_factory.mktemp("fz")
    (d / "t.png").write_bytes(b"x")
    text = ",".join(header) + "\n" + "\n".join(",".join(r) for r in rows)
    (d / "t.csv").write_text(text)
    try:
        t = read_table(d / "t.csv")
    except HexpressError:
        return
    assert len(t.ids) == len(set(t.ids)) and (t.Y is None or np.isfinite(t.Y).all())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00"]))
def test_fuzz_image_bytes_give_an_image_or_our_error(tmp_path_factory, data, prefix):
    p = tmp_path_factory.mktemp("img") / "x.png"
    p.write_bytes(prefix + data)
    try:
        img = load_rgb(p)
    except HexpressError:
        return
    assert img.mode == "RGB"
