"""A numpy-only reader of TensorFlow frozen graphs (GraphDef protobuf), no TensorFlow needed.

It decodes the protobuf wire format directly: GraphDef.node (1) -> NodeDef {name 1, op 2,
input 3, attr 5 (map entry: key 1, value 2)}; AttrValue {list 1, s 2, i 3, f 4, b 5, type 6,
shape 7, tensor 8}; TensorProto {dtype 1, tensor_shape 2, tensor_content 4, float_val 5,
double_val 6, int_val 7, int64_val 10, bool_val 11}; TensorShapeProto {dim 2: {size 1}}.
Anything else (library, versions, device, ...) is skipped. A file that is not a valid
GraphDef raises `GraphError` naming the file and the byte offset.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

# TF DataType enum -> numpy dtype (the ones a frozen inference graph carries).
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
           9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16}
# TensorProto repeated value fields: field number -> (dtype, wire type of one unpacked element).
_VAL_FIELDS = {5: (np.float32, 5), 6: (np.float64, 1), 7: (np.int32, 0), 10: (np.int64, 0),
               11: (np.bool_, 0)}


class GraphError(ValueError):
    """The file is not a readable GraphDef; the message names the file and the offset."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One NodeDef: its name, op, input names and decoded attributes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]


class _Malformed(Exception):
    """Internal: raised at the failing offset, turned into GraphError with the file name."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"truncated or overlong varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """Yields (field number, wire type, value) of one message; value is int or (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = (pos, pos + size), pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + size), pos + size
        else:  # groups (3, 4) are not used by GraphDef; anything else is garbage
            raise _Malformed(f"unsupported wire type {wire} (field {field}) at byte {pos}")
        if pos > end:
            raise _Malformed(f"field {field} runs past the end of its message (byte {end})")
        if field == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        yield field, wire, value


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"invalid UTF-8 string at byte {span[0]}") from e


def _shape(buf: memoryview, span: tuple[int, int]) -> tuple[int, ...]:
    dims = []
    for f, _, v in _fields(buf, *span):
        if f == 2:  # Dim {size 1 (int64, -1 = unknown)}
            size = 0
            for g, _, s in _fields(buf, *v):
                if g == 1:
                    size = s - (1 << 64) if s >= 1 << 63 else s
            dims.append(size)
    return tuple(dims)


def _repeated(buf, wire, value, dtype, elem_wire) -> list:
    """Returns the elements of one packed (wire 2) or unpacked repeated-scalar occurrence."""
    if wire == 2 and elem_wire != 2:
        start, end = value
        if elem_wire == 0:
            out, pos = [], start
            while pos < end:
                x, pos = _varint(buf, pos, end)
                out.append(x)
        else:
            out = np.frombuffer(buf[start:end], np.dtype(dtype).newbyteorder("<")).tolist()
        return out
    if wire in (1, 5):
        return np.frombuffer(buf[value[0]:value[1]], np.dtype(dtype).newbyteorder("<")).tolist()
    return [value]


def _tensor(buf: memoryview, span: tuple[int, int]) -> np.ndarray:
    dtype, shape, content, vals = 1, (), None, []
    for f, w, v in _fields(buf, *span):
        if f == 1:
            dtype = v
        elif f == 2:
            shape = _shape(buf, v)
        elif f == 4:
            content = buf[v[0]:v[1]]
        elif f in _VAL_FIELDS:
            vals += _repeated(buf, w, v, *_VAL_FIELDS[f])
    if dtype not in _DTYPES:
        raise _Malformed(f"tensor of unsupported dtype enum {dtype} at byte {span[0]}")
    np_dtype = np.dtype(_DTYPES[dtype])
    count = int(np.prod(shape, dtype=np.int64))
    if content is not None:
        if content.nbytes != count * np_dtype.itemsize:
            raise _Malformed(f"tensor_content of {content.nbytes} bytes does not fit shape {shape}"
                             f" of {np_dtype} at byte {span[0]}")
        return np.frombuffer(content, np_dtype.newbyteorder("<")).astype(np_dtype).reshape(shape)
    if dtype in (1, 19):
        vals = np.asarray(vals, np.float32)
    elif dtype == 10:
        vals = np.asarray(vals, bool)
    else:  # varints are two's complement over 64 bits
        vals = np.asarray([x - (1 << 64) if x >= 1 << 63 else x for x in vals], np.int64)
    if count == 0 or vals.size == count:
        return vals.astype(np_dtype).reshape(shape)
    if 0 < vals.size < count:  # TF repeats the last value to fill the shape
        vals = np.concatenate([vals, np.full(count - vals.size, vals[-1])])
        return vals.astype(np_dtype).reshape(shape)
    raise _Malformed(f"tensor with {vals.size} values for shape {shape} at byte {span[0]}")


def _attr(buf: memoryview, span: tuple[int, int]) -> Any:
    value = None
    for f, w, v in _fields(buf, *span):
        if f == 1:  # ListValue: same field numbers as AttrValue, repeated
            items: list = []
            for g, gw, gv in _fields(buf, *v):
                if g == 2:
                    items.append(bytes(buf[gv[0]:gv[1]]))
                elif g in (3, 6):
                    items += _repeated(buf, gw, gv, np.int64, 0)
                elif g == 4:
                    items += _repeated(buf, gw, gv, np.float32, 5)
                elif g == 5:
                    items += [bool(x) for x in _repeated(buf, gw, gv, np.bool_, 0)]
                elif g == 7:
                    items.append(_shape(buf, gv))
                elif g == 8:
                    items.append(_tensor(buf, gv))
            value = items
        elif f == 2:
            value = bytes(buf[v[0]:v[1]])
        elif f == 3:
            value = v - (1 << 64) if v >= 1 << 63 else v
        elif f == 4:
            value = struct.unpack("<f", buf[v[0]:v[1]])[0]
        elif f == 5:
            value = bool(v)
        elif f == 6:
            value = v  # DataType enum
        elif f == 7:
            value = _shape(buf, v)
        elif f == 8:
            value = _tensor(buf, v)
    return value


def _node(buf: memoryview, span: tuple[int, int]) -> Node:
    name = op = ""
    inputs, attrs = [], {}
    for f, w, v in _fields(buf, *span):
        if w != 2 and f in (1, 2, 3, 5):
            raise _Malformed(f"NodeDef field {f} has wire type {w} at byte {span[0]}")
        if f == 1:
            name = _text(buf, v)
        elif f == 2:
            op = _text(buf, v)
        elif f == 3:
            inputs.append(_text(buf, v))
        elif f == 5:
            key, value = "", None
            for g, _, gv in _fields(buf, *v):
                if g == 1:
                    key = _text(buf, gv)
                elif g == 2:
                    value = _attr(buf, gv)
            attrs[key] = value
    if not name or not op:
        raise _Malformed(f"NodeDef without a name or op at byte {span[0]}")
    return Node(name, op, tuple(inputs), attrs)


def parse_graph(data: bytes, source: str = "<bytes>") -> list[Node]:
    """Returns the nodes, in file order, of a serialised GraphDef.

    Args:
      data: the GraphDef bytes.
      source: name used in error messages (usually the file path).

    Raises:
      GraphError: the bytes are not a well-formed GraphDef with at least one node.
    """
    buf = memoryview(data)
    try:
        nodes = [_node(buf, v) for f, w, v in _fields(buf, 0, len(buf)) if f == 1 and w == 2]
    except _Malformed as e:
        raise GraphError(f"{source}: not a valid TensorFlow GraphDef ({e})") from None
    if not nodes:
        raise GraphError(f"{source}: not a valid TensorFlow GraphDef (no nodes)")
    return nodes


def read_graph(path: str | Path) -> list[Node]:
    """Returns the nodes of the frozen GraphDef (.pb) at `path`, in file order.

    Raises:
      GraphError: the file is missing or not a well-formed GraphDef.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GraphError(f"{path}: cannot read the graph file ({e.strerror})") from e
    return parse_graph(data, str(path))


def consts(nodes: list[Node]) -> dict[str, np.ndarray]:
    """Returns {node name: value} of every Const node."""
    return {n.name: n.attrs["value"] for n in nodes if n.op == "Const" and "value" in n.attrs}
