"""Mask files: protect photo files with per-image keys, restore them bit for bit.

`protect_files(inputs, out_dir, keys_dir, passphrase=...)` writes `<out_dir>/<stem>.png` (PNG
only: a lossy format would change the pixels the key restores) and the encrypted key
`<keys_dir>/<stem>.mask.key`. `restore_files(inputs, keys_dir, out_dir, passphrase=...)` reads
each protected PNG's key, checks it (passphrase, integrity, the image's pixel SHA-256) and only
when every input passes writes `<out_dir>/<stem>.png`. Nothing is written when any input fails,
and every file is written atomically (`image_io`, `keyfile`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from faceveil.engine import keyfile
from faceveil.engine.methods import mask
from faceveil.engine.pipeline import image_io, masks, progress, recognise

KEY_SUFFIX = ".mask.key"
LOSSY = (".jpg", ".jpeg")
PNG_ONLY = ("mask outputs are PNG only: a JPEG changes the pixels, and the key could no longer "
            "restore them bit for bit")


@dataclasses.dataclass(frozen=True)
class FileReport:
    """What happened to one input file."""

    source: str
    output: str
    key: str
    faces: int
    distances: dict  # recogniser -> [faces] embedding distance, clean vs protected (protect)
    ssim: list  # [faces] SSIM of each protected face patch (protect)


def key_path(keys_dir: str | Path, image: str | Path) -> Path:
    """Returns the key file of a protected photo: `<keys_dir>/<stem>.mask.key`."""
    return Path(keys_dir) / (Path(image).stem + KEY_SUFFIX)


def check_png_output(path: str | Path) -> None:
    """Raises OutputError naming `path` when it asks for a lossy (JPEG) output."""
    if Path(path).suffix.lower() in LOSSY:
        raise image_io.OutputError(path, PNG_ONLY)


def _outputs(files: list[Path], out_dir: Path, overwrite: bool, keys_dir: Path | None = None):
    check_png_output(out_dir)
    outs, seen = [], {}
    for f in files:
        o = out_dir / (f.stem + ".png")
        if o in seen:
            raise image_io.InputError(f, f"its output {o} would also be {seen[o]}'s; rename one")
        seen[o] = f
        image_io.ensure_not_input(o, files, overwrite=overwrite)
        if not overwrite and o.exists():
            raise image_io.OutputError(o, "exists; pass --overwrite to replace it")
        if keys_dir is not None and not overwrite and key_path(keys_dir, f).exists():
            raise image_io.OutputError(key_path(keys_dir, f), "exists; pass --overwrite to "
                                                               "replace it")
        outs.append(o)
    return outs


def protect_files(inputs, out_dir, keys_dir, *, passphrase: str, recognisers: str = "dlib",
                  config: mask.MaskConfig | None = None, seed: int = 0,
                  overwrite: bool = False, show_progress: bool = True,
                  scrypt_n: int = keyfile.SCRYPT_N, model=None) -> list[FileReport]:
    """Returns a FileReport per photo after writing its protected PNG and its encrypted key.

    `model`: a trained `mask_training.MaskModel` (keys from its generator); None: per-image.
    """
    files = recognise.photo_files(inputs)
    if not files:
        raise image_io.InputError(", ".join(map(str, inputs)), "no photos")
    out_dir, keys_dir = Path(out_dir), Path(keys_dir)
    outs = _outputs(files, out_dir, overwrite, keys_dir)
    images = [image_io.read_image(f) for f in files]  # a bad input stops before any output
    res = masks.mask_images(images, recognisers=recognisers, config=config, seed=seed,
                            names=[str(f) for f in files], show_progress=show_progress,
                            model=model)
    fr = res.photos.faces
    reports = []
    for i, (f, out) in enumerate(zip(files, outs)):
        sel = np.flatnonzero(fr.image == i)
        k = masks.write_mask_key(key_path(keys_dir, f), res.keys[i], res.images[i],
                                 bits=res.bits, recognisers=res.recognisers,
                                 passphrase=passphrase, source=f.name, faces=len(sel),
                                 overwrite=overwrite, inputs=files, n=scrypt_n)
        image_io.write_image(out, res.images[i], inputs=files, overwrite=overwrite)
        dist = {name: [round(float(v), 4) for v in d[sel]]
                for name, d in (fr.recognised_by or {}).items()}
        reports.append(FileReport(str(f), str(out), str(k), len(sel), dist,
                                  [round(float(v), 4) for v in fr.metrics["ssim"][sel]]
                                  if len(sel) else []))
    return reports


def restore_files(inputs, keys_dir, out_dir, *, passphrase: str, overwrite: bool = False,
                  show_progress: bool = True) -> list[FileReport]:
    """Returns a FileReport per protected photo after writing its restored original.

    Every input is read and its key checked before anything is written: a JPEG input, a
    missing key, a wrong passphrase, a tampered key or the key of another image stops the run
    with an InputError (a `keyfile.KeyFileError` for key problems) naming the file.
    """
    files = recognise.photo_files(inputs)
    if not files:
        raise image_io.InputError(", ".join(map(str, inputs)), "no photos")
    for f in files:
        if f.suffix.lower() in LOSSY:
            raise image_io.InputError(f, "is a JPEG: a masked photo is written as PNG, and a "
                                         "JPEG copy has lost the exact pixels its key restores")
    outs = _outputs(files, Path(out_dir), overwrite)
    restored = []
    for f in files:
        image = image_io.read_image(f)
        key, meta = masks.read_mask_key(key_path(keys_dir, f), passphrase, image, str(f))
        restored.append((masks.restore(image, key), int(meta.get("faces", 0))))
        progress.say(f"mask restore: checked {f}", enabled=show_progress)
    reports = []
    for f, out, (image, n) in zip(files, outs, restored):
        image_io.write_image(out, image, inputs=files, overwrite=overwrite)
        reports.append(FileReport(str(f), str(out), str(key_path(keys_dir, f)), n, {}, []))
    return reports
