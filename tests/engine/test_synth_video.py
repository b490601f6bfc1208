"""Synthetic demo video: shapes, smooth motion, ground-truth transforms, determinism, file I/O."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from skimage import data

from faceveil.engine.pipeline import align, synth_video, video_io

# A small clip keeps the file quick; at 180 x 320 the camera still magnifies the photo (~0.8x
# zoom), so resampling errors stay at the level of the full-size demo.
SIZE = (180, 320)
FPS = 25.0


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()


@pytest.fixture(scope="module")
def clip(photo):
    return synth_video.make_demo_video(photo, seconds=1.6, fps=FPS, size=SIZE, key=3,
                                       focus=synth_video.ASTRONAUT_FACE)


@pytest.fixture(scope="module")
def clip_no_light(photo):
    return synth_video.make_demo_video(photo, seconds=1.6, fps=FPS, size=SIZE, key=3,
                                       focus=synth_video.ASTRONAUT_FACE, light=0.0)


def test_shapes_dtypes_and_amplitudes(clip):
    n = 40  # round(1.6 s * 25 fps)
    assert clip.frames.shape == (n, *SIZE, 3) and clip.frames.dtype == np.uint8
    assert clip.transforms.shape == (n, 2, 3) and clip.transforms.dtype == np.float32
    assert clip.gain.shape == clip.gamma.shape == (n,)
    assert clip.fps == FPS
    # Defaults: gain in 1 +- 0.12, gamma in exp(+-0.12).
    assert np.all(np.abs(clip.gain - 1) <= 0.12 + 1e-6)
    assert np.all(np.abs(np.log(clip.gamma)) <= 0.12 + 1e-6)
    # The transforms are similarities (no shear): equal diagonal, opposite off-diagonal.
    lin = clip.transforms[:, :, :2]
    np.testing.assert_allclose(lin[:, 0, 0], lin[:, 1, 1], atol=1e-6)
    np.testing.assert_allclose(lin[:, 0, 1], -lin[:, 1, 0], atol=1e-6)
    # Rotation stays within the default 6 degrees.
    angle = np.degrees(np.arctan2(lin[:, 1, 0], lin[:, 0, 0]))
    assert np.all(np.abs(angle) <= 6.0 + 1e-3)
    # The frames are not flat, and not all alike.
    assert clip.frames.std() > 30
    assert np.abs(clip.frames[0].astype(int) - clip.frames[-1]).mean() > 5


def test_signals_reach_their_amplitude():
    sig = synth_video.smooth_signals(jax.random.key(0), 4, np.arange(100) / 25.0)
    np.testing.assert_allclose(np.abs(sig).max(axis=1), 1.0, atol=1e-12)


def test_motion_is_smooth(clip):
    frames = clip.frames.astype(np.float32) / 255
    step = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    # Measured (keys 0, 3, 7, this size and 360 x 640): consecutive frames differ by 0.03-0.04
    # on average, 0.06 at most (the astronaut is full of sharp edges, so a 1-2 px shift shows),
    # frames 20 apart by 0.21-0.26; a jump cut would be as large as the latter.
    assert step.max() < 0.08
    far = np.abs(frames[20:] - frames[:-20]).mean()
    assert step.max() < far / 3
    # Geometry: the face centre moves at most a few pixels per frame (measured max 1.4 px for
    # this key, 3.9 px over those keys at 360 x 640).
    face = np.array([synth_video.ASTRONAUT_FACE])
    pos = np.stack([align.apply_transform(align.invert(m), face)[0] for m in clip.transforms])
    assert np.linalg.norm(np.diff(pos, axis=0), axis=1).max() < 4.0


def test_frames_stay_inside_the_photo(photo, clip):
    # If any bilinear tap fell outside the photo, the warp's fill value would show: warping with
    # fill 0 and fill 1 must then differ somewhere.
    img = photo.astype(np.float32) / 255
    warp_all = jax.jit(jax.vmap(lambda m, fill: align.warp(img, m, SIZE, fill),
                                in_axes=(0, None)))
    np.testing.assert_array_equal(warp_all(clip.transforms, 0.0), warp_all(clip.transforms, 1.0))
    with pytest.raises(ValueError, match="zoom >="):
        synth_video.make_demo_video(photo, seconds=0.2, size=SIZE, zoom=0.2)


def test_transforms_are_what_the_frames_show(clip_no_light):
    frames = clip_no_light.frames.astype(np.float32) / 255
    h, w = SIZE
    for t in (7, 20, 39):
        m = synth_video.point_map(clip_no_light.transforms, t, 0)  # frame t -> frame 0 pixels
        pred = np.asarray(align.warp(frames[0], m, SIZE))
        # Interior: pixels whose source lies 2 px inside frame 0 (no border blending).
        v, u = np.mgrid[0:h, 0:w].astype(np.float32)
        src = np.asarray(align.apply_transform(m, np.stack([u, v], -1)))
        inside = ((src[..., 0] > 2) & (src[..., 0] < w - 3)
                  & (src[..., 1] > 2) & (src[..., 1] < h - 3))
        assert inside.mean() > 0.5
        err = np.abs(pred - frames[t])[inside].mean()
        # Measured ~0.006 (two bilinear resamplings plus uint8 rounding); the identity map,
        # i.e. assuming no motion, is 0.14-0.24, and the inverse map 0.19-0.32.
        assert err < 0.02
        assert np.abs(frames[0] - frames[t])[inside].mean() > 3 * err


def test_landmarks_map_by_point_map(clip):
    # Points of the photo seen in frame a land where point_map(a -> b) puts them in frame b.
    photo_pts = np.array([[200.0, 100.0], [245.0, 100.0], [222.0, 140.0]])
    in_frame = [align.apply_transform(align.invert(m), photo_pts) for m in clip.transforms]
    m = synth_video.point_map(clip.transforms, 5, 30)
    np.testing.assert_allclose(align.apply_transform(m, in_frame[5]), in_frame[30], atol=1e-3)


def test_light_change_is_gain_and_gamma(clip, clip_no_light):
    # Same key, so the same motion; the lit clip is the unlit one through gain * x ** gamma.
    np.testing.assert_array_equal(clip.transforms, clip_no_light.transforms)
    x = clip_no_light.frames.astype(np.float64) / 255
    want = np.clip(clip.gain[:, None, None, None] * x ** clip.gamma[:, None, None, None], 0, 1)
    # Rounding before vs after the tone curve: measured at most 1.3 uint8 levels (its slope
    # gain * gamma * x ** (gamma - 1) exceeds 1 in the shadows).
    np.testing.assert_allclose(clip.frames / 255, want, atol=2.5 / 255)
    lum = clip.frames.mean(axis=(1, 2, 3))
    assert lum.max() - lum.min() > 5  # the light change is visible


def test_deterministic_for_a_key(photo, clip):
    again = synth_video.make_demo_video(photo, seconds=1.6, fps=FPS, size=SIZE, key=3,
                                        focus=synth_video.ASTRONAUT_FACE)
    np.testing.assert_array_equal(again.frames, clip.frames)
    np.testing.assert_array_equal(again.transforms, clip.transforms)
    other = synth_video.demo_motion(photo.shape[:2], seconds=1.6, fps=FPS, size=SIZE,
                                    key=jax.random.key(4), focus=synth_video.ASTRONAUT_FACE)
    assert np.abs(other[0] - clip.transforms).max() > 1.0


def test_write_and_read_back(tmp_path, clip):
    path = tmp_path / "demo.mp4"
    assert synth_video.write_demo_video(path, clip.frames, clip.fps) == str(path)
    info = video_io.probe(path)
    assert (info.frames, info.fps, info.width, info.height) == (40, FPS, SIZE[1], SIZE[0])
    back = video_io.read_video(path)
    assert back.shape == clip.frames.shape
    # H.264 at imageio's quality 8 is close but lossy: measured ~2.1 levels mean error.
    assert np.abs(back.astype(int) - clip.frames).mean() < 4
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]  # no temporary file left
    with pytest.raises(ValueError, match="uint8"):
        synth_video.write_demo_video(tmp_path / "bad.mp4", clip.frames[:0], clip.fps)
    with pytest.raises(ValueError, match="even"):
        synth_video.write_demo_video(tmp_path / "odd.mp4", clip.frames[:2, :-1], clip.fps)
