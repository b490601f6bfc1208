"""tqdm stand-in: a progress bar that shows nothing (facenet-pytorch uses it for downloads)."""


class tqdm:
    """A do-nothing progress bar with tqdm's context-manager and update API."""

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable or ())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        """Returns None (nothing is shown)."""

    def close(self):
        """Returns None (nothing to close)."""
