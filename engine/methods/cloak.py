"""Video cloaks with computation reuse (DESIGN.md method 1, Guo et al.): the compiled core.

A face is a fixed-size square patch of the frame, side P (a bucket such as 128/192/256/384
chosen on the host to cover the face with a margin), cut at an integer offset so the cloak
lives on real frame pixels, plus the (2, 3) transform `m_chip` from the recogniser's chip
pixels to patch pixels (from the landmarks and the recogniser's template). The recogniser sees
`warp(patch, m_chip, chip_size)`, so its features are a differentiable function of the patch.

Per face per frame the cloak `delta` [P, P, 3] is optimised with Adadelta (optax) on
`faceveil.losses.objectives.cloak_objective`, for at most `max_iters` updates, and stops at the
first evaluation where the protection (feature distance from the clean face) reaches
`threshold` and DSSIM is within `rho`. Both are evaluated on the protected patch *rounded to
uint8*: the objective is computed on the rounded patch with a straight-through gradient, so one
forward+backward per evaluation serves both the update and the stop test. `iters` counts the
updates made; a warm start that already passes costs 0 iterations. A face costs one forward
pass for its clean features plus iters + 1 evaluations (the last one measures the final cloak;
its features become the next frame's temporal reference). With alignment jitter
(`CloakConfig.jitter`, `views`) an evaluation sees the face through `views` randomly jittered
alignments at once: per view one forward+backward of the protected face and one forward of the
clean face in that view; the update follows the views' mean gradient and the stop test needs
every view to pass.

With `CloakConfig.field` 'chip' (the default) the optimised variable is instead a field on
the (primary) recogniser's chip, carried to the patch through the inverse chip warp; the
budget is still measured on the patch, at the frame's own scale. `recogniser` may be a
`registry.Ensemble`: each member sees the patch through its own chip transform (`m_chip`
[R, 2, 3]) and every member must reach its own stop distance.

Reuse (`CloakConfig.reuse`), between consecutive faces of one chain (track):
  'none':   every frame cold-starts from a small uniform random cloak (the baseline);
  'copy':   the previous cloak on the same frame pixels (shifted by the integer patch offsets,
            no warp; the ablation);
  'affine': the previous cloak warped by the least-squares affine that maps the previous
            frame's 5 landmarks onto the current ones (the method). Warping is bilinear;
            pixels the warped cloak does not cover (the border the face moved away from) get 0,
            i.e. no cloak, which only touches the patch's margin.
With the chip field the previous field is already aligned to the landmarks (the chip moves
with the face), so 'copy' and 'affine' both start from it unwarped. A chain's first face
always cold-starts. The objective is the same in all three modes (the
temporal term uses the previous protected features whenever the chain has a previous face), so
the modes differ only in where the optimisation starts.

Compiled shape: `CloakMethod(recogniser, config)` is a method of `faceveil.engine.methods.base`;
`base.chunk_fn(method)` compiles one function over a chunk of frames: `lax.while_loop` (here,
in `step`) runs one frame's iterations with the early stop, `lax.scan` carries
(cloak, landmarks, offset, protected features) from frame to frame, `vmap` runs independent
chains side by side. Frames where a chain has no face are masked: no update, the carry passes
through, metrics are NaN and iters 0. Under vmap the while_loop runs until its slowest lane
stops; every lane keeps its own count because a stopped lane's update is masked.
The host streams chunk after chunk, passing back the returned carry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike

from faceveil.engine.methods import base
from faceveil.engine.pipeline import align
from faceveil.losses import jpeg, objectives, perceptual, regularisers
from faceveil.models import lpips, registry

REUSE_MODES = ("none", "copy", "affine")
FIELDS = ("patch", "chip")
BUDGETS = ("dssim", "lpips")


@dataclasses.dataclass(frozen=True)
class CloakConfig:
    """Static settings of the cloak optimisation (hashable: one compilation per config).

    Attributes:
      max_iters: most Adadelta updates per face per frame (paper: 40).
      lr: Adadelta learning rate (a multiplier on Adadelta's unit-free step).
      adadelta_rho: Adadelta's decay of its running averages.
      adadelta_eps: Adadelta's epsilon; it also sets the size of the first steps.
      threshold: protection (feature distance of the rounded protected face from the clean
        face) at which the optimisation stops; a tuple gives one per recogniser of an
        ensemble (`registry.Ensemble`, e.g. 'dlib,facenet'), every one must be reached.
      target_threshold: targeted mode also needs the distance to the target at most this.
      lam: weight of the DSSIM budget hinge.
      rho: DSSIM budget; the stop rule also needs DSSIM <= rho.
      lambda1: weight of the temporal feature-consistency term.
      p: order of the Minkowski distance D.
      reuse: 'none', 'copy' or 'affine' (module docstring).
      init_scale: half-width of the uniform cold-start cloak, in [0, 1] pixel units.
      layer: None for the final embedding, or the name of an intermediate feature of the
        recogniser (flattened).
      targeted: move towards a per-chain target feature instead of only away.
      antialias: low-pass the patch at the chip's scale before the recogniser samples it
        (`features`), so the cloak survives realignment by the attacker's own detector.
      jitter: size of the random alignment jitter each evaluation sees: the shift, in chip
        sizes (`jitter_transform`; 0: always the detected alignment, no jitter at all).
      jitter_scale, jitter_turn, jitter_scale_bias: the jitter's log-scale range (about
        jitter_scale_bias) and its angle range, radians. dlib-bin's own detector and 5-point
        predictor place the chip 3.6% closer on average than our MTCNN landmarks do, with a
        spread of ~0.05 in log-scale and ~0.03-0.08 rad in angle (`benchmarks.alignment_gap`,
        shared photos and clip): the views span both aligners.
      budget: the visual budget the stop rule and the hinge use. 'dssim': DSSIM of the face
        patch at the photo's own scale <= rho. 'lpips': LPIPS (AlexNet, `models.lpips`) of the
        primary recogniser's chip through the detected alignment (the face at ~150 px, as
        LowKey measures it) <= lpips_rho, weighted by lam; DSSIM is then only reported. The
        method's params must then carry the LPIPS weights (`method_params`).
      lpips_rho: the LPIPS budget with budget 'lpips'.
      jpeg_views: how many of the `views` see the protected face re-encoded as JPEG
        (`faceveil.losses.jpeg`, a differentiable libjpeg with the photo's own 8x8 grid) at a
        random quality in `jpeg_quality`, as sites re-encode uploads.
      field: where the optimised cloak lives. 'patch': one value per frame pixel of the face
        patch. 'chip': one value per pixel of the recogniser's aligned chip, carried to the
        frame's pixels through the chip warp (bilinear, so smooth on a face larger than the
        chip): the cloak's strength and cost then do not depend on how many pixels the face
        covers, and a video's previous cloak is already aligned to the landmarks (its warm
        start needs no warp; 'copy' and 'affine' reuse coincide).
      views: jittered alignments per evaluation (with jitter 0 there is one, the detected
        alignment). The update follows their mean gradient and the stop rule needs every view
        to pass, so a cloak stops only once it works from several alignments, not from one
        lucky draw.
    """

    # Defaults tuned for dlib (the default recogniser) on the shared Hamilton clip with
    # benchmarks/iterations_saved.py: threshold 0.8 is 4/3 of dlib's same-person distance 0.6;
    # at lr 1 the cold-start baseline then needs ~20 iterations per face (none at the cap).
    # rho 0.006 (SSIM >= 0.988) rather than the objective's 0.01: reused cloaks keep their
    # energy from frame to frame and settle at the budget's edge, so a tight budget is what
    # keeps reuse from costing visual quality. lambda1 0.3 rather than 1: at 1 the temporal
    # term's pull exactly cancels the protection term's push past the previous face's
    # distance, and protection stalls there. jitter 0.03: a cloak optimised through one fixed
    # alignment loses most of its effect when the attacker's detector places the chip a few
    # pixels elsewhere (on the clip's largest face 0.80 -> 0.49 at 3% landmark noise; only 25%
    # of its frames stayed beyond 0.6 of the person's other frames); seeing a random jittered
    # alignment at every evaluation raised that to 86% for ~1.5x the iterations. views 2: with
    # one view a warm-started cloak stopped at the first lucky draw, and only 91.5% of the
    # clip's affine-reused faces stayed beyond 0.6 of the mean of the person's other frames
    # (cold starts: 97%); needing two views at once (and following their mean gradient) gave
    # 97.7% with 23% fewer iterations (933 vs 1,208) in the same optimise time.
    max_iters: int = 40
    lr: float = 1.0
    adadelta_rho: float = 0.9
    adadelta_eps: float = 1e-6
    threshold: float | tuple[float, ...] = 0.8
    target_threshold: float = math.inf
    lam: float = objectives.CLOAK_LAM
    rho: float = 0.006
    lambda1: float = 0.3
    p: float = 2.0
    reuse: str = "affine"
    init_scale: float = 2.0 / 255.0
    layer: str | None = None
    targeted: bool = False
    antialias: bool = True
    jitter: float = 0.03
    jitter_scale: float = 0.05
    jitter_turn: float = 0.05
    jitter_scale_bias: float = -0.018
    views: int = 2
    field: str = "chip"
    jpeg_views: int = 0
    jpeg_quality: tuple[float, float] = (70.0, 90.0)
    budget: str = "dssim"
    lpips_rho: float = 0.01

    def __post_init__(self):
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got '{self.reuse}'")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be at least 1, got {self.max_iters}")
        if self.views < 1:
            raise ValueError(f"views must be at least 1, got {self.views}")
        if self.field not in FIELDS:
            raise ValueError(f"field must be one of {FIELDS}, got '{self.field}'")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got '{self.budget}'")
        if not 0 <= self.jpeg_views <= self.views:
            raise ValueError(f"jpeg_views must be in [0, views={self.views}], got "
                             f"{self.jpeg_views}")


class ChainCarry(NamedTuple):
    """What one chain passes from frame to frame (and chunk to chunk); leading axis [C]."""

    delta: jax.Array  # [C, P, P, 3] last optimised cloak in its patch's pixels ([C, S, S, 3]
    #                   chip pixels with CloakConfig.field 'chip')
    landmarks: jax.Array  # [C, 5, 2] float32 landmarks of that face, in its patch's pixels
    offset: jax.Array  # [C, 2] float32 that patch's top-left in frame pixels
    feat: tuple  # ([C, D_r] float32,) features of that protected face, per recogniser
    has_previous: jax.Array  # [C] bool, the chain has processed a face
    key: jax.Array  # [C] PRNG keys for cold starts


class FrameMetrics(NamedTuple):
    """Per-frame diagnostics (leading axes [C, T]); NaN where the chain has no face."""

    protection: jax.Array  # embedding distance, clean vs rounded protected face
    feature_distance: jax.Array  # the objective's protection term (feature-space D)
    target_distance: jax.Array  # D to the target (targeted mode; else as the objective says)
    temporal: jax.Array  # D to the previous protected features
    dssim: jax.Array  # the objective's DSSIM of the rounded protected patch
    ssim: jax.Array  # SSIM (losses.ssim, 11x11 Gaussian) of the rounded protected patch
    lpips: jax.Array  # LPIPS of the primary chip (CloakConfig.budget 'lpips'; else NaN)
    loss: jax.Array  # objective at the final cloak
    loss_curve: jax.Array  # [..., max_iters] loss at evaluation i (before update i), NaN after
    passed: jax.Array  # bool, the stop rule held at the final cloak


def quantise(x: jax.Array) -> jax.Array:
    """Returns x in [0, 1] rounded to the nearest uint8 level, as float."""
    return jnp.round(x * 255.0) / 255.0


def features(recogniser, params, patch: jax.Array, m_chip: jax.Array, layer: str | None,
             antialias: bool = True):
    """Returns (embedding [E], features [D]) of one face patch [P, P, 3] seen through m_chip.

    With `antialias` the patch is low-passed at the chip's scale before sampling
    (`align.antialias`), so a cloak optimised through it is smooth at that scale and survives
    the recogniser's own alignment of the published face (another detector's landmarks put
    the chip's sample points a few pixels elsewhere).
    """
    s = recogniser.chip_size
    if antialias:
        with jax.named_scope("antialias"):
            patch = align.antialias(patch, m_chip)
    with jax.named_scope("chip_warp"):
        chip = align.warp(patch, m_chip, (s, s))
    with jax.named_scope("recogniser"):
        emb, inter = recogniser.apply(params, chip[None])
    feat = emb[0] if layer is None else inter[layer][0].reshape(-1)
    return emb[0], feat


class _Loop(NamedTuple):
    it: jax.Array  # [] int32 updates made
    done: jax.Array  # [] bool
    delta: jax.Array  # [P, P, 3]
    opt_state: optax.OptState
    passed: jax.Array  # [] bool, stop rule at the last evaluation
    loss: jax.Array  # [] objective at the last evaluation
    aux: dict  # the objective's aux at the last evaluation
    emb: tuple  # ([E_r],) embeddings of the last evaluated (rounded) protected patch
    feat: tuple  # ([D_r],) its features
    emb_clean: tuple  # ([E_r],) the clean face's embeddings in the same view
    key: jax.Array  # PRNG key of the alignment jitter
    curve: jax.Array  # [max_iters] losses, NaN where not evaluated


def jitter_transform(key, chip_size: int, amount: float, *, scale: float | None = None,
                     turn: float | None = None, scale_bias: float = 0.0) -> jax.Array:
    """Returns a random (2, 3) chip -> chip similarity: shift, scale and turn about the centre.

    Shifts are uniform in +-amount * chip_size per axis, the log-scale uniform in
    scale_bias +- scale and the angle (radians) in +-turn (`scale`, `turn` default to
    `amount`); `amount` 0.03 moves a 150 px chip's sample points by up to ~5 px.
    """
    scale = amount if scale is None else scale
    turn = amount if turn is None else turn
    k_shift, k_scale, k_turn = jax.random.split(key, 3)
    shift = jax.random.uniform(k_shift, (2,), jnp.float32, -amount, amount) * chip_size
    scale = jnp.exp(scale_bias + jax.random.uniform(k_scale, (), jnp.float32, -scale, scale))
    turn = jax.random.uniform(k_turn, (), jnp.float32, -turn, turn)
    c, s = scale * jnp.cos(turn), scale * jnp.sin(turn)
    lin = jnp.array([[c, -s], [s, c]])
    centre = jnp.full((2,), (chip_size - 1) / 2.0, jnp.float32)
    return jnp.concatenate([lin, (centre - lin @ centre + shift)[:, None]], axis=1)


def _thresholds(cfg: CloakConfig, n: int) -> tuple[float, ...]:
    """Returns the stop distance of each of n recognisers (a float threshold serves one)."""
    thr = cfg.threshold if isinstance(cfg.threshold, tuple) else (cfg.threshold,)
    if len(thr) != n:
        raise ValueError(f"CloakConfig.threshold has {len(thr)} value(s) for {n} recogniser(s)")
    return tuple(float(t) for t in thr)


def method_params(config: CloakConfig, recogniser_params):
    """Returns the params a CloakMethod's step takes: the recogniser's, plus LPIPS' if needed.

    With budget 'dssim' they are the recogniser's own params (a tuple for an ensemble); with
    'lpips' a dict {"recognisers": those, "lpips": the LPIPS weights from the store}.
    """
    if config.budget != "lpips":
        return recogniser_params
    return {"recognisers": recogniser_params, "lpips": jax.device_put(lpips.load())}


def _split_params(cfg: CloakConfig, recogniser, params) -> tuple[tuple, dict | None]:
    """Returns (each recogniser's params, LPIPS params or None) of a step's params."""
    lp = None
    if cfg.budget == "lpips":
        params, lp = params["recognisers"], params["lpips"]
    return member_params(recogniser, params), lp


def member_params(recogniser, params) -> tuple:
    """Returns the parameters of each recogniser behind `recogniser`, in member order."""
    return tuple(params) if len(registry.members(recogniser)) > 1 else (params,)


def _member_transforms(recogniser, m_chip) -> jax.Array:
    """Returns [R, 2, 3]: each member's chip -> patch transform (m_chip [2, 3] or [R, 2, 3])."""
    return jnp.reshape(m_chip, (len(registry.members(recogniser)), 2, 3))


def _solve_frame(recogniser, cfg: CloakConfig, params, orig, m_chip, delta0, feat_prev,
                 has_prev, target, present, key, to_delta=None, jpeg_offset=(0, 0),
                 orig_ssim=None):
    """Returns the final _Loop state of one face's Adadelta run with early stop.

    The optimised variable is `delta0`'s shape: the patch cloak itself, or (`to_delta` given,
    `CloakConfig.field` 'chip') a chip-space field that `to_delta` carries to the patch.

    Every recogniser behind `recogniser` (one, or an ensemble's members, each through its own
    chip transform in `m_chip`) sees the face; the loss adds their objectives, each in units of
    its own stop distance, and the stop rule needs every recogniser to pass. With
    `cfg.jitter` > 0 every evaluation sees the face through `cfg.views` chip transforms, each
    composed with a fresh random jitter (expectation over alignments, as the attacker's own
    alignment of the published face will differ from ours), the clean face through the same
    views; a view's jitter is the same relative shift, scale and turn for every recogniser.
    `feat_prev`, the state's features and `target` are tuples over the recognisers.
    """
    recs = registry.members(recogniser)
    mparams, lp_params = _split_params(cfg, recogniser, params)
    thr = _thresholds(cfg, len(recs))
    m_all = _member_transforms(recogniser, m_chip)
    opt = optax.adadelta(cfg.lr, rho=cfg.adadelta_rho, eps=cfg.adadelta_eps)

    def low_pass(r, x):
        # Once per recogniser at the scale of its detected alignment, not per view: the
        # views' scales differ from it by a few percent, and the low-pass is the costliest
        # pass over a large face's patch.
        if not cfg.antialias:
            return x
        with jax.named_scope("antialias"):
            return align.antialias(x, m_all[r])

    orig_lp = [low_pass(r, orig) for r in range(len(recs))]
    if orig_ssim is None:  # the clean patch's half of SSIM: once per face, not per iteration
        orig_ssim = perceptual.ssim_reference(orig)

    def seen_by(r, x, m_views, quality=None, x_lp=None):
        """Returns (embeddings [V, E], features [V, D]) of patch x by recogniser r in views.

        With `quality` [V] the last `cfg.jpeg_views` views see x re-encoded as JPEG at that
        quality, on the photo's own block grid (the patch's offset). `x_lp`: x already
        low-passed for recogniser r.
        """
        def look(x_view, m):
            return features(recs[r], mparams[r], x_view, m, cfg.layer, antialias=False)

        n = m_views.shape[0] - (0 if quality is None else cfg.jpeg_views)
        out = jax.vmap(look, (None, 0))(low_pass(r, x) if x_lp is None else x_lp, m_views[:n])
        if n < m_views.shape[0]:
            xj = jax.vmap(lambda q: low_pass(r, jpeg.jpeg(x, q, offset=jpeg_offset)))(
                quality[n:])
            out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out,
                               jax.vmap(look)(xj, m_views[n:]))
        return out

    def objective(var, m_views, quality, feat_clean):
        prot = jnp.clip(orig + (var if to_delta is None else to_delta(var)), 0.0, 1.0)
        # Straight-through rounding: the value (and the stop test) is the uint8 picture that
        # ships, the gradient is that of the continuous cloak.
        q = prot + lax.stop_gradient(quantise(prot) - prot)
        total, auxes, embs, feats = 0.0, [], [], []
        for r in range(len(recs)):
            seen = []

            def features_fn(x, r=r, seen=seen):
                # Keep this forward pass's embeddings and features for the stop test and the
                # carry, so one forward+backward per evaluation serves everything.
                emb, feat = seen_by(r, x, m_views[r], quality)
                seen.append((emb, feat))
                return feat

            dssim_lam = cfg.lam if r == 0 and cfg.budget == "dssim" else 0.0
            loss, aux = objectives.cloak_objective(
                q, orig, features_fn=features_fn, feat_original=feat_clean[r],
                feat_previous=feat_prev[r], has_previous=has_prev,
                target=target[r] if cfg.targeted else None, lambda1=cfg.lambda1,
                lam=dssim_lam, rho=cfg.rho, p=cfg.p, original_reference=orig_ssim)
            if len(seen) != 1:  # the objective's contract: F is evaluated once, on `protected`
                raise RuntimeError(f"cloak_objective called features_fn {len(seen)} times")
            if r == 0 and cfg.budget == "lpips":
                aux["lpips"] = face_lpips(q)
                loss = loss + cfg.lam * regularisers.budget_hinge(aux["lpips"], cfg.lpips_rho)
            # Each recogniser's distances count in units of its own stop distance.
            total = loss if r == 0 else total + loss * (thr[0] / thr[r])
            auxes.append(aux)
            embs.append(seen[0][0])
            feats.append(seen[0][1])
        return total, (tuple(auxes), tuple(embs), tuple(feats))

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def face_lpips(x):
        """Returns the LPIPS of patch x's primary chip against the clean one (detected view)."""
        def chip(y_lp):
            return align.warp(y_lp, m_all[0], (recs[0].chip_size, recs[0].chip_size))

        return lpips.lpips(lp_params, chip(low_pass(0, x)), chip(orig_lp[0]))

    def passes(auxes):
        """Returns [V] whether each view passes for every recogniser."""
        if cfg.budget == "lpips":
            ok = auxes[0]["lpips"] <= cfg.lpips_rho
        else:
            ok = auxes[0]["dssim"] <= cfg.rho
        for r, aux in enumerate(auxes):
            ok = ok & (aux["protect"] >= thr[r])
            if cfg.targeted:
                ok = ok & (aux["target_dist"] <= cfg.target_threshold)
        return ok

    def view(key):
        """Returns (next key, chip transforms [R, V, 2, 3], JPEG qualities [V] or None)."""
        if cfg.jitter <= 0:
            return key, m_all[:, None], None
        key, sub, k_q = jax.random.split(key, 3)
        subs = sub[None] if cfg.views == 1 else jax.random.split(sub, cfg.views)
        m_views = [jax.vmap(lambda k, m=m, s=rec.chip_size: align.compose(
            m, jitter_transform(k, s, cfg.jitter, scale=cfg.jitter_scale, turn=cfg.jitter_turn,
                                scale_bias=cfg.jitter_scale_bias)))(subs)
            for m, rec in zip(m_all, recs)]
        quality = None
        if cfg.jpeg_views:
            quality = jax.random.uniform(k_q, (cfg.views,), jnp.float32, *cfg.jpeg_quality)
        return key, jnp.stack(m_views), quality

    def clean(m_views):
        return tuple(seen_by(r, orig, m_views[r], x_lp=orig_lp[r]) for r in range(len(recs)))

    def body(st: _Loop) -> _Loop:
        key, m_views, quality = view(st.key)
        clean_views = clean(m_views)
        (loss, (auxes, embs, feats)), grad = value_and_grad(
            st.delta, m_views, quality, tuple(f for _, f in clean_views))
        # Every view must pass; the diagnostics (and the next frame's temporal reference) are
        # those of the view that protects the primary recogniser least.
        passed = passes(auxes).all()
        worst = jnp.argmin(auxes[0]["protect"])
        pick = functools.partial(jax.tree.map, lambda x: x[worst] if x.ndim else x)
        stop = passed | (st.it >= cfg.max_iters)
        with jax.named_scope("update"):
            updates, new_opt = opt.update(grad, st.opt_state, st.delta)
        if to_delta is None:
            # Keep the protected patch in [0, 1] so the cloak never drifts where clip hides it.
            new_delta = jnp.clip(orig + st.delta + updates, 0.0, 1.0) - orig
        else:  # a chip field covers many patch pixels: bound it by the pixel range only
            new_delta = jnp.clip(st.delta + updates, -1.0, 1.0)

        def keep(new, old):  # a stopped lane must not move on (vmap runs it further)
            return jnp.where(stop, old, new)

        return _Loop(
            it=st.it + jnp.where(stop, 0, 1).astype(jnp.int32), done=stop,
            delta=keep(new_delta, st.delta),
            opt_state=jax.tree.map(keep, new_opt, st.opt_state), passed=passed, loss=loss,
            aux=pick(auxes[0]), emb=pick(embs), feat=pick(feats),
            emb_clean=pick(tuple(e for e, _ in clean_views)), key=key,
            curve=st.curve.at[st.it].set(loss, mode="drop"))

    m0 = m_all[:, None]  # the detected alignment: the clean reference before any view
    clean0 = clean(m0)
    (_, (aux_shape, emb_shape, feat_shape)), _ = jax.eval_shape(
        value_and_grad, delta0, m0, None, tuple(f for _, f in clean0))

    def nan_view(spec):  # NaN of one view's shape (the leading axis is the views')
        return jnp.full(spec.shape[1:] if spec.ndim else (), jnp.nan, spec.dtype)

    init = _Loop(
        it=jnp.zeros((), jnp.int32), done=~present, delta=delta0, opt_state=opt.init(delta0),
        passed=jnp.zeros((), bool), loss=jnp.full((), jnp.nan, jnp.float32),
        aux=jax.tree.map(nan_view, aux_shape[0]), emb=jax.tree.map(nan_view, emb_shape),
        feat=jax.tree.map(nan_view, feat_shape),
        emb_clean=tuple(e[0] for e, _ in clean0), key=key,
        curve=jnp.full((cfg.max_iters,), jnp.nan, jnp.float32))
    return lax.while_loop(lambda st: ~st.done, body, init)


def warm_start(reuse: str, delta_prev: ArrayLike, landmarks_prev: ArrayLike,
               offset_prev: ArrayLike, landmarks: ArrayLike, offset: ArrayLike,
               size: int) -> jax.Array:
    """Returns the previous face's cloak moved onto the current patch [size, size, 3].

    Args:
      reuse: 'copy' (same frame pixels, shifted by the patch offsets) or 'affine' (warped by
        the least-squares affine from the previous to the current landmarks).
      delta_prev: [P', P', 3] the previous cloak, in its patch's pixels.
      landmarks_prev: [5, 2] the previous face's landmarks, in its patch's pixels.
      offset_prev: [2] the previous patch's top-left (x, y) in frame pixels.
      landmarks: [5, 2] the current landmarks, in the current patch's pixels.
      offset: [2] the current patch's top-left in frame pixels.
      size: the current patch side.
    """
    delta_prev = jnp.asarray(delta_prev, jnp.float32)
    if reuse == "copy":
        # Same frame pixels: current patch pixel u is previous patch pixel u + (off - off_prev).
        shift = jnp.asarray(offset, jnp.float32) - jnp.asarray(offset_prev, jnp.float32)
        m = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).at[:, 2].set(shift)
    elif reuse == "affine":
        # Least squares previous -> current landmarks; the warp samples the previous cloak at
        # the inverse, so the cloak moves with the face.
        m = align.invert(align.estimate_affine(landmarks_prev, landmarks))
    else:
        raise ValueError(f"warm_start needs reuse 'copy' or 'affine', got '{reuse}'")
    return align.warp(delta_prev, m, (size, size), fill=0.0)


def _frame_step(recogniser, cfg: CloakConfig, params, target, carry: ChainCarry,
                face: base.FaceFrame) -> tuple[ChainCarry, base.FaceOutput]:
    """Returns (carry, FaceOutput) for one chain and one frame."""
    patch_u8, m_chip, landmarks, offset, present = face
    orig = patch_u8.astype(jnp.float32) / 255.0
    size = orig.shape[0]
    key, sub = jax.random.split(carry.key)
    to_delta = None
    if cfg.field == "chip":  # the field lives in the primary recogniser's chip
        m_inv = align.invert(_member_transforms(recogniser, m_chip)[0])

        def to_delta(z):
            with jax.named_scope("field"):
                return align.warp_image(z, m_inv, (size, size), fill=0.0)

        delta0 = cfg.init_scale * jax.random.uniform(sub, carry.delta.shape, jnp.float32,
                                                     -1.0, 1.0)
        if cfg.reuse != "none":  # the chip is aligned to the landmarks: no warp needed
            delta0 = jnp.where(carry.has_previous, carry.delta, delta0)
    else:
        delta0 = cfg.init_scale * jax.random.uniform(sub, orig.shape, jnp.float32, -1.0, 1.0)
        if cfg.reuse != "none":
            warm = warm_start(cfg.reuse, carry.delta, carry.landmarks, carry.offset, landmarks,
                              offset, size)
            delta0 = jnp.where(carry.has_previous, warm, delta0)
        delta0 = jnp.clip(orig + delta0, 0.0, 1.0) - orig

    orig_ssim = perceptual.ssim_reference(orig)  # the budget's and the metric's
    st = _solve_frame(recogniser, cfg, params, orig, m_chip, delta0, carry.feat,
                      carry.has_previous, (target,), present, jax.random.fold_in(sub, 1),
                      to_delta, jpeg_offset=jnp.round(offset).astype(jnp.int32),
                      orig_ssim=orig_ssim)
    final = quantise(jnp.clip(orig + (st.delta if to_delta is None else to_delta(st.delta)),
                              0.0, 1.0))
    protected = jnp.where(present, jnp.round(final * 255.0), patch_u8).astype(jnp.uint8)

    def masked(x):
        return jnp.where(present, x, jnp.nan)

    metrics = FrameMetrics(
        protection=masked(jnp.linalg.norm(st.emb[0] - st.emb_clean[0])),
        feature_distance=masked(st.aux["protect"]),
        target_distance=masked(st.aux["target_dist"]),
        temporal=masked(st.aux["temporal"]),
        dssim=masked(st.aux["dssim"]),
        ssim=masked(perceptual.ssim(orig, final, reference=orig_ssim)),
        lpips=masked(st.aux.get("lpips", jnp.nan)),
        loss=masked(st.loss),
        loss_curve=masked(st.curve),
        passed=present & st.passed)
    new_carry = ChainCarry(
        delta=jnp.where(present, st.delta, carry.delta),
        landmarks=jnp.where(present, landmarks, carry.landmarks),
        offset=jnp.where(present, offset, carry.offset),
        feat=jax.tree.map(lambda new, old: jnp.where(present, new, old), st.feat, carry.feat),
        has_previous=carry.has_previous | present,
        key=key)
    return new_carry, base.FaceOutput(protected, jnp.where(present, st.it, 0), metrics)


def _fn_key(fn):
    # Registries build a fresh functools.partial(apply, Module(...)) per lookup; partials compare
    # by identity, but their function and (hashable, dataclass) Flax modules compare by value.
    if isinstance(fn, functools.partial):
        try:
            key = (_fn_key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
            hash(key)
            return key
        except TypeError:
            return fn
    return fn


@dataclasses.dataclass(frozen=True, eq=False)
class CloakMethod:
    """The video cloak as a method (`faceveil.engine.methods.base`): recogniser plus config."""

    recogniser: object
    config: CloakConfig = CloakConfig()
    name: str = "cloak"

    def __post_init__(self):
        recs = registry.members(self.recogniser)
        _thresholds(self.config, len(recs))
        if len(recs) > 1 and (self.config.targeted or self.config.layer is not None):
            raise ValueError("a cloak against several recognisers is untargeted and compares "
                             "final embeddings (targeted=False, layer=None)")

    def cache_key(self) -> tuple:
        """Returns what identifies this method's compiled code."""
        return (self.name, self.config) + tuple(
            (rec.name, _fn_key(rec.apply), rec.chip_size, np.asarray(rec.template).tobytes(),
             float(rec.aspect)) for rec in registry.members(self.recogniser))

    def __hash__(self):
        return hash(self.cache_key())

    def __eq__(self, other):
        return isinstance(other, CloakMethod) and self.cache_key() == other.cache_key()

    def feature_spec(self, params, patch_size: int) -> tuple:
        """Returns the shapes of the features [D_r] the objective compares, per recogniser."""
        patch = jax.ShapeDtypeStruct((patch_size, patch_size, 3), jnp.float32)
        m = jax.ShapeDtypeStruct((2, 3), jnp.float32)
        return tuple(
            jax.eval_shape(functools.partial(features, rec, layer=self.config.layer), p,
                           patch, m)[1]
            for rec, p in zip(registry.members(self.recogniser),
                              _split_params(self.config, self.recogniser, params)[0]))

    def target_spec(self, params, patch_size: int) -> jax.ShapeDtypeStruct:
        """Returns the per-chain target: features [D] to move towards (targeted mode)."""
        return self.feature_spec(params, patch_size)[0]

    def init_state(self, params, key, patch_size: int) -> ChainCarry:
        """Returns the carry of one chain that has seen no face yet (it cold-starts)."""
        feats = self.feature_spec(params, patch_size)
        side = self.recogniser.chip_size if self.config.field == "chip" else patch_size
        return ChainCarry(
            delta=jnp.zeros((side, side, 3), jnp.float32),
            landmarks=jnp.zeros((5, 2), jnp.float32), offset=jnp.zeros((2,), jnp.float32),
            feat=tuple(jnp.zeros(f.shape, jnp.float32) for f in feats),
            has_previous=jnp.zeros((), bool), key=jnp.asarray(key))

    def step(self, params, target, state: ChainCarry, face: base.FaceFrame):
        """Returns (state, FaceOutput) of one face: warm start, Adadelta with early stop."""
        return _frame_step(self.recogniser, self.config, params, target, state, face)


# Named presets, in one place: visual budget (DSSIM rho), the distance the optimisation stops
# at (a multiple of the recogniser's own same-person threshold) and the iteration cap. 'mid',
# the default, is CloakConfig's defaults (for dlib: stop at 0.8, rho 0.006, 40 iterations), the
# settings the benchmarks measure; every preset sees jittered alignments (CloakConfig.jitter).
PRESETS = {
    "low": {"rho": 0.004, "factor": 1.15, "max_iters": 40},
    "mid": {"rho": 0.006, "factor": 4 / 3, "max_iters": 40},
    "high": {"rho": 0.012, "factor": 1.75, "max_iters": 80},
}


def preset(mode: str, recogniser, *, targeted: bool = False, **overrides) -> CloakConfig:
    """Returns the CloakConfig of a named preset ('low', 'mid', 'high') for a recogniser."""
    if mode not in PRESETS:
        raise ValueError(f"mode must be one of {sorted(PRESETS)}, got '{mode}'")
    if isinstance(recogniser, str):
        recogniser = registry.get(recogniser)
    m = PRESETS[mode]
    thr = tuple(round(m["factor"] * r.threshold, 4) for r in registry.members(recogniser))
    settings = {"rho": m["rho"], "threshold": thr[0] if len(thr) == 1 else thr,
                "max_iters": m["max_iters"], "targeted": targeted}
    settings.update(overrides)
    return CloakConfig(**settings)


def cloak_faces(params, recogniser, patches: ArrayLike, m_chip: ArrayLike, key: ArrayLike,
                config: CloakConfig, *, target: ArrayLike | None = None):
    """Returns (protected uint8 [B, P, P, 3], iters [B], FrameMetrics [B]) of B still faces.

    Every face is a chain of one frame without a previous face, all B in one compiled call
    (`base.solve_faces`).
    """
    out = base.solve_faces(CloakMethod(recogniser, config), params, patches, m_chip, key,
                           target=target)
    return out.protected, out.iters, out.metrics
