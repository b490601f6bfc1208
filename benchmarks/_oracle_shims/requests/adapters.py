"""requests.adapters stand-in."""


class HTTPAdapter:
    """Placeholder for the name facenet-pytorch imports; never used by MTCNN."""

    def __init__(self, *args, **kwargs):
        pass
