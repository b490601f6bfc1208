"""The charts of `faceveil attack --png`: the UP curve and the reconstructed faces.

Each figure has its own Agg canvas (no pyplot state) and is written atomically through
`report._save`, after checking that the path is a .png and none of the attack's inputs.

    write_up_png(up_result, "out/up.png", title=report.title)
    write_reconstruction_png("out/whitebox.png", faces, results, "dlib", title=report.title)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from faceveil.engine.attacks.paired import PairedFaces
from faceveil.engine.attacks.up import UpResult
from faceveil.engine.commands import report
from faceveil.engine.pipeline import image_io


def _check_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                overwrite: bool) -> Path:
    """Returns `path` as a Path after checking it is a .png and not one of `inputs`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise image_io.OutputError(path, "the chart is a PNG; use a .png name")
    return image_io.ensure_not_input(path, inputs, overwrite=overwrite)


def write_up_png(result: UpResult, path: str | os.PathLike, *, title: str = "",
                 inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Returns the path written: the UP(sigma) curve beside the per-face privacy/utility plot.

    Raises:
      OutputError: `path` is not a .png, or names one of `inputs` (unless `overwrite`).
    """
    path = _check_path(path, inputs, overwrite)
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax_up, ax_pu = fig.subplots(1, 2)
    ax_up.plot(result.sigmas, result.up, marker="o", ms=3)
    ax_up.set_xlabel("sigma (LPIPS privacy threshold)")
    ax_up.set_ylabel(f"UP(sigma, kappa={result.kappa:g})")
    ax_up.set_ylim(-0.02, 1.02)
    ax_up.grid(alpha=0.3)
    ok = result.utility >= result.kappa
    ax_pu.scatter(result.privacy[ok], result.utility[ok], s=16, color="#2ca02c",
                  label="useful (utility >= kappa)")
    ax_pu.scatter(result.privacy[~ok], result.utility[~ok], s=16, color="#d62728",
                  label="not useful")
    ax_pu.axhline(result.kappa, color="k", ls="--", lw=1.0)
    ax_pu.set_xlabel("privacy: LPIPS(x, x~)")
    ax_pu.set_ylabel("utility: centred cosine (authorised)")
    ax_pu.grid(alpha=0.3)
    ax_pu.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    return report._save(fig, path)


def write_reconstruction_png(path: str | os.PathLike, faces: PairedFaces, results: dict,
                             model: str, *, title: str, inputs: Iterable[str | os.PathLike] = (),
                             overwrite: bool = False) -> Path:
    """Returns the path written: original chips above each row of reconstructions.

    Args:
      path: the .png to write.
      faces: the attacked faces (their original chips head the columns).
      results: {features name: ReconstructionResult} (`inversion.whitebox` / `blackbox`).
      model: the recogniser whose chips were reconstructed.
      title, inputs, overwrite: the figure's title; paths it must not overwrite (unless
        `overwrite`).

    Raises:
      OutputError: `path` is not a .png, or names one of `inputs` (unless `overwrite`).
    """
    path = _check_path(path, inputs, overwrite)
    x = faces.original_chips(model)[1]
    rows = [("original", x)] + [(f"from {k} features", r.chips) for k, r in results.items()]
    n = min(len(x), 8)  # a readable strip: the first 8 faces
    fig = Figure(figsize=(1.6 * n + 1.2, 1.7 * len(rows)), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), n, squeeze=False))
    for r, (label, chips) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(np.clip(chips[c], 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r > 0:
                res = list(results.values())[r - 1]
                ax.set_xlabel(f"SSIM {res.ssim[c]:.2f}", fontsize=8)
            else:
                ax.set_title(faces.pairs[c].protected.name, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return report._save(fig, path)
