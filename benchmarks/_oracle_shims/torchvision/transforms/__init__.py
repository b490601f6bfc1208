"""torchvision.transforms stand-in: only `functional.to_tensor`."""

from . import functional  # noqa: F401
