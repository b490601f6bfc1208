"""Backward passes that are skipped when their incoming gradient is exactly zero.

A budget hinge lam * max(d - rho, 0) sends a zero gradient into d whenever the budget holds, so
the whole backward pass of d (DSSIM over a photo-sized face patch: a third of a cloak step on a
CPU) would only multiply zeros. `skip_zero_cotangent(fn)` returns fn with a backward pass that
runs only when the cotangent is non-zero; under `vmap` it runs (for every lane) when any lane
needs it, so a batch pays only in the steps where some face presses against its budget. The
gradients are unchanged: a skipped pass returns the zeros it would have computed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

__all__ = ["skip_zero_cotangent"]


def _zeros_like_tree(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def skip_zero_cotangent(fn: Callable) -> Callable:
    """Returns fn (array arguments -> array) whose backward pass is skipped on a zero cotangent.

    Args:
      fn: a pure function of array arguments returning one array (e.g. a per-pair metric).
    """

    def pullback(args, g):
        return jax.vjp(fn, *args)[1](g)

    @custom_vmap
    def maybe_pullback(args, g):
        return lax.cond(jnp.any(g != 0), pullback, lambda a, _: _zeros_like_tree(a), args, g)

    @maybe_pullback.def_vmap
    def _batched(axis_size, in_batched, args, g):
        # One decision for the whole batch: a per-lane decision would become a select that
        # runs the backward pass of every lane anyway.
        args_b, g_b = in_batched
        args = jax.tree.map(lambda a, b: a if b else jnp.broadcast_to(a, (axis_size,) + a.shape),
                            args, args_b)
        g = g if g_b else jnp.broadcast_to(g, (axis_size,) + g.shape)
        grads = lax.cond(jnp.any(g != 0), jax.vmap(pullback),
                         lambda a, _: _zeros_like_tree(a), args, g)
        return grads, jax.tree.map(lambda _: True, grads)

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), args

    def bwd(args, g):
        return tuple(maybe_pullback(args, g))

    wrapped.defvjp(fwd, bwd)
    return functools.wraps(fn)(wrapped)
