"""MTCNN P/R/O-Net ports against facenet-pytorch 2.6.0's torch nets (CPU torch 2.13.0).

The golden reference is facenet-pytorch's PNet/RNet/ONet with its bundled pnet/rnet/onet.pt,
an independent copy of the weights we convert from mtcnn==0.1.1's mtcnn_weights.npy. Our nets
take NHWC images; the torch nets take NCHW, so the inputs are transposed for them.
"""

from __future__ import annotations

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faceveil.models import mtcnn
from tests.conftest import store_params

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def params():
    """Returns the converted MTCNN params (fetched into the store when missing)."""
    return jax.tree.map(jnp.asarray, store_params("mtcnn"))


@pytest.fixture(scope="module")
def oracle():
    """Returns facenet-pytorch's MTCNN (its .pnet/.rnet/.onet are the reference nets)."""
    from faceveil.benchmarks._oracle_shims import facenet_pytorch_mtcnn

    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch (the oracle) is not installed")

    return facenet_pytorch_mtcnn(keep_all=True)


@pytest.fixture(scope="module")
def photo(data_dir) -> np.ndarray:
    """Returns obama1.jpg as [H, W, 3] float32 0..255."""
    with Image.open(data_dir / "faces" / "obama" / "obama1.jpg") as im:
        return np.asarray(im.convert("RGB"), np.float32)


def torch_net(net, x_nhwc: np.ndarray) -> list[np.ndarray]:
    """Returns the torch net's outputs on NHWC input, NCHW maps moved to NHWC."""
    with torch.no_grad():
        outs = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return [o.numpy().transpose(0, 2, 3, 1) if o.ndim == 4 else o.numpy() for o in outs]


def crops(photo: np.ndarray, size: int, n: int, seed: int) -> np.ndarray:
    """Returns n random square crops of the photo resized to size x size (normalised)."""
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(24, min(h, w) // 2))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        patch = Image.fromarray(photo[y:y + side, x:x + side].astype(np.uint8))
        out.append(np.asarray(patch.resize((size, size), Image.BILINEAR), np.float32))
    return np.asarray(mtcnn.normalise(np.stack(out)))


def test_param_counts(params):
    # Parameter counts of the three nets in mtcnn_weights.npy (fact sheet, Part B).
    counts = {k: sum(a.size for a in jax.tree.leaves(v)) for k, v in params.items()}
    assert counts == {"pnet": 6632, "rnet": 100178, "onet": 389040}


@pytest.mark.parametrize("kind", ["random", "photo"])
def test_pnet_matches_torch(params, oracle, photo, kind):
    rng = np.random.default_rng(0)
    if kind == "random":
        x = rng.uniform(-1, 1, (2, 37, 53, 3)).astype(np.float32)  # odd sizes: ceil-mode pool
    else:
        small = Image.fromarray(photo.astype(np.uint8)).resize((171, 137), Image.BILINEAR)
        x = np.asarray(mtcnn.normalise(np.asarray(small, np.float32)[None]))
    reg, probs = mtcnn.PNet().apply({"params": params["pnet"]}, jnp.asarray(x))
    t_reg, t_probs = torch_net(oracle.pnet, x)
    assert reg.shape == t_reg.shape and probs.shape == t_probs.shape
    # float32 conv stacks of this depth agree to ~1e-6 (fact sheet: 1.5e-7 on random inputs).
    np.testing.assert_allclose(reg, t_reg, atol=1e-5)
    np.testing.assert_allclose(probs, t_probs, atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "photo"])
def test_rnet_matches_torch(params, oracle, photo, kind):
    if kind == "random":
        x = np.random.default_rng(1).uniform(-1, 1, (16, 24, 24, 3)).astype(np.float32)
    else:
        x = crops(photo, 24, 16, seed=1)
    reg, probs = mtcnn.RNet().apply({"params": params["rnet"]}, jnp.asarray(x))
    t_reg, t_probs = torch_net(oracle.rnet, x)
    np.testing.assert_allclose(reg, t_reg, atol=1e-5)
    np.testing.assert_allclose(probs, t_probs, atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "photo"])
def test_onet_matches_torch(params, oracle, photo, kind):
    if kind == "random":
        x = np.random.default_rng(2).uniform(-1, 1, (8, 48, 48, 3)).astype(np.float32)
    else:
        x = crops(photo, 48, 8, seed=2)
    reg, marks, probs = mtcnn.ONet().apply({"params": params["onet"]}, jnp.asarray(x))
    t_reg, t_marks, t_probs = torch_net(oracle.onet, x)
    np.testing.assert_allclose(reg, t_reg, atol=1e-5)
    np.testing.assert_allclose(marks, t_marks, atol=1e-5)
    np.testing.assert_allclose(probs, t_probs, atol=1e-5)


def test_photo_crops_reach_both_decisions(params, photo):
    # Guards the "photo" cases above against comparing only trivial outputs: among the random
    # crops of obama1.jpg some must look like faces to R-Net and most must not.
    x = crops(photo, 24, 64, seed=3)
    _, probs = mtcnn.RNet().apply({"params": params["rnet"]}, jnp.asarray(x))
    p = np.asarray(probs[:, 1])
    assert (p > 0.7).any() and (p < 0.3).any()


@pytest.mark.parametrize("n", [5, 6, 9, 21])
def test_max_pool_ceil_matches_torch(n):
    x = np.random.default_rng(n).normal(size=(1, n, n + 1, 2)).astype(np.float32)
    for size, stride in [(2, 2), (3, 2)]:
        ours = mtcnn.max_pool_ceil(jnp.asarray(x), size, stride)
        ref = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), size,
                                             stride, ceil_mode=True).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(ours, ref)


def test_prelu_is_per_channel():
    x = jnp.asarray([[-2.0, -2.0, 3.0]])
    y = mtcnn.PReLU(3).apply({"params": {"alpha": jnp.asarray([0.5, 0.25, 0.1])}}, x)
    np.testing.assert_allclose(y, [[-1.0, -0.5, 3.0]])
    assert isinstance(mtcnn.PReLU(3), nn.Module)


def test_convert_rejects_wrong_layout():
    raw = {"pnet": [np.zeros((3, 3, 3, 10), np.float32)] * 12, "rnet": [], "onet": []}
    with pytest.raises(ValueError, match="pnet: expected 13 arrays"):
        mtcnn.convert_arrays(raw)
