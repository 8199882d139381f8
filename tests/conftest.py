"""Shared fixtures: a small generated tile set (never real tissue) and the her2st path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurize.synthetic import make_synthetic_table

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
VISIUM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "visium-format"

needs_her2st = pytest.mark.skipif(not (HER2ST / "images").is_dir(),
                                  reason=f"real her2st data not found at {HER2ST} (CI has ../shared; a bare clone does not)")
FORMATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "formats"

needs_visium = pytest.mark.skipif(not VISIUM.is_dir(), reason=f"Visium fixture not found at {VISIUM}")
needs_formats = pytest.mark.skipif(not (FORMATS / "README.md").is_file(),
                                   reason=f"files written by the real tools not found at {FORMATS} (CI has ../shared)")


def write_10x_h5(path, counts, barcodes, names, ids=None, types=None):
    """A 10x feature-barcode HDF5 matrix (features x barcodes, CSC), as Space Ranger writes it."""
    import h5py
    from scipy import sparse

    m = sparse.csc_matrix(np.asarray(counts).T)  # features x barcodes
    ids = list(ids) if ids is not None else list(names)
    types = list(types) if types is not None else ["Gene Expression"] * len(names)
    with h5py.File(path, "w") as fh:
        g = fh.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        f = g.create_group("features")
        f["id"], f["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
        f["feature_type"], f["genome"] = np.array(types, dtype="S"), np.array(["GRCh38"] * len(names), dtype="S")


@pytest.fixture(scope="session")
def syn_table(tmp_path_factory) -> Path:
    """48 generated 64 px tiles, 4 slides, 12 genes."""
    return make_synthetic_table(tmp_path_factory.mktemp("syn"), n=48, n_genes=12, size=64, n_groups=4)


@pytest.fixture(scope="session")
def syn_cache(syn_table, tmp_path_factory) -> tuple[Path, Path]:
    """(table, cache_dir) with a random-init timm:test_vit cache."""
    from featurize.engine.extract import embed

    cache_dir = tmp_path_factory.mktemp("cache")
    embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=cache_dir, batch_size=16, progress=False,
          num_workers=0)
    return syn_table, cache_dir


def embedded_train_test(root: Path, n_genes: int) -> tuple[Path, Path, Path]:
    """(train table, test table, cache dir): 64 + 16 generated tiles on slides, the test IDs new and without
    gene columns, the training tiles embedded with a random-init timm:test_vit."""
    import pandas as pd

    from featurize.engine.extract import embed

    table = make_synthetic_table(root / "d", n=64, n_genes=n_genes, size=32, name="train", seed=2)
    test = make_synthetic_table(root / "t", n=16, n_genes=n_genes, size=32, name="test", seed=3)
    df = pd.read_csv(test)
    df["ID"] = "T" + df["ID"].astype(str)
    df[["ID", "path", "slide", "x", "y"]].to_csv(test, index=False)
    embed(table, ["timm:test_vit"], random_init=True, cache_dir=root / "c", progress=False, num_workers=0)
    return table, test, root / "c"


def ridge_data(n=160, d=24, g=9, seed=0, signal=4):
    """Features of mixed scale and offset; genes a linear function of the first ``signal`` features,
    plus noise and an offset."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 4, d) + rng.uniform(-3, 3, d)
    Y = X[:, :signal] @ rng.standard_normal((signal, g)) + 2 * rng.standard_normal((n, g)) + 5
    return X, Y


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest entry of ``b``."""
    return float(np.abs(a - b).max() / np.abs(b).max())



def record_tile_size(table: Path, tile_um: float) -> None:
    """A ``tiles``-style sidecar beside ``table`` recording its tiles' physical size (um)."""
    import json

    import pandas as pd

    table = Path(table)
    slides = sorted(set(pd.read_csv(table, usecols=["slide"])["slide"].astype(str)))
    table.with_suffix(".json").write_text(json.dumps({"table": table.name, "gene_names": {},
                                                      "slides": {s: {"tile_um": tile_um} for s in slides}}))


def at_tile_size(table: Path, name: str, tile_um: float) -> Path:
    """The same rows as ``table`` (IDs, targets, slides, x, y) with other pixels (mirrored), as if its spots were
    cut at a second tile size: ``<name>.csv`` beside it, with a sidecar recording ``tile_um``."""
    import pandas as pd
    from PIL import Image

    table = Path(table)
    df = pd.read_csv(table)
    (table.parent / name).mkdir(exist_ok=True)
    paths = []
    for p in df["path"]:
        dest = table.parent / name / Path(p).name
        Image.open(table.parent / p).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dest)
        paths.append(f"./{name}/{dest.name}")
    df["path"] = paths
    out = table.parent / f"{name}.csv"
    df.to_csv(out, index=False)
    record_tile_size(out, tile_um)
    return out


def rewrite_info(folder: Path, info: dict) -> None:
    """Write a run's (or stack's) info file as hexpress would, checksum included: a test that changes a run
    on purpose (an edit hexpress itself would refuse as damage) re-seals it here."""
    import json

    from regress.runs.folder import INFO_FILES, _info_digest

    kind = info.get("kind") or ("stack" if (Path(folder) / "stack.json").is_file() else "run")
    info = {**info, "kind": kind}
    info["info_sha256"] = _info_digest(info)
    (Path(folder) / INFO_FILES[kind]).write_text(json.dumps(info, indent=2))


def small_world(root: Path) -> tuple[Path, Path, Path, Path]:
    """(root, train, test, cache): 40 generated training tiles (5 genes) embedded with a random-init
    timm:test_vit through the CLI, and 8 test tiles under new IDs without gene columns."""
    import pandas as pd

    import cli

    train = make_synthetic_table(root / "data", n=40, n_genes=5, size=48, name="train", seed=0)
    test = make_synthetic_table(root / "data", n=8, n_genes=5, size=48, name="test", seed=1)
    df = pd.read_csv(test)
    df["ID"] = "T" + df["ID"].astype(str)
    df[["ID", "path", "slide", "x", "y"]].to_csv(test, index=False)
    cache = root / "cache"
    assert cli.main(["embed", "--data", str(train), "--backbone", "timm:test_vit", "--random-init", "--quiet",
                     "--cache-dir", str(cache), "--workers", "0"]) == 0
    return root, train, test, cache


def run(argv) -> int:
    """``cli.main`` in this process; argparse's exits become return codes."""
    import cli

    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def fake_st(root, n=6, genes=30, seed=0, drop_counts=1, image_size=(600, 600), name="A1"):
    """A tiny ST-layout section (``name``): 6x6 grid spots on a generated image; returns the spot keys."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    for d in ("counts", "spots", "images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    xs, ys = np.meshgrid(np.arange(2, 2 + n), np.arange(3, 3 + n))
    xs, ys = xs.ravel(), ys.ravel()
    spots = pd.DataFrame({"x": xs, "y": ys, "new_x": xs, "new_y": ys, "pixel_x": 60.0 + 80 * (xs - 2),
                          "pixel_y": 70.0 + 80 * (ys - 3), "selected": 1})
    spots.to_csv(root / "spots" / f"{name}_selection.tsv", sep="\t", index=False)
    keys = [f"{x}x{y}" for x, y in zip(xs, ys)]
    counts = pd.DataFrame(rng.poisson(3, (len(keys), genes)), index=keys, columns=[f"G{j}" for j in range(genes)])
    counts.iloc[drop_counts:].to_csv(root / "counts" / f"{name}.tsv.gz", sep="\t")
    Image.fromarray((rng.random((*image_size, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{name}.jpg")
    return keys


def parser_leaves(p, path=()):
    """Every leaf of an argparse tree (each command and subcommand): (names, its option strings)."""
    for a in p._actions:
        if isinstance(a.choices, dict) and hasattr(next(iter(a.choices.values()), None), "_actions"):
            for name, sp in a.choices.items():
                yield from parser_leaves(sp, path + (name,))
            return
    yield path, [o for a in p._actions for o in a.option_strings]
