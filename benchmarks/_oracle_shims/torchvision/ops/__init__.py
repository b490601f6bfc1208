"""torchvision.ops stand-in: only the box NMS that facenet-pytorch uses."""

from .boxes import batched_nms, nms  # noqa: F401
