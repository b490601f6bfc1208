"""MTCNN P-Net, R-Net and O-Net (Zhang et al. 2016) in Flax, and their weight converter.

The weights are the ones shipped by the `mtcnn==0.1.1` package (mtcnn/data/mtcnn_weights.npy,
the original Caffe/MATLAB MTCNN weights, bit-identical to facenet-pytorch's pnet/rnet/onet.pt).
They were trained on W/H-transposed images; `convert` swaps kernel height and width once so
the nets here run on ordinary NHWC RGB images.

Data convention of every net: input NHWC RGB, already normalised as (x - 127.5) / 128 from
0..255 pixel values (`normalise`); outputs are NHWC maps (P-Net) or vectors (R-Net, O-Net).
Face probability is channel 1 of the softmax output.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from faceveil.models import store

PrecisionLike = jax.lax.Precision | str | None


def normalise(pixels: ArrayLike) -> jax.Array:
    """Returns 0..255 pixel values scaled as the MTCNN nets expect: (x - 127.5) / 128."""
    # 0.0078125 = 1/128 exactly, as in facenet-pytorch and the original MATLAB code.
    return (jnp.asarray(pixels, jnp.float32) - 127.5) * 0.0078125


class PReLU(nn.Module):
    """Per-channel PReLU (flax.linen.PReLU has a single scalar slope)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns x where x >= 0 and alpha[c] * x elsewhere, alpha per last-axis channel."""
        alpha = self.param("alpha", nn.initializers.constant(0.25), (self.features,))
        return jnp.where(x >= 0, x, alpha * x)


def max_pool_ceil(x: jax.Array, size: int, stride: int) -> jax.Array:
    """Returns a Caffe/torch ceil_mode max pool of NHWC `x` (padding only at the end)."""
    pads = []
    for n in x.shape[1:3]:
        out = math.ceil((n - size) / stride) + 1
        if (out - 1) * stride >= n:  # torch: the last window must start inside the input
            out -= 1
        pads.append((0, max((out - 1) * stride + size - n, 0)))
    return nn.max_pool(x, (size, size), (stride, stride), padding=pads)


def _conv(features: int, size: int, name: str, precision: PrecisionLike) -> nn.Conv:
    """Returns a VALID, stride-1 square conv layer with bias."""
    return nn.Conv(features, (size, size), padding="VALID", name=name, precision=precision)


def _dense(features: int, name: str, precision: PrecisionLike) -> nn.Dense:
    """Returns a dense layer with bias."""
    return nn.Dense(features, name=name, precision=precision)


def _flatten_whc(x: jax.Array) -> jax.Array:
    # The dense weights were trained on W/H-transposed maps: flatten in (W, H, C) order.
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (box regression [N,h,w,4], softmax face probabilities [N,h,w,2])."""
        conv = functools.partial(_conv, precision=self.precision)
        x = PReLU(10, name="prelu1")(conv(10, 3, "conv1")(x))
        x = max_pool_ceil(x, 2, 2)
        x = PReLU(16, name="prelu2")(conv(16, 3, "conv2")(x))
        x = PReLU(32, name="prelu3")(conv(32, 3, "conv3")(x))
        probs = jax.nn.softmax(conv(2, 1, "conv4_1")(x), axis=-1)
        reg = conv(4, 1, "conv4_2")(x)
        return reg, probs


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (box regression [N,4], softmax face probabilities [N,2]) for [N,24,24,3]."""
        conv = functools.partial(_conv, precision=self.precision)
        dense = functools.partial(_dense, precision=self.precision)
        x = PReLU(28, name="prelu1")(conv(28, 3, "conv1")(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(48, name="prelu2")(conv(48, 3, "conv2")(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(64, name="prelu3")(conv(64, 2, "conv3")(x))
        x = PReLU(128, name="prelu4")(dense(128, "dense4")(_flatten_whc(x)))
        probs = jax.nn.softmax(dense(2, "dense5_1")(x), axis=-1)
        reg = dense(4, "dense5_2")(x)
        return reg, probs


class ONet(nn.Module):
    """Output net on 48x48 crops: box regression, 5 landmarks, face probability."""

    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (regression [N,4], landmarks [N,10] as x1..x5,y1..y5 in crop units, probs [N,2]).

        Landmarks are fractions of the crop's width/height, in the order left eye, right eye,
        nose, mouth left, mouth right ("left" = image-left).
        """
        conv = functools.partial(_conv, precision=self.precision)
        dense = functools.partial(_dense, precision=self.precision)
        x = PReLU(32, name="prelu1")(conv(32, 3, "conv1")(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(64, name="prelu2")(conv(64, 3, "conv2")(x))
        x = max_pool_ceil(x, 3, 2)
        x = PReLU(64, name="prelu3")(conv(64, 3, "conv3")(x))
        x = max_pool_ceil(x, 2, 2)
        x = PReLU(128, name="prelu4")(conv(128, 2, "conv4")(x))
        x = PReLU(256, name="prelu5")(dense(256, "dense5")(_flatten_whc(x)))
        probs = jax.nn.softmax(dense(2, "dense6_1")(x), axis=-1)
        reg = dense(4, "dense6_2")(x)
        landmarks = dense(10, "dense6_3")(x)
        return reg, landmarks, probs


# Keras `set_weights` order of each net in mtcnn_weights.npy: (layer name, kind) per group of
# arrays; "conv" = kernel + bias + PReLU alpha (1,1,C); "dense" = kernel + bias (also the 1x1
# convs of P-Net's heads); "prelu" = alpha of a dense layer.
_LAYOUT = {
    "pnet": [("conv1", "conv"), ("conv2", "conv"), ("conv3", "conv"),
             ("conv4_1", "dense"), ("conv4_2", "dense")],
    "rnet": [("conv1", "conv"), ("conv2", "conv"), ("conv3", "conv"), ("dense4", "dense"),
             ("prelu4", "prelu"), ("dense5_1", "dense"), ("dense5_2", "dense")],
    "onet": [("conv1", "conv"), ("conv2", "conv"), ("conv3", "conv"), ("conv4", "conv"),
             ("dense5", "dense"), ("prelu5", "prelu"), ("dense6_1", "dense"),
             ("dense6_2", "dense"), ("dense6_3", "dense")],
}


def convert_arrays(raw: dict) -> dict:
    """Returns {'pnet', 'rnet', 'onet'} Flax params from the mtcnn .npy dict of Keras lists."""
    params = {}
    for net, layout in _LAYOUT.items():
        arrays = [np.asarray(a, np.float32) for a in raw[net]]
        expected = sum({"conv": 3, "dense": 2, "prelu": 1}[kind] for _, kind in layout)
        if len(arrays) != expected:
            raise ValueError(f"{net}: expected {expected} arrays in the weight file, "
                             f"found {len(arrays)}")
        out, i = {}, 0
        for name, kind in layout:
            if kind == "prelu":
                out[name] = {"alpha": arrays[i].reshape(-1)}
                i += 1
                continue
            kernel, bias = arrays[i], arrays[i + 1]
            i += 2
            if kernel.ndim == 4:
                # Swap kh and kw: the stored kernels expect a W/H-transposed image.
                kernel = np.ascontiguousarray(kernel.transpose(1, 0, 2, 3))
            out[name] = {"kernel": kernel, "bias": bias}
            if kind == "conv":
                out[f"prelu{name[4:]}"] = {"alpha": arrays[i].reshape(-1)}
                i += 1
        params[net] = out
    return params


def convert(npy_path: Path) -> dict:
    """Returns the Flax params {'pnet', 'rnet', 'onet'} read from mtcnn_weights.npy."""
    # The file is a pickled dict of lists (numpy object array); it comes from a pinned,
    # sha256-checked registry package, so allow_pickle is acceptable here.
    raw = np.load(npy_path, allow_pickle=True).item()
    return convert_arrays(raw)


def load() -> dict:
    """Returns the MTCNN params {'pnet', 'rnet', 'onet'} from the weight store as jax arrays."""
    return jax.tree.map(jnp.asarray, store.load("mtcnn"))


SOURCE = store.register(store.WeightSource(
    name="mtcnn",
    package="mtcnn",
    version="0.1.1",
    member="mtcnn/data/mtcnn_weights.npy",
    sha256="9e04e975abf93c7173e956df4b496d6da269e08b9e87f2daec963ee1176576b0",
    convert=convert,
))
