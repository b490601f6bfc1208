"""Robust image and JSON I/O at the engine's boundary: clear errors in, atomic files out.

Reading (`read_image`) turns anything a user may hand the tool into uint8 [H, W, 3] RGB, upright:

- EXIF orientation is applied (the pixels come back as a viewer shows them); an unreadable EXIF
  block is ignored, as viewers do, since the pixels themselves are intact.
- Transparency (RGBA, LA, PA, palette or RGB/L with a tRNS colour) is composited over white,
  the background a viewer shows on a white page: the colour under a fully transparent pixel is
  often leftover data. Fully opaque pixels keep their colour exactly.
- Grayscale (L, 1) is replicated into three channels; palette images are expanded.
- 16-bit and 32-bit integer images keep the high byte, floor(v / 256): what Pillow itself does
  for 16-bit colour (the only 16-bit colour decoding it offers) and libpng's strip_16, so a gray
  and a colour copy of the same 16-bit picture agree; within one level of the exact v * 255 /
  65535. Float (mode F) images are refused: their range is not defined by the format.
- CMYK, YCbCr and other colour modes go through Pillow's conversion; ICC profiles are ignored.
- Formats: JPEG (and MPO, whose first picture is the photo), PNG, TIFF, BMP, WEBP, GIF, PPM.
  Animated GIF/PNG/WEBP and multi-page TIFF are refused (which frame to protect is ambiguous;
  pass a single frame, or a video).

Everything else is an `InputError` that names the file and the reason: a missing file, a folder,
an empty file, bytes that are no image, a truncated or corrupt file (truncation always raises;
Pillow would otherwise pad the picture with gray if LOAD_TRUNCATED_IMAGES were set), an
unsupported format or mode, more than MAX_PIXELS pixels (a decompression-bomb guard), or a side
shorter than MIN_SIDE pixels. Reading never modifies the file.

Writing (`write_image`, `write_json`) goes to a temporary name in the destination folder which is
renamed over the target only once complete (os.replace is atomic within a file system), so an
interrupted or failed write never leaves a partial file under the real name, and the temporary
file is removed on failure. Outputs that would overwrite one of the run's inputs are refused
unless `overwrite=True` (`ensure_not_input`). Image metadata (EXIF, GPS) is never copied to
outputs: the pixels are written upright and nothing else, which also suits a privacy tool.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# 100 megapixels: ~300 MB as uint8 RGB, 1.2 GB as float32; above every phone camera but the 200 MP
# sensors, whose photos can be downscaled first. Pillow's own guard (DecompressionBombError at
# 2 * Image.MAX_IMAGE_PIXELS = 179 MP) still applies above that whatever `max_pixels` says.
MAX_PIXELS = 100_000_000
# Below 16 pixels a side there is no face to find (MTCNN's smallest face is 12 px at its finest
# pyramid level, recognisers want 112-160 px chips).
MIN_SIDE = 16

FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP", "GIF", "PPM")
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# What Pillow's EXIF parser raises on a malformed block.
_EXIF_ERRORS = (OSError, ValueError, SyntaxError, KeyError, IndexError, TypeError, struct.error)
_CONVERTIBLE = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", *_ALPHA_MODES)


class InputError(ValueError):
    """A file the user named cannot be used; `str(e)` is "<path>: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class OutputError(InputError):
    """An output file cannot be written (bad extension, folder not writable, would overwrite an
    input); a subclass of InputError so that one `except InputError` handles every user error."""


def read_image(
    path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> np.ndarray:
    """Returns the image at `path` as uint8 [H, W, 3] RGB, EXIF orientation applied.

    Args:
      path: an image file (see the module docstring for formats and modes).
      max_pixels: refuse images with more pixels than this (decompression-bomb guard).
      min_side: refuse images whose shorter side is below this.

    Raises:
      InputError: the file is missing, not an image, corrupt, truncated, unsupported, too large
        or too small; the message names the file and the reason.
    """
    path = Path(path)
    _check_readable_file(path)
    with _strict_pillow(), _open(path) as im:
        _check_header(path, im, max_pixels, min_side)
        try:
            im.load()  # decodes everything: truncation and chunk-CRC errors surface here
        except Exception as e:  # OSError for truncation, ValueError/SyntaxError/zlib errors
            raise InputError(path, f"corrupt or truncated {im.format} data ({e})") from e
        try:
            upright = ImageOps.exif_transpose(im)
        except _EXIF_ERRORS:  # a malformed EXIF block; the pixels are intact (module docstring)
            upright = im
        return _to_rgb(path, upright)


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not an image file")
    if not path.is_file():
        raise InputError(path, "is not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "not readable (permission denied)")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")


@contextlib.contextmanager
def _strict_pillow():
    # Truncated files must raise rather than come back padded with gray; Pillow's default is
    # already strict, but a library imported elsewhere may have flipped the global.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Our own MAX_PIXELS check replaces Pillow's warning between 89 and 179 MP.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except UnidentifiedImageError as e:
        raise InputError(
            path, f"not an image in a recognised format (supported: {', '.join(FORMATS)})"
        ) from e
    except Image.DecompressionBombError as e:
        raise InputError(
            path, f"image too large, refused as a possible decompression bomb ({e})"
        ) from e
    except Exception as e:  # a header Pillow recognises but cannot parse
        raise InputError(path, f"corrupt image header ({type(e).__name__}: {e})") from e


def _check_header(path: Path, im: Image.Image, max_pixels: int, min_side: int) -> None:
    if im.format not in FORMATS:
        raise InputError(
            path, f"{im.format} images are not supported (supported: {', '.join(FORMATS)})"
        )
    frames = getattr(im, "n_frames", 1)
    if frames > 1 and im.format != "MPO":
        kind = "multi-page" if im.format == "TIFF" else "animated"
        raise InputError(
            path,
            f"{kind} {im.format} with {frames} frames is not supported; pass a single image "
            "(or a video)",
        )
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(
            path,
            f"image of {w}x{h} = {w * h:,} pixels is above the limit of {max_pixels:,} "
            "(decompression-bomb guard); downscale it first",
        )
    if min(w, h) < min_side:
        raise InputError(path, f"image of {w}x{h} is too small (each side must be >= {min_side})")


def _to_rgb(path: Path, im: Image.Image) -> np.ndarray:
    """Returns uint8 [H, W, 3] from a decoded Pillow image of any supported mode."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # High byte (module docstring); mode I is where older Pillows put 16-bit PNG gray, and
        # 32-bit integer TIFFs are read as if they held 16-bit values.
        v = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        gray = (v >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    if mode not in _CONVERTIBLE:
        raise InputError(path, f"pixel mode {mode} is not supported (float or unusual layout)")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        # Over white, rounded to nearest in integers: (c a + 255 (255 - a)) / 255.
        out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(out.astype(np.uint8))
    try:
        rgb = im if mode == "RGB" else im.convert("RGB")
    except ValueError as e:
        raise InputError(path, f"pixel mode {mode} cannot be converted to RGB ({e})") from e
    return np.array(rgb, dtype=np.uint8)


def to_float(image: np.ndarray) -> np.ndarray:
    """Returns a uint8 image as float32 in [0, 1] (x / 255)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"to_float expects uint8, got {image.dtype}")
    return image.astype(np.float32) / np.float32(255)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Returns a float image in [0, 1] as uint8: clip, scale by 255, round to nearest.

    np.round rounds halves to even; x * 255 lands exactly on a half only for rare values, and
    to_uint8(to_float(u)) == u for every uint8 u.

    Raises:
      ValueError: the image holds NaN (clip would keep it and the cast is undefined).
    """
    image = np.asarray(image, dtype=np.float32)
    if np.isnan(image).any():
        raise ValueError("to_uint8: the image contains NaN")
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def ensure_not_input(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    *,
    overwrite: bool = False,
) -> Path:
    """Returns `out` as a Path after checking that it is none of `inputs`.

    Paths are compared after resolving symlinks and `..`, and by device and inode when both
    exist, so a hard link or another spelling of an input is caught too.

    Raises:
      OutputError: `out` names an input and `overwrite` is False.
    """
    out = Path(out)
    if overwrite:
        return out
    for inp in inputs:
        inp = Path(inp)
        same = out.resolve() == inp.resolve()
        if not same and out.exists() and inp.exists():
            same = os.path.samefile(out, inp)
        if same:
            raise OutputError(
                out, f"would overwrite the input {inp}; choose another output or pass overwrite"
            )
    return out


def write_image(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    quality: int = 95,
) -> Path:
    """Returns the path written: `image` saved atomically as PNG or JPEG (by extension).

    Args:
      path: destination ending in .png, .jpg or .jpeg (any case); missing folders are created.
      image: uint8 [H, W, 3] RGB or [H, W] gray; PNG also takes [H, W, 4] RGBA.
      inputs: the run's input files, never overwritten unless `overwrite`.
      overwrite: allow `path` to be one of `inputs`.
      quality: JPEG quality; chroma is not subsampled (4:4:4) so that fine perturbations survive
        as well as JPEG allows.

    Raises:
      OutputError: unknown extension, folder not writable, or `path` is an input.
      TypeError / ValueError: `image` is not uint8 or has an unsupported shape.
    """
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(
            path, f"unknown image extension '{path.suffix}' (use {', '.join(WRITE_FORMATS)})"
        )
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"write_image expects uint8 (see to_uint8), got {image.dtype}")
    channels = (3, 4) if fmt == "PNG" else (3,)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in channels)):
        raise ValueError(f"write_image: cannot write shape {image.shape} as {fmt}")
    ensure_not_input(path, inputs, overwrite=overwrite)
    pil = Image.fromarray(np.ascontiguousarray(image))
    options = {"quality": quality, "subsampling": 0} if fmt == "JPEG" else {}
    _atomic_write(path, lambda f: pil.save(f, format=fmt, **options), binary=True)
    return path


def write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
) -> Path:
    """Returns the path written: `obj` as indented JSON, written atomically.

    numpy scalars and arrays become numbers and lists, paths become strings; NaN and infinity
    are written as Python's json writes them (NaN, Infinity), which json.load reads back.

    Raises:
      OutputError: folder not writable, or `path` is an input.
      TypeError: `obj` holds something JSON cannot represent (nothing is left on disk).
    """
    path = Path(path)
    ensure_not_input(path, inputs, overwrite=overwrite)

    def dump(f: IO[str]) -> None:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")

    _atomic_write(path, dump, binary=False)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"write_json: cannot store {type(o).__name__} as JSON")


def _atomic_write(path: Path, write: Callable[[IO], None], *, binary: bool) -> None:
    """Writes through `write(file)` to a temporary file beside `path`, then renames it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(path, f"cannot write in folder {path.parent} ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; outputs are ordinary files, readable by all (0644).
        # (Reading the umask would mean setting it, which is not thread-safe.)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(path, f"could not be written ({e.strerror or e})") from e
        raise
