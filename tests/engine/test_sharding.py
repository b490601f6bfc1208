"""Lanes sharded over all local devices give the unsharded results (`faceveil.engine.sharding`).

The pytest process already initialised JAX with one CPU device, so the sharded runs happen in
a subprocess with 8 fake CPU devices (`--xla_force_host_platform_device_count=8`):
`tests/engine/sharded_runs.py` runs the photo cloak (5 faces), PMT (3 faces in one call) and
the video cloak (3 segment chains per call, carried over 2 calls) once over all 8 devices and
once with `use_devices(1)`; lane counts 5 and 3 are not multiples of 8, so every run pads
(padded lanes hold absent faces). Tolerances: see each test.
About 2 minutes on a 2-core CPU (compilation of the dlib programs, 2 iterations each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from faceveil.engine import sharding

REPO = Path(__file__).resolve().parents[2]
DEVICES = 8


# ----------------------------------------------------------------------------------------------
# The helpers, in this process (one device: no mesh, nothing moves)


def test_pad_and_unpad_lanes_repeat_lane_zero_and_drop_it_again():
    tree = {"a": np.arange(5 * 2).reshape(5, 2), "b": np.arange(5, dtype=np.float32)}
    padded, n = sharding.pad_lanes(tree, 8)
    assert n == 5 and padded["a"].shape == (8, 2) and padded["b"].shape == (8,)
    np.testing.assert_array_equal(padded["a"][5:], np.repeat(tree["a"][:1], 3, 0))
    back = sharding.unpad_lanes(padded, n)
    np.testing.assert_array_equal(back["a"], tree["a"])
    same, n = sharding.pad_lanes(tree, 5)
    assert same is tree and n == 5  # already a multiple: untouched
    keys = jax.random.split(jax.random.key(0), 3)  # typed PRNG keys pad too
    assert sharding.pad_lanes(keys, 4)[0].shape == (4,)


def test_one_device_is_no_mesh_and_no_copy():
    with sharding.use_devices(1):
        assert sharding.lane_mesh() is None
        assert sharding.lane_multiple(None) == 1
        tree = {"x": np.zeros(3)}
        assert sharding.shard_lanes(tree, None) is tree
        assert sharding.replicate(tree, None) is tree
    with pytest.raises(ValueError, match="at least 1"), sharding.use_devices(0):
        pass


# ----------------------------------------------------------------------------------------------
# Sharded over 8 devices vs unsharded (subprocess)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, np.ndarray]:
    """Returns the arrays `sharded_runs` saved: `<engine>/<all|one>/<name>`."""
    out = tmp_path_factory.mktemp("sharding") / "runs.npz"
    env = {k: v for k, v in os.environ.items() if k != sharding.ENV}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "tests.engine.sharded_runs", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _pairs(runs, engine):
    prefix = f"{engine}/all/"
    names = sorted(k[len(prefix):] for k in runs if k.startswith(prefix))
    assert names, engine
    return [(name, runs[prefix + name], runs[f"{engine}/one/{name}"]) for name in names]


def test_the_sharded_runs_used_every_device(runs):
    assert int(runs["devices"]) == DEVICES
    assert int(runs["lanes/all/mesh"]) == DEVICES and int(runs["lanes/one/mesh"]) == 1
    # 3 chains per call: a bucket of 4 lanes on one device, 8 (one per device) sharded.
    np.testing.assert_array_equal(runs["cloak_video/all/lane_counts"], [DEVICES])
    np.testing.assert_array_equal(runs["cloak_video/one/lane_counts"], [4])
    assert int(runs["cloak_video/all/chains"]) == 3


def test_photo_cloak_is_bit_equal_sharded(runs):
    # A CPU cloaks one photo face per call on one device (each stops at its own iteration) and
    # one per device sharded: every device runs the same one-lane program, so all agree bit for
    # bit, metrics included; faces keep their PRNG keys (`photos.face_keys`).
    for name, sharded, single in _pairs(runs, "cloak_photo"):
        np.testing.assert_array_equal(sharded, single, err_msg=f"cloak_photo {name}")


@pytest.mark.parametrize("engine", ["pmt", "cloak_video"])
def test_batched_lanes_agree_with_one_lane_per_device(runs, engine):
    # Unsharded, these calls batch 3 lanes (PMT, `lanes=256`) or a bucket of 4 (the video's 3
    # chains) on one device; sharded, each device runs one lane and padding. XLA's CPU kernels
    # sum in another order at another batch width, so float32 roundings may differ: the rule
    # of test_cloak's vmap-lanes test (a flipped rounding takes its own path, so < 0.1% of
    # values may end apart; written pixels otherwise within one level), iterations exact.
    # Float metrics (distances, SSIM, losses: order 1) within 1e-3 + 1e-3 relative; the
    # protection is measured on the rounded face, so a pixel one level apart moves it by ~1e-4.
    # Measured here: 30 of ~1e6 video pixels one level apart, metrics within 9.3e-5 (video)
    # and 6e-8 (PMT, whose pixels agreed bit for bit).
    for name, sharded, single in _pairs(runs, engine):
        if name in ("lane_counts", "chains"):
            continue  # what the runs saw (test above)
        msg = f"{engine} {name}"
        if name == "iterations":
            np.testing.assert_array_equal(sharded, single, err_msg=msg)
        elif sharded.dtype == np.uint8:
            diff = np.abs(sharded.astype(np.int16) - single)
            assert np.mean(diff > 1) < 1e-3 and diff.mean() < 0.01, (msg, diff.max())
        else:
            np.testing.assert_array_equal(np.isnan(sharded), np.isnan(single), err_msg=msg)
            a, b = np.nan_to_num(sharded), np.nan_to_num(single)
            far = np.abs(a - b) > 1e-3 + 1e-3 * np.abs(b)
            assert np.mean(far) < 1e-3, (msg, np.nanmax(np.abs(sharded - single)))
