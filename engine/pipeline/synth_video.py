"""A few seconds of synthetic video from one photo: smooth head motion plus a light change.

The demo of the video cloaking job (DESIGN.md method 1) needs a clip with a real face that
moves the way faces move in video: a little translation, in-plane rotation, zoom, and a slow
change of light. `make_demo_video` films one photo with a virtual camera: every frame is a
similarity warp of the photo (`faceveil.engine.pipeline.align.warp`, bilinear, jit + vmap over frames)
followed by a brightness gain and a gamma, all driven by sums of low-frequency sinusoids, so
consecutive frames are related by near-identity similarity maps: exactly the setting where
warping the previous frame's cloak by the landmark affine pays off.

Transforms follow `align`'s convention: `transforms[t]` is the (2, 3) map from frame-t pixels
(u, v) to photo pixels (x, y), and frame t is `tone(warp(photo, transforms[t]))`. Hence a scene
point at frame-a pixel p sits at frame-b pixel `point_map(transforms, a, b) @ [p, 1]`, and
`warp(frame_a, point_map(transforms, b, a))` reproduces frame b wherever frame a saw the same
part of the photo (up to the light change and resampling).

The camera never looks past the photo's edge: the zoom is chosen (or checked) so that, at the
worst combination of rotation and zoom of the clip, every frame's footprint stays inside the
photo, so no frame has a border (the fill value of the warp is never read).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from faceveil.engine.pipeline import align, video_io

# Centre of the face (between the eyes and the mouth) in scikit-image's astronaut photo
# (skimage.data.astronaut(), 512 x 512), the demo's default image; read off the picture.
ASTRONAUT_FACE = (222.0, 112.0)

# Sinusoids per motion signal and their frequency band (Hz): slow enough that a 25 fps frame
# moves a few pixels, fast enough that a 4 s clip shows more than one drift.
_N_SINES = 3
_FREQ_BAND = (0.1, 0.45)
# Frames warped per step of lax.map: bounds the [batch, h, w, 3] float32 temporaries of the
# four bilinear taps (about 40 MB at 360 x 640) on a small CPU box.
_RENDER_BATCH = 8
# Distance kept between a frame's footprint and the photo's outermost pixel centres.
_EDGE_MARGIN = 0.5


class DemoVideo(NamedTuple):
    """A synthetic clip and the ground truth that produced it."""

    frames: np.ndarray  # [T, h, w, 3] uint8 RGB
    transforms: np.ndarray  # [T, 2, 3] float32 frame-t pixels -> photo pixels
    gain: np.ndarray  # [T] float32 brightness factor of frame t
    gamma: np.ndarray  # [T] float32 exponent of frame t: out = clip(gain * in ** gamma)
    fps: float


def smooth_signals(key: ArrayLike, num: int, times: np.ndarray) -> np.ndarray:
    """Returns [num, T] smooth signals in [-1, 1], each a sum of low-frequency sinusoids.

    Each signal is rescaled by its own maximum over `times`, so it reaches -1 or +1 somewhere in
    the clip (the amplitude parameters of `make_demo_video` are the motion actually seen).
    """
    k_f, k_p, k_a = jax.random.split(jnp.asarray(key), 3)
    freq = np.asarray(jax.random.uniform(k_f, (num, _N_SINES), minval=_FREQ_BAND[0],
                                         maxval=_FREQ_BAND[1]), np.float64)
    phase = np.asarray(jax.random.uniform(k_p, (num, _N_SINES), maxval=2 * np.pi), np.float64)
    amp = np.asarray(jax.random.uniform(k_a, (num, _N_SINES), minval=0.5, maxval=1.0), np.float64)
    t = np.asarray(times, np.float64)
    sig = np.einsum("nk,nkt->nt", amp, np.sin(2 * np.pi * freq[..., None] * t + phase[..., None]))
    peak = np.max(np.abs(sig), axis=1, keepdims=True)
    return sig / np.maximum(peak, 1e-12)


def _half_extent(a: float, b: float, max_angle: float) -> float:
    """Returns max over |theta| <= max_angle of a |cos theta| + b |sin theta|."""
    # a cos + b sin peaks at theta = atan(b / a) with value hypot(a, b), and increases before.
    if math.atan2(b, a) <= max_angle:
        return math.hypot(a, b)
    return a * math.cos(max_angle) + b * math.sin(max_angle)


def min_zoom(image_shape: tuple[int, int], size: tuple[int, int], *, angle_deg: float,
             zoom_amp: float, shift: float) -> float:
    """Returns the smallest base zoom at which every frame of the motion stays inside the photo.

    Args:
      image_shape: (H, W) of the photo.
      size: (h, w) of the frames.
      angle_deg: largest in-plane rotation, degrees.
      zoom_amp: zoom varies as zoom * exp(zoom_amp * s(t)), s in [-1, 1].
      shift: largest translation of the camera centre along each axis, photo pixels.
    """
    big_h, big_w = image_shape
    h, w = size
    a, b, th = (w - 1) / 2, (h - 1) / 2, math.radians(abs(angle_deg))
    ext_x, ext_y = _half_extent(a, b, th), _half_extent(b, a, th)
    # Footprint half-extent in photo pixels is ext * s, s = exp(zoom_amp s(t)) / zoom at most
    # exp(|zoom_amp|) / zoom; it plus the shift plus the margin must fit in half the photo.
    room_x = (big_w - 1) / 2 - _EDGE_MARGIN - shift
    room_y = (big_h - 1) / 2 - _EDGE_MARGIN - shift
    if min(room_x, room_y) <= 0:
        raise ValueError(f"shift={shift} photo pixels leaves no room in a {big_w}x{big_h} photo")
    return math.exp(abs(zoom_amp)) * max(ext_x / room_x, ext_y / room_y)


def demo_motion(image_shape: tuple[int, int], *, seconds: float = 4.0, fps: float = 25.0,
                size: tuple[int, int] = (360, 640), key: ArrayLike | None = None,
                focus: tuple[float, float] | None = None, zoom: float | None = None,
                angle_deg: float = 6.0, zoom_amp: float = 0.1, shift: float = 24.0,
                light: float = 0.12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (transforms [T, 2, 3], gain [T], gamma [T]) of a smooth synthetic camera.

    Args: as `make_demo_video` (image_shape is the photo's (H, W)).
    """
    big_h, big_w = image_shape[:2]
    h, w = size
    n = round(seconds * fps)
    if n < 1:
        raise ValueError(f"seconds * fps = {seconds} * {fps} gives no frame")
    if min(h, w) < 2:
        raise ValueError(f"frame size {size} is too small")
    needed = min_zoom((big_h, big_w), size, angle_deg=angle_deg, zoom_amp=zoom_amp, shift=shift)
    if zoom is None:
        zoom = needed
    elif zoom < needed:
        raise ValueError(
            f"zoom {zoom:.3f} shows beyond the {big_w}x{big_h} photo for a {w}x{h} frame with "
            f"this motion; use zoom >= {needed:.3f} (or less rotation/zoom/shift)")
    if key is None or isinstance(key, int):
        key = jax.random.key(0 if key is None else key)
    times = np.arange(n) / fps
    sx, sy, sa, sz, sg, sgam = smooth_signals(key, 6, times)

    # Footprint half-extents at the worst rotation and zoom (as in min_zoom), so that clamping
    # the base centre into [lo, hi] keeps every frame inside the photo with its shift added.
    th = math.radians(abs(angle_deg))
    s_max = math.exp(abs(zoom_amp)) / zoom
    ext_x = s_max * _half_extent((w - 1) / 2, (h - 1) / 2, th) + _EDGE_MARGIN + shift
    ext_y = s_max * _half_extent((h - 1) / 2, (w - 1) / 2, th) + _EDGE_MARGIN + shift
    fx, fy = focus if focus is not None else ((big_w - 1) / 2, (big_h - 1) / 2)
    base_x = float(np.clip(fx, ext_x, big_w - 1 - ext_x))
    base_y = float(np.clip(fy, ext_y, big_h - 1 - ext_y))

    px, py = base_x + shift * sx, base_y + shift * sy
    theta = np.radians(angle_deg) * sa
    scale = np.exp(-zoom_amp * sz) / zoom  # photo pixels per frame pixel
    cos, sin = scale * np.cos(theta), scale * np.sin(theta)
    cu, cv = (w - 1) / 2, (h - 1) / 2
    # photo = p + s R(theta) ([u, v] - c): the camera turns by theta, the scene by -theta.
    transforms = np.stack([
        np.stack([cos, -sin, px - cos * cu + sin * cv], axis=-1),
        np.stack([sin, cos, py - sin * cu - cos * cv], axis=-1),
    ], axis=1).astype(np.float32)
    gain = (1.0 + light * sg).astype(np.float32)
    gamma = np.exp(light * sgam).astype(np.float32)
    return transforms, gain, gamma


@functools.partial(jax.jit, static_argnames=("size",))
def render(image: ArrayLike, transforms: ArrayLike, gain: ArrayLike, gamma: ArrayLike,
           size: tuple[int, int]) -> jax.Array:
    """Returns the uint8 frames [T, h, w, 3]: clip(gain * warp(image, M_t) ** gamma), rounded.

    Args:
      image: [H, W, 3] photo, float in [0, 1].
      transforms: [T, 2, 3] frame pixels -> photo pixels.
      gain, gamma: [T] light of each frame.
      size: (h, w) of the frames.
    """
    image = jnp.asarray(image, jnp.float32)

    def frame(args):
        m, g, gam = args
        x = align.warp(image, m, size)
        # max(., 0) keeps x ** gamma defined where bilinear rounding dips below 0.
        y = g * jnp.maximum(x, 0.0) ** gam
        return jnp.round(jnp.clip(y, 0.0, 1.0) * 255.0).astype(jnp.uint8)

    # lax.map with batch_size vmaps `frame` over batches of frames inside one compiled loop.
    return lax.map(frame, (jnp.asarray(transforms, jnp.float32), jnp.asarray(gain, jnp.float32),
                           jnp.asarray(gamma, jnp.float32)), batch_size=_RENDER_BATCH)


def make_demo_video(image: ArrayLike, *, seconds: float = 4.0, fps: float = 25.0,
                    size: tuple[int, int] = (360, 640), key: ArrayLike | None = None,
                    focus: tuple[float, float] | None = None, zoom: float | None = None,
                    angle_deg: float = 6.0, zoom_amp: float = 0.1, shift: float = 24.0,
                    light: float = 0.12) -> DemoVideo:
    """Returns a DemoVideo: round(seconds * fps) frames filming `image` with a moving camera.

    Motion and light are smooth (sums of low-frequency sinusoids, see `smooth_signals`), and
    every signal reaches its stated amplitude somewhere in the clip. The same key gives the
    same clip.

    Args:
      image: uint8 [H, W, 3] RGB photo (e.g. skimage.data.astronaut()).
      seconds: clip length.
      fps: frame rate.
      size: (height, width) of the frames.
      key: jax PRNG key (or an int seed) for the motion; default jax.random.key(0).
      focus: (x, y) photo pixel the camera centres on when it can (the frame must stay inside
        the photo, so near an edge the camera stops short); default the photo's centre. For the
        astronaut pass ASTRONAUT_FACE.
      zoom: frame pixels per photo pixel at rest; default the smallest that keeps every frame
        inside the photo (ValueError if a given zoom is smaller than that).
      angle_deg: largest in-plane rotation.
      zoom_amp: the zoom varies by the factor exp(+-zoom_amp).
      shift: largest camera translation along x and along y, photo pixels.
      light: the brightness gain varies in 1 +- light and the gamma in exp(+-light).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    transforms, gain, gamma = demo_motion(
        image.shape[:2], seconds=seconds, fps=fps, size=size, key=key, focus=focus, zoom=zoom,
        angle_deg=angle_deg, zoom_amp=zoom_amp, shift=shift, light=light)
    photo = jnp.asarray(image, jnp.float32) / 255.0
    frames = np.asarray(render(photo, transforms, gain, gamma, tuple(int(s) for s in size)))
    return DemoVideo(frames, transforms, gain, gamma, float(fps))


def point_map(transforms: ArrayLike, src: int, dst: int) -> np.ndarray:
    """Returns the (2, 3) map from frame-`src` pixels to frame-`dst` pixels of the same point.

    Landmarks found at p in frame src lie at `align.apply_transform(point_map(T, src, dst), p)`
    in frame dst; and `align.warp(frame_src, point_map(T, dst, src), size)` resamples frame src
    onto frame dst's pixel grid.
    """
    transforms = np.asarray(transforms, np.float32)
    return np.asarray(align.compose(align.invert(transforms[dst]), transforms[src]))


def write_demo_video(path: str | os.PathLike, frames: ArrayLike, fps: float) -> str:
    """Returns the path written: uint8 frames [T, h, w, 3] as an H.264 video (atomic write)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be uint8 [T, h, w, 3] with T >= 1, got "
                         f"{frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        # H.264 in yuv420p halves the chroma resolution; libx264 refuses odd sides.
        raise ValueError(f"H.264 needs an even frame size, got {frames.shape[2]}x{frames.shape[1]}")
    with video_io.VideoWriter(path, fps) as writer:
        writer.write(frames)
    return os.fspath(path)
