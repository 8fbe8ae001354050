"""`selftrain predict` decodes an image file exactly as training decoded it from the shards.

PIL's plain convert() drops alpha (a transparent background's hidden colour shows through) and clips
16-bit grayscale to white; the importer keeps the original bytes and the stages composite on black and
scale by 1/257, so predict must too.
"""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from augment import build_eval_transform
from pipeline.data.shards import decode_image
from pipeline.engine.serving import Predictor


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def transparent_on_white() -> Image.Image:
    rgba = np.zeros((12, 12, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # hidden colour of the transparent background
    rgba[3:9, 3:9] = (40, 120, 200, 255)
    return Image.fromarray(rgba, "RGBA")


def sixteen_bit_gray() -> Image.Image:
    return Image.fromarray(np.arange(144, dtype=np.uint16).reshape(12, 12) * 300)  # mode I;16


@pytest.mark.parametrize("make, in_chans", [(transparent_on_white, 3), (sixteen_bit_gray, 1), (sixteen_bit_gray, 3)])
def test_predict_sees_the_training_view_of_converted_images(make, in_chans):
    data = png_bytes(make())
    meta = SimpleNamespace(in_chans=in_chans, input_size=16, mean=(0.0,) * in_chans, std=(1.0,) * in_chans)
    served = Predictor(meta=meta, logits_of=lambda x: x, source="test").preprocess(data)
    mode = "L" if in_chans == 1 else "RGB"
    trained = build_eval_transform(16)(decode_image({"__key__": "k", "png": data}, "shard-0", mode))
    np.testing.assert_allclose(served, trained.astype(np.float32).transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert served.max() < 1.0  # neither the white background nor clipped 16-bit white


def test_predict_on_a_folder_skips_hidden_files_and_folders(tmp_path):
    from pipeline.engine.serving import image_files

    for name in ("a.png", "sub/b.jpg", "._a.png", ".ipynb_checkpoints/a.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert image_files([str(tmp_path)]) == [tmp_path / "a.png", tmp_path / "sub" / "b.jpg"]


def test_predict_on_a_folder_lists_a_dangling_link_so_that_it_is_named(tmp_path):
    from pipeline.engine.serving import image_files

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved-away.png")
    assert image_files([str(tmp_path)]) == [tmp_path / "a.png", tmp_path / "gone.png"]


@pytest.mark.parametrize("mode, key", [("L", 200), ("RGB", (200, 200, 200))])
def test_a_colour_key_png_is_composited_on_black_like_an_alpha_one(mode, key):
    from pipeline.data.shards import decode_bytes

    pixels = np.full((6, 6), 200, np.uint8) if mode == "L" else np.full((6, 6, 3), 200, np.uint8)
    pixels[2:4, 2:4] = 90  # the object; everything else has the key colour, marked transparent (tRNS)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG", transparency=key)
    decoded = decode_bytes(buffer.getvalue(), mode)
    assert decoded[0, 0].max() == 0 and decoded[2, 2].min() == 90


def test_a_png_larger_than_pillow_allows_is_refused_as_pillow_refuses_it(monkeypatch):
    from pipeline.data.shards import decode_bytes

    data = png_bytes(Image.fromarray(np.zeros((40, 50), np.uint8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)  # 2,000 pixels > twice the limit
    with pytest.raises(Image.DecompressionBombError):
        decode_bytes(data, "L")


def test_linked_folders_are_followed_once(tmp_path):
    """rglob skipped a linked sub-folder silently; a link back up the tree must not loop."""
    from pipeline.engine.serving import image_files

    (tmp_path / "shared" / "cats").mkdir(parents=True)
    (tmp_path / "shared" / "cats" / "c.png").write_bytes(b"x")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "t.png").write_bytes(b"x")
    (tmp_path / "tree" / "cats").symlink_to(tmp_path / "shared" / "cats")
    (tmp_path / "tree" / "up").symlink_to(tmp_path / "tree")
    assert image_files([str(tmp_path / "tree")]) == [tmp_path / "tree" / "cats" / "c.png", tmp_path / "tree" / "t.png"]


def test_damaged_headers_float_pixels_and_bombs_are_refused_as_pillow_refuses_them(monkeypatch):
    """A BMP whose header claims 2,000,000 rows raised OpenCV's own error past every handler; 32-bit float
    pixels came out black; a JPEG past Pillow's pixel limit was decoded by OpenCV (PNG alone was checked)."""
    import struct

    import cv2

    from pipeline.data.shards import decode_bytes

    image = Image.fromarray(np.arange(784, dtype=np.uint8).reshape(28, 28))
    bmp = io.BytesIO()
    image.save(bmp, format="BMP")
    damaged = bytearray(bmp.getvalue())
    damaged[22:26] = struct.pack("<i", 2_000_000)
    with pytest.raises(Exception) as raised:
        decode_bytes(bytes(damaged), "L")
    assert not isinstance(raised.value, cv2.error)
    floats = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32), "F").save(floats, format="TIFF")
    with pytest.raises(ValueError, match=r"32-bit float pixels \(mode F\)"):
        decode_bytes(floats.getvalue(), "L")
    ok, jpeg = cv2.imencode(".jpg", np.zeros((40, 40), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1,600 pixels: past twice the limit
    with pytest.raises(Image.DecompressionBombError):
        decode_bytes(jpeg.tobytes(), "L")


def test_files_a_folder_search_skips_are_named(tmp_path, capsys):
    """GIF and TIFF files were skipped in a folder (read when named), and a folder of other files said only
    "no image files in DIR"."""
    from pipeline.cli import main
    from pipeline.engine.serving import find_images

    for name in ("a.gif", "b.TIFF", "c.png", "photo.heic", "notes.txt"):
        (tmp_path / "mixed" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mixed" / name).write_bytes(b"x")
    images, others = find_images([str(tmp_path / "mixed")])
    assert [p.name for p in images] == ["a.gif", "b.TIFF", "c.png"]
    assert [p.name for p in others] == ["notes.txt", "photo.heic"]
    (tmp_path / "phone").mkdir()
    (tmp_path / "phone" / "photo.heic").write_bytes(b"x")
    assert main(["predict", str(tmp_path / "no-model"), str(tmp_path / "phone")]) == 2
    err = capsys.readouterr().err
    assert f"no image files in {tmp_path / 'phone'}: 1 file(s) without an image suffix" in err
    assert "photo.heic; name a file to read it whatever its suffix" in err
