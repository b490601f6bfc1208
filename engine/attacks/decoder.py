"""Black-box reconstruction: a U-Net decoder trained from shallow features back to face chips.

The attacker does not know the shallow model's weights but holds pairs (E_c(x), x) of features
at the cut and face chips (or can query E_c). A decoder D is trained on them, then applied to
released features; the result is judged like the white-box attack
(`reconstruction.judge`: SSIM / PSNR against the original chip, embedding cosine, SRRA).

    train:   minimise  mean |D(n(E_c(T(x)))) - T(x)|  +  ssim_weight * (1 - SSIM)
             over Adam steps, a batch of training chips per step, T a random augmentation drawn
             per face (horizontal flip, a small similarity warp, brightness / contrast jitter),
             the same draw on both sides; n normalises each feature channel with the mean and
             standard deviation of E_c over the clean training chips (stored with D).
    attack:  r = D(n(f)) for released features f [N, h, w, c];  judge(r, originals).

D (`_UNet`): two conv blocks at the feature resolution, two average-pool downs and bilinear ups
with skip connections (a small U-Net), then bilinear upsampling by at most ~2x a stage to the
chip size S with a conv block per stage, and a sigmoid. Data convention: chips float32 in
[0, 1], NHWC, the recogniser's chip size; features as `methods.pmt.cut_features` gives them.

Checkpoints: one file, `<dir>/decoder.npz` (`CHECKPOINT_FILE`), written atomically (a temporary
name and a rename): a JSON `meta` record (format, recogniser, cut, config, step, PRNG key, a
digest of the training chips) and the arrays `net/...`, `stats/mean`, `stats/std`, and while
training the optimiser state `opt/...`. `train(..., checkpoint_dir=d)` writes one every
`checkpoint_every` steps and, started again, resumes from it when it was made for the same
recogniser, cut, config (`steps` and the logging / checkpoint cadence aside), key and chips; the
batch and augmentation of step k are drawn from fold_in(key, k), so an interrupted run resumed
ends where an uninterrupted one would.

    decoder = train("dlib", chips, cut=2, checkpoint_dir="out/decoder_dlib")
    result = attack(decoder, pmt.cut_features(rec, params, released, 2), originals)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from faceveil import losses
from faceveil.engine import checkpoints
from faceveil.engine.attacks import reconstruction
from faceveil.engine.methods import cloak
from faceveil.engine.pipeline import align, image_io, progress, recognise
from faceveil.models import registry

FORMAT = "faceveil-decoder-1"
CHECKPOINT_FILE = "decoder.npz"
# Config fields that do not change what step k computes: a checkpoint made under other values
# of these still resumes (train 500 steps, later continue the same run to 1000).
_CADENCE_FIELDS = ("steps", "checkpoint_every", "log_every")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Settings of the decoder and its training (defaults: a few CPU minutes per recogniser)."""

    width: int = 32  # channels at the feature resolution (x2, x4 down the U); chip-side: width / 2
    steps: int = 600
    batch: int = 8
    lr: float = 2e-3  # Adam, constant: a resumed run continues the same schedule
    ssim_weight: float = 0.5  # weight of (1 - SSIM) beside the L1 term
    flip: bool = True  # random horizontal flips
    affine: float = 0.04  # similarity jitter: shift (fraction of S), log-scale, angle (rad)
    brightness: float = 0.08  # added offset, uniform in +-brightness
    contrast: float = 0.15  # contrast factor exp(uniform +-contrast) about the chip's mean
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 50

    def __post_init__(self):
        if self.width < 2 or self.steps < 0 or self.batch < 1 or self.checkpoint_every < 1:
            raise ValueError("width must be at least 2, batch and checkpoint_every at least 1, "
                             "steps at least 0")


class _UNet(nn.Module):
    """The decoder: normalised features [N, h, w, c] -> chips [N, size, size, 3] in [0, 1]."""

    width: int
    size: int

    @nn.compact
    def __call__(self, f):
        def block(x, ch, name):
            x = nn.relu(nn.Conv(ch, (3, 3), name=f"{name}_a")(x))
            return nn.relu(nn.Conv(ch, (3, 3), name=f"{name}_b")(x))

        def resize(x, hw):
            return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear")

        w = self.width
        s0 = block(f, w, "enc0")
        s1 = block(nn.avg_pool(s0, (2, 2), (2, 2), padding="SAME"), 2 * w, "enc1")
        x = block(nn.avg_pool(s1, (2, 2), (2, 2), padding="SAME"), 4 * w, "mid")
        x = block(jnp.concatenate([resize(x, s1.shape[1:3]), s1], -1), 2 * w, "dec1")
        x = block(jnp.concatenate([resize(x, s0.shape[1:3]), s0], -1), w, "dec0")
        for k, side in enumerate(_up_sizes(f.shape[1], self.size)):
            # Thin at full size: convolutions there cost (S / h)^2 times more per channel.
            ch = w if side < self.size else max(w // 2, 1)
            x = block(resize(x, (side, side)), ch, f"up{k}")
        return nn.sigmoid(nn.Conv(3, (3, 3), name="out")(x))


def _up_sizes(h: int, size: int) -> list[int]:
    """Returns the sides of the upsampling stages from h to size, each about a doubling."""
    n = max(1, round(math.log2(size / h))) if size > h else 1
    return [round(h * (size / h) ** ((k + 1) / n)) for k in range(n)]


@functools.cache
def _feature_shape(name: str, cut: int) -> tuple[int, int, int]:
    """Returns (h, w, c) of the recogniser's features at the cut."""
    rec, params = recognise.recogniser_params(name)
    rec.check_cut(cut)
    x = jax.ShapeDtypeStruct((1, rec.chip_size, rec.chip_size, 3), jnp.float32)
    return tuple(jax.eval_shape(lambda p, c: rec.shallow(p, c, cut)[-1], params, x).shape[1:])


@functools.cache
def _net(name: str, width: int) -> _UNet:
    return _UNet(width=width, size=registry.get(name).chip_size)


def _apply(net: _UNet, params, features):
    """Returns net's chips for raw features: normalised with the stored stats first."""
    stats = params["stats"]
    return net.apply({"params": params["net"]}, (features - stats["mean"]) / stats["std"])


@functools.cache
def _decode_fn(name: str, width: int):
    """Returns the jitted decode of one architecture (one compilation per feature shape)."""
    return jax.jit(functools.partial(_apply, _net(name, width)))


@dataclasses.dataclass
class Decoder:
    """A trained decoder: recogniser features at a cut -> that recogniser's face chips."""

    recogniser: str  # registry name, e.g. "dlib"
    cut: int
    config: DecoderConfig
    params: Any  # {"net": flax params, "stats": {"mean": [c], "std": [c]}}
    step: int = 0  # training steps made

    def decode(self, features: np.ndarray) -> np.ndarray:
        """Returns chips [N, S, S, 3] float in [0, 1] decoded from features [N, h, w, c].

        Raises:
          ValueError: the features are not [N, h, w, c] of this recogniser's cut.
        """
        want = _feature_shape(self.recogniser, self.cut)
        features = np.asarray(features, np.float32)
        if features.ndim != 4 or features.shape[1:] != want:
            raise ValueError(f"features of shape {features.shape}; the decoder of "
                             f"{self.recogniser} at cut {self.cut} takes [N, {', '.join(map(str, want))}]")
        fn = _decode_fn(self.recogniser, self.config.width)
        return np.asarray(fn(self.params, jnp.asarray(features)))

    def save(self, path) -> None:
        """Writes the decoder to `path` (a checkpoint folder, or a .npz file) atomically."""
        _write(checkpoints.checkpoint_file(path, CHECKPOINT_FILE),
               _meta(self.recogniser, self.cut, self.config, self.step), self.params)

    @classmethod
    def load(cls, path) -> Decoder:
        """Returns the decoder saved at `path` (a checkpoint folder, or a .npz file).

        Raises:
          FileNotFoundError: there is no checkpoint there.
          ValueError: (an `image_io.InputError` naming the file) the file is corrupt, of another
            format, or its arrays do not fit its recorded architecture.
        """
        return _read(checkpoints.checkpoint_file(path, CHECKPOINT_FILE))[0]


def face_chips(paths, recogniser: str) -> tuple[np.ndarray, list[str]]:
    """Returns (chips [N, S, S, 3] float32 in [0, 1], identities [N]) of photos' largest faces.

    `paths` are photos or folders (every .jpg/.jpeg/.png under them); a face's identity is its
    photo's parent folder name. Photos without a face are skipped with a progress line.
    """
    size = registry.get(recogniser).chip_size
    chips, names = [], []
    for f in recognise.photo_files(paths):
        image = image_io.read_image(f)
        try:
            _, lms, _ = recognise.largest_face(image, source=str(f))
        except recognise.NoFaceError as e:
            progress.say(f"decoder: skipping {e}")
            continue
        chips.append(recognise.embed_faces(image, lms[None], recogniser)[1][0])
        names.append(f.parent.name)
    if not chips:
        return np.zeros((0, size, size, 3), np.float32), names
    return np.stack(chips).astype(np.float32), names


class TrainState(NamedTuple):
    """What a training step carries."""

    params: Any  # {"net": ..., "stats": ...} as in Decoder.params (stats are not trained)
    opt_state: optax.OptState  # Adam's state of params["net"]
    step: jax.Array  # [] int32, steps made


def _optimiser(cfg: DecoderConfig) -> optax.GradientTransformation:
    # Clipping guards the first steps, when a fresh sigmoid head meets large feature outliers.
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.lr))


def _augment(cfg: DecoderConfig, key, x):
    """Returns one random draw of T applied to a chip x [S, S, 3]."""
    k_flip, k_aff, k_b, k_c = jax.random.split(key, 4)
    size = x.shape[0]
    if cfg.flip:
        x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
    if cfg.affine > 0:
        x = align.warp(x, cloak.jitter_transform(k_aff, size, cfg.affine), (size, size))
    mean = jnp.mean(x, axis=(0, 1), keepdims=True)
    c = jnp.exp(jax.random.uniform(k_c, (), jnp.float32, -cfg.contrast, cfg.contrast))
    b = jax.random.uniform(k_b, (), jnp.float32, -cfg.brightness, cfg.brightness)
    return jnp.clip((x - mean) * c + mean + b, 0.0, 1.0)


def _loss(net, cfg: DecoderConfig, net_params, stats, features, targets):
    """Returns (loss, metrics) of one batch: L1 + ssim_weight * (1 - SSIM), batch means."""
    out = _apply(net, {"net": net_params, "stats": stats}, features)
    l1 = jnp.mean(jnp.abs(out - targets))
    ssim = jnp.mean(losses.ssim(out, targets))
    return l1 + cfg.ssim_weight * (1.0 - ssim), {"l1": l1, "ssim": ssim}


def _train_step(rec, cut: int, net, cfg: DecoderConfig, rec_params, state: TrainState, chips,
                key):
    """Returns (state, metrics) after one Adam step on a fresh augmented batch."""
    k_idx, k_aug = jax.random.split(jax.random.fold_in(key, state.step))
    idx = jax.random.randint(k_idx, (cfg.batch,), 0, chips.shape[0])
    x = jax.vmap(functools.partial(_augment, cfg))(jax.random.split(k_aug, cfg.batch),
                                                   chips[idx])
    f = jax.lax.stop_gradient(rec.shallow(rec_params, x, cut)[-1])
    stats = state.params["stats"]
    (loss, metrics), grads = jax.value_and_grad(
        functools.partial(_loss, net, cfg), has_aux=True)(state.params["net"], stats, f, x)
    updates, opt_state = _optimiser(cfg).update(grads, state.opt_state, state.params["net"])
    params = {"net": optax.apply_updates(state.params["net"], updates), "stats": stats}
    return TrainState(params, opt_state, state.step + 1), {"loss": loss, **metrics}


def _step_fn(name: str, cut: int, cfg: DecoderConfig):
    """Returns the jitted training step of a run (one per run, whatever its steps / cadence)."""
    # steps / cadence do not enter the step: runs that differ only there share one compilation.
    return _compiled_step(name, cut, dataclasses.replace(
        cfg, **{f.name: f.default for f in dataclasses.fields(cfg) if f.name in _CADENCE_FIELDS}))


@functools.cache
def _compiled_step(name: str, cut: int, cfg: DecoderConfig):
    rec = registry.get(name)
    return jax.jit(functools.partial(_train_step, rec, cut, _net(name, cfg.width), cfg),
                   donate_argnums=(1,))


def _feature_stats(rec, params, cut: int, chips: np.ndarray) -> dict:
    """Returns per-channel mean and std [c] of E_c over the chips (batches of 16)."""
    total, sq, n = 0.0, 0.0, 0
    from faceveil.engine.methods import pmt

    for i in range(0, chips.shape[0], 16):
        f = np.asarray(pmt.cut_features(rec, params, chips[i:i + 16], cut), np.float64)
        total = total + f.sum(axis=(0, 1, 2))
        sq = sq + (f ** 2).sum(axis=(0, 1, 2))
        n += f.shape[0] * f.shape[1] * f.shape[2]
    mean = total / n
    # A floor keeps dead channels (all zero after a relu) from dividing by zero.
    std = np.sqrt(np.maximum(sq / n - mean ** 2, 0.0)) + 1e-3
    return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


@functools.cache
def _init_fn(name: str, width: int):
    """Returns the jitted init of one architecture (a fresh jit of a bound method every call
    would compile again: ~10 s on a CPU)."""
    return jax.jit(_net(name, width).init)


def _init_params(name: str, cut: int, cfg: DecoderConfig, key, stats) -> dict:
    """Returns fresh decoder params {"net", "stats"}."""
    f = jnp.zeros((1, *_feature_shape(name, cut)), jnp.float32)
    net_params = _init_fn(name, cfg.width)(key, f)["params"]
    return {"net": net_params, "stats": {k: jnp.asarray(v) for k, v in stats.items()}}


def _net_shapes(name: str, cut: int, width: int):
    """Returns the decoder's parameter shapes (ShapeDtypeStructs), nothing computed."""
    # The feature shape first, outside the trace: it loads (and caches) the recogniser's
    # parameters, which must not be loaded inside eval_shape (the cache would keep tracers).
    f = jax.ShapeDtypeStruct((1, *_feature_shape(name, cut)), jnp.float32)
    return jax.eval_shape(_net(name, width).init, jax.random.PRNGKey(0), f)["params"]


def _digest(chips: np.ndarray) -> str:
    """Returns a short digest of the training chips (a checkpoint resumes on the same data)."""
    h = hashlib.sha256(str(chips.shape).encode())
    h.update(np.ascontiguousarray(chips, np.float32).tobytes())
    return h.hexdigest()[:16]


def train(recogniser: str, chips: np.ndarray, cut: int, config: DecoderConfig | None = None, *,
          checkpoint_dir=None, key=None) -> Decoder:
    """Returns a Decoder trained on (E_c(T(x)), T(x)) for the chips x (see the module docstring).

    Args:
      recogniser: registry name of the recogniser whose shallow features are decoded.
      chips: [N, S, S, 3] float in [0, 1], the recogniser's aligned chips (`face_chips`).
      cut: the cut (stages 1..cut are the shallow model).
      config: settings (default DecoderConfig()).
      checkpoint_dir: where a checkpoint is written every `checkpoint_every` steps and at the
        end; a checkpoint there of the same run (recogniser, cut, config but `steps` and the
        cadence, key, chips) is resumed from, another one is replaced.
      key: PRNG key of the initialisation and of every step's draws (default: config.seed).

    Raises:
      ValueError: no chips, chips of the wrong size, a cut the recogniser lacks, or a corrupt
        checkpoint in checkpoint_dir (naming the file).
    """
    cfg = config or DecoderConfig()
    rec, rec_params = recognise.recogniser_params(recogniser)
    rec.check_cut(cut)
    chips = np.asarray(chips, np.float32)
    size = rec.chip_size
    if chips.ndim != 4 or chips.shape[0] == 0 or chips.shape[1:] != (size, size, 3):
        raise ValueError(f"chips of shape {chips.shape}; {recogniser} needs [N>0, {size}, "
                         f"{size}, 3]")
    key = jnp.asarray(checkpoints.key_data(jax.random.PRNGKey(cfg.seed) if key is None else key))
    k_init, k_steps = jax.random.split(key)
    meta = _meta(recogniser, cut, cfg, 0, key=key, data=_digest(chips))
    opt = _optimiser(cfg)

    state = None
    file = checkpoints.checkpoint_file(checkpoint_dir, CHECKPOINT_FILE) if checkpoint_dir is not None else None
    if file is not None and file.exists():
        saved, saved_meta, opt_leaves = _read(file)
        why = checkpoints.mismatch(saved_meta, meta, ("recogniser", "cut", "key", "data"),
                                     _CADENCE_FIELDS)
        if why is None and opt_leaves is None:
            why = "it holds no optimiser state (a saved decoder, not a training checkpoint)"
        if why is None:
            state = TrainState(saved.params, checkpoints.opt_state(
                opt, saved.params["net"], opt_leaves, file, "decoder"),
                               jnp.asarray(saved.step, jnp.int32))
            progress.say(f"decoder: resuming from {file} at step {saved.step}")
        else:
            progress.say(f"decoder: not resuming from {file}: {why}; starting afresh")
    if state is None:
        stats = _feature_stats(rec, rec_params, cut, chips)
        params = _init_params(recogniser, cut, cfg, k_init, stats)
        state = TrainState(params, opt.init(params["net"]), jnp.zeros((), jnp.int32))

    step_fn = _step_fn(recogniser, cut, cfg)
    chips_dev = jnp.asarray(chips)
    start = int(state.step)
    t0 = time.perf_counter()
    metrics = None
    for k in range(start, cfg.steps):
        state, metrics = step_fn(rec_params, state, chips_dev, k_steps)
        done = k + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            m = {n: float(v) for n, v in jax.device_get(metrics).items()}
            progress.say(f"decoder {recogniser} cut {cut}: step {done}/{cfg.steps} "
                         f"loss {m['loss']:.4f} l1 {m['l1']:.4f} ssim {m['ssim']:.3f} "
                         f"({time.perf_counter() - t0:.0f} s)")
        if file is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _write(file, {**meta, "step": done}, state.params, state.opt_state)
    params = jax.device_get(state.params)
    return Decoder(recogniser, cut, cfg, params, int(state.step))


def attack(decoder: Decoder, features: np.ndarray,
           originals: np.ndarray) -> reconstruction.ReconstructionResult:
    """Returns the ReconstructionResult of decoding released features [N, h, w, c]."""
    rec, params = recognise.recogniser_params(decoder.recogniser)
    return reconstruction.judge(rec, params, decoder.decode(features), originals)


# --- Checkpoint files (`faceveil.engine.checkpoints`) ------------------------------------


def _meta(recogniser: str, cut: int, cfg: DecoderConfig, step: int, *, key=None,
          data: str | None = None) -> dict:
    return {"format": FORMAT, "recogniser": recogniser, "cut": int(cut),
            "config": dataclasses.asdict(cfg), "step": int(step),
            "key": None if key is None else [int(v) for v in np.asarray(key).ravel()],
            "data": data}


def _write(file: Path, meta: dict, params, opt_state=None) -> None:
    """Writes one checkpoint file atomically."""
    checkpoints.write(file, meta, {"net": params["net"], "stats": params["stats"]},
                      None if opt_state is None else {"net": opt_state})


def _read(file: Path) -> tuple[Decoder, dict, list | None]:
    """Returns (decoder, meta, optimiser-state leaves or None) of a checkpoint file.

    Raises:
      FileNotFoundError: no such file.
      image_io.InputError: (a ValueError naming the file) anything else wrong with it.
    """
    meta, params, opt = checkpoints.read(file, FORMAT, "decoder checkpoint")
    try:
        cfg = DecoderConfig(**meta["config"])
        name, cut = str(meta["recogniser"]), int(meta["cut"])
        registry.get(name).check_cut(cut)
        checkpoints.check_like(params.get("net"), _net_shapes(name, cut, cfg.width), "net")
        c = _feature_shape(name, cut)[-1]
        for s in ("mean", "std"):
            got = params.get("stats", {}).get(s)
            if got is None or got.shape != (c,):
                raise ValueError(f"stats/{s} missing or not of shape ({c},)")
        decoder = Decoder(name, cut, cfg, params, int(meta["step"]))
    except (KeyError, TypeError, ValueError) as e:
        raise image_io.InputError(file, f"not a valid decoder checkpoint ({e})") from e
    return decoder, meta, opt.get("net")
