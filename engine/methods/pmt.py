"""PMT, the privacy minimisation transformation (DESIGN.md method 4, Pu et al.): compiled core.

A service shares the shallow part E_c (stages 1..L, `Recogniser.shallow`) of its recogniser.
Per face, an obfuscated chip x~ on the (primary) authorised recogniser's chip is optimised so
that E_c sees it as the original chip x:

    x~_0 = uniform noise | a random pixel shuffle of x | x under a heavy blur   (`init`)
    repeat iters times:
        J  = sum_m  mean (agg E_m(T(x~)) - agg E_m(T(x)))^2
        x~ <- clip(x~ - step_k * sign(W (*) grad J))                   (W: `kernel`, TI)

agg (`losses.aggregate_layers`) concatenates the outputs of stages 1..L (`aggregate`; the cut's
output alone without it), each average-pooled over cells of `pool` x `pool`. Pooling is what
keeps the face out of x~: matching the full-resolution maps draws the face's own structure
back into x~, which an unauthorised recogniser then identifies; cell means leave the service's
deeper layers what they need for the identity while fine structure stays free.
T is one random augmentation per iteration (`augment`: noise, a small affine, both) drawn once
and applied to both sides; step_k decays linearly from `step` to `step / 10`. MR-PMT: with a
`registry.Ensemble` every member's term is summed, each member seeing x~ through its own chip
(x~ carried from the primary chip by the two chip transforms; where x~ does not cover the
member's chip, the member sees the original face). Basic PMT is `PRESETS['basic']` (no
augmentation, no aggregation, no smoothing); `enhanced` is the default.

As a method of `faceveil.engine.methods.base` (`PmtMethod`), a face's patch is returned with the
primary chip's footprint replaced by x~ (the photo a user uploads in image mode); its metrics
hold x~ itself (feature upload sends `cut_features` of it) and, per member, the distance of
the embedding finished from E_c(x~) to the original's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from faceveil import losses
from faceveil.engine.methods import base, cloak
from faceveil.engine.pipeline import align
from faceveil.models import registry

INITS = ("noise", "shuffle", "blur")
AUGMENTS = ("none", "noise", "affine", "mix")
KERNELS = ("none", "gaussian", "linear")


@dataclasses.dataclass(frozen=True)
class PmtConfig:
    """Settings of PMT (presets: PRESETS)."""

    layers: int = 2  # the cut: stages 1..layers are the shared shallow model
    init: str = "noise"
    augment: str = "mix"
    kernel: str = "gaussian"
    kernel_size: int = 5
    aggregate: bool = True  # layer aggregation: match stages 1..layers, not the cut alone
    pool: int = 4  # average pooling (cells of pool x pool) of every matched map
    iters: int = 300
    step: float = 4.0 / 255.0
    noise_sigma: float = 0.02  # augmentation noise (image units)
    affine_amount: float = 0.03  # augmentation: shift (fraction), log-scale and angle (rad)
    blur_sigma: float = 8.0  # init 'blur' (chip pixels)

    def __post_init__(self):
        for name, value, allowed in (("init", self.init, INITS),
                                     ("augment", self.augment, AUGMENTS),
                                     ("kernel", self.kernel, KERNELS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if min(self.iters, self.layers, self.kernel_size, self.pool) < 1:
            raise ValueError("iters, layers, kernel_size and pool must be at least 1")


# Basic PMT matches the cut's full output map (pool 1): pooling belongs to the aggregation
# enhancement ("layer aggregation of average-pooled layers").
PRESETS = {
    "basic": {"augment": "none", "aggregate": False, "pool": 1, "kernel": "none"},
    "enhanced": {},
    # Table X of the paper: each enhancement alone.
    "augment_only": {"aggregate": False, "pool": 1, "kernel": "none"},
    "aggregate_only": {"augment": "none", "kernel": "none"},
    "kernel_only": {"augment": "none", "aggregate": False, "pool": 1},
}


def preset(name: str = "enhanced", **overrides) -> PmtConfig:
    """Returns the PmtConfig of a named preset with overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PmtConfig(**{**PRESETS[name], **overrides})


def check_layers(recogniser, layers: int) -> None:
    """Raises ValueError (naming the valid range) when a member cannot be cut at `layers`."""
    for rec in registry.members(recogniser):
        rec.check_cut(layers)


def check_pool(recogniser, params, layers: int, pool: int) -> None:
    """Raises ValueError (naming the stage) when `pool` exceeds a matched stage's map."""
    members = registry.members(recogniser)
    for rec, p in zip(members, tuple(params) if len(members) > 1 else (params,)):
        chips = jax.ShapeDtypeStruct((1, rec.chip_size, rec.chip_size, 3), jnp.float32)
        maps = jax.eval_shape(lambda c, rec=rec, p=p: rec.shallow(p, c, layers), chips)
        for name, m in zip(rec.stages, maps):
            if pool > min(m.shape[1:3]):
                raise ValueError(f"pool {pool} is larger than {rec.name}'s {name} map "
                                 f"({m.shape[1]} x {m.shape[2]}) at layers {layers}")


class PmtMetrics(NamedTuple):
    """Per-face results of PMT (NaN / zeros where no face)."""

    objective: jax.Array  # [] J at the last iteration
    authorised_distance: jax.Array  # [R] embedding distance, finished from E_c(x~) vs clean
    obfuscated: jax.Array  # [S, S, 3] float x~ on the primary chip


def _init(cfg: PmtConfig, key, x):
    if cfg.init == "noise":
        return jax.random.uniform(key, x.shape, jnp.float32)
    if cfg.init == "shuffle":
        flat = x.reshape(-1, x.shape[-1])
        return jax.random.permutation(key, flat, axis=0).reshape(x.shape)
    import dm_pix

    return dm_pix.gaussian_blur(x, cfg.blur_sigma, kernel_size=int(4 * cfg.blur_sigma) | 1)


def _augment(cfg: PmtConfig, key, size: int):
    """Returns one draw of T: a function on [S, S, 3] chips (the same for both sides)."""
    k_noise, k_aff = jax.random.split(key)
    use_noise = cfg.augment in ("noise", "mix")
    use_affine = cfg.augment in ("affine", "mix")
    noise = cfg.noise_sigma * jax.random.normal(k_noise, (size, size, 3))
    m = cloak.jitter_transform(k_aff, size, cfg.affine_amount)

    @jax.named_scope("augment")
    def t(x):
        if use_affine:
            x = align.warp(x, m, (size, size))
        if use_noise:
            x = x + noise
        return x

    return t


def _objective(recs, cfg: PmtConfig, params, views, x_tilde, originals, key):
    """Returns J summed over the members (views: x~ -> each member's chip)."""
    total = 0.0
    for r, (rec, p, view, orig) in enumerate(zip(recs, params, views, originals)):
        t = _augment(cfg, jax.random.fold_in(key, r), rec.chip_size)
        a = rec.shallow(p, t(view(x_tilde))[None], cfg.layers)
        b = jax.lax.stop_gradient(rec.shallow(p, t(orig)[None], cfg.layers))
        chosen = None if cfg.aggregate else [len(a) - 1]
        total = total + jnp.mean((losses.aggregate_layers(a, chosen, window=cfg.pool)
                                  - losses.aggregate_layers(b, chosen, window=cfg.pool)) ** 2)
    return total


def _solve(recogniser, cfg: PmtConfig, params, patch, m_chip, key):
    """Returns (x~ [S, S, 3], J, distances [R]) of one face."""
    recs = registry.members(recogniser)
    params = tuple(params) if len(recs) > 1 else (params,)
    m = m_chip if len(recs) > 1 else m_chip[None]
    size = recs[0].chip_size
    originals = [align.warp(patch, m[r], (rec.chip_size, rec.chip_size))
                 for r, rec in enumerate(recs)]

    def view_of(r, rec):
        if r == 0:
            return lambda z: z
        to_primary = align.compose(align.invert(m[0]), m[r])  # member chip -> primary chip

        def view(z):
            xs, ys, inside = align.footprint(to_primary, rec.chip_size, size)
            return jnp.where(inside[..., None], align.sample_bilinear(z, xs, ys), originals[r])

        return view

    views = [view_of(r, rec) for r, rec in enumerate(recs)]
    k_init, k_loop = jax.random.split(key)
    x0 = jnp.clip(_init(cfg, k_init, originals[0]), 0.0, 1.0)
    smoother = None if cfg.kernel == "none" else losses.smooth(cfg.kernel, cfg.kernel_size)
    grad_fn = jax.value_and_grad(functools.partial(_objective, recs, cfg, params, views))

    def body(k, carry):
        x, _ = carry
        j, g = grad_fn(x, originals, jax.random.fold_in(k_loop, k))
        with jax.named_scope("update"):
            if smoother is not None:
                g, _ = smoother.update(g, smoother.init(g))
            step = cfg.step * (1.0 - 0.9 * k / max(cfg.iters - 1, 1))
            return jnp.clip(x - step * jnp.sign(g), 0.0, 1.0), j

    x, j = jax.lax.fori_loop(0, cfg.iters, body, (x0, jnp.zeros((), jnp.float32)))
    dists = []
    for rec, p, view, orig in zip(recs, params, views, originals):
        f = rec.shallow(p, view(x)[None], cfg.layers)[-1]
        e = rec.rest(p, f, cfg.layers)[0]
        dists.append(jnp.linalg.norm(e - rec.apply(p, orig[None])[0][0]))
    return x, j, jnp.stack(dists)


def replace_footprint(patch, m_chip, chip):
    """Returns uint8 patch [P, P, 3] with the chip's footprint replaced by `chip` [S, S, 3]."""
    x = jnp.asarray(patch).astype(jnp.float32) / 255.0
    xs, ys, inside = align.footprint(align.invert(jnp.asarray(m_chip, jnp.float32)),
                                     x.shape[0], chip.shape[0])
    y = jnp.where(inside[..., None], align.sample_bilinear(chip, xs, ys), x)
    return jnp.round(jnp.clip(y, 0, 1) * 255.0).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class PmtMethod(base.PerFaceMethod):
    """PMT as a method of `faceveil.engine.methods.base`: params are the recogniser's (a tuple
    per member for an `Ensemble`, the authorised shallow models of MR-PMT)."""

    recogniser: object
    config: PmtConfig = PmtConfig()
    name: str = "pmt"

    def __post_init__(self):
        check_layers(self.recogniser, self.config.layers)

    def step(self, params, target, state, face: base.FaceFrame):
        """Returns (state, FaceOutput) of one face: x~ optimised, the footprint replaced."""
        del target
        key, k_face = jax.random.split(state)
        m = face.m_chip
        x, j, dists = _solve(self.recogniser, self.config, params,
                                    face.patch.astype(jnp.float32) / 255.0, m, k_face)
        m0 = m[0] if m.ndim == 3 else m
        out = jnp.where(face.present, replace_footprint(face.patch, m0, x), face.patch)
        nan = jnp.where(face.present, 0.0, jnp.nan)
        metrics = PmtMetrics(objective=j + nan, authorised_distance=dists + nan, obfuscated=x)
        return key, base.FaceOutput(protected=out, iters=jnp.asarray(self.config.iters,
                                                                     jnp.int32),
                                    metrics=metrics)


_CUT_FNS: dict = {}


def cut_features(recogniser, params, chips, layers: int) -> jax.Array:
    """Returns [N, h, w, c] E_c(chips) at the cut: what a user uploads in feature mode."""
    key = (recogniser.name, layers)
    if key not in _CUT_FNS:
        _CUT_FNS[key] = jax.jit(lambda p, c: recogniser.shallow(p, c, layers)[-1])
    return _CUT_FNS[key](params, jnp.asarray(chips, jnp.float32))
