"""One interface for every face recogniser: chip size, alignment template, pure apply.

A recogniser is used as `rec.apply(params, chips)` where `chips` are aligned face chips,
float32 in [0, 1], NHWC, of size `rec.chip_size`; it returns `(embedding, features)` with
`features` a dict of named intermediate activations in network order. `rec.preprocess` is
already inside `apply` (callers never normalise by hand). Everything is pure and jit-able and
differentiable with respect to `chips`.

Alignment: `rec.template` holds where the 5 landmarks (left eye, right eye, nose, left mouth
corner, right mouth corner; image-left first) land in chip pixels; the engine estimates the
similarity transform frame -> chip from detected landmarks to this template. `rec.aspect`
(default 1) is the height/width ratio of the face region the chip squashes into a square (FaceNet
was trained on MTCNN box crops ~1.26x taller than wide): the similarity is fitted in
unsquashed chip coordinates and the chip then squashes y by it (`align.chip_transform`).

Split (PMT's shallow model E_c): `rec.shallow(params, chips, cut)` runs the first `cut` of
`rec.stages` and returns their outputs; `rec.rest(params, feats, cut)` finishes the embedding
from the last of them, so `rest(shallow(x, L)[-1], L)` is `embed(x)` for L in 1..len(stages)-1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recogniser:
    """A face recogniser behind the common interface (see the module docstring)."""

    name: str
    chip_size: int
    template: np.ndarray  # (5, 2) float, (x, y) in chip pixels
    apply: Callable  # (params, chips [N,S,S,3] in [0,1]) -> (emb [N,D], {name: [N,...]})
    embed_dim: int
    threshold: float  # same-person decision: distance(a, b) < threshold
    metric: str  # "euclidean" (on the raw embedding)
    layers: tuple[str, ...]  # names of the intermediate features, shallow to deep
    load_params: Callable[[], dict]  # from the weight store
    aspect: float = 1.0  # height/width of the region the chip squashes (see module docstring)
    stages: tuple[str, ...] = ()  # the stages `run` runs, in order (features named alike)
    run: Callable | None = None  # (params, x, start, end) -> (stage end-1's output, or the
    #   embedding when end == len(stages); {stage: features}) of stages [start, end) on x

    def embed(self, params, chips):
        """Returns the embeddings [N, D] of aligned chips [N, S, S, 3] in [0, 1]."""
        return self.apply(params, chips)[0]

    def check_cut(self, cut: int) -> None:
        """Raises ValueError (naming the valid range) unless `cut` splits this recogniser."""
        n = len(self.stages) if self.run is not None else 0
        if n < 2:
            raise ValueError(f"{self.name} cannot be split into a shallow part and the rest")
        if not 1 <= cut < n:
            raise ValueError(
                f"cut {cut}: {self.name} has stages 1..{n - 1} "
                f"({self.stages[0]} .. {self.stages[n - 2]})"
            )

    def shallow(self, params, chips, cut: int) -> list:
        """Returns the outputs [N, h, w, c] of stages 1..cut for chips [N, S, S, 3] in [0, 1].

        Raises:
          ValueError: cut is not in 1..len(stages) - 1.
        """
        self.check_cut(cut)
        feats = self.run(params, chips, 0, cut)[1]
        return [feats[name] for name in self.stages[:cut]]

    def rest(self, params, feats, cut: int):
        """Returns the embeddings [N, D] finished from `feats`, stage `cut`'s output.

        Raises:
          ValueError: cut is not in 1..len(stages) - 1.
        """
        self.check_cut(cut)
        return self.run(params, feats, cut, len(self.stages))[0]


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Several recognisers cloaked against at once (`get("dlib,facenet")`).

    The first member is the primary: a method plans its face patches and, where it has one, its
    chip-space field with the primary's chip; every member still sees the face through its own
    template, chip size and aspect. `name`, `threshold`, `chip_size`, `template` and `aspect`
    are the primary's, so code that reports one recogniser reports the primary.
    """

    members: tuple[Recogniser, ...]

    def __post_init__(self):
        if len(self.members) < 2:
            raise ValueError("an ensemble needs at least two recognisers")
        if len({m.name for m in self.members}) != len(self.members):
            raise ValueError(f"recognisers repeat in '{self.name}'")

    @property
    def name(self) -> str:
        return ",".join(m.name for m in self.members)

    @property
    def chip_size(self) -> int:
        return self.members[0].chip_size

    @property
    def template(self) -> np.ndarray:
        return self.members[0].template

    @property
    def aspect(self) -> float:
        return self.members[0].aspect

    @property
    def threshold(self) -> float:
        return self.members[0].threshold

    def load_params(self) -> tuple:
        """Returns the members' parameters, in member order."""
        return tuple(m.load_params() for m in self.members)


def members(recogniser) -> tuple[Recogniser, ...]:
    """Returns the recognisers behind `recogniser` (itself, or an ensemble's members)."""
    return recogniser.members if isinstance(recogniser, Ensemble) else (recogniser,)


_RECOGNISERS: dict[str, Callable[[], Recogniser]] = {}


def register(name: str, factory: Callable[[], Recogniser]) -> None:
    """Adds a recogniser factory under `name`."""
    _RECOGNISERS[name] = factory


def get(name: str) -> Recogniser | Ensemble:
    """Returns the recogniser registered as `name` ("dlib", "facenet"; "dlib,facenet": both).

    A comma-separated list gives an `Ensemble` whose primary is the first name.
    """
    import importlib

    if "," in name:
        names = [n.strip() for n in name.split(",") if n.strip()]
        return get(names[0]) if len(names) == 1 else Ensemble(tuple(get(n) for n in names))

    for mod in ("dlib_resnet", "facenet"):
        try:
            importlib.import_module(f"faceveil.models.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"faceveil.models.{mod}":
                raise
    if name not in _RECOGNISERS:
        raise KeyError(f"unknown recogniser '{name}'; known: {sorted(_RECOGNISERS)}")
    return _RECOGNISERS[name]()


def names() -> list[str]:
    """Returns the names of the registered recognisers."""
    return sorted(_RECOGNISERS)
