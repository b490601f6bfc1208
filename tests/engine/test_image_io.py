"""Image I/O: every awkward input read correctly or refused clearly, inputs untouched, atomic writes.

The awkward inputs are made here in tmp_path with Pillow (and OpenCV for 16-bit colour PNG, which
Pillow cannot write); expected pixels come from the formulas in engine/image_io.py's docstring
computed independently with numpy, or from the EXIF specification's orientation table.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceveil.engine.pipeline import image_io
from faceveil.engine.pipeline.image_io import InputError, OutputError

JPEG = "faces/obama/obama1_240p.jpg"  # 427x240, RGB
RGBA_PNG = "faces/alex_lacamoire/alex2.png"  # 424x394, RGBA, alpha 255 everywhere


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _refused(path: Path, *words: str, **kwargs) -> InputError:
    """Returns the InputError of read_image(path) after checking it names the file and reason."""
    before = _sha(path) if Path(path).is_file() else None
    with pytest.raises(InputError) as info:
        image_io.read_image(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    if before is not None:
        assert _sha(path) == before  # the input is left untouched
    return info.value


def _rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _white_composite(rgb, alpha):
    # Reference: "over white" in float64, rounded to nearest (no exact halves can occur: 255 is odd).
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


# --- reading good files ---------------------------------------------------------------------


def test_real_jpeg_and_opaque_rgba_png(data_dir):
    path = data_dir / JPEG
    before = _sha(path)
    img = image_io.read_image(path)
    assert img.dtype == np.uint8 and img.shape == (240, 427, 3)
    # Reference: Pillow's own decode of the same file (orientation tag absent).
    np.testing.assert_array_equal(img, np.asarray(Image.open(path).convert("RGB")))
    assert _sha(path) == before
    png = image_io.read_image(data_dir / RGBA_PNG)
    assert png.shape == (394, 424, 3)
    # Alpha is 255 everywhere in this file, so compositing must return the RGB bytes unchanged.
    np.testing.assert_array_equal(png, np.asarray(Image.open(data_dir / RGBA_PNG))[..., :3])


# Displayed image for each EXIF orientation, from the stored pixels (EXIF 2.3 table, tag 0x0112).
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_exact(tmp_path, orientation):
    stored = _rand((24, 40, 3), seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=exif)
    np.testing.assert_array_equal(image_io.read_image(path), _ORIENT[orientation](stored))


def test_exif_rotated_jpeg(tmp_path):
    # A phone-style JPEG: stored landscape, tag 6 says "rotate 90 degrees clockwise to view".
    stored = np.zeros((48, 80, 3), np.uint8)
    stored[:16, :16] = (255, 0, 0)  # red marker in the stored top-left corner
    stored[-16:, :, 2] = 200
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, quality=100, subsampling=0, exif=exif)
    img = image_io.read_image(path)
    assert img.shape == (80, 48, 3)
    # JPEG is lossy: compare with a tolerance of a few levels (quality 100, flat blocks).
    assert np.abs(img.astype(int) - np.rot90(stored, -1)).mean() < 2.0
    assert img[:16, -16:, 0].mean() > 240 and img[:16, -16:, 1].mean() < 15  # marker top-right


def test_rgba_la_palette_and_trns_composite_over_white(tmp_path):
    rgb, alpha = _rand((20, 30, 3), 1), _rand((20, 30), 2)
    alpha[0, :] = 0  # fully transparent row: white whatever the colour underneath
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    got = image_io.read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(got, _white_composite(rgb, alpha))
    assert np.all(got[0] == 255)

    gray = _rand((20, 30), 3)
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(tmp_path / "la.png")
    want = _white_composite(np.repeat(gray[..., None], 3, -1), alpha)
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "la.png"), want)

    # Palette image whose entry 0 is transparent (tRNS): those pixels turn white.
    idx = (np.arange(20 * 30).reshape(20, 30) % 4).astype(np.uint8)
    pal = Image.fromarray(idx, mode="P")
    colours = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
    pal.putpalette([c for rgb3 in colours for c in rgb3])
    pal.save(tmp_path / "pal.png", transparency=0)
    want = np.array(colours, np.uint8)[idx]
    want[idx == 0] = 255
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "pal.png"), want)

    # RGB PNG with a tRNS colour key: that exact colour is transparent.
    img = _rand((20, 30, 3), 4)
    img[5:10, 5:10] = (1, 2, 3)
    Image.fromarray(img).save(tmp_path / "key.png", transparency=(1, 2, 3))
    want = img.copy()
    want[5:10, 5:10] = 255
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "key.png"), want)


def test_grayscale_and_bilevel_replicated(tmp_path):
    gray = _rand((25, 33), 5)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "g.png"), np.dstack([gray] * 3))
    bits = gray > 128
    Image.fromarray(bits).save(tmp_path / "b.png")  # mode "1"
    want = np.where(bits, 255, 0).astype(np.uint8)
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "b.png"), np.dstack([want] * 3))


def test_16_bit_gray_png_and_tiff(tmp_path):
    v = np.random.default_rng(6).integers(0, 65536, (20, 24), dtype=np.uint16)
    v[0, :4] = (0, 255, 256, 65535)
    for name in ("g16.png", "g16.tif"):
        Image.fromarray(v).save(tmp_path / name)
        got = image_io.read_image(tmp_path / name)
        np.testing.assert_array_equal(got, np.dstack([(v >> 8).astype(np.uint8)] * 3))
        assert list(got[0, :4, 0]) == [0, 0, 1, 255]
        # Within one level of the exact rescaling v * 255 / 65535.
        assert np.abs(got[..., 0] - v * (255 / 65535)).max() < 1.0


def test_16_bit_colour_png_agrees_with_gray(tmp_path):
    cv2 = pytest.importorskip("cv2")  # Pillow cannot write 16-bit colour PNGs; OpenCV can
    v = np.random.default_rng(7).integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "c16.png"), v[..., ::-1])  # OpenCV writes BGR
    got = image_io.read_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(got, (v >> 8).astype(np.uint8))
    # The same 16-bit gray picture stored as gray and as colour reads identically.
    g = v[..., 0]
    Image.fromarray(g).save(tmp_path / "g16.png")
    assert cv2.imwrite(str(tmp_path / "g16c.png"), np.dstack([g] * 3))
    np.testing.assert_array_equal(
        image_io.read_image(tmp_path / "g16.png"), image_io.read_image(tmp_path / "g16c.png")
    )


def test_cmyk_jpeg(tmp_path):
    # Solid CMYK patches (C, M, Y, K, none) -> cyan, magenta, yellow, black, white.
    cmyk = np.zeros((40, 200, 4), np.uint8)
    for i in range(4):
        cmyk[:, 40 * i : 40 * (i + 1), i] = 255
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, mode="CMYK").save(path, quality=100)
    img = image_io.read_image(path).astype(int)
    want = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0), (255, 255, 255)]
    for i, colour in enumerate(want):
        patch = img[8:-8, 40 * i + 8 : 40 * (i + 1) - 8]  # away from JPEG ringing at the edges
        np.testing.assert_allclose(patch.mean(axis=(0, 1)), colour, atol=6)


def test_static_gif_read_animated_refused(tmp_path):
    frames = [Image.fromarray(_rand((32, 32, 3), s)).quantize(16) for s in range(3)]
    frames[0].save(tmp_path / "still.gif")
    still = image_io.read_image(tmp_path / "still.gif")
    np.testing.assert_array_equal(still, np.asarray(frames[0].convert("RGB")))
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    _refused(tmp_path / "anim.gif", "animated GIF with 3 frames")


# --- refusing bad files ---------------------------------------------------------------------


def test_missing_folder_and_empty(tmp_path):
    _refused(tmp_path / "nope.jpg", "no such file")
    _refused(tmp_path, "is a folder")
    (tmp_path / "empty.png").write_bytes(b"")
    _refused(tmp_path / "empty.png", "empty file")


def test_not_an_image(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG\n" * 20)
    _refused(text, "not an image in a recognised format")
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(8).bytes(5000))
    _refused(noise, "not an image in a recognised format")


def test_truncated_real_jpeg_and_png(tmp_path, data_dir):
    data = (data_dir / JPEG).read_bytes()
    for frac in (0.3, 0.6, 0.95):
        cut = tmp_path / f"cut{frac}.jpg"
        cut.write_bytes(data[: int(len(data) * frac)])
        _refused(cut, "truncated")
    no_eoi = tmp_path / "no_eoi.jpg"  # only the 2-byte end marker missing
    no_eoi.write_bytes(data[:-2])
    _refused(no_eoi, "truncated")
    Image.open(data_dir / JPEG).save(tmp_path / "full.png")
    png = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    _refused(tmp_path / "cut.png", "truncated")


def test_corrupt_png_byte(tmp_path):
    Image.fromarray(_rand((64, 64, 3), 9)).save(tmp_path / "ok.png")
    data = bytearray((tmp_path / "ok.png").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    (tmp_path / "bad.png").write_bytes(bytes(data))
    _refused(tmp_path / "bad.png", "corrupt")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """Writes a PNG whose header claims width x height but whose data is a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_huge_images_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 50_000, 50_000)  # 2.5 gigapixels: Pillow's own guard fires at open
    _refused(bomb, "decompression bomb")
    big = tmp_path / "big.png"
    _png_header_only(big, 12_000, 10_000)  # 120 MP: above our 100 MP limit, below Pillow's
    _refused(big, "120,000,000 pixels is above the limit of 100,000,000")
    Image.fromarray(_rand((40, 50, 3))).save(tmp_path / "small.png")
    _refused(tmp_path / "small.png", "2,000 pixels is above the limit of 1,000", max_pixels=1000)


def test_too_small_refused(tmp_path):
    Image.fromarray(_rand((10, 300, 3))).save(tmp_path / "strip.png")
    _refused(tmp_path / "strip.png", "300x10 is too small", "16")
    assert image_io.read_image(tmp_path / "strip.png", min_side=10).shape == (10, 300, 3)


def test_unsupported_format_and_mode(tmp_path):
    Image.fromarray(_rand((32, 32, 3))).save(tmp_path / "pic.pcx")  # Pillow reads PCX; we don't
    _refused(tmp_path / "pic.pcx", "PCX images are not supported")
    Image.fromarray(np.ones((32, 32), np.float32)).save(tmp_path / "float.tif")
    _refused(tmp_path / "float.tif", "pixel mode F")


# --- float conversion -----------------------------------------------------------------------


def test_to_float_to_uint8():
    u = np.arange(256, dtype=np.uint8)
    f = image_io.to_float(u)
    assert f.dtype == np.float32 and f.min() == 0.0 and f.max() == 1.0
    np.testing.assert_array_equal(image_io.to_uint8(f), u)  # exact round trip
    # Clip then round to nearest: 0.3/255 -> 0, 0.7/255 -> 1, out of range saturates.
    x = np.array([-0.5, 0.3 / 255, 0.7 / 255, 254.6 / 255, 1.7], np.float32)
    np.testing.assert_array_equal(image_io.to_uint8(x), [0, 0, 1, 255, 255])
    with pytest.raises(ValueError, match="NaN"):
        image_io.to_uint8(np.array([0.5, np.nan], np.float32))
    with pytest.raises(TypeError, match="uint8"):
        image_io.to_float(np.zeros(3, np.float32))


# --- writing --------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_png_exact_and_jpeg_close(tmp_path):
    img = _rand((40, 60, 3), 10)
    out = image_io.write_image(tmp_path / "new" / "sub" / "x.PNG", img)  # folders are created
    np.testing.assert_array_equal(image_io.read_image(out), img)
    assert (out.stat().st_mode & 0o777) == 0o644
    smooth = np.repeat(np.repeat(_rand((5, 6, 3), 11), 8, 0), 10, 1)
    jpg = image_io.write_image(tmp_path / "x.jpeg", smooth, quality=95)
    with Image.open(jpg) as im:
        assert im.format == "JPEG"
    assert np.abs(image_io.read_image(jpg).astype(int) - smooth).mean() < 3.0
    gray = _rand((40, 60), 12)
    image_io.write_image(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "g.png"), np.dstack([gray] * 3))
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "new" / "sub") == []


def test_write_errors_name_the_path_and_leave_nothing(tmp_path):
    img = _rand((20, 20, 3))
    with pytest.raises(OutputError, match=r"x\.bmp: unknown image extension '\.bmp'"):
        image_io.write_image(tmp_path / "x.bmp", img)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder is expected")
    with pytest.raises(OutputError) as info:
        image_io.write_image(blocker / "x.png", img)
    assert str(blocker / "x.png") in str(info.value) and "cannot write in folder" in str(info.value)
    with pytest.raises(TypeError, match="uint8"):
        image_io.write_image(tmp_path / "f.png", img.astype(np.float32))
    with pytest.raises(ValueError, match="cannot write shape"):
        image_io.write_image(tmp_path / "a.jpg", np.dstack([img, img[..., :1]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_into_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write in folder"):
            image_io.write_image(ro / "x.png", _rand((20, 20, 3)))
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


def test_inputs_are_never_overwritten(tmp_path, data_dir):
    src = tmp_path / "in.png"
    Image.open(data_dir / RGBA_PNG).save(src)
    before = _sha(src)
    img = image_io.read_image(src)
    link = tmp_path / "link.png"
    link.symlink_to(src)
    hard = tmp_path / "hard.png"
    os.link(src, hard)
    spellings = [src, tmp_path / "." / "in.png", tmp_path / "sub" / ".." / "in.png", link, hard]
    (tmp_path / "sub").mkdir()
    for out in spellings:
        with pytest.raises(OutputError, match="would overwrite the input"):
            image_io.write_image(out, 255 - img, inputs=[src])
        with pytest.raises(OutputError, match="would overwrite the input"):
            image_io.write_json(out, {"a": 1}, inputs=[src])
    assert _sha(src) == before
    assert image_io.ensure_not_input(tmp_path / "out.png", [src]) == tmp_path / "out.png"
    image_io.write_image(src, 255 - img, inputs=[src], overwrite=True)  # explicitly allowed
    np.testing.assert_array_equal(image_io.read_image(src), 255 - img)


def test_write_json_atomic(tmp_path):
    path = tmp_path / "report.json"
    obj = {"n": np.int64(3), "x": np.float32(0.5), "v": np.arange(3), "p": Path("a/b"), "s": "é"}
    image_io.write_json(path, obj)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "n": 3,
        "x": 0.5,
        "v": [0, 1, 2],
        "p": "a/b",
        "s": "é",
    }
    before = path.read_bytes()
    # json.dump streams into the temporary file and fails half-way on the object it cannot
    # store: the old report must survive untouched and no temporary file may remain.
    with pytest.raises(TypeError, match="cannot store object"):
        image_io.write_json(path, {"first": list(range(1000)), "bad": object()})
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
