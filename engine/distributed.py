"""Several hosts: one process per host, each protecting its own share of the input files.

    faceveil pmt photos/ --out out/ --distributed \
        --coordinator_address=host0:1234 --num_processes=2 --process_id=0      # on host 0
    faceveil pmt photos/ --out out/ --distributed \
        --coordinator_address=host0:1234 --num_processes=2 --process_id=1      # on host 1

`initialize` calls `jax.distributed.initialize`. Each setting comes from its flag, else from
the environment (FACEVEIL_COORDINATOR_ADDRESS, FACEVEIL_NUM_PROCESSES, FACEVEIL_PROCESS_ID),
else JAX finds it itself: JAX_COORDINATOR_ADDRESS, or a cluster manager it detects (SLURM,
Open MPI, Kubernetes, Cloud TPU; `jax.distributed.initialize()` without arguments).

The hosts never exchange faces: `share(files)` gives every process a fixed, disjoint part of
the inputs (every process computes the same split from the same list), each process runs the
command on its part with its own devices (`faceveil.engine.sharding`) and writes the outputs of
its files only; a file every process would write (a run's report) gets the process's index in
its name (`own_path`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax

ENV_COORDINATOR = "FACEVEIL_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FACEVEIL_NUM_PROCESSES"
ENV_PROCESS_ID = "FACEVEIL_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the coordinator is and who this process is (None: JAX detects it)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r}: a whole number") from None


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> Settings:
    """Returns the Settings: each argument, else its FACEVEIL_* variable, else None."""
    return Settings(
        coordinator_address=coordinator_address or os.environ.get(ENV_COORDINATOR) or None,
        num_processes=num_processes if num_processes is not None else _env_int(
            ENV_NUM_PROCESSES),
        process_id=process_id if process_id is not None else _env_int(ENV_PROCESS_ID))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
    """Returns (process index, process count) after joining the cluster.

    Must run before anything else uses JAX. Arguments left None come from the environment
    (`settings`), then from JAX's own detection (module docstring).
    """
    s = settings(coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=s.coordinator_address,
                               num_processes=s.num_processes, process_id=s.process_id)
    return jax.process_index(), jax.process_count()


def share(files: Sequence, process_id: int | None = None,
          num_processes: int | None = None) -> list:
    """Returns this process's part of `files`: a fixed split, disjoint, together all files.

    Files are dealt round-robin in their given order, except that files with the same name
    stem (whose outputs would share a name) always go to one process together, where the
    command's own check of output names sees them. Defaults: `jax.process_index()` and
    `jax.process_count()` (one process: every file).
    """
    pid = jax.process_index() if process_id is None else process_id
    n = jax.process_count() if num_processes is None else num_processes
    if not 0 <= pid < n:
        raise ValueError(f"process {pid} of {n}: the index must be in 0..{n - 1}")
    groups: dict[str, int] = {}
    for f in files:
        groups.setdefault(Path(f).stem, len(groups))
    return [f for f in files if groups[Path(f).stem] % n == pid]


def own_path(path: str | Path) -> Path:
    """Returns the path this process writes a per-run file to (its index in the name).

    With one process the path is unchanged; with several, `report.json` becomes
    `report.process1of2.json` for process 1, so that no two processes write one file.
    """
    path = Path(path)
    n = jax.process_count()
    if n == 1:
        return path
    return path.with_name(f"{path.stem}.process{jax.process_index()}of{n}{path.suffix}")
