"""The static MTCNN pipeline against facenet-pytorch 2.6.0 MTCNN (CPU torch 2.13.0) on real photos.

To keep compilation to a few programs, every photo is letterboxed onto one 480x640 canvas
(aspect kept, gray border), so a single compiled detector serves all per-frame tests and one
more serves the batch test. The oracle sees exactly the same uint8 arrays.
"""

from __future__ import annotations

import importlib.util
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faceveil.engine.pipeline import detect as D
from faceveil.engine.pipeline import pyramid
from tests.conftest import store_params

CANVAS = (480, 640)  # (H, W) of every test frame
PHOTOS = {
    "two_people": "multi/two_people.jpg",
    "multiface": "multi/multiface.jpg",
    "obama_and_biden": "multi/obama_and_biden.jpg",
    "kit_with_rose": "multi/kit_with_rose.jpg",
}


def letterbox(path, canvas=CANVAS) -> np.ndarray:
    """Returns the photo resized to fit `canvas` (aspect kept) on a gray [H, W, 3] uint8 frame."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = min(canvas[0] / im.height, canvas[1] / im.width)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.BILINEAR)
    out = np.full((*canvas, 3), 128, np.uint8)
    out[:im.height, :im.width] = np.asarray(im)
    return out


@pytest.fixture(scope="module")
def params():
    """Returns the MTCNN params as jax arrays (fetched into the store when missing)."""
    return jax.tree.map(jnp.asarray, store_params("mtcnn"))


@pytest.fixture(scope="module")
def frames(data_dir) -> dict[str, np.ndarray]:
    """Returns the letterboxed test photos by name."""
    return {name: letterbox(data_dir / rel) for name, rel in PHOTOS.items()}


@pytest.fixture(scope="module")
def single(frames, params) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Returns our per-frame (boxes, scores, landmarks) for every photo (one compiled program)."""
    return {name: D.to_lists(D.detect(f[None], params))[0] for name, f in frames.items()}


@pytest.fixture(scope="module")
def oracle():
    """Returns facenet-pytorch's MTCNN(keep_all=True), the reference detector."""
    pytest.importorskip("torch")
    from faceveil.benchmarks._oracle_shims import facenet_pytorch_mtcnn

    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch (the oracle) is not installed")
    return facenet_pytorch_mtcnn(keep_all=True)


def oracle_detect(oracle, frame):
    """Returns facenet-pytorch's (boxes, scores, landmarks) sorted by descending score."""
    boxes, probs, points = oracle.detect(Image.fromarray(frame), landmarks=True)
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    boxes, probs = np.asarray(boxes, float), np.asarray(probs, float)
    order = np.argsort(-probs)  # it sorts by area; ours by score
    return boxes[order], probs[order], np.asarray(points, float)[order]


# ------------------------------------------------------------------ whole-pipeline behaviour


def test_two_people_has_two_sane_faces(single):
    boxes, scores, marks = single["two_people"]
    assert len(scores) == 2
    assert (scores > 0.99).all()
    # Faces are sorted by score.
    assert (np.diff(scores) <= 0).all()
    for box, m in zip(boxes, marks):
        (lex, ley), (rex, rey), (nx, ny), (mlx, mly), (mrx, mry) = m
        assert lex < rex and mlx < mrx  # image-left first
        assert max(ley, rey) < ny < min(mly, mry)  # eyes above nose above mouth
        assert lex < nx < rex
        # Landmarks lie inside their face box.
        assert (m[:, 0] > box[0]).all() and (m[:, 0] < box[2]).all()
        assert (m[:, 1] > box[1]).all() and (m[:, 1] < box[3]).all()
    # The two faces are different people side by side, not overlapping.
    assert boxes[0, 2] < boxes[1, 0] or boxes[1, 2] < boxes[0, 0]


@pytest.mark.parametrize("name", list(PHOTOS))
def test_matches_facenet_pytorch(single, frames, oracle, name):
    ours = single[name]
    theirs = oracle_detect(oracle, frames[name])
    # Same faces in the same order: counts equal and scores sorted alike.
    assert len(ours[1]) == len(theirs[1]), (ours[1], theirs[1])
    if name == "multiface":
        assert len(ours[1]) >= 5  # several clearly visible faces in that photo
    # Oracle tolerance of the task: 2 px; the port in fact agrees to ~1e-3 px (fact sheet).
    np.testing.assert_allclose(ours[0], theirs[0], atol=2.0)
    np.testing.assert_allclose(ours[2], theirs[2], atol=2.0)
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-3)


def test_blank_and_noise_frames_have_no_face(params):
    gray = np.full((1, *CANVAS, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, *CANVAS, 3), dtype=np.uint8)
    for frame in (gray, noise):
        det = D.detect(frame, params)
        assert not np.asarray(det.valid).any()
        assert det.boxes.shape == (1, 16, 4) and det.landmarks.shape == (1, 16, 5, 2)
        assert not np.asarray(det.scores).any()


def test_batch_equals_single_frames(frames, single, params):
    names = list(PHOTOS)
    # Float frames in [0, 1] (faceveil's convention) take the same 8-bit path as uint8.
    batch = np.stack([frames[n] for n in names]).astype(np.float32) / 255.0
    det = D.detect(batch, params)
    assert det.boxes.shape == (len(names), 16, 4)
    valid = np.asarray(det.valid)
    # Valid slots come first in every frame.
    assert all((np.diff(v.astype(int)) <= 0).all() for v in valid)
    for i, (b, s, m) in enumerate(D.to_lists(det)):
        rb, rs, rm = single[names[i]]
        assert len(s) == len(rs)
        # Same computation on a batch axis; only float reassociation can differ.
        np.testing.assert_allclose(b, rb, atol=1e-3)
        np.testing.assert_allclose(m, rm, atol=1e-3)
        np.testing.assert_allclose(s, rs, atol=1e-5)


def test_float_frames_round_to_the_uint8_levels(frames):
    u8 = frames["two_people"]
    np.testing.assert_array_equal(D._to_pixels(jnp.asarray(u8 / 255.0, jnp.float32)), u8)


def test_second_call_does_not_compile(frames, params, caplog):
    x = frames["kit_with_rose"][None]
    jax.block_until_ready(D.detect(x, params))
    traces = D.trace_count()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        jax.block_until_ready(D.detect(x, params))
    assert D.trace_count() == traces
    compiled = [r.getMessage() for r in caplog.records if "compil" in r.getMessage().lower()]
    assert not compiled, compiled


def test_largest_face_and_bad_shapes(single, frames, params):
    det = D.detect(frames["obama_and_biden"][None], params)
    box, score, marks = D.largest_face(det, 0)
    boxes = single["obama_and_biden"][0]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert np.isclose((box[2] - box[0]) * (box[3] - box[1]), areas.max())
    assert marks.shape == (5, 2) and 0.7 < score <= 1.0
    assert D.largest_face(D.detect(np.zeros((1, *CANVAS, 3), np.uint8), params), 0) is None
    with pytest.raises(ValueError, match="RGB"):
        D.detect(np.zeros((1, 8, 8), np.uint8), params)


# ------------------------------------------------------------------ the static building blocks


def test_summed_area_table_is_exact():
    img = np.random.default_rng(0).integers(0, 256, (77, 131, 3), dtype=np.uint8)
    ref = np.pad(img.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0), (0, 0)))
    np.testing.assert_array_equal(np.asarray(pyramid.summed_area_table(img)), ref)


def test_pyramid_matches_torch_area_resampling():
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(1).integers(0, 256, (97, 123, 3), dtype=np.uint8)
    sat = pyramid.summed_area_table(img)
    timg = torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32))
    levels = pyramid.plan_pyramid(97, 123, 20, 0.709)
    # facenet-pytorch: scales m * 0.709**k while min side * scale >= 12, m = 12 / 20.
    assert [lv.size for lv in levels][:2] == [(int(97 * 0.6 + 1), int(123 * 0.6 + 1)),
                                              (int(97 * 0.6 * 0.709 + 1),
                                               int(123 * 0.6 * 0.709 + 1))]
    for lv in levels:
        ref = torch.nn.functional.interpolate(timg, size=lv.size, mode="area")
        ours = np.asarray(pyramid.resample_level(sat, lv))
        # float32 mean of <= 9 pixels vs exact integer sum / count: ~1e-5 apart.
        np.testing.assert_allclose(ours, ref[0].numpy().transpose(1, 2, 0), atol=1e-4)


def test_crop_resample_matches_torch_slices():
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    sat = pyramid.summed_area_table(img)
    blocks = np.array([[0, 0, 60, 80], [5, 7, 9, 30], [10, 3, 50, 20], [59, 79, 60, 80]])
    ours = np.asarray(pyramid.crop_resample(sat, blocks, 24))
    for (r0, c0, r1, c1), crop in zip(blocks, ours):
        patch = torch.from_numpy(img[r0:r1, c0:c1].transpose(2, 0, 1)[None].astype(np.float32))
        ref = torch.nn.functional.interpolate(patch, size=(24, 24), mode="area")
        np.testing.assert_allclose(crop, ref[0].numpy().transpose(1, 2, 0), atol=1e-4)


def test_cell_boxes_use_true_division():
    torch = pytest.importorskip("torch")
    # facenet-pytorch generateBoundingBox: floor((2 * i + 1) / scale) in float32; at scale 0.6
    # a multiply-by-reciprocal differs for ~10% of the cells (fact sheet, XLA pitfall).
    lv = pyramid.plan_pyramid(2000, 2000, 20, 0.709)[0]
    i = torch.arange(lv.grid[1], dtype=torch.float32)
    ref_lo = ((2 * i + 1) / lv.scale).floor().numpy()
    ref_hi = ((2 * i + 12) / lv.scale).floor().numpy()
    np.testing.assert_array_equal(lv.cell_x[:, 0], ref_lo)
    np.testing.assert_array_equal(lv.cell_x[:, 1], ref_hi)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_nms_matches_the_references(oracle, seed):
    import torch
    from facenet_pytorch.models.utils.detect_face import nms_numpy
    from torchvision.ops import nms  # torchvision semantics (our shim unless the real one exists)

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (200, 2)).astype(np.float32)
    wh = rng.uniform(5, 30, (200, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    valid = rng.uniform(size=200) < 0.8
    order = np.argsort(-scores, kind="stable")
    b, v = boxes[order], valid[order]

    keep = np.asarray(D.greedy_nms(jnp.asarray(b), jnp.asarray(v), 0.5))
    ref = nms(torch.from_numpy(b[v]), torch.from_numpy(scores[order][v]), 0.5).numpy()
    np.testing.assert_array_equal(np.flatnonzero(keep), np.flatnonzero(v)[np.sort(ref)])

    # facenet-pytorch's numpy NMS with the "Min" overlap and +1 areas (stage 3).
    keep = np.asarray(D.greedy_nms(jnp.asarray(b), jnp.asarray(v), 0.7, mode="min",
                                   plus_one=True))
    ref = nms_numpy(b[v], scores[order][v], 0.7, "Min")
    np.testing.assert_array_equal(np.flatnonzero(keep), np.flatnonzero(v)[np.sort(ref)])
