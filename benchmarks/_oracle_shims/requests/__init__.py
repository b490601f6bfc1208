"""requests stand-in: facenet-pytorch imports it for weight downloads the oracle never makes."""

from . import adapters  # noqa: F401


class Session:
    """Refuses to make network requests (the oracle only uses the bundled .pt files)."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("network access is not available in the faceveil oracle shim")
