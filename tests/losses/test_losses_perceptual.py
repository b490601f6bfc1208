"""SSIM, DSSIM and PSNR against scikit-image and numpy on real photos of the test data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from skimage.metrics import structural_similarity

from faceveil.losses import dssim, psnr, ssim

SIZE = 64
# Jitted once per module: eager dm-pix SSIM dispatches op by op and is ~10x slower on CPU.
_ssim = jax.jit(ssim)
_dssim = jax.jit(dssim)
_psnr = jax.jit(psnr)


def _load_square(path, size):
    """Returns the centre square of the photo resized to size x size, RGB float32 in [0, 1]."""
    im = Image.open(path)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    im = im.convert("RGB")
    w, h = im.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    im = im.crop((left, top, left + m, top + m)).resize((size, size), Image.BILINEAR)
    return np.asarray(im, np.float32) / 255.0


@pytest.fixture(scope="module")
def photos(data_dir):
    """Returns [n <= 6, 128, 128, 3] real face photos from data_dir/faces, one per identity."""
    files = sorted(
        p for p in (data_dir / "faces").rglob("*") if p.suffix.lower() in (".jpg", ".png")
    )
    assert len(files) >= 6, files
    # One per identity where possible, so the set is varied.
    by_person = {}
    for p in files:
        by_person.setdefault(p.parent.name, p)
    chosen = list(by_person.values())[:6]
    return np.stack([_load_square(p, 128) for p in chosen])


def _perturbations(ims):
    rng = np.random.default_rng(0)
    return {
        "noise_0.05": np.clip(ims + rng.normal(0, 0.05, ims.shape), 0, 1),
        "noise_0.005": np.clip(ims + rng.normal(0, 0.005, ims.shape), 0, 1),
        "blur": ndi.gaussian_filter(ims, (0, 1.5, 1.5, 0)),
        "contrast": np.clip(0.8 * ims + 0.1, 0, 1),
        "shift": np.roll(ims, 3, axis=1),
    }


def test_ssim_matches_skimage_on_real_photos(photos):
    # Reference: scikit-image's structural_similarity with the Gaussian-window settings of
    # Wang et al. (sigma 1.5, population covariance, data range 1); measured gap ~1.5e-5.
    for name, other in _perturbations(photos).items():
        other = other.astype(np.float32)
        ours = np.asarray(_ssim(photos, other))
        ref = np.array(
            [
                structural_similarity(
                    a,
                    b,
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                    data_range=1.0,
                    channel_axis=-1,
                )
                for a, b in zip(photos, other)
            ]
        )
        assert ours.shape == (len(photos),)
        np.testing.assert_allclose(ours, ref, atol=1e-4, err_msg=name)


def test_dssim_and_single_image(photos):
    a, b = photos[0], np.clip(photos[0] + 0.03, 0, 1)
    s = _ssim(a, b)
    assert s.shape == ()
    np.testing.assert_allclose(_dssim(a, b), (1 - s) / 2, atol=1e-7)
    # One batched call equals per-image calls.
    batch = _ssim(photos[:2], photos[1:3])
    np.testing.assert_allclose(batch[0], _ssim(photos[0], photos[1]), rtol=1e-5)


def test_psnr_matches_numpy(photos):
    other = np.clip(photos + np.random.default_rng(1).normal(0, 0.02, photos.shape), 0, 1)
    other = other.astype(np.float32)
    mse = np.mean((photos.astype(np.float64) - other) ** 2, axis=(1, 2, 3))
    # Reference: the definition, 10 log10(1 / MSE) with data range 1.
    np.testing.assert_allclose(_psnr(photos, other), 10 * np.log10(1 / mse), rtol=1e-4)


def test_rejects_uint8():
    with pytest.raises(TypeError, match="float"):
        ssim(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))


_dssim_value_and_grad = jax.jit(jax.value_and_grad(dssim))

_images = hnp.arrays(
    np.float32,
    (SIZE // 2, SIZE // 2, 3),
    elements=st.floats(0, 1, width=32),
)


@settings(max_examples=15, deadline=None)
@given(_images)
def test_ssim_of_identical_images_is_one(x):
    np.testing.assert_allclose(_ssim(x, x), 1.0, atol=1e-5)
    np.testing.assert_allclose(_dssim(x, x), 0.0, atol=3e-6)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_dssim_finite_with_finite_gradients_on_flat_images(value):
    flat = jnp.full((24, 24, 3), value, jnp.float32)
    other = jnp.full((24, 24, 3), 1.0 - value, jnp.float32)
    for a, b in [(flat, flat), (flat, other)]:
        val, grad = _dssim_value_and_grad(a, b)
        assert np.isfinite(val)
        assert np.all(np.isfinite(grad))


def test_ssim_reference_reuse_is_exact_and_matches_dm_pix(photos):
    import dm_pix

    from faceveil.losses import ssim_reference

    a = jnp.asarray(photos[:3], jnp.float32)
    rng = np.random.default_rng(7)
    b = jnp.clip(a + jnp.asarray(rng.normal(scale=0.05, size=a.shape), jnp.float32), 0, 1)
    ref = ssim_reference(a)
    np.testing.assert_array_equal(np.asarray(ssim(a, b, reference=ref)), np.asarray(ssim(a, b)))
    np.testing.assert_allclose(np.asarray(ssim(a, b)), np.asarray(dm_pix.ssim(a, b)), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(dssim(a, b, reference=ref)),
                                  np.asarray(dssim(a, b)))
