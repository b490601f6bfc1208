"""tqdm.auto stand-in."""

from . import tqdm  # noqa: F401
