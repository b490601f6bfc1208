"""Lanes across devices: a 1-D mesh over this host's devices, padding, placement, unpadding.

Every engine runs independent lanes side by side in one compiled call (cloak chains and video
segments, the faces of a photo batch for any method: cloak, veil, PMT, mask keys). The lanes
are the leading axis of every input of `faceveil.engine.methods.base.chunk_fn`; here they are
padded to a multiple of the device count and laid out over a 1-D `jax.sharding.Mesh` (axis
'lanes'), the parameters replicated, so that `jit` runs each device's share of the lanes and
the results are the unsharded run's (lanes never talk to each other; padded lanes are dropped).

    mesh = lane_mesh()                     # None with one device: everything below is a no-op
    tree, n = pad_lanes(tree, lane_multiple(mesh))
    tree = shard_lanes(tree, mesh)         # params: replicate(params, mesh)
    ...                                    # the compiled call
    out = unpad_lanes(out, n)

The mesh spans this process's devices only (`jax.local_devices()`): on a cluster every process
works on its own files (`faceveil.engine.distributed`), so no array spans hosts.
`FACEVEIL_DEVICES=N` in the environment, or `with use_devices(N):`, limits the mesh to the first
N local devices (1: unsharded, e.g. to compare).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "lanes"
ENV = "FACEVEIL_DEVICES"

_limit: list[int | None] = [None]  # `use_devices` override (a list: set inside a context)


@contextlib.contextmanager
def use_devices(n: int | None) -> Iterator[None]:
    """Yields with lanes sharded over at most n local devices (None: the default)."""
    if n is not None and n < 1:
        raise ValueError(f"devices must be at least 1, got {n}")
    old, _limit[0] = _limit[0], n
    try:
        yield
    finally:
        _limit[0] = old


def device_limit() -> int | None:
    """Returns the most local devices lanes may use (`use_devices`, then $FACEVEIL_DEVICES)."""
    if _limit[0] is not None:
        return _limit[0]
    env = os.environ.get(ENV, "").strip()
    if not env:
        return None
    try:
        n = int(env)
    except ValueError:
        raise ValueError(f"${ENV}={env!r}: a number of devices (e.g. 1)") from None
    if n < 1:
        raise ValueError(f"${ENV}={env!r}: at least 1 device")
    return n


@functools.cache
def _mesh(devices: tuple) -> Mesh:
    return Mesh(np.array(devices, dtype=object), (AXIS,))


def lane_mesh() -> Mesh | None:
    """Returns the 1-D lane mesh over this process's devices, or None when there is one."""
    devices = jax.local_devices()
    limit = device_limit()
    if limit is not None:
        devices = devices[:limit]
    return _mesh(tuple(devices)) if len(devices) > 1 else None


def lane_multiple(mesh: Mesh | None) -> int:
    """Returns the multiple the lane count must be padded to (the mesh's size; 1 without)."""
    return 1 if mesh is None else int(mesh.size)


def round_up(n: int, multiple: int) -> int:
    """Returns the smallest multiple of `multiple` that is at least n."""
    return -(-n // multiple) * multiple


def _repeat_first(a, extra: int):
    if isinstance(a, np.ndarray):
        return np.concatenate([a, np.repeat(a[:1], extra, axis=0)])
    a = jnp.asarray(a)
    return jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)])


def pad_lanes(tree: Any, multiple: int) -> tuple[Any, int]:
    """Returns (tree padded along axis 0 to a multiple, the number of real lanes).

    Padded lanes repeat lane 0 (valid inputs: no NaN or empty face enters a lane); callers
    mark them absent where a method reads presence (`base.FaceFrame.present`) and drop them
    with `unpad_lanes`. A tree that is already a multiple is returned as it is.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return tree, 0
    n = int(leaves[0].shape[0])
    extra = round_up(n, multiple) - n
    if extra == 0:
        return tree, n
    return jax.tree.map(lambda a: _repeat_first(a, extra), tree), n


def unpad_lanes(tree: Any, n: int) -> Any:
    """Returns the tree's first n lanes (padded lanes dropped); the tree itself when unpadded."""
    leaves = jax.tree.leaves(tree)
    if not leaves or int(leaves[0].shape[0]) == n:
        return tree
    return jax.tree.map(lambda a: a[:n], tree)


def shard_lanes(tree: Any, mesh: Mesh | None) -> Any:
    """Returns the tree with axis 0 of every leaf split over the mesh (the tree without one)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(AXIS)))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Returns the tree copied to every device of the mesh (the tree itself without one).

    Arrays already replicated on the mesh are not copied again: callers replicate parameters
    once and pass them to every call.
    """
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
