"""The method interface and the compiled chain runner that every protection method plugs into.

A method is a frozen dataclass (hashable: one compilation per method) with

    name                 'cloak', ...
    recogniser           the `faceveil.models.registry.Recogniser` it works against
    config               its frozen config (named presets live beside it, in one place)
    cache_key()          what identifies its compiled code
    init_state(params, key, patch_size) -> state
                         one chain's carry before its first face (pure; jit-able)
    target_spec(params, patch_size) -> ShapeDtypeStruct
                         the per-chain target argument (e.g. target features); zeros when unused
    step(params, target, state, face: FaceFrame) -> (state, FaceOutput)
                         one face of one chain: pure, traced once

`chunk_fn(method)` compiles one function over a chunk of frames for C chains: `lax.scan` over
the T frames of a chain (the state carries from face to face: a warm start, a temporal
reference), `vmap` over the chains (independent lanes). Targets are an argument of their own, so
the carry can be donated on accelerators. Still photos are chains of one frame (`solve_faces`).
The host side (`faceveil.engine.pipeline.faces`, `.chains`) plans the faces and packs lanes;
`shard_chunk` lays a call's lanes over every local device (`faceveil.engine.sharding`), padded
with absent faces, so each device runs its share and the results are the unsharded run's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from faceveil.engine import sharding


class FaceFrame(NamedTuple):
    """One face of one chain in one frame (a method's input); batched as [C, T, ...]."""

    patch: jax.Array  # [P, P, 3] uint8 clean face patch (real frame pixels)
    m_chip: jax.Array  # [2, 3] float32 recogniser chip pixels -> patch pixels
    landmarks: jax.Array  # [5, 2] float32 landmarks in patch pixels
    offset: jax.Array  # [2] float32 patch top-left (x, y) in frame pixels
    present: jax.Array  # [] bool, the chain has a face in this frame


class FaceOutput(NamedTuple):
    """What a method returns for one face; batched as [C, T, ...] in a ChunkResult."""

    protected: jax.Array  # [P, P, 3] uint8 protected patch (the clean patch where no face)
    iters: jax.Array  # [] int32 optimisation steps made (0 where no face)
    metrics: Any  # the method's NamedTuple of per-face diagnostics (NaN where no face)


ChunkResult = FaceOutput  # the same fields with leading axes [C, T]


class Method(Protocol):
    """A protection method (module docstring)."""

    name: str
    recogniser: Any
    config: Any

    def cache_key(self) -> tuple: ...

    def init_state(self, params, key: ArrayLike, patch_size: int) -> Any: ...

    def target_spec(self, params, patch_size: int) -> jax.ShapeDtypeStruct: ...

    def step(self, params, target, state, face: FaceFrame) -> tuple[Any, FaceOutput]: ...


class PerFaceMethod:
    """Shared parts of a method whose chain state is a PRNG key and that takes no target.

    Each face is solved on its own (PMT, mask keys): the state only carries the key every face
    draws from. Subclasses are frozen dataclasses with eq=False and fields `recogniser`,
    `config` and `name`; equal cache keys mean the same compiled code.
    """

    def cache_key(self) -> tuple:
        """Returns what identifies this method's compiled code."""
        from faceveil.models import registry

        return (self.name, self.config) + tuple(
            (r.name, r.chip_size, float(r.aspect)) for r in registry.members(self.recogniser))

    def __hash__(self):
        return hash(self.cache_key())

    def __eq__(self, other):
        return type(other) is type(self) and self.cache_key() == other.cache_key()

    def init_state(self, params, key, patch_size: int) -> jax.Array:
        """Returns the chain state: its PRNG key (every face draws from it)."""
        del params, patch_size
        return jnp.asarray(key)

    def target_spec(self, params, patch_size: int) -> jax.ShapeDtypeStruct:
        """Returns the (unused) per-chain target."""
        del params, patch_size
        return jax.ShapeDtypeStruct((), jnp.float32)


def _chunk(method: Method, params, frames: FaceFrame, carry, target):
    def chain(frames_one, carry_one, target_one):
        step = functools.partial(method.step, params, target_one)
        return jax.lax.scan(step, carry_one, frames_one)

    return jax.vmap(chain)(frames, carry, target)


_CHUNK_FNS: dict = {}


def donates() -> bool:
    """Returns whether carries are donated (accelerators; XLA's CPU backend ignores donation)."""
    return jax.default_backend() != "cpu"


def chunk_fn(method: Method) -> Callable:
    """Returns the jitted `(params, frames, carry, target) -> (carry, ChunkResult)` of a method.

    `frames` is a FaceFrame [C, T, ...], `carry` the method's state [C, ...] (`init_carry` or
    the previous chunk's; donated on accelerators), `target` [C, ...] as `target_spec` says.
    One function per method, cached, so every chunk of the same shape reuses one compilation.
    """
    key = method.cache_key()
    fn = _CHUNK_FNS.get(key)
    if fn is None:
        fn = jax.jit(functools.partial(_chunk, method),
                     donate_argnums=(2,) if donates() else ())
        _CHUNK_FNS[key] = fn
    return fn


@functools.cache
def _init_fn(method: Method, patch_size: int):
    return jax.jit(jax.vmap(lambda params, key: method.init_state(params, key, patch_size),
                            (None, 0)))


def init_carry(method: Method, params, keys: ArrayLike, patch_size: int):
    """Returns the carry [C, ...] of chains that have seen no face, one PRNG key [C] each."""
    return _init_fn(method, patch_size)(params, jnp.asarray(keys))


_TARGET_SPECS: dict = {}


def empty_target(method: Method, params, num_chains: int, patch_size: int) -> jax.Array:
    """Returns zeros [C, ...] for the target argument of a method run without targets."""
    # The spec traces the recogniser (eval_shape); it depends only on the method and the patch
    # side, so it is traced once, not at every call of a video's chain runner.
    spec = _TARGET_SPECS.get((method, patch_size))
    if spec is None:
        spec = _TARGET_SPECS[(method, patch_size)] = method.target_spec(params, patch_size)
    return jnp.zeros((num_chains,) + tuple(spec.shape), spec.dtype)


def still_frames(patches: ArrayLike, m_chip: ArrayLike, offsets: ArrayLike | None = None,
                 landmarks: ArrayLike | None = None) -> FaceFrame:
    """Returns the FaceFrame [B, 1, ...] of B still faces (each a chain of one frame).

    `offsets` [B, 2] (the patches' top-left in their photos; 0 when None) and `landmarks`
    [B, 5, 2] (in patch pixels; 0 when None) are passed on to the method.
    """
    patches = jnp.asarray(patches)
    if patches.dtype != jnp.uint8:
        patches = jnp.round(jnp.clip(patches, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    b = patches.shape[0]
    offsets = jnp.zeros((b, 2)) if offsets is None else offsets
    landmarks = jnp.zeros((b, 5, 2)) if landmarks is None else landmarks
    return FaceFrame(
        patch=patches[:, None], m_chip=jnp.asarray(m_chip, jnp.float32)[:, None],
        landmarks=jnp.asarray(landmarks, jnp.float32)[:, None],
        offset=jnp.asarray(offsets, jnp.float32)[:, None], present=jnp.ones((b, 1), bool))


def shard_chunk(params, frames: FaceFrame, carry, target, mesh=None):
    """Returns (params, frames, carry, target, lanes) placed for `chunk_fn` over the lane mesh.

    The lanes (axis 0 of frames, carry, target) are padded to a multiple of the mesh's size
    and split over it, the params replicated; `lanes` is the number of real lanes (drop the
    rest with `sharding.unpad_lanes`). Padded lanes repeat lane 0 with every face absent, so a
    method passes them through untouched. Without a mesh (one device) all is returned as is.

    Args:
      params, frames, carry, target: `chunk_fn`'s arguments, lanes unpadded.
      mesh: the lane mesh (default `sharding.lane_mesh()`, from the local devices).
    """
    mesh = sharding.lane_mesh() if mesh is None else mesh
    lanes = int(frames.present.shape[0])
    if mesh is None:
        return params, frames, carry, target, lanes
    multiple = sharding.lane_multiple(mesh)
    frames, _ = sharding.pad_lanes(frames, multiple)
    frames = frames._replace(present=jnp.asarray(frames.present).at[lanes:].set(False))
    (carry, target), _ = sharding.pad_lanes((carry, target), multiple)
    return (sharding.replicate(params, mesh), *sharding.shard_lanes((frames, carry, target), mesh),
            lanes)


def solve_faces(method: Method, params, patches: ArrayLike, m_chip: ArrayLike,
                key: ArrayLike | None = None, *, keys: ArrayLike | None = None,
                target: ArrayLike | None = None, offsets: ArrayLike | None = None,
                landmarks: ArrayLike | None = None) -> FaceOutput:
    """Returns the FaceOutput [B, ...] of B still faces, all in one compiled call.

    The faces are lanes sharded over the local devices (`shard_chunk`); the outputs do not
    depend on the number of devices.

    Args:
      method: the protection method.
      params: its recogniser's parameters.
      patches: [B, P, P, 3] face patches, uint8 or float in [0, 1].
      m_chip: [B, 2, 3] chip pixels -> patch pixels ([B, R, 2, 3] for an ensemble).
      key: PRNG key (split into one key per face).
      keys: [B] PRNG keys, one per face, instead of `key`.
      target: [B, ...] per-face targets (zeros when None).
      offsets, landmarks: as `still_frames` takes them.
    """
    if (key is None) == (keys is None):
        raise ValueError("solve_faces takes either key or keys")
    frames = still_frames(patches, m_chip, offsets, landmarks)
    b, size = frames.patch.shape[0], frames.patch.shape[2]
    keys = jax.random.split(key, b) if keys is None else keys
    carry = init_carry(method, params, keys, size)
    if target is None:
        target = empty_target(method, params, b, size)
    params, frames, carry, target, lanes = shard_chunk(params, frames, carry,
                                                       jnp.asarray(target))
    _, res = chunk_fn(method)(params, frames, carry, target)
    res = sharding.unpad_lanes(res, lanes)
    return jax.tree.map(functools.partial(jnp.squeeze, axis=1), res)
