"""Shared pytest fixtures: strict JAX numerics, the shared data folder, the weight store."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

# Parity tests compare against float32 CPU references; keep matmuls/convs at full precision.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACEVEIL_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Returns ../shared/data (real faces, multi-face photos, the video)."""
    if not DATA.is_dir():
        pytest.fail(f"{DATA}: the shared test data is missing (tests read ../shared/data)")
    return DATA


def store_params(name: str):
    """Returns the converted params of `name`, fetching them into the store if needed."""
    from faceveil.models import store

    try:
        return store.load(name)
    except store.StoreError:
        store.fetch([name])
        return store.load(name)
