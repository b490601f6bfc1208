"""Veil files: apply a veil to photo and video files, recover them, with sidecars.

`veil_files(inputs, out_dir, veil)` writes each protected file (photos as PNG: the recovery
divides by alpha, so lossy coding error would come back 1 / alpha times larger; videos as
lossless H.264) and beside it `<output>.veil.json`: the key id, the model, the output's
SHA-256 and every veiled face's box and landmarks (what recovery needs; never pixels).
`recover_files(inputs, out_dir, veil)` checks each input against its sidecar (present, same
key, same SHA-256) before anything is written, then removes the veil.
Every output is written atomically; a bad input stops the run before any output exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from faceveil.engine.pipeline import image_io, progress, recognise, veils, video_io

SIDECAR_SUFFIX = ".veil.json"
SIDECAR_KIND = "faceveil veil sidecar"


@dataclasses.dataclass(frozen=True)
class FileReport:
    """What happened to one input file."""

    source: str
    output: str
    sidecar: str
    faces: int  # faces veiled (or recovered)
    others: int = 0  # faces of other people left alone (apply)


def sidecar_path(output: str | Path) -> Path:
    """Returns the sidecar path of a veiled file."""
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def sha256(path: str | Path) -> str:
    """Returns the hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_files(inputs) -> list[Path]:
    """Returns the photo and video files of `inputs` (folders: every photo and video in them)."""
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and (
                f.suffix.lower() in recognise.PHOTO_SUFFIXES or video_io.is_video(f)))
        elif not p.exists():
            raise image_io.InputError(p, "no such file or folder")
        else:
            files.append(p)
    if not files:
        raise image_io.InputError(", ".join(map(str, inputs)), "no photos or videos")
    return files


def _output(out_dir: Path, src: Path) -> Path:
    return out_dir / (src.stem + (".mp4" if video_io.is_video(src) else ".png"))


def _check_outputs(files, out_dir: Path, overwrite: bool) -> list[Path]:
    outs = [_output(out_dir, f) for f in files]
    seen = {}
    for f, o in zip(files, outs):
        if o in seen:
            raise image_io.InputError(f, f"its output {o} would also be {seen[o]}'s; rename one")
        seen[o] = f
        image_io.ensure_not_input(o, files, overwrite=overwrite)
    return outs


def veil_files(inputs, out_dir, veil: veils.Veil, *, overwrite: bool = False,
               min_face: float = 40.0, show_progress: bool = True) -> list[FileReport]:
    """Returns a FileReport per input after veiling the key's person in photos and videos."""
    files = input_files(inputs)
    out_dir = Path(out_dir)
    outs = _check_outputs(files, out_dir, overwrite)
    images = {f: image_io.read_image(f) for f in files if not video_io.is_video(f)}
    for f in files:
        if video_io.is_video(f):
            video_io.probe(f)  # unreadable videos stop the run before anything is written
    # Every photo's faces go through one compiled call per patch size.
    order = list(images)
    if order:
        progress.say(f"veil apply: {len(order)} photo(s)", enabled=show_progress)
        veiled = veils.veil_images([images[f] for f in order], veil, min_face=min_face)
    reports = []
    for f, out in zip(files, outs):
        common = {"kind": SIDECAR_KIND, "key_id": veil.key_id, "model": veil.model,
                  "alpha": veil.config.alpha, "source": f.name}
        if f in images:
            k = order.index(f)
            image_io.write_image(out, veiled.images[k], inputs=files, overwrite=overwrite)
            entries = veils.face_entries(veiled.faces[k])
            others = int(veiled.others[k])
            side = {**common, "type": "photo", "faces": entries}
        else:
            progress.say(f"veil apply: {f}", enabled=show_progress)
            vres, entries, others = veils.veil_video(f, veil, output=out, min_face=min_face,
                                                     show_progress=show_progress)
            side = {**common, "type": "video", "frames": int(vres.frames_out),
                    "faces": entries}
        side["output_sha256"] = sha256(out)
        image_io.write_json(sidecar_path(out), side, inputs=files, overwrite=overwrite)
        reports.append(FileReport(str(f), str(out), str(sidecar_path(out)), len(entries),
                                  others))
    return reports


def read_sidecar(path: Path, veil: veils.Veil) -> dict:
    """Returns the sidecar of a veiled file after checking it belongs to this file and key."""
    side_path = sidecar_path(path)
    if not side_path.is_file():
        raise image_io.InputError(path, f"was not veiled by faceveil (no sidecar {side_path.name}"
                                        " beside it)")
    try:
        side = json.loads(side_path.read_text())
        ok = side.get("kind") == SIDECAR_KIND and isinstance(side.get("faces"), list)
    except (ValueError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok:
        raise image_io.InputError(side_path, "is not a faceveil veil sidecar (damaged?)")
    if side.get("model") != veil.model:
        raise image_io.InputError(path, f"was veiled for model {side.get('model')}; this key is "
                                        f"for {veil.model}")
    if side.get("key_id") != veil.key_id:
        raise image_io.InputError(path, "was veiled with another key (another person's veil): "
                                        "use the key that veiled it")
    if sha256(path) != side.get("output_sha256"):
        raise image_io.InputError(path, "has changed since it was veiled (its SHA-256 differs "
                                        "from the sidecar's): only the file as written can be "
                                        "recovered")
    return side


def recover_files(inputs, out_dir, veil: veils.Veil, *, overwrite: bool = False,
                  show_progress: bool = True) -> list[FileReport]:
    """Returns a FileReport per input after removing the veil from veiled photos and videos."""
    files = input_files(inputs)
    out_dir = Path(out_dir)
    outs = _check_outputs(files, out_dir, overwrite)
    sides = {f: read_sidecar(f, veil) for f in files}  # every check before any output
    order = [f for f in files if sides[f].get("type") != "video"]
    if order:  # every photo's faces in one compiled call per patch size
        progress.say(f"veil recover: {len(order)} photo(s)", enabled=show_progress)
        recovered = veils.recover_images([image_io.read_image(f) for f in order], veil,
                                         [veils.photo_faces_from(sides[f]["faces"])
                                          for f in order])
    reports = []
    for f, out in zip(files, outs):
        side = sides[f]
        if side.get("type") == "video":
            progress.say(f"veil recover: {f}", enabled=show_progress)
            veils.recover_video(f, veil, side["faces"], int(side["frames"]), output=out,
                                show_progress=show_progress)
        else:
            image_io.write_image(out, recovered[order.index(f)], inputs=files,
                                 overwrite=overwrite)
        reports.append(FileReport(str(f), str(out), "", len(side["faces"])))
    return reports


def faces_in(side: dict) -> np.ndarray:
    """Returns [F, 5, 2] the landmarks a sidecar recorded."""
    return np.array([e["landmarks"] for e in side["faces"]], np.float32).reshape(-1, 5, 2)
