"""Shared pytest fixtures: strict JAX numerics, the test data folder, the weight store."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import jax
import pytest

# Parity tests compare against float32 CPU references; keep matmuls/convs at full precision.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
# tests/data: small copies of the real photos and video the tests read (see its README.md);
# FACEVEIL_DATA may point the tests at another folder with the same layout.
DATA = Path(os.environ.get("FACEVEIL_DATA", REPO / "tests" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Returns tests/data (real faces, multi-face photos, the video), or $FACEVEIL_DATA."""
    if not DATA.is_dir():
        pytest.fail(f"{DATA}: the test data folder is missing")
    return DATA


def store_params(name: str):
    """Returns the converted params of `name`, fetching them into the store if needed."""
    from faceveil.models import store

    try:
        return store.load(name)
    except store.StoreError:
        store.fetch([name])
        return store.load(name)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops every module's compiled programs when it ends.

    One pytest process compiles several thousand XLA programs; kept all at once, their code
    exhausted the CI machine's memory maps and LLVM crashed the process mid-run.
    """
    yield
    jax.clear_caches()
    gc.collect()
