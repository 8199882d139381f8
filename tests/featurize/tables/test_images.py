import numpy as np
import pytest
from PIL import Image

from core.errors import ImageError
from featurize.tables.images import load_rgb


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    arr = (np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "L")
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257).convert("I;16")
    else:
        img = img.convert(mode)
    ext = "tiff" if mode in ("I;16", "I", "F", "CMYK", "LA") else "png"
    p = tmp_path / f"t.{ext}"
    img.save(p)
    out = load_rgb(p)
    assert out.mode == "RGB" and out.size == (24, 20)


def test_sixteen_bit_is_rescaled(tmp_path):
    p = tmp_path / "t.tiff"
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).convert("I;16").save(p)
    assert np.asarray(load_rgb(p)).min() == 255


def test_transparent_pixels_become_white(tmp_path):
    p = tmp_path / "t.png"
    Image.new("RGBA", (16, 16), (10, 20, 30, 0)).save(p)
    assert np.asarray(load_rgb(p)).min() == 255


@pytest.mark.parametrize("content, needle", [
    (b"", "empty"), (b"not an image at all", "cannot be decoded"),
])
def test_bad_bytes(tmp_path, content, needle):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=needle):
        load_rgb(p)


def test_truncated_jpeg_and_tiny_and_directory(tmp_path):
    big = tmp_path / "big.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(big)
    data = big.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.jpg"):
        load_rgb(tmp_path / "trunc.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match="minimum"):
        load_rgb(tmp_path / "tiny.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="directory"):
        load_rgb(tmp_path / "dir.png")
