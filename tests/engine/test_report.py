"""Report writers: valid PNGs written atomically, exact pixels in image panels, the summary."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from faceveil.engine.commands import report
from faceveil.engine.pipeline import image_io

# Colours the plots promise (report._MODE_COLOURS / _COLD_COLOUR), as RGB.
AFFINE_BLUE = (0x1F, 0x77, 0xB4)
COLD_RED = (0xD6, 0x27, 0x28)


def _read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _only(tmp_path, *names):
    # Atomic writes leave no ".name.xxx.tmp" beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def _has_colour(img: np.ndarray, rgb, min_pixels=50) -> bool:
    return int(np.all(img == np.asarray(rgb, np.uint8), axis=-1).sum()) >= min_pixels


def _find_block(img: np.ndarray, block: np.ndarray) -> tuple[int, int] | None:
    """Returns (y, x) where `block` appears pixel for pixel in `img`, or None."""
    h, w = block.shape[:2]
    for y, x in np.argwhere(np.all(img == block[0, 0], axis=-1)):
        if np.array_equal(img[y:y + h, x:x + w], block):
            return int(y), int(x)
    return None


def _iters(seed=0, t=60):
    rng = np.random.default_rng(seed)
    none = np.clip(rng.normal(22, 6, t), 3, 40).round()
    affine = np.concatenate([none[:1], np.clip(rng.normal(10, 4, t - 1), 0, 40).round()])
    return none, affine


def test_plot_iterations_modes(tmp_path):
    none, affine = _iters()
    out = report.plot_iterations(tmp_path / "iters.png", {"none": none, "affine": affine},
                                 max_iters=40)
    assert out == tmp_path / "iters.png"
    img = _read_png(out)
    assert img.shape == (600, 1200, 3)  # 12 x 6 inches at 100 dpi
    assert _has_colour(img, AFFINE_BLUE)  # the affine line is drawn in its colour
    _only(tmp_path, "iters.png")


def test_plot_iterations_tracks_with_mask(tmp_path):
    none, affine = _iters()
    tracks = np.stack([affine, none])
    mask = np.ones(tracks.shape, bool)
    mask[1, :20] = False
    out = report.plot_iterations(tmp_path / "tracks.png", tracks, mask=mask,
                                 labels=["alice", "bob"])
    assert _read_png(out).shape == (600, 1200, 3)
    # 12 tracks: the legend is summarised instead of overflowing; still a valid figure.
    many = np.tile(affine, (12, 1))
    report.plot_iterations(tmp_path / "many.png", many)
    _only(tmp_path, "tracks.png", "many.png")


@pytest.mark.parametrize("bad, match", [
    ({}, "empty dict"),
    (np.zeros((2, 0)), "no frames"),
    ({"affine": []}, "no frames"),
    (np.zeros((2, 3, 4)), "expected"),
])
def test_plot_iterations_rejects_empty(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        report.plot_iterations(tmp_path / "x.png", bad)
    # A track masked everywhere has no frame either.
    with pytest.raises(ValueError, match="no frames"):
        report.plot_iterations(tmp_path / "x.png", np.ones((2, 5)),
                               mask=np.array([[True] * 5, [False] * 5]))
    _only(tmp_path)


def _curves(rows=20, max_iters=40, seed=1):
    rng = np.random.default_rng(seed)
    curves = np.full((rows, max_iters), np.nan)
    for i in range(rows):
        n = max_iters if i == 0 else int(rng.integers(1, 12))
        x = np.arange(n)
        curves[i, :n] = (-0.2 if i == 0 else -0.9) - 0.8 * (1 - np.exp(-x / 8))
    return curves


def test_plot_loss_curves_nan_padded(tmp_path):
    curves = _curves()
    curves[5] = np.nan  # a frame with no evaluation (no face) is skipped, not an error
    out = report.plot_loss_curves(tmp_path / "loss.png", curves, np.arange(20) * 2)
    img = _read_png(out)
    assert img.shape == (500, 900, 3)
    assert _has_colour(img, COLD_RED)  # the cold start stands out in red
    # Without a cold row the red line is absent: the colour really marks cold starts.
    out = report.plot_loss_curves(tmp_path / "warm.png", curves[1:], np.arange(19),
                                  cold=np.zeros(19, bool))
    assert not _has_colour(_read_png(out), COLD_RED, min_pixels=1)
    _only(tmp_path, "loss.png", "warm.png")


def test_loss_rows_selection_keeps_cold_and_spreads_warm():
    cold = np.zeros(30, bool)
    cold[[0, 17]] = True
    rows = report._pick_rows(np.arange(30), cold, 6)
    assert list(rows[:2]) == [0, 17] and len(rows) == 6
    assert rows[2] == 1 and rows[-1] == 29  # warm rows from first to last


def test_plot_loss_curves_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="every curve is NaN"):
        report.plot_loss_curves(tmp_path / "x.png", np.full((3, 40), np.nan), [0, 1, 2])
    with pytest.raises(ValueError, match="expected"):
        report.plot_loss_curves(tmp_path / "x.png", np.zeros((0, 40)), [])
    with pytest.raises(ValueError, match="frame ids"):
        report.plot_loss_curves(tmp_path / "x.png", _curves(3), [0, 1])
    _only(tmp_path)


def _crops(n, size, seed=2):
    rng = np.random.default_rng(seed)
    orig = [rng.integers(0, 256, (size, size + 4 * i, 3), dtype=np.uint8) for i in range(n)]
    prot = [np.clip(o.astype(int) + rng.integers(-6, 7, o.shape), 0, 255).astype(np.uint8)
            for o in orig]
    return orig, prot


def test_crop_strip_shows_exact_pixels(tmp_path):
    orig, prot = _crops(3, 140)
    labels = [{"frame": 0, "protection": 1.0512, "ssim": 0.9812}, "frame 9", {"frame": 18}]
    out = report.crop_strip(tmp_path / "strip.png", orig, prot, labels)
    img = _read_png(out)
    assert 400 < img.shape[1] < 800 and 400 < img.shape[0] < 700
    # Every panel is in the PNG pixel for pixel, rows stacked in order: original, protected,
    # amplified difference (|p - o| * 10, rounded and clipped, as the docstring says).
    for o, p in zip(orig, prot):
        diff = np.clip(np.abs(p.astype(int) - o) * 10, 0, 255).astype(np.uint8)
        at = [_find_block(img, block) for block in (o, p, diff)]
        assert None not in at
        assert at[0][1] == at[1][1] == at[2][1] and at[0][0] < at[1][0] < at[2][0]
    _only(tmp_path, "strip.png")


def test_crop_strip_enlarges_small_crops(tmp_path):
    orig, prot = _crops(2, 40)
    img = _read_png(report.crop_strip(tmp_path / "small.png", orig, prot, title=None))
    # The longest crop side is 44 px (40 x 44), so each pixel is repeated ceil(128 / 44) = 3
    # times to reach min_cell=128; both columns share the factor.
    for o in orig:
        assert _find_block(img, np.repeat(np.repeat(o, 3, axis=0), 3, axis=1)) is not None
    assert _find_block(img, o) is None


def test_crop_strip_rejects_bad_input(tmp_path):
    orig, prot = _crops(2, 32)
    with pytest.raises(ValueError, match="no crops"):
        report.crop_strip(tmp_path / "x.png", [], [])
    with pytest.raises(ValueError, match="protected crops"):
        report.crop_strip(tmp_path / "x.png", orig, prot[:1])
    with pytest.raises(ValueError, match="labels"):
        report.crop_strip(tmp_path / "x.png", orig, prot, ["one"])
    with pytest.raises(ValueError, match="vs protected"):
        report.crop_strip(tmp_path / "x.png", orig, prot[::-1])
    with pytest.raises(ValueError, match="uint8"):
        report.crop_strip(tmp_path / "x.png", [o / 255 for o in orig], prot)
    _only(tmp_path)


def test_side_by_side(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    b = a.copy()
    b[30:60, 50:100] ^= 7
    img = _read_png(report.side_by_side(tmp_path / "sbs.png", a, b, title="frame 3"))
    ya, xa = _find_block(img, a)
    yb, xb = _find_block(img, b)
    assert ya == yb and xb > xa + 160  # side by side, original on the left, unresampled
    # A frame wider than max_width / 2 is shrunk, the PNG stays within max_width.
    wide = rng.integers(0, 256, (300, 1000, 3), dtype=np.uint8)
    img = _read_png(report.side_by_side(tmp_path / "wide.png", wide, wide, max_width=800))
    assert img.shape[1] <= 800 and img.shape[0] < 300
    with pytest.raises(ValueError, match="vs protected"):
        report.side_by_side(tmp_path / "x.png", a, a[:, :100])
    with pytest.raises(ValueError, match="uint8"):
        report.side_by_side(tmp_path / "x.png", np.zeros((0, 4, 3), np.uint8),
                            np.zeros((0, 4, 3), np.uint8))
    _only(tmp_path, "sbs.png", "wide.png")


def test_failed_write_leaves_nothing(tmp_path):
    none, _ = _iters()
    with pytest.raises(image_io.OutputError, match="extension"):
        report.plot_iterations(tmp_path / "iters.txt", {"none": none})
    _only(tmp_path)


def test_pyplot_state_untouched():
    # The writers must not import pyplot (its global figure registry and backend switching).
    code = ("import sys, numpy as np, tempfile, os\n"
            "from faceveil.engine.commands import report\n"
            "d = tempfile.mkdtemp()\n"
            "report.plot_iterations(os.path.join(d, 'a.png'), {'none': np.arange(5.0)})\n"
            "print('matplotlib.pyplot' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
