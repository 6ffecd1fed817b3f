"""Caffemodel files, with no pycaffe and no full protobuf parse: a wire-format scanner for reading, a streaming
writer.

The float payload of every blob is mapped straight from the file into a read-only numpy array (no copy), so a
550 MB model costs about its file size in memory; writing streams the blobs the same way, through a temp file and a
rename. Modern ``layer`` and V1 ``layers`` entries are both read.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from typing import IO

import numpy as np
from google.protobuf.message import DecodeError

from deeprebirth import caffe_pb2 as pb
from deeprebirth.aliases import Weights
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io.atomic import atomic_write

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_NET_LAYER, _NET_V1_LAYERS = 100, 2
# (name field, type field, blobs field) of LayerParameter and V1LayerParameter
_LAYER_FIELDS = {_NET_LAYER: (1, 2, 7), _NET_V1_LAYERS: (4, 5, 6)}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int | memoryview, int]]:
    """Yield (field number, wire type, value, offset of value) for one message's bytes; LEN values as views."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire == _WIRE_VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
        elif wire == _WIRE_LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise DecodeError("truncated field")
            yield number, wire, buf[pos:pos + length], pos
            pos += length
        elif wire == _WIRE_I32:
            if pos + 4 > end:
                raise DecodeError("truncated field")
            yield number, wire, buf[pos:pos + 4], pos
            pos += 4
        elif wire == _WIRE_I64:
            if pos + 8 > end:
                raise DecodeError("truncated field")
            yield number, wire, buf[pos:pos + 8], pos
            pos += 8
        else:
            raise DecodeError(f"unsupported wire type {wire}")


def _packed_varints(view: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(view):
        value, pos = _varint(view, pos)
        values.append(value)
    return values


def _reals(value: memoryview, wire: int, kind: str) -> np.ndarray:
    """BlobProto's ``data`` ("float") or ``double_data`` ("double"): a packed run (a view into the file, no copy) or
    one unpacked element (copied: its few bytes would otherwise pin the whole buffer)."""
    dtype = np.dtype("<f4" if kind == "float" else "<f8")
    if wire != _WIRE_LEN:
        return np.frombuffer(value, dtype=dtype).copy()
    if len(value) % dtype.itemsize:
        raise DecodeError(f"packed {kind} data of {len(value)} bytes")
    return np.frombuffer(value, dtype=dtype)


def _decode_blob(view: memoryview) -> np.ndarray:
    """BlobProto bytes -> float32 array; packed float data is a zero-copy view of the file."""
    shape: list[int] = []
    legacy = {1: 1, 2: 1, 3: 1, 4: 1}
    has_legacy = False
    chunks: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    for number, wire, value, _ in _fields(view, 0, len(view)):
        if number == 7 and wire == _WIRE_LEN:  # shape
            for dim_number, dim_wire, dim_value, _ in _fields(value, 0, len(value)):  # type: ignore[arg-type]
                if dim_number == 1 and dim_wire == _WIRE_LEN:
                    shape.extend(_packed_varints(dim_value))  # type: ignore[arg-type]
                elif dim_number == 1 and dim_wire == _WIRE_VARINT:
                    shape.append(dim_value)  # type: ignore[arg-type]
        elif number == 5 and wire in (_WIRE_LEN, _WIRE_I32):
            chunks.append(_reals(value, wire, "float"))  # type: ignore[arg-type]
        elif number == 8 and wire in (_WIRE_LEN, _WIRE_I64):
            doubles.append(_reals(value, wire, "double"))  # type: ignore[arg-type]
        elif number in legacy and wire == _WIRE_VARINT:
            legacy[number] = value  # type: ignore[assignment]
            has_legacy = True
    if chunks:
        data = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    elif doubles:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range doubles: Inf or NaN, which load_model reports
            data = np.concatenate(doubles).astype(np.float32)
    else:
        data = np.zeros(0, dtype=np.float32)
    if shape:
        dims = tuple(int(d) for d in shape)
    elif has_legacy:
        dims = (legacy[1], legacy[2], legacy[3], legacy[4])
    else:
        dims = (data.size,)
    if math.prod(dims) != data.size:  # Python ints: a corrupt dim of 2**64 - 1 must not overflow int64
        raise DecodeError(f"blob shape {dims} does not match its {data.size} values")
    return data.reshape(dims)


def read_weights(path: str | os.PathLike[str]) -> Weights:
    """Blobs of every layer in a caffemodel, by layer name (modern or V1 layers; extra training layers too).

    Arrays are read-only views of the memory-mapped file: copy before changing them in place.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise DeepRebirthError("empty caffemodel", file=str(path))
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise DeepRebirthError(f"cannot read: {err.strerror}", file=str(path)) from None
    buf = memoryview(mapped)
    weights: Weights = {}
    try:
        found_layer = False
        for number, wire, value, _ in _fields(buf, 0, len(buf)):
            if number not in _LAYER_FIELDS:
                continue
            if wire != _WIRE_LEN:
                raise DecodeError("layer field is not a message")
            found_layer = True
            name_field, _type_field, blobs_field = _LAYER_FIELDS[number]
            name, blobs = "", []
            for inner_number, inner_wire, inner_value, _ in _fields(value, 0, len(value)):  # type: ignore[arg-type]
                if inner_wire != _WIRE_LEN:
                    continue
                if inner_number == name_field:
                    name = bytes(inner_value).decode("utf-8", errors="replace")  # type: ignore[arg-type]
                elif inner_number == blobs_field:
                    blobs.append(_decode_blob(inner_value))  # type: ignore[arg-type]
            if blobs:
                weights[name] = blobs
        if not found_layer:
            raise DecodeError("no layers found")
    except DecodeError as err:
        raise DeepRebirthError(f"not a valid caffemodel ({err})", file=str(path)) from None
    return weights


def _key(number: int, wire: int) -> bytes:
    return _encode_varint((number << 3) | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _blob_header(array: np.ndarray) -> tuple[bytes, int]:
    """Bytes of a BlobProto up to the float payload, and the payload's size in bytes."""
    dims = b"".join(_encode_varint(int(d)) for d in array.shape)
    shape_msg = _key(1, _WIRE_LEN) + _encode_varint(len(dims)) + dims if dims else b""  # 0-D: no dims
    nbytes = array.size * 4
    header = _key(7, _WIRE_LEN) + _encode_varint(len(shape_msg)) + shape_msg
    header += _key(5, _WIRE_LEN) + _encode_varint(nbytes)
    return header, nbytes


def write_caffemodel(path: str | os.PathLike[str], net: pb.NetParameter, weights: Weights) -> None:
    """Write ``net`` (its prototxt part) with ``weights`` attached by layer name, streaming the float payloads."""
    head = pb.NetParameter()
    head.CopyFrom(net)
    del head.layer[:]

    def write(handle: IO[bytes]) -> None:
        handle.write(head.SerializeToString())
        for layer in net.layer:
            bare = pb.LayerParameter()
            bare.CopyFrom(layer)
            del bare.blobs[:]
            layer_bytes = bare.SerializeToString()
            blob_parts = []
            for array in weights.get(layer.name, []):
                data = np.asarray(array, dtype="<f4")
                if not data.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-D blob into 1-D)
                    data = data.copy(order="C")
                header, nbytes = _blob_header(data)
                blob_len = len(header) + nbytes
                blob_parts.append((_key(7, _WIRE_LEN) + _encode_varint(blob_len) + header, data))
            total = len(layer_bytes) + sum(len(h) + d.nbytes for h, d in blob_parts)
            handle.write(_key(_NET_LAYER, _WIRE_LEN) + _encode_varint(total))
            handle.write(layer_bytes)
            for header, data in blob_parts:
                handle.write(header)
                handle.write(data.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)


def blob_to_array(blob: pb.BlobProto) -> np.ndarray:
    """A BlobProto held in a parsed message (e.g. blobs inside a prototxt) -> float32 array."""
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range doubles: Inf or NaN, which load_model reports
        data = np.asarray(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    if blob.HasField("shape"):
        dims = tuple(blob.shape.dim)
    elif any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        dims = (blob.num, blob.channels, blob.height, blob.width)
    else:
        dims = (data.size,)
    if any(d < 0 for d in dims) or math.prod(dims) != data.size:
        raise DeepRebirthError(f"blob shape {dims} does not match its {data.size} values")
    return data.reshape(dims)
