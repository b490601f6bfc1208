"""Minimal torchvision stand-in for facenet-pytorch's MTCNN (see the parent package)."""

from . import ops, transforms  # noqa: F401

__version__ = "0.0.0+faceveil-shim"
