"""Training of a mask model: the template network, then the key generator (DESIGN.md method 3).

    model = train(["faces/"], ("dlib", "facenet"), out="models/mask")   # `faceveil mask train`
    model = MaskModel.load("models/mask")                               # `mask protect --model`

Data: every face our MTCNN finds (score >= 0.9, side >= 40 px) in the photos under the folders
given (any LFW-style tree; the identities do not matter), each cropped once to a source square
around its landmarks (`SOURCE`, wide enough for the augmentation's jitter).

1. Template network (`models.mask_nets.TemplateNet` and tau, `methods.mask_model`): its target
   for recogniser r is r's sensitivity map (`losses.sensitivity_map`) on the face's aligned
   frame, in the frame's 8 px cells; ridge loss (`losses.template_ridge_loss`, paper Eq. 5);
   Adam; augmentation: horizontal flips (of frame and target), brightness and contrast.
2. Key generator (`models.mask_nets.KeyGenerator`), the template network frozen: each step a
   batch of faces, each drawn as a training patch from its source square under a random
   similarity (scale, angle, shift), brightness and contrast, quantised to uint8 levels, with
   b drawn from 1..4; loss = mean over faces of `losses.mask_objective` (every recogniser's
   feature distance over its threshold, minus; the DSSIM budget of b, `RHO_OF_BITS`) on
   x XOR k (`mask_model.protected_levels`: the generator's signed change within each pixel's
   b low bits, straight-through gradients through the rounding); Adam, beta1 0.5 (the
   paper's) at lr 1e-3 (`MaskTrainConfig.lr`; the paper's 2e-4 is for far longer runs).

One model serves b = 1..4 (b is an input) and any subset of its recognisers (rows of tau).
Checkpoints: `<out>/mask_model.npz` (`engine.checkpoints`), written every `checkpoint_every`
steps and at the end; a run started again on the same data, recognisers, config (cadence and
generator_steps aside) and key resumes where it stopped (step k draws from fold_in(key, k)).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from faceveil import losses
from faceveil.engine import checkpoints
from faceveil.engine.methods import mask_model
from faceveil.engine.pipeline import align, faces, image_io, progress, recognise
from faceveil.models import dlib_resnet, mask_nets, registry

FORMAT = "faceveil-mask-model-1"
MODEL_FILE = "mask_model.npz"
SOURCE = 256  # side of each face's source square (dlib's template, padding SOURCE_PADDING)
SOURCE_PADDING = 1.0
# Settings that do not change what step k computes: a finished run may be continued.
_CADENCE_FIELDS = ("generator_steps", "checkpoint_every", "log_every")


@dataclasses.dataclass(frozen=True)
class MaskTrainConfig:
    """Settings of `train` (defaults: minutes per recogniser on a CPU, the shared faces)."""

    template_steps: int = 300
    generator_steps: int = 300
    batch: int = 8
    template_lr: float = 1e-3
    lr: float = 1e-3  # the generator's Adam (paper: 2e-4, over far more steps than a CPU run)
    beta1: float = 0.5
    ridge: float = 1e-4  # weight of the template network's ridge penalty
    lam: float = 100.0  # weight of the budget's excess in the generator's objective
    probes: int = 8  # random projections per sensitivity map
    patch: int = 192  # side of a training patch
    span: float = 2.6  # face widths a training patch spans (protect-time patches: ~2.3-3.5)
    scale: float = 0.15  # log-scale jitter of the training patch
    angle: float = 0.1  # rotation jitter (radians)
    shift: float = 0.05  # translation jitter (fraction of the patch)
    brightness: float = 0.08
    contrast: float = 0.15
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 25

    def __post_init__(self):
        if min(self.template_steps, self.generator_steps) < 0 or self.batch < 1:
            raise ValueError("steps must be at least 0 and batch at least 1")
        if self.patch % 8:
            raise ValueError(f"patch must be a multiple of 8, got {self.patch}")


@dataclasses.dataclass
class MaskModel:
    """A trained mask model: what `mask protect --model` loads."""

    recognisers: tuple[str, ...]
    config: mask_model.MaskModelConfig
    params: dict  # {"template": {params, batch_stats}, "tau": [R, K], "generator": {...}}
    template_step: int = 0
    generator_step: int = 0

    def rows(self, recognisers) -> tuple[int, ...]:
        """Returns the rows of tau of `recognisers` (names); ValueError if not trained for."""
        names = [r.name for r in registry.members(registry.get(recognisers))] if isinstance(
            recognisers, str) else list(recognisers)
        missing = [n for n in names if n not in self.recognisers]
        if missing:
            raise ValueError(f"the mask model was trained for {','.join(self.recognisers)}, not "
                             f"{','.join(missing)}")
        return tuple(self.recognisers.index(n) for n in names)

    def save(self, path) -> Path:
        """Writes the model to `path` (a folder, or a .npz file) atomically; returns the file."""
        file = checkpoints.checkpoint_file(path, MODEL_FILE)
        file.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.write(file, _meta(self.recognisers, self.config, None, self.template_step,
                                      self.generator_step), _trees(self.params))
        return file

    @classmethod
    def load(cls, path) -> MaskModel:
        """Returns the model saved at `path` (a folder or a .npz file).

        Raises:
          FileNotFoundError: no model there.
          ValueError: (`image_io.InputError`, naming the file) not a valid mask model.
        """
        return _read(checkpoints.checkpoint_file(path, MODEL_FILE))[0]


# --------------------------------------------------------------------------------------------
# Data


class TrainingFaces(NamedTuple):
    """Training faces, each cropped once to its source square."""

    source: np.ndarray  # [N, SOURCE, SOURCE, 3] float32, uint8 levels / 255
    landmarks: np.ndarray  # [N, 5, 2] in source pixels
    m_chip: np.ndarray  # [N, R, 2, 3] chip pixels -> source pixels, per recogniser
    names: list  # [N] "file#face"


def training_faces(paths, recognisers: tuple[str, ...], *, min_face: float = 40.0,
                   show_progress: bool = True) -> TrainingFaces:
    """Returns the TrainingFaces of every face in the photos under `paths`.

    Raises:
      ValueError: no photo or no face found (naming the paths).
    """
    files = recognise.photo_files(paths)
    if not files:
        raise ValueError(f"no photos (.jpg, .jpeg, .png) under {', '.join(map(str, paths))}")
    images, found = [], []
    for i, f in enumerate(files):
        images.append(image_io.read_image(f))
        found.append(faces.find_photo_faces(images[-1], min_face=min_face))
        progress.say(f"mask train: faces {i + 1}/{len(files)} {f.name}: "
                     f"{len(found[-1].boxes)} face(s)", enabled=show_progress)
    if not any(len(pf.boxes) for pf in found):
        raise ValueError(f"no face found in the photos under {', '.join(map(str, paths))}")
    return crop_faces(images, found, recognisers, names=[str(f) for f in files])


def crop_faces(images, found, recognisers: tuple[str, ...], names=None) -> TrainingFaces:
    """Returns the TrainingFaces of the faces `found` (`faces.PhotoFaces`) in uint8 photos."""
    recs = [registry.get(r) for r in recognisers]
    tmpl = jnp.asarray(dlib_resnet.face_template(SOURCE, SOURCE_PADDING), jnp.float32)
    names = names or [f"photo {i + 1}" for i in range(len(images))]
    src, lms, ms, face_names = [], [], [], []
    for img, pf, name in zip(images, found, names):
        for k, lm in enumerate(pf.landmarks):
            m_src = align.chip_transform(jnp.asarray(lm), tmpl)
            to_src = align.invert(m_src)
            src.append(np.asarray(align.warp(jnp.asarray(img, jnp.float32) / 255.0, m_src,
                                             (SOURCE, SOURCE))))
            lms.append(np.asarray(align.apply_transform(to_src, jnp.asarray(lm))))
            ms.append(np.stack([np.asarray(align.compose(to_src, m)) for m in
                                (faces.chip_transforms(lm[None], r)[0] for r in recs)]))
            face_names.append(f"{name}#{k}")
    source = np.round(np.clip(np.stack(src), 0.0, 1.0) * 255.0) / 255.0
    return TrainingFaces(source.astype(np.float32), np.stack(lms).astype(np.float32),
                         np.stack(ms).astype(np.float32), face_names)


def _digest(data: TrainingFaces) -> str:
    h = hashlib.sha256(str(data.source.shape).encode())
    for a in (data.source, data.landmarks, data.m_chip):
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()[:16]


def _frame_views(cfg: mask_model.MaskModelConfig, data: TrainingFaces):
    """Returns (views [N, G, G, 3], chip -> frame transforms [N, R, 2, 3])."""
    def one(src, lm, m_chip):
        m_frame = mask_model.frame_transform(cfg, lm)
        to_frame = align.invert(m_frame)
        view = align.warp(src, m_frame, (cfg.frame, cfg.frame))
        return view, jax.vmap(lambda m: align.compose(to_frame, m))(m_chip)

    return jax.jit(jax.vmap(one))(data.source, data.landmarks, data.m_chip)


def sensitivity_targets(recognisers, cfg: mask_model.MaskModelConfig, views, m_frame_chip, key,
                        probes: int, show_progress: bool = True) -> np.ndarray:
    """Returns [N, G/8, G/8, R]: each recogniser's sensitivity map on each face's frame."""
    out = []
    for r, name in enumerate(recognisers):
        rec, params = recognise.recogniser_params(name)

        @jax.jit
        def smap(view, m, k, rec=rec, params=params):
            s = rec.chip_size

            def embed(v):
                return rec.embed(params, jax.vmap(lambda im: align.warp(im, m, (s, s)))(v))

            return losses.sensitivity_map(view[None], embed_fn=embed, key=k, cell=cfg.cell,
                                          probes=probes)[0]

        maps = [np.asarray(smap(views[i], m_frame_chip[i, r], jax.random.fold_in(key, i)))
                for i in range(views.shape[0])]
        progress.say(f"mask train: sensitivity maps of {name}: {len(maps)} face(s)",
                     enabled=show_progress)
        out.append(np.stack(maps))
    return np.stack(out, axis=-1)


# --------------------------------------------------------------------------------------------
# Steps


class TrainState(NamedTuple):
    params: dict  # {"template", "tau", "generator"} (flax variables)
    template_opt: optax.OptState
    generator_opt: optax.OptState


def _optimisers(cfg: MaskTrainConfig):
    return optax.adam(cfg.template_lr), optax.adam(cfg.lr, b1=cfg.beta1)


def _jitter(cfg: MaskTrainConfig, key, x):
    """Returns x [..., H, W, 3] under a random brightness offset and contrast factor."""
    kb, kc = jax.random.split(key)
    b = jax.random.uniform(kb, (), minval=-cfg.brightness, maxval=cfg.brightness)
    c = jnp.exp(jax.random.uniform(kc, (), minval=-cfg.contrast, maxval=cfg.contrast))
    mean = jnp.mean(x)
    return jnp.clip((x - mean) * c + mean + b, 0.0, 1.0)


def _template_step(mcfg, cfg, state: TrainState, views, targets, key):
    """Returns (state, metrics) after one Adam step of the template network and tau."""
    n = views.shape[0]
    k_idx, k_aug = jax.random.split(key)
    idx = jax.random.randint(k_idx, (cfg.batch,), 0, n)
    ks = jax.random.split(k_aug, cfg.batch)
    flip = jax.random.bernoulli(jax.random.fold_in(k_aug, 1), 0.5, (cfg.batch,))
    v = jax.vmap(functools.partial(_jitter, cfg))(ks, views[idx])
    v = jnp.where(flip[:, None, None, None], v[:, :, ::-1], v)
    t = jnp.where(flip[:, None, None, None], targets[idx][:, :, ::-1], targets[idx])
    net = mask_model.template_net(mcfg)
    tvars = state.params["template"]

    def loss_fn(trainable):
        basis, upd = net.apply({"params": trainable["net"], "batch_stats": tvars["batch_stats"]},
                               v, train=True, mutable=["batch_stats"])
        pred = mask_nets.templates(basis, trainable["tau"])
        loss, aux = losses.template_ridge_loss(pred, t, trainable["net"], ridge=cfg.ridge)
        return loss, (upd["batch_stats"], jnp.mean(aux["sq_err"]))

    trainable = {"net": tvars["params"], "tau": state.params["tau"]}
    (loss, (stats, err)), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    upd, opt = _optimisers(cfg)[0].update(g, state.template_opt)
    new = optax.apply_updates(trainable, upd)
    params = {**state.params, "template": {"params": new["net"], "batch_stats": stats},
              "tau": new["tau"]}
    return TrainState(params, opt, state.generator_opt), {"loss": loss, "sq_err": err}


def _patch(cfg: MaskTrainConfig, key, src, lm, m_chip):
    """Returns (patch [P, P, 3] uint8 levels, landmarks [5, 2], chip -> patch [R, 2, 3]) of a
    face drawn from its source square under a random similarity and colour jitter."""
    ks, ka, kt, kc = jax.random.split(key, 4)
    p = cfg.patch
    # Source pixels per patch pixel: the source square spans 2 (1 + padding) template widths.
    base = SOURCE / (2.0 * (1.0 + SOURCE_PADDING)) * cfg.span / p
    s = base * jnp.exp(jax.random.uniform(ks, (), minval=-cfg.scale, maxval=cfg.scale))
    a = jax.random.uniform(ka, (), minval=-cfg.angle, maxval=cfg.angle)
    t = jax.random.uniform(kt, (2,), minval=-cfg.shift, maxval=cfg.shift) * SOURCE
    rot = s * jnp.array([[jnp.cos(a), -jnp.sin(a)], [jnp.sin(a), jnp.cos(a)]])
    c_patch, c_src = (p - 1) / 2.0, (SOURCE - 1) / 2.0
    m_aug = jnp.concatenate([rot, (c_src + t - rot @ jnp.full(2, c_patch))[:, None]], 1)
    x = _jitter(cfg, kc, align.warp(src, m_aug, (p, p)))
    x = jnp.round(x * 255.0) / 255.0
    to_patch = align.invert(m_aug)
    return (x, align.apply_transform(to_patch, lm),
            jax.vmap(lambda m: align.compose(to_patch, m))(m_chip))


def _generator_step(recognisers, mcfg, cfg, rec_params, state: TrainState, data, key):
    """Returns (state, metrics) after one Adam step of the key generator."""
    recs = [registry.get(r) for r in recognisers]
    rows = tuple(range(len(recs)))
    src, lms, m_chips = data
    k_idx, k_patch, k_bits, k_z = jax.random.split(key, 4)
    idx = jax.random.randint(k_idx, (cfg.batch,), 0, src.shape[0])
    x, lm, m = jax.vmap(functools.partial(_patch, cfg))(
        jax.random.split(k_patch, cfg.batch), src[idx], lms[idx], m_chips[idx])
    bits = jax.random.randint(k_bits, (cfg.batch,), 1, mask_nets.MAX_BITS + 1)
    rho = jnp.asarray(mask_model.RHO_OF_BITS)[bits - 1]
    prep = jax.vmap(lambda xi, li, bi, ki: mask_model.prepare(state.params, mcfg, xi, li, bi,
                                                              rows, ki))(
        x, lm, bits, jax.random.split(k_z, cfg.batch))
    gen = mask_model.generator_net(mcfg)
    gvars = state.params["generator"]

    def feats(rec, p, mr):
        return lambda y: rec.embed(p, align.warp(y, mr, (rec.chip_size, rec.chip_size))[None])[0]

    def face_loss(xi, y, mi, rho_i):
        fns = [feats(rec, p, mi[r]) for r, (rec, p) in enumerate(zip(recs, rec_params))]
        clean = [jax.lax.stop_gradient(f(xi)) for f in fns]
        return losses.mask_objective(y, xi, features_fns=fns, original_feats=clean,
                                     scales=[r.threshold for r in recs], rho=rho_i, lam=cfg.lam)

    def loss_fn(gparams):
        logits, upd = gen.apply({"params": gparams, "batch_stats": gvars["batch_stats"]},
                                prep.z, train=True, mutable=["batch_stats"])
        y = jax.vmap(mask_model.protected_levels)(logits, prep, x, bits)
        loss, aux = jax.vmap(face_loss)(x, y, m, rho)
        return jnp.mean(loss), (upd["batch_stats"], aux)

    (loss, (stats, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(gvars["params"])
    upd, opt = _optimisers(cfg)[1].update(g, state.generator_opt)
    params = {**state.params, "generator": {"params": optax.apply_updates(gvars["params"], upd),
                                            "batch_stats": stats}}
    thr = jnp.asarray([r.threshold for r in recs])
    return TrainState(params, state.template_opt, opt), {
        "loss": loss, "dssim": jnp.mean(aux["dssim"]),
        "passed": jnp.mean(jnp.all(aux["distances"] > thr, axis=-1).astype(jnp.float32))}


# --------------------------------------------------------------------------------------------
# Init, files, the training run


def init_params(mcfg: mask_model.MaskModelConfig, num_recognisers: int, key) -> dict:
    """Returns fresh model variables {"template", "tau", "generator"}."""
    kt, kg, ktau = jax.random.split(key, 3)
    g = mcfg.frame
    template = mask_model.template_net(mcfg).init(kt, jnp.zeros((1, g, g, 3)))
    generator = mask_model.generator_net(mcfg).init(kg, jnp.zeros((1, g, g, mcfg.channels)))
    tau = 0.1 * jax.random.normal(ktau, (num_recognisers, mcfg.basis))
    return {"template": dict(template), "tau": tau, "generator": dict(generator)}


def _trees(params) -> dict:
    return {"template": params["template"], "tau": {"tau": params["tau"]},
            "generator": params["generator"]}


def _meta(recognisers, mcfg, cfg, template_step: int, generator_step: int, *, key=None,
          data: str | None = None) -> dict:
    return {"format": FORMAT, "recognisers": list(recognisers),
            "model_config": dataclasses.asdict(mcfg),
            "config": None if cfg is None else dataclasses.asdict(cfg),
            "template_step": int(template_step), "generator_step": int(generator_step),
            "key": None if key is None else [int(v) for v in np.asarray(key).ravel()],
            "data": data}


def _read(file: Path) -> tuple[MaskModel, dict, dict]:
    """Returns (model, meta, optimiser leaves by name) of a model or checkpoint file."""
    meta, trees, opt = checkpoints.read(file, FORMAT, "mask model")
    try:
        recognisers = tuple(str(r) for r in meta["recognisers"])
        for r in recognisers:
            registry.get(r)
        mcfg = mask_model.MaskModelConfig(**meta["model_config"])
        want = jax.eval_shape(lambda: init_params(mcfg, len(recognisers), jax.random.key(0)))
        params = {"template": trees.get("template"), "tau": trees.get("tau", {}).get("tau"),
                  "generator": trees.get("generator")}
        checkpoints.check_like(params, want, "model")
        model = MaskModel(recognisers, mcfg, params, int(meta["template_step"]),
                          int(meta["generator_step"]))
    except (KeyError, TypeError, ValueError) as e:
        raise image_io.InputError(file, f"not a valid mask model ({e})") from e
    return model, meta, opt


@functools.cache
def _compiled(kind: str, recognisers: tuple, mcfg, cfg):
    if kind == "template":
        return jax.jit(functools.partial(_template_step, mcfg, cfg), donate_argnums=())
    return jax.jit(functools.partial(_generator_step, recognisers, mcfg, cfg))


def train(paths, recognisers=("dlib",), *, out=None,
          model_config: mask_model.MaskModelConfig | None = None,
          config: MaskTrainConfig | None = None, data: TrainingFaces | None = None,
          show_progress: bool = True) -> MaskModel:
    """Returns the MaskModel trained on the faces under `paths` (module docstring).

    Args:
      paths: photos or folders of photos (any number of people).
      recognisers: names of the recognisers the keys work against (one row of tau each).
      out: folder (or .npz) of the checkpoint and the final model; resumed from when it holds
        a checkpoint of the same run.
      model_config, config: architecture and training settings (defaults when None).
      data: faces already cropped (`training_faces`); `paths` is then unused.
      show_progress: progress lines on stderr.
    """
    mcfg = model_config or mask_model.MaskModelConfig()
    cfg = config or MaskTrainConfig()
    recognisers = tuple(recognisers)
    for r in recognisers:
        registry.get(r)
    data = data if data is not None else training_faces(paths, recognisers,
                                                        show_progress=show_progress)
    key = jnp.asarray(checkpoints.key_data(jax.random.PRNGKey(cfg.seed)))
    k_init, k_maps, k_tmpl, k_gen = jax.random.split(key, 4)
    meta = _meta(recognisers, mcfg, cfg, 0, 0, key=key, data=_digest(data))
    topt, gopt = _optimisers(cfg)
    file = None if out is None else checkpoints.checkpoint_file(out, MODEL_FILE)
    state, t_step, g_step = None, 0, 0
    if file is not None and file.exists():
        saved, saved_meta, leaves = _read(file)
        why = checkpoints.mismatch(saved_meta, meta, ("recognisers", "model_config", "key",
                                                      "data"), _CADENCE_FIELDS)
        if why is None and set(leaves) != {"template", "generator"}:
            why = "it holds no optimiser state (a finished model, not a training checkpoint)"
        if why is None:
            p = jax.tree.map(jnp.asarray, saved.params)
            state = TrainState(
                p, checkpoints.opt_state(topt, {"net": p["template"]["params"], "tau": p["tau"]},
                                         leaves["template"], file, "template network"),
                checkpoints.opt_state(gopt, p["generator"]["params"], leaves["generator"],
                                      file, "key generator"))
            t_step, g_step = saved.template_step, saved.generator_step
            progress.say(f"mask train: resuming from {file} at template step {t_step}, "
                         f"generator step {g_step}", enabled=show_progress)
        else:
            progress.say(f"mask train: not resuming from {file}: {why}; starting afresh",
                         enabled=show_progress)
    if state is None:
        p = init_params(mcfg, len(recognisers), k_init)
        state = TrainState(p, topt.init({"net": p["template"]["params"], "tau": p["tau"]}),
                           gopt.init(p["generator"]["params"]))

    def save(t, g):
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.write(file, {**meta, "template_step": t, "generator_step": g},
                              _trees(state.params), {"template": state.template_opt,
                                                     "generator": state.generator_opt})

    t0 = time.perf_counter()
    if t_step < cfg.template_steps:
        views, m_fc = _frame_views(mcfg, data)
        targets = jnp.asarray(sensitivity_targets(recognisers, mcfg, views, m_fc, k_maps,
                                                  cfg.probes, show_progress))
        step = _compiled("template", recognisers, mcfg, cfg)
        for k in range(t_step, cfg.template_steps):
            state, metrics = step(state, views, targets, jax.random.fold_in(k_tmpl, k))
            done = k + 1
            if done % cfg.log_every == 0 or done == cfg.template_steps:
                m = jax.device_get(metrics)
                progress.say(f"mask train: template step {done}/{cfg.template_steps} squared "
                             f"error {float(m['sq_err']):.3f} ({time.perf_counter() - t0:.0f} s)",
                             enabled=show_progress)
            if done % cfg.checkpoint_every == 0 or done == cfg.template_steps:
                save(done, 0)
        t_step = cfg.template_steps
    rec_params = tuple(recognise.recogniser_params(r)[1] for r in recognisers)
    arrays = (jnp.asarray(data.source), jnp.asarray(data.landmarks), jnp.asarray(data.m_chip))
    step = _compiled("generator", recognisers, mcfg, cfg)
    for k in range(g_step, cfg.generator_steps):
        state, metrics = step(rec_params, state, arrays, jax.random.fold_in(k_gen, k))
        done = k + 1
        if done % cfg.log_every == 0 or done == cfg.generator_steps:
            m = jax.device_get(metrics)
            progress.say(f"mask train: generator step {done}/{cfg.generator_steps} loss "
                         f"{float(m['loss']):.3f} DSSIM {float(m['dssim']):.4f} passed "
                         f"{float(m['passed']):.2f} ({time.perf_counter() - t0:.0f} s)",
                         enabled=show_progress)
        if done % cfg.checkpoint_every == 0 or done == cfg.generator_steps:
            save(t_step, done)
    g_step = max(g_step, cfg.generator_steps)
    if file is not None and g_step == 0 and t_step:
        save(t_step, 0)
    return MaskModel(recognisers, mcfg, jax.device_get(state.params), t_step, g_step)
