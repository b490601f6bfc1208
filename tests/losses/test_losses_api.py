"""The public surface of faceveil.losses and its one data convention (style.md habit 4).

Images are float in [0, 1], NHWC; results are one value per image / pair, unreduced; data
arguments come first and options are keyword-only; convolutions expose `precision=`; a PRNG
argument, if any, is named `key`; every docstring's first line says what is returned.
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
import pytest

import faceveil.losses as L

# name -> number of leading positional data arguments (everything after is keyword-only).
DATA_ARGS = {
    "ssim": 2,
    "ssim_reference": 1,
    "dssim": 2,
    "psnr": 2,
    "minkowski": 2,
    "cosine_similarity": 2,
    "safe_norm": 1,
    "subspace_projection": 2,
    "subspace_distance": 2,
    "hull_projection": 2,
    "hull_distance": 2,
    "block_sums": 1,
    "block_variance_terms": 1,
    "block_variance": 1,
    "total_variation": 1,
    "budget_hinge": 2,
    "cloak_objective": 2,
    "veil_objective": 2,
    "pmt_objective": 2,
    "aggregate_layers": 2,
    "ridge_penalty": 1,
    "template_ridge_loss": 3,
    "sensitivity_map": 1,
    "straight_through_bits": 1,
    "xor_low_bits": 2,
    "mask_objective": 2,
    "match_success": 4,
    "msr": 4,
    "verification_correct": 3,
    "pmt_accuracy": 3,
    "r_s": 2,
    "up_success": 2,
    "up": 2,
    # Transform factories: their leading arguments are the transform's main settings.
    "mi_fgsm": 1,
    "sign": 0,
    "smooth": 2,
    "smoothing_kernel": 2,
}
CONVOLUTIONS = ("ssim", "dssim", "smooth")


def test_public_names_exist():
    for name in L.__all__:
        assert hasattr(L, name), name
    # Some are jitted at definition (PjitFunction), hence "callable and not a class".
    functions = {
        n for n in L.__all__ if callable(getattr(L, n)) and not isinstance(getattr(L, n), type)
    }
    assert functions == set(DATA_ARGS), functions ^ set(DATA_ARGS)


@pytest.mark.parametrize("name", sorted(DATA_ARGS))
def test_signature_convention(name):
    fn = getattr(L, name)
    params = list(inspect.signature(fn).parameters.values())
    n_data = DATA_ARGS[name]
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) == n_data, (name, [p.name for p in positional])
    assert all(p.kind is p.KEYWORD_ONLY for p in params[n_data:]), name
    names = {p.name for p in params}
    assert not names & {"rng", "seed", "prng", "prng_key", "rng_key"}, "PRNG args are named key"
    if name in CONVOLUTIONS:
        assert "precision" in names, name
    first = inspect.getdoc(fn).splitlines()[0]
    assert first.startswith("Returns"), (name, first)


def test_one_value_per_pair():
    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 16, 3)).astype(np.float32)
    b = rng.random((3, 16, 16, 3)).astype(np.float32)
    for fn in (L.ssim, L.dssim, L.psnr):
        out = jax.jit(fn)(a, b)
        assert out.shape == (3,), fn.__name__
        assert jax.jit(fn)(a[0], b[0]).shape == (), fn.__name__
    for fn in (L.block_variance, L.total_variation):
        assert fn(a).shape == (3,) and fn(a[0]).shape == (), fn.__name__
    fa, fb = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    for fn in (L.minkowski, L.cosine_similarity):
        assert fn(fa, fb).shape == (3,), fn.__name__
    basis = rng.normal(size=(4, 8))
    for fn in (L.subspace_distance, L.hull_distance):
        assert fn(fa, basis).shape == (3,) and fn(fa[0], basis).shape == (), fn.__name__
