"""Tiny stand-ins that let facenet-pytorch (the MTCNN oracle) import without its extra deps.

facenet-pytorch 2.6.0 imports torchvision (for `batched_nms` and `to_tensor`), tqdm and
requests at import time; torchvision has no CPU wheel here and the others are only used for
downloads. The folder holds our own minimal `torchvision`, `tqdm` and `requests` packages. It
is put on sys.path only by `facenet_pytorch_mtcnn()` (the oracle harness), never by faceveil.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent


def facenet_pytorch_mtcnn(**kwargs):
    """Returns facenet_pytorch.MTCNN(**kwargs) on CPU, importing it with the shims on sys.path.

    Raises:
      ImportError: torch or facenet-pytorch is not installed.
    """
    import torch  # noqa: F401  (fail early and clearly when torch is missing)

    if str(SHIM_DIR) not in sys.path:
        # Appended, not prepended: a real torchvision/tqdm/requests, if installed, wins.
        sys.path.append(str(SHIM_DIR))
    from facenet_pytorch import MTCNN

    return MTCNN(device="cpu", **kwargs)
