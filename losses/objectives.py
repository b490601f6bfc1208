"""The four methods' objectives, as pure functions of explicit inputs.

Data convention: float images in [0, 1], HWC for one face ([N, H, W, C] for a batch where
stated); feature vectors on the last axis. Networks enter only as functions passed in
(`features_fn`, `shallow_fns`, `augment`), closed over by the caller with their params; losses
hold no weights. Each objective returns `(loss, aux)`: a scalar to differentiate (use
`jax.value_and_grad(..., has_aux=True)`) and a dict of the unweighted terms for logging and
stopping rules. All are jit-able, differentiable in their first argument and vmap-able.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from faceveil.losses.distances import hull_distance, minkowski, safe_norm, subspace_distance
from faceveil.losses.perceptual import SsimReference, budget_dssim
from faceveil.losses.regularisers import block_variance, block_variance_terms, budget_hinge

__all__ = [
    "CLOAK_LAM",
    "CLOAK_RHO",
    "aggregate_layers",
    "cloak_objective",
    "pmt_objective",
    "ridge_penalty",
    "template_ridge_loss",
    "veil_objective",
]

# Cloak defaults. rho = 0.01 DSSIM is SSIM >= 0.98, the budget Fawkes-style cloaks use as
# "looks the same". Feature distances of the recognisers here are O(1) (dlib ~0.6 between
# people, FaceNet's normalised embeddings <= 2), so lam = 1000 makes exceeding the budget by
# 0.001 DSSIM (0.002 SSIM) cost as much as a whole unit of feature distance: the budget binds
# and the optimum sits at its edge instead of trading visibility for protection.
CLOAK_LAM = 1000.0
CLOAK_RHO = 0.01


def cloak_objective(
    protected: ArrayLike,
    original: ArrayLike,
    *,
    features_fn: Callable[[jax.Array], jax.Array],
    feat_original: ArrayLike,
    feat_previous: ArrayLike,
    has_previous: ArrayLike,
    target: ArrayLike | None = None,
    lambda1: float = 1.0,
    lam: float = CLOAK_LAM,
    rho: float = CLOAK_RHO,
    p: float = 2.0,
    original_reference: SsimReference | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, aux) of the video cloak objective (Guo et al.) for one face.

        L = -D(F(x_m), F(x))                    untargeted (target is None)
            | +D(F(x_m), target)                 targeted
            + lambda1 * has_previous * D(F(x_m), F(x_p))
            + lam * max(DSSIM(x, x_m) - rho, 0)

    with D the Minkowski distance of order p, x = `original`, x_m = `protected`. When
    `features_fn` returns features with leading axes ([V, D]: the face seen through V
    alignments at once) the feature terms are averaged over them and the budget counted once.

    Args:
      protected: [H, W, 3] float in [0, 1], the frame-space face region with the cloak.
      original: [H, W, 3] the same region without it (H, W >= 11 for SSIM's window).
      features_fn: maps a [H, W, 3] region to a feature vector [D], or to [V, D] for V
        views (alignment warp and recogniser, closed over by the caller). It is called exactly once, on `protected`,
        so a caller may capture that forward pass's outputs for its own use.
      feat_original: [D] (or [V, D]) = features_fn(original), precomputed (a constant).
      feat_previous: [D] features of the previous protected frame's face; ignored unless
        `has_previous` (it may then hold anything finite or not).
      has_previous: traced bool or 0/1 float: whether a previous frame exists.
      target: None (untargeted) or a [D] target-identity centroid (targeted).
      lambda1: weight of the temporal feature-consistency term.
      lam: weight of the DSSIM budget hinge (default `CLOAK_LAM`).
      rho: DSSIM budget (default `CLOAK_RHO`, i.e. SSIM >= 0.98).
      p: Minkowski order of D.
      original_reference: `ssim_reference(original)`, computed once by a caller that
        evaluates many candidates against one original (None: computed here).

    Returns:
      loss: scalar.
      aux: dict of scalars ([V] per view for the feature terms): protect = D(F(x_m), F(x));
        target_dist = D(F(x_m), target) (0 when untargeted); temporal = D(F(x_m), feat_previous) masked to 0 without a
        previous frame; dssim = DSSIM(x, x_m); budget = max(dssim - rho, 0); loss.
    """
    protected = jnp.asarray(protected)
    original = jnp.asarray(original)
    feat_m = features_fn(protected)
    feat_orig = jax.lax.stop_gradient(jnp.asarray(feat_original))
    hp = jnp.asarray(has_previous).astype(feat_m.dtype)
    # Without a previous frame feat_previous may be padding (zeros, NaN): replace it by the
    # original's features so the masked term and its gradient stay finite (0 * NaN = NaN).
    feat_prev = jnp.where(hp > 0, jnp.asarray(feat_previous), feat_orig)
    feat_prev = jax.lax.stop_gradient(feat_prev)

    protect = minkowski(feat_m, feat_orig, p=p)
    temporal = hp * minkowski(feat_m, feat_prev, p=p)
    if target is None:
        target_dist = jnp.zeros_like(protect)
        feature_term = -protect
    else:
        target_dist = minkowski(feat_m, jax.lax.stop_gradient(jnp.asarray(target)), p=p)
        feature_term = target_dist
    # Under budget the hinge passes no gradient: DSSIM's backward pass is then skipped.
    vis = budget_dssim(original, protected, original_reference)
    budget = budget_hinge(vis, rho)
    loss = jnp.mean(feature_term + lambda1 * temporal) + lam * budget
    aux = {
        "protect": protect,
        "target_dist": target_dist,
        "temporal": temporal,
        "dssim": vis,
        "budget": budget,
        "loss": loss,
    }
    return loss, aux


def veil_objective(
    veil: ArrayLike,
    chips: ArrayLike,
    *,
    alpha: float = 0.2,
    features_fn: Callable[[jax.Array], jax.Array],
    basis_feats: ArrayLike,
    mode: str = "subspace",
    lam: float = 0.01,
    mu: float = 0.01,
    hull_iterations: int = 50,
    weights: ArrayLike | None = None,
    var_terms: str = "both",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, aux) of the person-specific veil objective (Once-for-all).

        x'_i = alpha * x_i + (1 - alpha) * veil
        loss = sum_i [ L_fea(x'_i) - lam * ||x_i - x'_i||_2 + mu * L_var(x'_i) ]

    L_fea(x') is the distance of F(x') to the subspace spanned by (mode 'subspace') or the
    convex hull of (mode 'hull') the rows of W = `basis_feats`, or (mode 'own', the V-UAP
    baseline without a feature set) the distance of F(x'_i) to its own chip's F(x_i), row i of
    W; L_var is `block_variance` (`var_terms` 'both') or its Var_inner alone ('inner').

    The defaults of lam and mu are scale-matched starting points, not the paper's values: for
    a 150x150x3 chip ||x - x'||_2 is O(100) and its gradient has L1 norm ~sqrt(#pixels) ~ 260
    per unit weight, against an O(1-10) L1 norm for a recogniser's input gradient, so
    lam ~ 0.01 puts the two on a par; the MI-FGSM sign step makes only the ratios matter.

    Args:
      veil: [H, W, 3] the veil, float in [0, 1].
      chips: [N, H, W, 3] aligned face chips of one person.
      alpha: blend weight of the chip (the paper's 0.2).
      features_fn: maps one chip [H, W, 3] to its feature vector [D] (vmapped here).
      basis_feats: [n, D] W, the features of the person's original chips (a constant).
      mode: 'subspace' (least-squares weights) or 'hull' (w >= 0, sum w = 1).
      lam: weight of the visual-difference reward.
      mu: weight of the block-variance penalty.
      hull_iterations: solver iterations in 'hull' mode (static).
      weights: [N] per-chip weights of the sum (0 for padding rows); default all 1.
      var_terms: 'both' (Var_inner + Var_intra, DESIGN.md literally) or 'inner'.

    Returns:
      loss: scalar (summed over chips).
      aux: fea, vis, var: [N] unweighted per-chip terms; loss: scalar.
    """
    if mode not in ("subspace", "hull", "own"):
        raise ValueError(f"mode must be 'subspace', 'hull' or 'own', got {mode!r}")
    if var_terms not in ("both", "inner"):
        raise ValueError(f"var_terms must be 'both' or 'inner', got {var_terms!r}")
    veil = jnp.asarray(veil)
    chips = jnp.asarray(chips)
    basis = jax.lax.stop_gradient(jnp.asarray(basis_feats))
    blended = alpha * chips + (1.0 - alpha) * veil[None]
    feats = jax.vmap(features_fn)(blended)
    if mode == "subspace":
        fea = subspace_distance(feats, basis)
    elif mode == "hull":
        fea = hull_distance(feats, basis, iterations=hull_iterations)
    else:
        fea = safe_norm(feats - basis)
    vis = safe_norm((chips - blended).reshape(chips.shape[0], -1))
    var = block_variance(blended) if var_terms == "both" else block_variance_terms(blended)[0]
    w = jnp.ones(chips.shape[0]) if weights is None else jnp.asarray(weights)
    loss = jnp.sum(w * (fea - lam * vis + mu * var))
    return loss, {"fea": fea, "vis": vis, "var": var, "loss": loss}


def aggregate_layers(
    outputs: Mapping[Any, jax.Array] | Sequence[jax.Array],
    layers: Sequence[Any] | None = None,
    *,
    window: int | None = None,
) -> jax.Array:
    """Returns the concatenated average-pooled layer outputs, flattened [..., n].

    Args:
      outputs: a dict of named layer outputs or a list of them, each [..., h, w, C_l].
      layers: the keys (dict) or indices (list) to aggregate, in order; None takes all, in
        the container's order.
      window: None pools each map globally (n = sum C_l); k pools k x k cells with stride k
        (rows and columns beyond the last whole cell dropped; 1 keeps the full map).
    """
    if layers is None:
        chosen = list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)
    else:
        chosen = [outputs[k] for k in layers]
    if not chosen:
        raise ValueError("no layers to aggregate")
    if window is None:
        return jnp.concatenate([jnp.mean(o, axis=(-3, -2)) for o in chosen], axis=-1)
    return jnp.concatenate([_cell_means(o, window).reshape(*o.shape[:-3], -1) for o in chosen],
                           axis=-1)


def _cell_means(o: jax.Array, k: int) -> jax.Array:
    """Returns [..., h // k, w // k, C]: the means of o's k x k cells."""
    h, w, c = o.shape[-3:]
    if k > min(h, w):
        raise ValueError(f"pooling window {k} is larger than the {h} x {w} map")
    o = o[..., : h // k * k, : w // k * k, :]
    return jnp.mean(o.reshape(*o.shape[:-3], h // k, k, w // k, k, c), axis=(-4, -2))


def pmt_objective(
    x_tilde: ArrayLike,
    x: ArrayLike,
    *,
    shallow_fns: Callable | Sequence[Callable],
    augment: Callable[[jax.Array], jax.Array] | None = None,
    layers: Sequence[Any] | Sequence[Sequence[Any] | None] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (J, aux) of PMT's feature-matching objective (Pu et al.), MR-PMT for a list.

        J = sum_m || agg(E_m(T(x~))) - agg(E_m(T(x))) ||_2^2

    agg concatenates the global-average-pooled outputs of the chosen layers. The target side
    E_m(T(x)) is a constant (stop-gradient).

    Args:
      x_tilde: [..., H, W, 3] the obfuscated image(s) being optimised.
      x: [..., H, W, 3] the original image(s).
      shallow_fns: E, or a list of E_m (MR-PMT); each maps images to a dict (or list) of layer
        outputs [..., h, w, C].
      augment: T, applied identically to both sides; already bound by the caller to one
        random draw. None: the identity.
      layers: which outputs to aggregate: None (all), one list of keys/indices used for every
        model, or (with a list of models) one such entry per model.

    Returns:
      J: the objective per image: shape [...] (a scalar for one HWC image; sum a batch
        before taking the gradient).
      aux: per_model: [M, ...] the terms of the sum; loss: J.
    """
    fns = list(shallow_fns) if isinstance(shallow_fns, Sequence) else [shallow_fns]
    per_model_layers = (
        layers is not None
        and len(fns) > 1
        and len(layers) == len(fns)
        and all(item is None or isinstance(item, (list, tuple)) for item in layers)
    )
    layer_sets = list(layers) if per_model_layers else [layers] * len(fns)
    t = augment if augment is not None else (lambda z: z)
    xt, xo = t(jnp.asarray(x_tilde)), t(jnp.asarray(x))
    terms = []
    for fn, sel in zip(fns, layer_sets):
        a = aggregate_layers(fn(xt), sel)
        b = jax.lax.stop_gradient(aggregate_layers(fn(xo), sel))
        terms.append(jnp.sum((a - b) ** 2, axis=-1))
    per_model = jnp.stack(terms)
    j = jnp.sum(per_model, axis=0)
    return j, {"per_model": per_model, "loss": j}


def ridge_penalty(params_or_weights: Any) -> jax.Array:
    """Returns the sum of squared weights: of the 'kernel' leaves if the tree has any, else all.

    Flax names conv/dense weights 'kernel'; biases, batch-norm scales and statistics are not
    ridge-penalised, as in ordinary ridge regression (the intercept is free).

    Args:
      params_or_weights: a params pytree, or an array / list of arrays to penalise entirely.
    """
    flat = jax.tree_util.tree_flatten_with_path(params_or_weights)[0]

    def is_kernel(path):
        last = path[-1] if path else None
        key = getattr(last, "key", getattr(last, "name", None))
        return key == "kernel"

    kernels = [leaf for path, leaf in flat if is_kernel(path)]
    leaves = kernels if kernels else [leaf for _, leaf in flat]
    return sum(jnp.sum(jnp.square(jnp.asarray(leaf))) for leaf in leaves)


def template_ridge_loss(
    pred: ArrayLike,
    target: ArrayLike,
    params_or_weights: Any,
    *,
    ridge: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, aux) of the mask-template network's ridge loss (Wang et al., Eq. 5).

    What is implemented (ridge regression of the template on the sensitivity map):

        loss = mean_n sum_pixels (T_n - M_n)^2 + ridge * sum ||kernel||_2^2

    T = `pred` the predicted soft template, M = `target` the normalised sensitivity map of the
    recogniser; the squared error is summed over the template's cells and averaged over the
    batch, and the ridge term penalises the network's weights (see `ridge_penalty`).

    Args:
      pred: [N, H, W] or [N, H, W, K] predicted templates in [0, 1].
      target: sensitivity maps of the same shape.
      params_or_weights: the template network's params (or the arrays to penalise).
      ridge: the ridge coefficient (>= 0).

    Returns:
      loss: scalar.
      aux: sq_err [N] per-example squared error; penalty: the unweighted ridge term; loss.
    """
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    sq_err = jnp.sum((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
    penalty = ridge_penalty(params_or_weights)
    loss = jnp.mean(sq_err) + ridge * penalty
    return loss, {"sq_err": sq_err, "penalty": penalty, "loss": loss}
