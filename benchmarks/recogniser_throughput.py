"""Forward+backward throughput of a recogniser: chips/s of the gradient of the embeddings.

    python -m benchmarks.recogniser_throughput --model dlib --batch 64 --json out.json
    python -m benchmarks.recogniser_throughput --model facenet --batch 64 --precision highest

One step is `jax.grad(lambda x: apply(params, x)[0].sum())(chips)`: the cost of one cloak
iteration per face (a forward pass and the backward pass to the input pixels). The step is
jitted; compilation is timed on its own (lower + compile), one warm-up call is not counted, and
every timed call ends with `block_until_ready`. The forward pass alone is timed the same way.
Weights come from the store (`faceveil fetch-weights`); throughput does not depend on their
values. Runs unchanged on CPU or GPU (the JSON names the device).
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import benchmarks
from faceveil.models import registry


def _timed(fn, args, iters: int) -> tuple[float, float, jax.Array]:
    """Returns (compile seconds, mean seconds per call, output) of jitted `fn` on `args`."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    first = jax.block_until_ready(compiled(*args))  # warm-up: first-call allocation, not counted
    t0 = time.perf_counter()
    for _ in range(iters):
        out = compiled(*args)
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - t0) / iters, first


def measure(name: str, *, batch: int = 64, iters: int = 5, precision: str | None = None,
            seed: int = 0) -> dict:  # fmt: skip
    """Returns throughput figures of recogniser `name` (see the module docstring).

    Args:
      name: a registered recogniser ("dlib", "facenet").
      batch: chips per step.
      iters: timed steps (after one warm-up step).
      precision: jax default matmul/conv precision for the run (None: JAX's default, which is
        TF32 on recent NVIDIA GPUs and full float32 on CPU; "highest" for exact float32).
      seed: PRNG seed of the random chips.
    """
    rec = registry.get(name)
    params = jax.device_put(rec.load_params())
    size = rec.chip_size
    chips = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), jnp.float32)

    def forward(p, x):
        return rec.apply(p, x)[0]

    def grad(p, x):
        return jax.grad(lambda x: rec.apply(p, x)[0].sum())(x)

    ctx = (jax.default_matmul_precision(precision) if precision and precision != "default"
           else contextlib.nullcontext())  # fmt: skip
    with ctx:
        compile_fb, step_fb, g = _timed(grad, (params, chips), iters)
        compile_f, step_f, _ = _timed(forward, (params, chips), iters)
    finite = bool(jnp.isfinite(g).all())
    dev = jax.devices()[0]
    return {
        "model": name,
        "device": f"{dev.platform}:{dev.device_kind}",
        "cpu_count": _cpu_count(),
        "jax": jax.__version__,
        "precision": precision or "default",
        "batch": batch,
        "iters": iters,
        "chip_size": size,
        "grad_finite": finite,
        "compile_s": {"forward_backward": round(compile_fb, 2), "forward": round(compile_f, 2)},
        "step_ms": {"forward_backward": round(1e3 * step_fb, 2), "forward": round(1e3 * step_f, 2)},
        "chips_per_s": {
            "forward_backward": round(batch / step_fb, 2),
            "forward": round(batch / step_f, 2),
        },
    }


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _define_flags() -> None:
    # Defined only when run as a script, so importing `measure` elsewhere adds no flags.
    flags.DEFINE_string("model", "dlib", "Registered recogniser: dlib or facenet.")
    flags.DEFINE_integer("batch", 64, "Chips per step.")
    flags.DEFINE_integer("iters", 5, "Timed steps after one warm-up step.")
    flags.DEFINE_enum("precision", None, ["default", "high", "highest"],
                      "Matmul/conv precision (default: JAX's default).")  # fmt: skip
    flags.DEFINE_string("json", None, "Write the JSON report here too.")


def main(argv: list[str]) -> None:
    """Prints the JSON report of `measure` for --model."""
    del argv
    opts = flags.FLAGS
    report = measure(opts.model, batch=opts.batch, iters=opts.iters,
                     precision=opts.precision)  # fmt: skip
    benchmarks.emit(report, opts.json, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
