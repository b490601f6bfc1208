"""Flax ports of face detection and recognition networks, their weight loaders and registry."""

from faceveil.models.store import StoreError, WeightSource, fetch, home, load

__all__ = ["StoreError", "WeightSource", "fetch", "home", "load"]
