"""Pure, jit-able loss and metric functions (no state, no I/O).

Data convention for the whole package: float images in [0, 1], NHWC (HWC for one image);
features on the last axis; one value per image / pair / vector, unreduced (the caller
reduces); data arguments first, options keyword-only; convolutions expose `precision=`.
Networks enter only as functions passed in.

Modules: `perceptual` (SSIM, DSSIM, PSNR), `distances` (Minkowski, cosine, subspace and hull
distances), `regularisers` (block variance, total variation, budget hinge), `objectives`
(cloak, veil, PMT, template ridge loss), `masks` (sensitivity maps, low-bit XOR, the mask-key
objective), `transforms` (MI-FGSM, sign, TI smoothing as optax transforms), `metrics` (MSR,
PMT accuracy, r_s, UP), `filters` (separable filters as banded matrix products).
"""

from faceveil.losses.distances import (
    cosine_similarity,
    hull_distance,
    hull_projection,
    minkowski,
    safe_norm,
    subspace_distance,
    subspace_projection,
)
from faceveil.losses.masks import (
    mask_objective,
    sensitivity_map,
    straight_through_bits,
    xor_low_bits,
)
from faceveil.losses.metrics import (
    match_success,
    msr,
    pmt_accuracy,
    r_s,
    up,
    up_success,
    verification_correct,
)
from faceveil.losses.objectives import (
    CLOAK_LAM,
    CLOAK_RHO,
    aggregate_layers,
    cloak_objective,
    pmt_objective,
    ridge_penalty,
    template_ridge_loss,
    veil_objective,
)
from faceveil.losses.perceptual import SsimReference, dssim, psnr, ssim, ssim_reference
from faceveil.losses.regularisers import (
    block_sums,
    block_variance,
    block_variance_terms,
    budget_hinge,
    total_variation,
)
from faceveil.losses.transforms import MiFgsmState, mi_fgsm, sign, smooth, smoothing_kernel

__all__ = [
    "CLOAK_LAM",
    "CLOAK_RHO",
    "MiFgsmState",
    "SsimReference",
    "aggregate_layers",
    "block_sums",
    "block_variance",
    "block_variance_terms",
    "budget_hinge",
    "cloak_objective",
    "cosine_similarity",
    "dssim",
    "hull_distance",
    "hull_projection",
    "mask_objective",
    "match_success",
    "mi_fgsm",
    "minkowski",
    "msr",
    "pmt_accuracy",
    "pmt_objective",
    "psnr",
    "r_s",
    "ridge_penalty",
    "safe_norm",
    "sensitivity_map",
    "sign",
    "smooth",
    "smoothing_kernel",
    "ssim",
    "ssim_reference",
    "straight_through_bits",
    "subspace_distance",
    "subspace_projection",
    "template_ridge_loss",
    "total_variation",
    "up",
    "up_success",
    "veil_objective",
    "verification_correct",
    "xor_low_bits",
]
