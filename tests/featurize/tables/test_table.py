import numpy as np
import pandas as pd
import pytest

from core.errors import TableError
from featurize.tables.table import read_table


def _write(tmp_path, df, name="t.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def test_reference_layout_reads_as_is(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(3):
        (tmp_path / "train" / f"TRAIN_{i:04d}.png").write_bytes(b"x")
    df = pd.DataFrame({"ID": [f"TRAIN_{i:04d}" for i in range(3)],
                       "path": [f"./train/TRAIN_{i:04d}.png" for i in range(3)],
                       "GENE_A": [1.0, 2.0, 3.0], "GENE_B": [0, 1, 0]})
    t = read_table(_write(tmp_path, df))
    assert t.genes == ["GENE_A", "GENE_B"]
    assert t.paths[0] == tmp_path / "train" / "TRAIN_0000.png"
    assert t.Y.shape == (3, 2) and t.groups is None


@pytest.mark.parametrize("mutate, needle", [
    (lambda df: df.drop(columns="ID"), "missing required column 'ID'"),
    (lambda df: df.drop(columns="path"), "missing required column 'path'"),
    (lambda df: df.assign(ID=["a", "a", "c"]), "duplicate ID 'a'"),
    (lambda df: df.assign(G=["1", "x", "2"]), "non-numeric text 'x'"),
    (lambda df: df.assign(G=[1.0, np.nan, 2.0]), "row 3"),
    (lambda df: df.assign(G=[1.0, np.inf, 2.0]), "finite"),
    (lambda df: df.assign(path=["a.png", "b.png", "missing.png"]), "does not exist"),
])
def test_bad_tables_name_the_fault(tmp_path, mutate, needle):
    for n in "abc":
        (tmp_path / f"{n}.png").write_bytes(b"x")
    df = pd.DataFrame({"ID": ["a", "b", "c"], "path": ["a.png", "b.png", "c.png"], "G": [1.0, 2.0, 3.0]})
    with pytest.raises(TableError, match=needle):
        read_table(_write(tmp_path, mutate(df)))


def test_empty_and_missing_tables(tmp_path):
    with pytest.raises(TableError, match="not found"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(TableError, match="empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("ID,path\n")
    with pytest.raises(TableError, match="no rows"):
        read_table(tmp_path / "header.csv")


def test_fingerprint_changes_with_ids_and_files(syn_table, tmp_path):
    t = read_table(syn_table)
    assert t.fingerprint() == read_table(syn_table).fingerprint()
    df = pd.read_csv(syn_table)
    df.iloc[::-1].to_csv(tmp_path / "train.csv", index=False)
    # same rows, other order -> other fingerprint (paths are absolute-resolved from the new folder, so copy tiles)
    import shutil
    shutil.copytree(syn_table.parent / "train", tmp_path / "train")
    assert read_table(tmp_path / "train.csv").fingerprint() != t.fingerprint()


def test_group_column_detected(syn_table):
    t = read_table(syn_table)
    assert t.group_col == "slide" and len(set(t.groups)) == 4
    assert t.xy.shape == (48, 2)


def test_parquet_table(syn_table, tmp_path):
    import shutil

    shutil.copytree(syn_table.parent / "train", tmp_path / "train")
    pd.read_csv(syn_table).to_parquet(tmp_path / "train.parquet")
    t = read_table(tmp_path / "train.parquet")
    assert len(t) == 48 and t.genes == read_table(syn_table).genes
