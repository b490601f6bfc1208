"""Progress lines on stderr for long work (a run that takes more than a few seconds says so)."""

from __future__ import annotations

import sys


def say(msg: str, end: str = "\n", *, enabled: bool = True) -> None:
    """Prints one progress message on stderr (`end=''` with a leading '\\r' updates a line)."""
    if enabled:
        print(msg, end=end, file=sys.stderr, flush=True)
