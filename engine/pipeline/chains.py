"""Host side of a video run: chains (track x segment), their schedule, lanes and carries.

A *chain* is a run of one track's faces that passes a method's state from frame to frame (for
the cloak: its previous cloak); its first face cold-starts. By default a track is one chain.
With a segment length L, the video is cut into segments of L frames and every track into one
chain per segment it appears in, so one long track becomes several chains that run side by
side under vmap: the device gets lanes to fill even when the video has a single face, at the
price of a cold start per segment head.

The schedule runs the segments in lockstep: call k processes window k of every segment (frames
[s*L + k*T, s*L + (k+1)*T) for chunk T), so a call's lanes are every chain present in any of
its windows. Without segments a call is simply the k-th chunk of the video.

`ChainRunner` runs any method of `faceveil.engine.methods`: it keeps every chain's carry on the
host between calls, packs a call's chains into lanes (padded to a few lane counts, so the
compiled chunk function is reused, and to a multiple of the local device count, over which
the lanes are sharded: `faceveil.engine.sharding`), runs the ahead-of-time compiled executable
(compile time is measured apart from run time), pastes the protected patches back into the
window's frames and records per-face iterations and metrics.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine import sharding
from faceveil.engine.methods import base
from faceveil.engine.pipeline import faces


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which frames each compiled call processes (module docstring)."""

    n_frames: int
    chunk: int  # T, frames per window
    segment: int  # L, frames per segment (a multiple of T)

    @property
    def num_segments(self) -> int:
        return -(-self.n_frames // self.segment)

    @property
    def num_calls(self) -> int:
        return -(-min(self.segment, self.n_frames) // self.chunk)

    def windows(self, k: int) -> list[tuple[int, int, int]]:
        """Returns the (segment, first frame, end frame) of every window of call k."""
        out = []
        for s in range(self.num_segments):
            end = min((s + 1) * self.segment, self.n_frames)
            t0 = s * self.segment + k * self.chunk
            if t0 < end:
                out.append((s, t0, min(t0 + self.chunk, end)))
        return out


def make_schedule(n_frames: int, chunk: int, segment: int | None = None) -> Schedule:
    """Returns the Schedule; `segment` None (or past the end) means one segment, the video."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 frame, got {chunk}")
    if segment is None or segment >= n_frames:
        segment = max(n_frames, 1)
    if segment < 1:
        raise ValueError(f"segment must be at least 1 frame, got {segment}")
    return Schedule(n_frames, chunk, -(-segment // chunk) * chunk)


_EXECUTABLES: dict = {}


class ChainRunner:
    """Runs every chain of a video call by call for any method; collects records and timings.

    Per face it records the method's iterations and every field of its metrics ([C, N] for a
    scalar field, [C, N, ...] otherwise; NaN where a track has no face).
    """

    def __init__(self, method: base.Method, params, plans, size: int, schedule: Schedule, key):
        # Lanes are split over the local devices; the params are copied to each once, here.
        self.mesh = sharding.lane_mesh()
        self.method, self.params = method, sharding.replicate(params, self.mesh)
        self.plans, self.size, self.schedule = plans, size, schedule
        self.mask = np.stack([p.present for p in plans])  # [C, N]
        self.fn = base.chunk_fn(method)
        self._key = key
        self.carries: dict[tuple[int, int], object] = {}
        self.iters = np.zeros(self.mask.shape, np.int32)
        self.metrics: dict[str, np.ndarray] = {}
        self.compile_seconds = 0.0
        self.run_seconds = 0.0
        self.lane_counts: list[int] = []

    def carry(self, track: int, segment: int):
        """Returns a chain's carry (a fresh one, cold-starting, the first time)."""
        c = self.carries.get((track, segment))
        if c is None:
            key = jax.random.fold_in(jax.random.fold_in(self._key, track), segment)
            fresh = base.init_carry(self.method, self.params, key[None], self.size)
            c = jax.tree.map(lambda a: np.asarray(a[0]), jax.device_get(fresh))
        return c

    def active(self, k: int) -> list[tuple[int, int, int, int]]:
        """Returns (track, segment, t0, t1) of every chain with a face in call k's windows."""
        return [(i, s, t0, t1) for s, t0, t1 in self.schedule.windows(k)
                for i in range(self.mask.shape[0]) if self.mask[i, t0:t1].any()]

    def run(self, k: int, windows: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], list]:
        """Returns ({t0: protected frames}, active chains) of call k, given {t0: frames}."""
        out = dict(windows)
        lanes = self.active(k)
        if not lanes:
            return out, lanes
        frames, carry = self._pack(lanes, windows)
        target = base.empty_target(self.method, self.params, frames.present.shape[0], self.size)
        patches = np.asarray(frames.patch)  # the clean patches, before they leave the host
        frames, carry, target = sharding.shard_lanes((frames, carry, target), self.mesh)
        exe = self._executable(frames, carry, target)
        t = time.perf_counter()
        new_carry, res = exe(self.params, frames, carry, target)
        res, new_carry = jax.device_get((res, new_carry))
        self.run_seconds += time.perf_counter() - t
        metrics = res.metrics._asdict()
        for name, v in metrics.items():
            if name not in self.metrics:
                self.metrics[name] = np.full(self.mask.shape + v.shape[2:], np.nan, np.float32)
        for lane, (i, s, t0, t1) in enumerate(lanes):
            n = t1 - t0
            self.carries[(i, s)] = jax.tree.map(lambda a, lane=lane: np.asarray(a[lane]),
                                                new_carry)
            p = self.plans[i]
            out[t0] = faces.paste_patches(out[t0], patches[lane, :n], res.protected[lane, :n],
                                          p.offsets[t0:t1], p.present[t0:t1])
            self.iters[i, t0:t1] = res.iters[lane, :n]
            for name, v in metrics.items():
                self.metrics[name][i, t0:t1] = v[lane, :n]
        return out, lanes

    def _pack(self, lanes, windows):
        """Returns (FaceFrame [C, T], carry [C]) of the lanes, padded to a bucket.

        The bucket is rounded up to a multiple of the lane mesh's devices (padded lanes have
        no face, so they pass through untouched).
        """
        c = sharding.round_up(faces.lane_count(len(lanes)), sharding.lane_multiple(self.mesh))
        big_t, size = self.schedule.chunk, self.size
        patches = np.zeros((c, big_t, size, size, 3), np.uint8)
        m_chip = np.tile(np.eye(2, 3, dtype=np.float32), (c, big_t, 1, 1))
        lms = np.zeros((c, big_t, 5, 2), np.float32)
        offs = np.zeros((c, big_t, 2), np.float32)
        present = np.zeros((c, big_t), bool)
        for lane, (i, _, t0, t1) in enumerate(lanes):
            p, sl, n = self.plans[i], slice(t0, t1), t1 - t0
            patches[lane, :n] = faces.crop_patches(windows[t0], p.offsets[sl], size)
            m_chip[lane, :n] = p.m_chip[sl]
            lms[lane, :n] = p.landmarks[sl]
            offs[lane, :n] = p.offsets[sl]
            present[lane, :n] = p.present[sl]
        carries = [self.carry(i, s) for i, s, _, _ in lanes]
        carries += [carries[0]] * (c - len(lanes))  # padded lanes: present is False throughout
        carry = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *carries)
        frames = base.FaceFrame(*map(jnp.asarray, (patches, m_chip, lms, offs, present)))
        return frames, carry

    def _executable(self, frames, carry, target):
        """Returns the compiled chunk function for these shapes (compiled once per process)."""
        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), (frames, carry, target))
        # The lane mesh is part of the key: an executable is compiled for its input shardings.
        key = (id(self.fn), str(shapes), sharding.lane_multiple(self.mesh))
        exe = _EXECUTABLES.get(key)
        if exe is None:
            t = time.perf_counter()
            exe = self.fn.lower(self.params, frames, carry, target).compile()
            self.compile_seconds += time.perf_counter() - t
            _EXECUTABLES[key] = (self.fn, exe)  # keep fn alive so its id is not reused
            self.lane_counts.append(int(frames.present.shape[0]))
            return exe
        return exe[1]

    # State of an interrupted job ---------------------------------------------------------

    def window_state(self, t0: int, t1: int) -> dict[str, np.ndarray]:
        """Returns the per-face records of frames [t0, t1) (to save a finished window)."""
        sl = slice(t0, t1)
        return {"iters": self.iters[:, sl]} | {f"m_{k}": v[:, sl]
                                                for k, v in self.metrics.items()}

    def restore_window(self, t0: int, saved) -> None:
        """Puts back the records of a window saved by `window_state`."""
        n = saved["iters"].shape[1]
        sl = slice(t0, t0 + n)
        self.iters[:, sl] = saved["iters"]
        for name in saved:
            if name.startswith("m_"):
                v = saved[name]
                if name[2:] not in self.metrics:
                    self.metrics[name[2:]] = np.full(self.mask.shape + v.shape[2:], np.nan,
                                                     np.float32)
                self.metrics[name[2:]][:, sl] = v

    def carry_state(self) -> dict[str, np.ndarray]:
        """Returns every chain's carry as flat arrays (to resume after the last call)."""
        out = {}
        for (i, s), c in self.carries.items():
            for j, leaf in enumerate(jax.tree.leaves(c)):
                out[f"{i}.{s}/{j}"] = np.asarray(leaf)
        return out

    def restore_carries(self, saved) -> None:
        """Puts back carries saved by `carry_state`."""
        treedef = jax.tree.structure(self.carry(0, 0))
        chains = {tuple(map(int, name.split("/")[0].split("."))) for name in saved}
        for i, s in chains:
            n = treedef.num_leaves
            self.carries[(i, s)] = jax.tree.unflatten(
                treedef, [saved[f"{i}.{s}/{j}"] for j in range(n)])
