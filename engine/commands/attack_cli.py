"""`faceveil attack KIND`: the common attack suite (DESIGN.md) on any method's output files.

    faceveil attack data-abuse --original DIR --protected DIR [--model dlib,facenet] [--kappa]
    faceveil attack whitebox   --original DIR --protected DIR [--model dlib] [--layers 2] [--iters]
    faceveil attack blackbox   --original DIR --protected DIR --decoder DIR [--train-faces DIR]
    faceveil attack attributes --original DIR --protected DIR
    faceveil attack up         --original DIR --protected DIR [--model dlib] [--sigmas] [--png]
    faceveil attack recognise  --original DIR --protected DIR [--model dlib,facenet]
    faceveil attack recognise  --original clean.mp4 --protected cloaked.mp4 [--references DIR]

The command layer only: `run` pairs the files (`attacks.paired`: protected files with the
original of the same stem, `cloak`'s `<stem>_cloaked.png`, `veil` / `pmt`'s `<stem>.png`, PMT's
`<stem>.features.npz`), calls the kind's evaluator (`attacks.suite`, `attacks.inversion`),
prints its `AttackReport` table and writes `--json` (and `--png` where a kind draws one,
`attack_figures`) atomically, after every input has been read and checked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from faceveil.engine.attacks import paired, suite
from faceveil.engine.attacks.paired import AttackInputError
from faceveil.engine.pipeline import image_io

KINDS = ("data-abuse", "whitebox", "blackbox", "attributes", "up", "recognise")


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    """What `faceveil attack` was asked (flags), for `run`."""

    original: tuple[str, ...]
    protected: tuple[str, ...]
    models: tuple[str, ...] = ("dlib",)
    layers: int = 2
    iters: int | None = None
    kappa: float = 0.2
    sigmas: tuple[float, ...] | None = None
    decoder: str | None = None
    train_faces: str | None = None
    references: str | None = None
    align: str = "original"
    frames: int | None = None
    json_path: str | None = None
    png_path: str | None = None
    overwrite: bool = False


PNG_KINDS = ("whitebox", "blackbox", "up")


def run(kind: str, opts: AttackOptions) -> suite.AttackReport:
    """Returns the report of attack `kind` after printing its table and writing its files.

    Raises:
      ValueError: an unknown kind.
      InputError: a bad input or output path (named, with the reason); nothing is written.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attack {kind!r}; kinds: {', '.join(KINDS)}")
    if opts.png_path and kind not in PNG_KINDS:
        raise AttackInputError(opts.png_path, f"attack {kind} draws no chart (--png is for "
                                              f"{', '.join(PNG_KINDS)})")
    if opts.png_path and Path(opts.png_path).suffix.lower() != ".png":
        raise AttackInputError(opts.png_path, "the chart is a PNG; use a .png name")
    if kind == "blackbox" and not opts.decoder:
        raise AttackInputError(".", "attack blackbox needs --decoder DIR")
    inputs = [*opts.original, *opts.protected]
    files = _input_files(inputs)
    for out in (opts.json_path, opts.png_path):
        if out:  # checked before the slow part: never one of the inputs
            image_io.ensure_not_input(out, files, overwrite=opts.overwrite)
    report, faces, results = _evaluate(kind, opts)
    print(report.format_table())
    if opts.png_path:
        from faceveil.engine.commands import attack_figures

        if kind == "up":
            path = attack_figures.write_up_png(results, opts.png_path, title=report.title,
                                               inputs=files, overwrite=opts.overwrite)
        else:
            path = attack_figures.write_reconstruction_png(
                opts.png_path, faces, results, report.details["model"], title=report.title,
                inputs=files, overwrite=opts.overwrite)
        print(f"chart -> {path}")
    if opts.json_path:
        summary = report.summary() | {"original": list(opts.original),
                                      "protected": list(opts.protected)}
        path = image_io.write_json(opts.json_path, summary, inputs=files,
                                   overwrite=opts.overwrite)
        print(f"json -> {path}")
    return report


def _evaluate(kind: str, opts: AttackOptions):
    """Returns (report, PairedFaces or None, the kind's results or None) of one attack."""
    from faceveil.engine.pipeline import video_io

    videos = [p for p in (*opts.original, *opts.protected) if video_io.is_video(p)]
    if videos:
        if kind != "recognise" or len(opts.original) != 1 or len(opts.protected) != 1 \
                or len(videos) != 2:
            raise AttackInputError(videos[0], "videos are judged by `attack recognise "
                                              "--original CLEAN.mp4 --protected CLOAKED.mp4` "
                                              "(one video each)")
        return suite.recognise_video(opts.original[0], opts.protected[0], opts.models,
                                     references=opts.references, frames=opts.frames), None, None
    faces = paired.load_faces(paired.pair_files(opts.original, opts.protected), align=opts.align)
    results = None
    if kind == "data-abuse":
        report = suite.data_abuse(faces, opts.models, kappa=opts.kappa,
                                  references=opts.references)
    elif kind in ("whitebox", "blackbox"):
        from faceveil.engine.attacks import inversion

        if kind == "whitebox":
            report, results = inversion.whitebox(faces, opts.models[0], layers=opts.layers,
                                                 iters=opts.iters)
        else:
            dec = inversion.load_or_train_decoder(opts.models[0], opts.layers, opts.decoder,
                                                  opts.train_faces, steps=opts.iters)
            report, results = inversion.blackbox(faces, dec)
    elif kind == "attributes":
        report = suite.attributes(faces)
    elif kind == "up":
        report, results = suite.up_curve(faces, opts.models[0], kappa=opts.kappa,
                                         sigmas=opts.sigmas, references=opts.references)
    else:
        report = suite.recognise_photos(faces, opts.models)
    return report, faces, results


def _input_files(paths) -> list[Path]:
    """Returns the files named by `paths` (folders: every file under them), for output checks."""
    out = []
    for p in map(Path, paths):
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out
