"""Mask templates, per-image mode (DESIGN.md method 3, Wang et al.): the compiled core.

Per face, with x the clean uint8 face patch (real photo pixels) and R the recogniser(s):

  template  for each recogniser, its sensitivity map on the aligned chip
            (`losses.sensitivity_map`: input-gradient magnitude of the embedding, pooled to
            cells of `cell` chip pixels, normalised); its `coverage` most sensitive cells are
            the recogniser's template, carried to the patch's pixel grid through the chip
            transform; the templates of several recognisers superpose (their union).
  key       b = `bits` low-order bits per pixel and channel, zero outside the template.
            The bits are optimised directly for this photo (no trained generator) with Adam on
            their logits, straight-through gradients through quantisation, XOR differentiated
            exactly (`losses.xor_low_bits`), maximising `losses.mask_objective` (feature
            distance of every recogniser over its threshold) under the DSSIM budget `rho`.
  protect   x' = x XOR k on uint8: the face keeps its high-order bits, so people see it, and
            the same key XORed again restores x bit for bit.

The key lives on the patch's (hence the photo's) own pixels, never on a resampled chip: any
photo size works, and restoration needs no alignment. The best hard key met during the
optimisation is kept. The bits start random, as the paper's generator starts from noise: at
the zero key the feature distance has no gradient.

As a method of `faceveil.engine.methods.base` (`MaskMethod`, `combine = "xor"`: the pipeline
XORs each face's key into the photo, so overlapping faces compose and stay restorable), a
face's FaceOutput.protected is x XOR k; k is protected XOR clean.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from faceveil import losses
from faceveil.engine.methods import base
from faceveil.engine.pipeline import align
from faceveil.models import registry


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Settings of the per-image mask key (presets: PRESETS)."""

    bits: int = 4  # b, low-order bits per pixel the key may flip (1..4)
    iters: int = 60  # Adam steps on the key's bit logits
    lr: float = 0.1  # Adam's learning rate on the logits
    coverage: float = 0.4  # fraction of each recogniser's chip cells in its template
    cell: int = 10  # sensitivity-map cell side (chip pixels)
    probes: int = 8  # random projections estimating the embedding's Jacobian norm
    rho: float = 0.05  # DSSIM budget of the face patch (SSIM >= 0.9, the bar)
    lam: float = 100.0  # weight of the budget's excess in the objective
    # The bits start random (logits init_logit + init_scale * N(0, 1)): at the zero key the
    # feature distance is at its minimum 0, where its gradient vanishes, so a zero start
    # would never move.
    init_logit: float = 0.0
    init_scale: float = 0.05

    def __post_init__(self):
        if not 1 <= self.bits <= 4:
            raise ValueError(f"bits must be in 1..4, got {self.bits}")
        if self.iters < 1 or self.cell < 1 or self.probes < 1:
            raise ValueError("iters, cell and probes must be at least 1")
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")


# Named presets: b = 4 (dlib's distance ~0.9 at SSIM ~0.95 on a test face, 60 steps), fewer
# bits at a tighter budget (b = 3 reaches about dlib's threshold 0.6 at SSIM ~0.98), and a
# quick one for tests and previews.
PRESETS = {
    "default": {},
    "b1": {"bits": 1, "rho": 0.025},
    "b2": {"bits": 2, "rho": 0.025},
    "b3": {"bits": 3, "rho": 0.025},
    "quick": {"iters": 8, "probes": 2},
}


def preset(name: str = "default", **overrides) -> MaskConfig:
    """Returns the MaskConfig of a named preset with overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return MaskConfig(**{**PRESETS[name], **overrides})


class MaskMetrics(NamedTuple):
    """Per-face results of a mask key (NaN where no face)."""

    protection: jax.Array  # [] primary recogniser's embedding distance, clean vs protected
    start_protection: jax.Array  # [] the same at the random start key (before optimising)
    distances: jax.Array  # [R] every recogniser's embedding distance, clean vs protected
    ssim: jax.Array  # [] SSIM of the uint8 protected patch vs the clean one
    psnr: jax.Array  # [] PSNR (dB) of the same pair
    passed: jax.Array  # [] 1.0 when every distance exceeds its recogniser's threshold
    coverage: jax.Array  # [] fraction of the primary chip's footprint inside the template
    flipped: jax.Array  # [] fraction of the template's key bits that are set
    template: jax.Array  # [P, P] 1.0 where the key may be non-zero (patch pixels)


def cells_to_patch(cells: jax.Array, m_chip: jax.Array, patch_size: int, chip_size: int,
                   cell: int) -> jax.Array:
    """Returns [P, P] bool: the patch pixels whose chip position lies in a selected cell.

    Args:
      cells: [h, w] bool selected cells of the chip.
      m_chip: (2, 3) chip pixels -> patch pixels.
      patch_size: P.
      chip_size: S.
      cell: cell side in chip pixels.
    """
    xs, ys, inside = align.footprint(align.invert(m_chip), patch_size, chip_size)
    h, w = cells.shape
    # Chip pixel i covers [i - 0.5, i + 0.5): its cell is floor((i + 0.5) / cell).
    ci = jnp.clip(jnp.floor((xs + 0.5) / cell).astype(jnp.int32), 0, w - 1)
    cj = jnp.clip(jnp.floor((ys + 0.5) / cell).astype(jnp.int32), 0, h - 1)
    return inside & cells[cj, ci]


def top_cells(smap: jax.Array, coverage: float) -> jax.Array:
    """Returns [h, w] bool: the ceil(coverage * h * w) cells of highest sensitivity."""
    k = max(1, math.ceil(coverage * smap.size - 1e-6))
    kth = jnp.sort(smap.ravel())[smap.size - k]
    return smap >= kth


def _members(recogniser, params, m_chip):
    recs = registry.members(recogniser)
    params = tuple(params) if len(recs) > 1 else (params,)
    m = m_chip if len(recs) > 1 else m_chip[None]
    return recs, params, m


def template(recogniser, params, x: jax.Array, m_chip: jax.Array, key, cfg: MaskConfig):
    """Returns [P, P] bool, the superposed template of every recogniser on patch x [P, P, 3]."""
    recs, params, m = _members(recogniser, params, m_chip)
    out = jnp.zeros(x.shape[:2], bool)
    for r, (rec, p) in enumerate(zip(recs, params)):
        s = rec.chip_size
        chip = align.warp(x, m[r], (s, s))
        smap = losses.sensitivity_map(chip, embed_fn=functools.partial(rec.embed, p),
                                      key=jax.random.fold_in(key, r), cell=cfg.cell,
                                      probes=cfg.probes)
        out = out | cells_to_patch(top_cells(smap, cfg.coverage), m[r], x.shape[0], s, cfg.cell)
    return out


class _Loop(NamedTuple):
    logits: jax.Array  # [P, P, 3, b] the key's bit logits
    opt: optax.OptState
    best: jax.Array  # [P, P, 3, b] float32 bits of the best hard key so far
    best_loss: jax.Array  # [] its objective
    start: jax.Array  # [R] feature distances of the random start key


def solve(recogniser, cfg: MaskConfig, params, patch: jax.Array, m_chip: jax.Array, key):
    """Returns (key [P, P, 3] uint8 < 2^bits, template [P, P] bool, start distances [R]).

    The start distances are the recognisers' feature distances at the random start key: what
    the optimisation adds is the final distance over them.

    Args:
      recogniser: a `registry.Recogniser` or `Ensemble`.
      cfg: the MaskConfig.
      params: its parameters (a tuple per member for an ensemble).
      patch: uint8 [P, P, 3] clean face patch.
      m_chip: (2, 3) chip -> patch pixels ([R, 2, 3] for an ensemble).
      key: PRNG key (the sensitivity probes, the key's random start).
    """
    recs, ps, m = _members(recogniser, params, m_chip)
    x = patch.astype(jnp.float32) / 255.0
    k_tmpl, k_init = jax.random.split(key)
    with jax.named_scope("template"):
        tmpl = template(recogniser, params, x, m_chip, k_tmpl, cfg)
    allowed = tmpl[:, :, None, None].astype(jnp.float32)

    def feats_fn(rec, p, mr):
        def feats(y):
            with jax.named_scope("chip_warp"):
                chip = align.warp(y, mr, (rec.chip_size, rec.chip_size))
            with jax.named_scope("recogniser"):
                return rec.embed(p, chip[None])[0]

        return feats

    fns = [feats_fn(rec, p, m[r]) for r, (rec, p) in enumerate(zip(recs, ps))]
    clean = [f(x) for f in fns]
    x_ssim = losses.ssim_reference(x)  # the clean face's half of the budget, once

    def objective(logits):
        with jax.named_scope("xor"):
            bits = losses.straight_through_bits(logits) * allowed
            y = losses.xor_low_bits(x, bits)
        return losses.mask_objective(y, x, features_fns=fns, original_feats=clean,
                                     scales=[r.threshold for r in recs], rho=cfg.rho,
                                     lam=cfg.lam, original_reference=x_ssim)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    tx = optax.adam(cfg.lr)
    logits0 = cfg.init_logit + cfg.init_scale * jax.random.normal(
        k_init, x.shape + (cfg.bits,), jnp.float32)

    def body(i, st: _Loop) -> _Loop:
        (loss, aux), g = grad_fn(st.logits)
        # The loss was evaluated on the hard key of st.logits (the forward pass is exact).
        better = loss < st.best_loss
        hard = (st.logits > 0).astype(jnp.float32) * allowed
        with jax.named_scope("update"):
            upd, opt = tx.update(g, st.opt)
        return _Loop(optax.apply_updates(st.logits, upd), opt,
                     jnp.where(better, hard, st.best), jnp.where(better, loss, st.best_loss),
                     jnp.where(i == 0, aux["distances"], st.start))

    init = _Loop(logits0, tx.init(logits0), jnp.zeros_like(logits0),
                 jnp.asarray(jnp.inf, jnp.float32), jnp.zeros(len(recs), jnp.float32))
    st = jax.lax.fori_loop(0, cfg.iters, body, init)
    powers = 2 ** jnp.arange(cfg.bits, dtype=jnp.int32)
    k = jnp.sum(st.best.astype(jnp.int32) * powers, axis=-1).astype(jnp.uint8)
    return k, tmpl, st.start


def evaluate(recogniser, params, patch, protected, m_chip, tmpl, key_u8, bits: int, start):
    """Returns the MaskMetrics of a protected uint8 patch against its clean patch."""
    recs, ps, m = _members(recogniser, params, m_chip)
    x = patch.astype(jnp.float32) / 255.0
    y = protected.astype(jnp.float32) / 255.0
    dists = []
    for r, (rec, p) in enumerate(zip(recs, ps)):
        s = (rec.chip_size, rec.chip_size)
        e = rec.embed(p, jnp.stack([align.warp(x, m[r], s), align.warp(y, m[r], s)]))
        dists.append(jnp.linalg.norm(e[0] - e[1]))
    dists = jnp.stack(dists)
    thr = jnp.asarray([rec.threshold for rec in recs], jnp.float32)
    _, _, inside = align.footprint(align.invert(m[0]), x.shape[0], recs[0].chip_size)
    cov = jnp.sum(tmpl & inside) / jnp.maximum(jnp.sum(inside), 1)
    bits_set = sum(jnp.sum((key_u8.astype(jnp.int32) >> j) & 1) for j in range(bits))
    flipped = bits_set / jnp.maximum(jnp.sum(tmpl) * 3 * bits, 1)
    return MaskMetrics(protection=dists[0], start_protection=start[0], distances=dists, ssim=losses.ssim(x, y),
                       psnr=losses.psnr(x, y),
                       passed=jnp.all(dists > thr).astype(jnp.float32),
                       coverage=cov.astype(jnp.float32), flipped=flipped.astype(jnp.float32),
                       template=tmpl.astype(jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class MaskMethod(base.PerFaceMethod):
    """The per-image mask key as a method of `faceveil.engine.methods.base`: params are the
    recogniser's (a tuple per member for an `Ensemble`, whose templates superpose)."""

    recogniser: object
    config: MaskConfig = MaskConfig()
    name: str = "mask"
    combine: str = "xor"  # the pipeline XORs each face's change into the photo (photos.py)

    def step(self, params, target, state, face: base.FaceFrame):
        """Returns (state, FaceOutput) of one face: x XOR k, the key optimised for this face."""
        del target
        key, k_face = jax.random.split(state)
        k, tmpl, start = solve(self.recogniser, self.config, params, face.patch, face.m_chip, k_face)
        k = jnp.where(face.present, k, jnp.zeros_like(k))
        out = face.patch ^ k
        metrics = evaluate(self.recogniser, params, face.patch, out, face.m_chip, tmpl, k,
                           self.config.bits, start)
        nan = jnp.where(face.present, 0.0, jnp.nan)
        metrics = jax.tree.map(lambda v: v + nan, metrics)
        return key, base.FaceOutput(protected=out,
                                    iters=jnp.asarray(self.config.iters, jnp.int32),
                                    metrics=metrics)
