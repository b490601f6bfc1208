"""Report figures of a protection run: iterations, loss curves, crop strips, side by side.

Host-side only (numpy + matplotlib, no JAX). Figures are `matplotlib.figure.Figure` objects
drawn on their own Agg canvas, so nothing touches pyplot's global state (no figure registry, no
backend switch) and the functions are safe to call from any thread or a headless CLI. Each PNG
is rendered to pixels in memory and written with `image_io.write_image`, i.e. atomically (a
temporary file in the destination folder renamed over the target), so a failed run never leaves
a half-written picture; every writer returns the path it wrote.

Image panels are laid out in exact pixels and drawn without resampling where they are shown at
their own size, so the cloak's fine structure in a crop strip or side-by-side PNG is what the
output really holds (zoom in with any viewer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from faceveil.engine.pipeline import image_io

_DPI = 100
_COLD_COLOUR = "#d62728"  # red: cold starts
_MODE_COLOURS = {"none": "#7f7f7f", "copy": "#ff7f0e", "affine": "#1f77b4"}
# Legend entries beyond this are summarised in one line (a long video can have many tracks).
_MAX_LEGEND = 10


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Returns the path written: the figure rendered by Agg and saved atomically."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return image_io.write_image(path, np.ascontiguousarray(rgba[..., :3]))


# --------------------------------------------------------------------------------------------
# Iterations per frame


def _iteration_series(iterations, mask, labels) -> list[tuple[str, np.ndarray]]:
    """Returns [(label, per-frame float counts with NaN where masked)] from either input form."""
    if isinstance(iterations, Mapping):
        if not iterations:
            raise ValueError("plot_iterations: no series given (empty dict)")
        if mask is not None:
            raise ValueError("plot_iterations: `mask` goes with the [tracks, T] array form")
        series = [(str(k), np.asarray(v, np.float64).reshape(-1)) for k, v in iterations.items()]
    else:
        arr = np.asarray(iterations, np.float64)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"plot_iterations: expected [tracks, T], got shape {arr.shape}")
        if mask is not None:
            mask = np.broadcast_to(np.asarray(mask, bool), arr.shape)
            arr = np.where(mask, arr, np.nan)
        names = labels if labels is not None else [f"track {i}" for i in range(arr.shape[0])]
        if len(names) != arr.shape[0]:
            raise ValueError(f"plot_iterations: {len(names)} labels for {arr.shape[0]} tracks")
        series = list(zip((str(n) for n in names), arr))
    for name, s in series:
        if s.size == 0 or not np.isfinite(s).any():
            raise ValueError(f"plot_iterations: series '{name}' has no frames")
    return series


def plot_iterations(
    path: str | os.PathLike,
    iterations: Mapping[str, Any] | np.ndarray,
    *,
    mask: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    max_iters: int | None = None,
    title: str = "Optimiser iterations per frame",
) -> Path:
    """Returns the path written: iterations per frame (top) and cumulative (bottom), as PNG.

    One line per reuse mode (dict form) or per face track (array form). The legend gives each
    line's total; with a 'none' series beside others, also each one's iterations saved,
    1 - total / total('none') (DESIGN.md, method 1), when they cover the same frames.

    Args:
      path: the .png to write.
      iterations: {mode: [T] counts} or an array [tracks, T] (or [T]) of counts.
      mask: [tracks, T] bool, False where a track has no face (array form only); those frames
        are gaps in the lines and count nowhere.
      labels: names of the tracks (array form); default "track i".
      max_iters: the per-frame cap, drawn as a dashed line when given.
      title: figure title.

    Raises:
      ValueError: no series, or a series with no (unmasked) frame.
    """
    series = _iteration_series(iterations, mask, labels)
    totals = {name: float(np.nansum(s)) for name, s in series}
    base = dict(series).get("none")

    fig = Figure(figsize=(12.0, 6.0), dpi=_DPI, layout="constrained")
    ax_it, ax_cum = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    many = len(series) > _MAX_LEGEND
    for i, (name, s) in enumerate(series):
        frames = np.arange(s.size)
        colour = _MODE_COLOURS.get(name, f"C{i % 10}")
        legend = f"{name}: {totals[name]:,.0f} total, {np.nanmean(s):.1f}/frame"
        if base is not None and name != "none" and s.size == base.size and totals["none"] > 0:
            same = np.isfinite(s) & np.isfinite(base)
            saved = 1.0 - np.sum(s[same]) / max(np.sum(base[same]), 1e-12)
            legend += f", {saved:.1%} saved vs none"
        if many and i >= _MAX_LEGEND - 1:
            legend = None
        ax_it.plot(frames, s, drawstyle="steps-mid", color=colour, lw=1.4, alpha=0.9,
                   label=legend)
        ax_cum.plot(frames, np.nancumsum(s), color=colour, lw=1.8)
    if max_iters is not None:
        ax_it.axhline(max_iters, color="k", ls="--", lw=0.8, alpha=0.6)
        ax_it.annotate(f"cap {max_iters}", (0, max_iters), xytext=(2, 2),
                       textcoords="offset points", fontsize=8, alpha=0.7)
    ax_it.set_ylabel("iterations in the frame")
    ax_it.set_ylim(bottom=0)
    handles, texts = ax_it.get_legend_handles_labels()
    if many:  # one line stands for the tracks left out, without a colour of its own
        handles.append(Line2D([], [], linestyle="none"))
        texts.append(f"... and {len(series) - len(texts)} more tracks")
    # Outside the axes, right: per-frame counts fill the whole height, a legend inside hides some.
    ax_it.legend(handles, texts, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
                 frameon=False)
    ax_it.grid(alpha=0.3)
    ax_cum.set_ylabel("cumulative iterations")
    ax_cum.set_xlabel("frame")
    ax_cum.set_ylim(bottom=0)
    ax_cum.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Loss curves


def _pick_rows(finite_rows: np.ndarray, cold: np.ndarray, max_lines: int) -> np.ndarray:
    """Returns the row indices to draw: the cold starts first, then warm rows evenly spaced."""
    cold_rows = finite_rows[cold[finite_rows]][:max_lines]
    warm_rows = finite_rows[~cold[finite_rows]]
    room = max(max_lines - cold_rows.size, 0)
    if warm_rows.size > room:
        warm_rows = warm_rows[np.unique(np.linspace(0, warm_rows.size - 1, room).round()
                                        .astype(int))] if room else warm_rows[:0]
    return np.concatenate([cold_rows, warm_rows])


def plot_loss_curves(
    path: str | os.PathLike,
    curves: np.ndarray,
    frame_ids: Sequence[int],
    *,
    cold: Sequence[bool] | None = None,
    max_lines: int = 8,
    title: str = "Loss during each frame's optimisation",
) -> Path:
    """Returns the path written: the objective against the iteration for selected frames, PNG.

    Cold starts are thick red lines, warm starts thin lines in shades of blue (darker = later
    frame); the last point of each curve (where the optimisation stopped) is marked. A frame
    whose warm start already passed has a single point.

    Args:
      path: the .png to write.
      curves: [frames, max_iters] loss at each evaluation, NaN after the last (as
        `cloak.FrameMetrics.loss_curve`).
      frame_ids: [frames] frame index of each row (legend labels).
      cold: [frames] True where the row is a cold start; default only the first row.
      max_lines: at most this many curves (all cold rows first, then warm rows evenly spread).
      title: figure title.

    Raises:
      ValueError: no rows, mismatched lengths, or no row with a finite value.
    """
    curves = np.asarray(curves, np.float64)
    if curves.ndim == 1:
        curves = curves[None]
    if curves.ndim != 2 or curves.shape[0] == 0 or curves.shape[1] == 0:
        raise ValueError(f"plot_loss_curves: expected [frames, iterations], got {curves.shape}")
    frame_ids = np.asarray(frame_ids).reshape(-1)
    if frame_ids.size != curves.shape[0]:
        raise ValueError(f"plot_loss_curves: {frame_ids.size} frame ids for "
                         f"{curves.shape[0]} curves")
    cold = (np.arange(curves.shape[0]) == 0) if cold is None else np.asarray(cold, bool)
    if cold.shape != (curves.shape[0],):
        raise ValueError(f"plot_loss_curves: cold has shape {cold.shape}, want "
                         f"({curves.shape[0]},)")
    finite = np.isfinite(curves)
    finite_rows = np.flatnonzero(finite.any(axis=1))
    if finite_rows.size == 0:
        raise ValueError("plot_loss_curves: every curve is NaN (no evaluation to plot)")
    rows = _pick_rows(finite_rows, cold, max(int(max_lines), 1))

    fig = Figure(figsize=(9.0, 5.0), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    warm_rows = [r for r in rows if not cold[r]]
    shades = np.linspace(0.45, 0.95, max(len(warm_rows), 1))
    cmap = colormaps["Blues"]
    for r in rows:
        its = np.flatnonzero(finite[r])
        ys = curves[r, its]
        n = its.size
        if cold[r]:
            style = {"color": _COLD_COLOUR, "lw": 2.6, "zorder": 3}
            label = f"frame {frame_ids[r]}: cold start, {n} evaluation{'s' * (n != 1)}"
        else:
            style = {"color": cmap(shades[warm_rows.index(r)]), "lw": 1.3, "zorder": 2}
            label = f"frame {frame_ids[r]}: warm start, {n} evaluation{'s' * (n != 1)}"
        ax.plot(its, ys, marker="o" if n == 1 else None, ms=5, label=label, **style)
        ax.plot(its[-1:], ys[-1:], marker="o", ms=5, color=style["color"], zorder=4)
    hidden = finite_rows.size - rows.size
    ax.set_xlabel("iteration (evaluation before each update)")
    ax.set_ylabel("objective (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9,
              title=f"{hidden} more frames not shown" if hidden else None, title_fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Image panels


def _check_image(name: str, image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{name}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _format_label(label: str | Mapping[str, Any]) -> str:
    if isinstance(label, str):
        return label
    names = {"frame": "frame {}", "protection": "protection {:.3f}", "ssim": "SSIM {:.3f}",
             "track": "track {}"}
    lines = []
    for key, value in label.items():
        fmt = names.get(key)
        if fmt is None:
            fmt = key + " {:.3g}" if isinstance(value, float) else key + " {}"
        lines.append(fmt.format(value))
    return "\n".join(lines)


class _Canvas:
    """A figure of exact integer pixel size where images are placed pixel for pixel.

    `figimage` copies an array's pixels into the canvas unresampled, so what the PNG shows of a
    crop or frame is exactly its pixels (enlarged by integer repetition, or shrunk beforehand
    with Pillow's Lanczos filter); text is placed in pixels from the top-left corner.
    """

    def __init__(self, width: int, height: int):
        self.width, self.height = int(width), int(height)
        self.fig = Figure(figsize=(self.width / _DPI, self.height / _DPI), dpi=_DPI)
        self.fig.patch.set_facecolor("white")

    def image(self, img: np.ndarray, x: int, y: int) -> None:
        """Places uint8 [h, w, 3] with its top-left pixel at (x, y) from the top-left."""
        self.fig.figimage(img, xo=int(x), yo=self.height - int(y) - img.shape[0],
                          origin="upper", resize=False)

    def text(self, x: float, y: float, s: str, **kwargs) -> None:
        self.fig.text(x / self.width, 1 - y / self.height, s, **kwargs)


def _enlarge(img: np.ndarray, k: int) -> np.ndarray:
    return img if k == 1 else np.repeat(np.repeat(img, k, axis=0), k, axis=1)


def _shrink(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if (height, width) == img.shape[:2]:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))


def crop_strip(
    path: str | os.PathLike,
    originals: Sequence[np.ndarray],
    protected: Sequence[np.ndarray],
    labels: Sequence[str | Mapping[str, Any]] | None = None,
    *,
    amplify: float = 10.0,
    title: str | None = "Face crops before and after protection",
    min_cell: int = 128,
) -> Path:
    """Returns the path written: a before/after strip of face crops, one column per crop, PNG.

    Rows: the original crops, the protected crops, and |protected - original| * amplify
    (clipped to 255), which shows where the cloak lives. Each column's label goes under it.
    Crops are drawn pixel for pixel (small ones enlarged by an integer factor).

    Args:
      path: the .png to write.
      originals: uint8 [h, w, 3] crops (columns may differ in size).
      protected: the protected crops, each the shape of its original.
      labels: one per column: a string, or a mapping such as {"frame": 12, "protection": 1.05,
        "ssim": 0.981}, written one item a line.
      amplify: the difference row's gain.
      title: figure title (None for none).
      min_cell: crops whose longer side is below this are enlarged by the smallest integer
        factor that reaches it (pixel repetition, so single pixels stay visible).

    Raises:
      ValueError: no crops, mismatched lengths or shapes, or crops that are not uint8 RGB.
    """
    if len(originals) == 0:
        raise ValueError("crop_strip: no crops given")
    if len(protected) != len(originals):
        raise ValueError(f"crop_strip: {len(originals)} originals but {len(protected)} "
                         "protected crops")
    if labels is not None and len(labels) != len(originals):
        raise ValueError(f"crop_strip: {len(labels)} labels for {len(originals)} crops")
    pairs = []
    for i, (o, p) in enumerate(zip(originals, protected)):
        o = _check_image(f"crop_strip original {i}", o)
        p = _check_image(f"crop_strip protected {i}", p)
        if o.shape != p.shape:
            raise ValueError(f"crop_strip: column {i} original {o.shape} vs protected {p.shape}")
        pairs.append((o, p))
    texts = [_format_label(lab) for lab in labels] if labels is not None else [""] * len(pairs)

    k = max(1, math.ceil(min_cell / max(max(o.shape[:2]) for o, _ in pairs)))
    cell_h = k * max(o.shape[0] for o, _ in pairs)
    gap, left = 8, 100
    top = 40 if title else 10
    n_lines = max((t.count("\n") + 1 for t in texts if t), default=0)
    width = left + sum(k * o.shape[1] + gap for o, _ in pairs)
    height = top + 3 * cell_h + 2 * gap + 16 * n_lines + 12
    canvas = _Canvas(width, height)
    for r, name in enumerate(("original", "protected", f"|difference|\nx {amplify:g}")):
        canvas.text(left - 10, top + r * (cell_h + gap) + cell_h / 2, name, ha="right",
                    va="center", fontsize=10)
    x = left
    for (o, p), text in zip(pairs, texts):
        diff = np.abs(p.astype(np.float32) - o.astype(np.float32)) * amplify
        rows = (o, p, np.round(np.clip(diff, 0, 255)).astype(np.uint8))
        for r, img in enumerate(rows):
            canvas.image(_enlarge(img, k), x, top + r * (cell_h + gap))
        w = k * o.shape[1]
        if text:
            canvas.text(x + w / 2, top + 3 * cell_h + 2 * gap + 4, text, ha="center", va="top",
                        fontsize=9, linespacing=1.3)
        x += w + gap
    if title:
        canvas.text(width / 2, 12, title, ha="center", va="top", fontsize=12)
    return _save(canvas.fig, path)


def side_by_side(
    path: str | os.PathLike,
    original_frame: np.ndarray,
    protected_frame: np.ndarray,
    *,
    labels: tuple[str, str] = ("original", "protected"),
    title: str | None = None,
    max_width: int = 2560,
) -> Path:
    """Returns the path written: the original and the protected frame side by side, labelled.

    Frames are drawn pixel for pixel while the pair fits in `max_width`; wider frames are
    both shrunk by the same factor (Lanczos).

    Args:
      path: the .png to write.
      original_frame: uint8 [H, W, 3].
      protected_frame: uint8 [H, W, 3], the same shape.
      labels: captions above the two frames.
      title: an optional line above everything (e.g. the frame index and its metrics).
      max_width: the widest PNG to write, in pixels.

    Raises:
      ValueError: the frames are not uint8 RGB of one shape.
    """
    o = _check_image("side_by_side original", original_frame)
    p = _check_image("side_by_side protected", protected_frame)
    if o.shape != p.shape:
        raise ValueError(f"side_by_side: original {o.shape} vs protected {p.shape}")
    gap = 12
    h, w = o.shape[:2]
    scale = min(1.0, (max_width - 3 * gap) / (2 * w))
    dw, dh = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
    top = 34 + (26 if title else 0)
    canvas = _Canvas(2 * dw + 3 * gap, dh + top + gap)
    for i, (img, label) in enumerate(zip((o, p), labels)):
        x = gap + i * (dw + gap)
        canvas.image(_shrink(img, dw, dh), x, top)
        canvas.text(x + dw / 2, top - 8, label, ha="center", va="bottom", fontsize=12)
    if title:
        canvas.text(canvas.width / 2, 8, title, ha="center", va="top", fontsize=12)
    return _save(canvas.fig, path)


# --------------------------------------------------------------------------------------------
# Text summary
