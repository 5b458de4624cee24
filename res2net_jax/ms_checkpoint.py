"""MindSpore `.ckpt` files, read and written without MindSpore.

A `.ckpt` is a run of serialised protobuf messages, each `Checkpoint { repeated Value value = 1 }` with
`Value { string tag = 1; TensorProto tensor = 2 }` and
`TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3 }`.
MindSpore writes one message per tensor (a very large tensor as several with the same tag, joined on
reading) and, when asked for a checksum, ends the file with b"crc_num" and a 10-byte big-endian CRC32.
The wire format is small enough to code here, which keeps MindSpore out of the JAX environment.
"""

from __future__ import annotations

import binascii
import math
import os
from collections.abc import Iterator, Mapping

import numpy as np

from res2net_jax.errors import InvalidInputError

_NUMPY_TYPES = {
    "Float16": np.float16, "Float32": np.float32, "Float64": np.float64, "Int8": np.int8, "Int16": np.int16,
    "Int32": np.int32, "Int64": np.int64, "UInt8": np.uint8, "UInt16": np.uint16, "UInt32": np.uint32,
    "UInt64": np.uint64, "Bool": np.bool_,
}  # fmt: skip
_TENSOR_TYPES = {np.dtype(v): k for k, v in _NUMPY_TYPES.items()}
_CRC_MARK = b"crc_num"
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class CorruptCheckpointError(InvalidInputError):
    """A file that is not a complete MindSpore checkpoint."""


# --- Wire format ---------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | _BYTES) + _varint(len(payload)) + payload


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CorruptCheckpointError("a number runs past the end of its message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each field of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _BYTES:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise CorruptCheckpointError(f"a field of {size} bytes runs past the end of the file")
            value, pos = data[pos : pos + size], pos + size
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
        else:
            raise CorruptCheckpointError(f"unknown protobuf wire type {wire}")
        if pos > len(data):
            raise CorruptCheckpointError("the last field runs past the end of the file")
        yield number, wire, value


def _tensor(data: memoryview, tag: str) -> tuple[list[int], str, bytes]:
    dims, tensor_type, content = [], None, None
    for number, wire, value in _fields(data):
        if number == 1 and wire == _VARINT:
            dims.append(value)
        elif number == 1 and wire == _BYTES:  # packed dims
            pos = 0
            while pos < len(value):
                dim, pos = _read_varint(value, pos)
                dims.append(dim)
        elif number in (2, 3) and wire != _BYTES:
            raise CorruptCheckpointError(f"tensor {tag!r} has a number where its type or content belongs")
        elif number == 2:
            tensor_type = bytes(value).decode()
        elif number == 3:
            content = bytes(value)
    if tensor_type is None or content is None:
        raise CorruptCheckpointError(f"tensor {tag!r} has no type or no content")
    return dims, tensor_type, content


# --- Files ---------------------------------------------------------------------------------------


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a MindSpore `.ckpt` by name, in file order."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _parse(data)
    except (CorruptCheckpointError, UnicodeDecodeError) as err:  # a name that is not UTF-8: not a checkpoint
        raise CorruptCheckpointError(f"{path} is not a complete MindSpore checkpoint: {err}") from None


def _parse(data: bytes) -> dict[str, np.ndarray]:
    if data[-17:-10] == _CRC_MARK:
        data, stored = data[:-17], int.from_bytes(data[-10:], "big")
        if binascii.crc32(data) != stored:
            raise CorruptCheckpointError("its CRC32 does not match its content")
    pieces: dict[str, list] = {}
    for number, wire, value in _fields(memoryview(data)):
        if number != 1 or wire != _BYTES:
            raise CorruptCheckpointError(f"unexpected top-level field {number}")
        tag, tensor = None, None
        for inner, inner_wire, inner_value in _fields(value):
            if inner in (1, 2) and inner_wire != _BYTES:
                raise CorruptCheckpointError("an entry has a number where its name or tensor belongs")
            if inner == 1:
                tag = bytes(inner_value).decode()
            elif inner == 2:
                tensor = inner_value
            elif inner == 3:
                raise CorruptCheckpointError(f"{tag!r} is a MindSpore map tensor, which Res2Net weights never are")
        if tag is None or tensor is None:
            raise CorruptCheckpointError("an entry has no name or no tensor")
        pieces.setdefault(tag, []).append(_tensor(tensor, tag))
    if not pieces:
        raise CorruptCheckpointError("it holds no tensors")
    tensors = {}
    for tag, parts in pieces.items():
        dims, tensor_type = parts[0][0], parts[0][1]
        if tensor_type not in _NUMPY_TYPES:
            raise CorruptCheckpointError(f"{tag!r} has tensor type {tensor_type!r}, which this reader does not know")
        dtype = np.dtype(_NUMPY_TYPES[tensor_type])
        content = b"".join(part[2] for part in parts)
        if len(content) != math.prod(dims) * dtype.itemsize:
            raise CorruptCheckpointError(f"{tag!r} has {len(content)} bytes for shape {tuple(dims)} of {tensor_type}")
        try:
            tensors[tag] = np.frombuffer(content, dtype).reshape(dims).copy()
        except (ValueError, OverflowError):  # a zero-size shape with a dimension no array can have
            raise CorruptCheckpointError(f"{tag!r} has shape {tuple(dims)}, larger than any array") from None
    return tensors


def write(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes tensors as a MindSpore `.ckpt` (one message per tensor, as MindSpore does)."""
    with open(os.fspath(path), "wb") as f:
        for tag, value in tensors.items():
            value = np.ascontiguousarray(value)
            if value.dtype not in _TENSOR_TYPES:
                raise InvalidInputError(f"{tag}: MindSpore checkpoints have no {value.dtype} tensors")
            dims = b"".join(_varint(1 << 3 | _VARINT) + _varint(d) for d in value.shape)
            tensor = dims + _field(2, _TENSOR_TYPES[value.dtype].encode()) + _field(3, value.tobytes())
            f.write(_field(1, _field(1, tag.encode()) + _field(2, tensor)))
