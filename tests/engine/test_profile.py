"""benchmarks.profile: the trace of a compiled call is split by named part and pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profile


def test_part_names_follow_scopes_and_library_names():
    assert profile._part_of("jit(_chunk)/while/body/jvp(vmap(recogniser))/DlibResNet/conv") \
        == "recogniser"
    assert profile._part_of("while/body/transpose(jvp())/cond/vmap(jvp(jit(ssim)))/add") \
        == "SSIM / DSSIM"
    assert profile._part_of("while/body/clip").startswith("rest")


def test_trace_breakdown_splits_forward_and_backward_by_scope():
    def f(x):
        with jax.named_scope("recogniser"):
            y = jnp.tanh(x @ x)
        with jax.named_scope("antialias"):  # a second product: its own kernel, not fused
            return jnp.sin(y) @ x.T

    step = jax.jit(jax.grad(lambda x: jnp.sum(f(x))))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    exe = step.lower(x).compile()
    out = profile.trace_breakdown(exe, (x,))
    seen = {(r["part"], r["pass"]) for r in out["parts"]}
    assert {("recogniser", "forward"), ("recogniser", "backward")} <= seen, seen
    assert any(p == "anti-aliasing blur" for p, _ in seen), seen
    assert abs(sum(r["share"] for r in out["parts"]) - 1.0) < 0.01
    assert out["thunk_s"] > 0 and out["traced_call_s"] > 0
