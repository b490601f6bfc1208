"""Benchmarks: each prints JSON (and writes it with --json); see the README for commands.

Importing this package quiets absl's INFO records (e.g. JAX's "Unable to initialize backend
'tpu'" on every machine without a TPU) unless --verbosity is given, as the CLI does.
"""

from absl import app as _app
from absl import flags as _flags
from absl import logging as _logging


def _quiet_logging() -> None:
    # absl raises an unset --verbosity to INFO once the flags are parsed; this runs after.
    if not _flags.FLAGS["verbosity"].present:
        _logging.set_verbosity(_logging.WARNING)


_app.call_after_init(_quiet_logging)


def emit(report: dict, json_path: str | None, *, indent: int = 1) -> None:
    """Prints a benchmark's report as JSON and writes it to `json_path` too (None: only prints)."""
    import json
    from pathlib import Path

    from faceveil.engine.pipeline import image_io

    print(json.dumps(report, indent=indent))
    if json_path:
        image_io.write_json(Path(json_path), report)
