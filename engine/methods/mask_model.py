"""Mask templates with a trained template network and key generator: the compiled core.

The trained mode of DESIGN.md method 3 (Wang et al.); the per-image mode is `methods.mask`.
Per face, with x the clean uint8 face patch (real photo pixels) and its 5 landmarks:

  frame     the face's aligned frame: G x G pixels fitted to the landmarks (dlib's alignment
            template with `padding`), the same for every recogniser; m_G maps frame pixels to
            patch pixels. Templates and keys are made in this frame and carried to the patch.
  template  `models.mask_nets.TemplateNet` on the frame view gives a basis [G/8, G/8, K]; the
            template of recognisers S is sum_{r in S} tau_r . basis (one tau per recogniser the
            model was trained for, so templates superpose), its `coverage` highest cells the
            allowed region, carried to the patch's pixels (`mask.cells_to_patch`).
  key       `models.mask_nets.KeyGenerator` on the conditioning maps (`conditioning`: the
            template, the pixel statistics near the landmarks or Gaussian noise, b / 4, and a
            noise channel) gives a signed change c in [-1, 1] on the frame grid, sampled
            (bilinear) at every patch pixel's frame position. Each pixel level L = H + l (H its
            high-order bits, l < 2^b its b low ones) becomes y = H + clip(round(l + c (2^b - 1)),
            0, 2^b - 1), inside the template (elsewhere y = L): the change stays within the
            pixel's own block of 2^b levels, so the key k = L XOR y has b bits.
  protect   x XOR k = y, so the restore is exact whatever the key (as the per-image mode).

Why a signed change and not bits: XOR with a key bit adds or takes away 2^j depending on the
pixel's own bit j, which the generator cannot see on a frame grid resampled from the patch; a
bit-valued generator could only draw noise of random sign. Mapping its change through each
pixel's low bits lets it push every pixel the way the recogniser's gradient asks.

One forward pass per face: no optimisation at protect time. `protected_levels` is
differentiable (straight-through through the rounding) for `pipeline.mask_training`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine.methods import base, mask
from faceveil.engine.pipeline import align
from faceveil.models import dlib_resnet, mask_nets, registry

# The visual budget (DSSIM) a key of b bits is trained under: the per-image presets' values.
RHO_OF_BITS = (0.025, 0.025, 0.025, 0.05)


@dataclasses.dataclass(frozen=True)
class MaskModelConfig:
    """Architecture of a trained mask model (stored with it; fixed once trained)."""

    frame: int = 128  # G, side of the aligned frame (a multiple of 8)
    padding: float = 0.4  # the frame's margin about the landmarks (dlib's chip: 0.25)
    basis: int = 4  # K, templates in the shared basis
    width: int = 32  # channels of both networks' first stage
    coverage: float = 0.4  # fraction of the frame's template cells a key may touch
    inputs: str = "landmarks"  # generator input: "landmarks" (pixel statistics) or "noise"
    sigma: float = 0.12  # radius of the landmark neighbourhoods (fraction of G)

    def __post_init__(self):
        if self.frame % 8 or self.frame < 32:
            raise ValueError(f"frame must be a multiple of 8, at least 32, got {self.frame}")
        if self.inputs not in ("landmarks", "noise"):
            raise ValueError(f"inputs must be 'landmarks' or 'noise', got {self.inputs!r}")
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")

    @property
    def cell(self) -> int:
        """The template cell's side in frame pixels (the template net halves G three times)."""
        return 8

    @property
    def channels(self) -> int:
        """Returns the conditioning's channel count."""
        return 3 + (6 if self.inputs == "landmarks" else 0)


def template_net(cfg: MaskModelConfig) -> mask_nets.TemplateNet:
    """Returns the template network of a config."""
    return mask_nets.TemplateNet(width=cfg.width, basis=cfg.basis)


def generator_net(cfg: MaskModelConfig) -> mask_nets.KeyGenerator:
    """Returns the key generator of a config."""
    return mask_nets.KeyGenerator(width=cfg.width)


@functools.cache
def frame_template(frame: int, padding: float):
    """Returns [5, 2] where the landmarks land in the frame (dlib's template, `padding`)."""
    # NumPy, not jnp: a cached jnp array made under a trace would leak the tracer.
    return np.asarray(dlib_resnet.face_template(frame, padding), np.float32)


def frame_transform(cfg: MaskModelConfig, landmarks: jax.Array) -> jax.Array:
    """Returns (2, 3) frame pixels -> patch pixels of a face with landmarks [5, 2] (patch px)."""
    return align.chip_transform(landmarks, frame_template(cfg.frame, cfg.padding))


def landmark_statistics(view: jax.Array, cfg: MaskModelConfig) -> jax.Array:
    """Returns [G, G, 6]: the mean and standard deviation of the pixels near each landmark.

    Each of the 5 landmark neighbourhoods (a Gaussian window of radius sigma * G about the
    landmark's place in the frame) gives a mean and std per channel; every frame pixel holds
    the statistics of the landmarks near it, blended by the same Gaussian weights. The paper's
    better generator input: the key follows the face's own colours, not only noise.
    """
    g = cfg.frame
    pts = frame_template(cfg.frame, cfg.padding)
    yy, xx = jnp.meshgrid(jnp.arange(g, dtype=jnp.float32), jnp.arange(g, dtype=jnp.float32),
                          indexing="ij")
    d2 = (xx[None] - pts[:, 0, None, None]) ** 2 + (yy[None] - pts[:, 1, None, None]) ** 2
    w = jnp.exp(-0.5 * d2 / (cfg.sigma * g) ** 2)  # [5, G, G]
    wn = w / jnp.sum(w, axis=(1, 2), keepdims=True)
    mean = jnp.einsum("khw,hwc->kc", wn, view)
    var = jnp.einsum("khw,hwc->kc", wn, view ** 2) - mean ** 2
    stats = jnp.concatenate([mean, jnp.sqrt(jnp.maximum(var, 1e-8))], axis=-1)  # [5, 6]
    blend = w / jnp.maximum(jnp.sum(w, axis=0, keepdims=True), 1e-12)
    return jnp.einsum("khw,kc->hwc", blend, stats)


def soft_template(model_params, cfg: MaskModelConfig, view: jax.Array,
                  rows: tuple[int, ...]) -> jax.Array:
    """Returns the superposed soft template [G/8, G/8] of the recognisers `rows` of tau."""
    basis = template_net(cfg).apply(model_params["template"], view[None], train=False)
    tau = model_params["tau"][jnp.asarray(rows)]
    return jnp.sum(mask_nets.templates(basis, tau)[0], axis=-1)


def conditioning(cfg: MaskModelConfig, view: jax.Array, tmpl_cells: jax.Array, bits,
                 key) -> jax.Array:
    """Returns the generator's input [G, G, C] for one face (module docstring)."""
    g, c = cfg.frame, cfg.cell
    t = jnp.repeat(jnp.repeat(tmpl_cells.astype(jnp.float32), c, 0), c, 1)[:g, :g, None]
    z = jax.random.normal(key, (g, g, 1), jnp.float32)
    b = jnp.full((g, g, 1), jnp.asarray(bits, jnp.float32) / mask_nets.MAX_BITS)
    parts = [t, b, z]
    if cfg.inputs == "landmarks":
        parts.append(landmark_statistics(view, cfg))
    return jnp.concatenate(parts, axis=-1)


def carry_to_patch(values: jax.Array, m_frame: jax.Array, patch_size: int) -> jax.Array:
    """Returns frame-grid values [G, G, C] sampled (bilinear) at every patch pixel: [P, P, C].

    Patch pixels outside the frame get 0 (no change).
    """
    xs, ys, _ = align.footprint(align.invert(m_frame), patch_size, values.shape[0])
    return align.sample_bilinear(values, xs, ys, fill=0.0)


class Prepared(NamedTuple):
    """One face made ready for the generator: its conditioning, frame and template."""

    z: jax.Array  # [G, G, C] the generator's input
    m_frame: jax.Array  # (2, 3) frame pixels -> patch pixels
    allowed: jax.Array  # [P, P] bool, the template on the patch's pixels


def prepare(model_params, cfg: MaskModelConfig, x: jax.Array, landmarks: jax.Array, bits,
            rows: tuple[int, ...], key) -> Prepared:
    """Returns the Prepared face of patch x [P, P, 3] (float, uint8 levels), landmarks [5, 2]
    in patch pixels, b = `bits`, the recognisers `rows` of tau and the noise's PRNG key."""
    m_frame = frame_transform(cfg, landmarks)
    view = align.warp(x, m_frame, (cfg.frame, cfg.frame))
    soft = jax.lax.stop_gradient(soft_template(model_params, cfg, view, rows))
    cells = mask.top_cells(soft, cfg.coverage)
    allowed = mask.cells_to_patch(cells, m_frame, x.shape[0], cfg.frame, cfg.cell)
    return Prepared(conditioning(cfg, view, cells, bits, key), m_frame, allowed)


def protected_levels(change: jax.Array, face: Prepared, x: jax.Array, bits) -> jax.Array:
    """Returns the protected patch y [P, P, 3] as float uint8 levels / 255 (module docstring).

    Args:
      change: the generator's output on the frame grid [G, G, 3], in [-1, 1].
      face: the Prepared face (frame transform, template on the patch).
      x: the clean patch [P, P, 3], float uint8 levels / 255.
      bits: b (an int or a traced scalar).
    The rounding passes gradients straight through, so y is differentiable in `change`.
    """
    c = carry_to_patch(change, face.m_frame, x.shape[0])
    levels = jnp.round(x * 255.0)
    span = 2.0 ** jnp.asarray(bits, jnp.float32)
    low = jnp.mod(levels, span)
    want = jnp.clip(low + c * (span - 1.0), 0.0, span - 1.0)
    new_low = want + jax.lax.stop_gradient(jnp.round(want) - want)
    y = jnp.where(face.allowed[:, :, None], levels - low + new_low, levels)
    return y / 255.0


def protect_patch(model_params, cfg: MaskModelConfig, patch: jax.Array, landmarks: jax.Array,
                  bits, rows: tuple[int, ...], key) -> tuple[jax.Array, jax.Array]:
    """Returns (key uint8 [P, P, 3] < 2^b, template [P, P] bool) of one uint8 face patch.

    Args:
      model_params: {"template", "tau", "generator"} of a trained model.
      cfg: its MaskModelConfig.
      patch: the clean uint8 face patch [P, P, 3].
      landmarks: [5, 2] in patch pixels.
      bits: b.
      rows: the recognisers protected against (rows of tau).
      key: PRNG key of the noise channel.
    """
    x = patch.astype(jnp.float32) / 255.0
    face = prepare(model_params, cfg, x, landmarks, bits, rows, key)
    change = generator_net(cfg).apply(model_params["generator"], face.z[None], train=False)[0]
    y = jnp.round(protected_levels(change, face, x, bits) * 255.0).astype(jnp.uint8)
    return patch ^ y, face.allowed


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What a protect run of a trained model is: the model's config, b, rows of tau."""

    model: MaskModelConfig
    bits: int = 4
    rows: tuple[int, ...] = (0,)

    def __post_init__(self):
        if not 1 <= self.bits <= mask_nets.MAX_BITS:
            raise ValueError(f"bits must be in 1..{mask_nets.MAX_BITS}, got {self.bits}")


@dataclasses.dataclass(frozen=True, eq=False)
class GeneratorMaskMethod(base.PerFaceMethod):
    """A trained mask model as a method of `faceveil.engine.methods.base`: params are
    {"recognisers": the recognisers' params, "model": the model's}; outputs as `MaskMethod`'s
    (`start_protection` is NaN: a generated key has no random start)."""

    recogniser: object
    config: GeneratorConfig
    name: str = "mask-generator"
    combine: str = "xor"

    def step(self, params, target, state, face: base.FaceFrame):
        """Returns (state, FaceOutput) of one face: x XOR k, k the generator's key."""
        del target
        key, k_face = jax.random.split(state)
        cfg = self.config
        k, allowed = protect_patch(params["model"], cfg.model, face.patch, face.landmarks,
                                   cfg.bits, cfg.rows, k_face)
        k = jnp.where(face.present, k, jnp.zeros_like(k))
        out = face.patch ^ k
        n = len(registry.members(self.recogniser))
        metrics = mask.evaluate(self.recogniser, params["recognisers"], face.patch, out,
                                face.m_chip, allowed, k, cfg.bits, jnp.full(n, jnp.nan))
        nan = jnp.where(face.present, 0.0, jnp.nan)
        metrics = jax.tree.map(lambda v: v + nan, metrics)
        return key, base.FaceOutput(protected=out, iters=jnp.zeros((), jnp.int32),
                                    metrics=metrics)
