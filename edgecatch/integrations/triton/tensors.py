"""KServe v2 tensors, read (never written) from the bodies the sidecar forwards.

Three wire forms carry the same tensors:
- HTTP/REST JSON: `{"inputs"|"outputs": [{"name", "datatype", "shape", "data": [...]}]}`;
- HTTP/REST with Triton's binary-tensor extension: the body is a JSON header of
  `Inference-Header-Content-Length` bytes followed by the raw tensors, in order, of every tensor whose
  `parameters.binary_data_size` is set;
- gRPC: `ModelInferRequest.inputs` / `ModelInferResponse.outputs` with typed `contents`, or
  `raw_input_contents` / `raw_output_contents` in tensor order.
BYTES tensors in raw form are a sequence of 4-byte little-endian lengths, each followed by the bytes.

Parsing happens after the response has been sent, from the very bytes that were forwarded; a body
that does not parse raises `TensorError` and is only counted.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from typing import Any

import numpy as np

__all__ = ["Tensor", "TensorError", "grpc_tensors", "http_tensors", "inflate", "split_http_body"]

_NUMPY_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}

_NUMPY_DTYPES = {name: np.dtype(t) for name, t in _NUMPY_TYPES.items()}

# Which typed `contents` field of InferTensorContents holds each datatype (gRPC).
_GRPC_CONTENTS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


class TensorError(ValueError):
    """A body or message edgecatch cannot read; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# memoryview.cast formats (no FP16: memoryview cannot cast to "e"; numpy reads those)
_CAST = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
         "INT32": "i", "INT64": "q", "FP32": "f", "FP64": "d"}
_LITTLE_ENDIAN = sys.byteorder == "little"  # KServe's binary tensors are little-endian


class Tensor:
    """One named tensor: its values as a flat Python list (`flat`) or a numpy array (`array`), each
    made on first use. Observation reads small detection outputs for every call, where a list made
    straight from the bytes costs a fraction of numpy arrays and numpy scalars."""

    __slots__ = ("name", "datatype", "shape", "_raw", "_flat", "_array", "_views")

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], array: np.ndarray | None = None, *,
                 raw: bytes | memoryview | None = None, flat: list | None = None,
                 views: list[memoryview] | None = None) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self._raw = raw  # little-endian values of a numeric tensor
        self._flat = flat  # BYTES elements, or values already listed
        self._views = views  # BYTES elements of a binary tensor, as views of the received message
        self._array = array

    @property
    def array(self) -> np.ndarray:
        """numpy array shaped `shape`; BYTES tensors are object arrays of `bytes`."""
        if self._array is None:
            if self._raw is not None:
                self._array = np.frombuffer(self._raw, dtype=_NUMPY_DTYPES[self.datatype]).reshape(self.shape)
            else:
                flat = self.flat
                array = np.empty(len(flat), dtype=object)
                array[:] = flat
                self._array = array.reshape(self.shape)
        return self._array

    @property
    def flat(self) -> list:
        """Every value in row-major order, as Python objects (float, int, bool, bytes)."""
        if self._flat is None:
            if self._views is not None:
                self._flat = [bytes(view) for view in self._views]
            elif self._raw is not None and _LITTLE_ENDIAN and self.datatype in _CAST:
                self._flat = memoryview(self._raw).cast(_CAST[self.datatype]).tolist()
            else:
                self._flat = self.array.reshape(-1).tolist()
        return self._flat

    @property
    def byte_elements(self) -> list[bytes] | list[memoryview]:
        """A BYTES tensor's elements without copying them out of the message where it was binary
        (an encoded image is read, and copied once into the recall buffer, from the message itself)."""
        return self._views if self._views is not None else self.flat

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.datatype}, {list(self.shape)})"


def _bytes_elements(raw: bytes | memoryview, count: int | None) -> list[memoryview]:
    view = memoryview(raw)
    if count == 1 and len(view) >= 4 and int.from_bytes(view[:4], "little") == len(view) - 4:
        return [view[4:]]  # one element (one image per request): the common case
    out = []
    offset, end = 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise TensorError("tensor", "truncated BYTES element length")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > end:
            raise TensorError("tensor", "truncated BYTES element")
        out.append(view[offset:offset + length])
        offset += length
    if count is not None and len(out) != count:
        raise TensorError("tensor", f"BYTES tensor has {len(out)} elements, shape says {count}")
    return out


def _from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> Tensor:
    count = math.prod(shape)
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, views=_bytes_elements(raw, count))
    dtype = _NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise TensorError("datatype", f"datatype {datatype} is not read by edgecatch")
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorError("tensor", f"tensor {name}: {len(raw)} bytes, shape {list(shape)} {datatype} needs {expected}")
    return Tensor(name, datatype, shape, raw=raw)


def _from_list(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Tensor:
    flat = np.asarray(data, dtype=object if datatype == "BYTES" else _NUMPY_TYPES.get(datatype, object))
    if datatype not in _NUMPY_TYPES and datatype != "BYTES":
        raise TensorError("datatype", f"datatype {datatype} is not read by edgecatch")
    try:
        array = flat.reshape(shape)
    except ValueError:
        raise TensorError("tensor", f"tensor {name}: {flat.size} values do not fit shape {list(shape)}") from None
    if datatype == "BYTES":
        array = np.vectorize(lambda v: v if isinstance(v, bytes) else str(v).encode(), otypes=[object])(array)
    return Tensor(name, datatype, shape, array)


def inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """Decompress one zlib/gzip/deflate stream (`wbits` as for `zlib.decompressobj`) into at most
    `limit` bytes. The output is what is bounded, not the input: a few kilobytes of zeros compressed
    expand a thousandfold, and one such body must not take the sidecar's memory. Raises ValueError past
    the limit, on corrupt or truncated data, and on data after the stream."""
    inflater = zlib.decompressobj(wbits)
    try:
        output = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"does not decompress ({exc})") from None
    if len(output) > limit:
        raise ValueError(f"decompresses to more than {limit} bytes")
    if not inflater.eof:
        raise ValueError("is truncated")
    if inflater.unused_data:
        raise ValueError("has data after its compressed stream")
    return output


def split_http_body(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary part of a KServe v2 HTTP body."""
    view = memoryview(body)
    if header_length is None:
        header_length = len(body)
    if header_length < 0 or header_length > len(body):
        raise TensorError("header", f"Inference-Header-Content-Length {header_length} exceeds the body")
    try:
        header = json.loads(str(view[:header_length], "utf-8"))  # str: skips json's encoding sniffing
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorError("json", f"not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorError("json", "the JSON body is not an object")
    return header, view[header_length:]


def http_tensors(body: bytes, header_length: int | None, key: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and the tensors (`key`: "inputs" or "outputs") of an HTTP infer request or response."""
    header, binary = split_http_body(body, header_length)
    tensors: dict[str, Tensor] = {}
    offset = 0
    for spec in header.get(key) or ():
        try:
            name, datatype = spec["name"], spec["datatype"]
            shape = tuple(map(int, spec["shape"]))
        except (KeyError, TypeError, ValueError):
            raise TensorError("json", f"a tensor in '{key}' lacks name, datatype or shape") from None
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            size = int(size)
            if offset + size > len(binary):
                raise TensorError("tensor", f"binary data of {name} runs past the body")
            tensors[name] = _from_raw(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in spec:
            tensors[name] = _from_list(name, datatype, shape, spec["data"])
        # else: a tensor in shared memory — nothing to read here.
    return header, tensors


def grpc_tensors(message: Any, key: str) -> dict[str, Tensor]:
    """Tensors of a ModelInferRequest (`key`="inputs") or ModelInferResponse (`key`="outputs").

    A tensor in shared memory has no data in the message: tritonclient leaves a shared-memory input
    out of `raw_input_contents`, and Triton gives a shared-memory output an empty entry of
    `raw_output_contents`. Either way the raw entries are matched to the tensors that have data, and
    a tensor without data (an empty entry for a tensor with elements) is left out, as over HTTP:
    reading fails only if it is one edgecatch needs."""
    specs = getattr(message, key)
    raw = message.raw_input_contents if key == "inputs" else message.raw_output_contents
    tensors: dict[str, Tensor] = {}
    if raw:
        if len(raw) == len(specs):
            pairs = zip(specs, raw)
        else:
            with_data = [spec for spec in specs if "shared_memory_region" not in spec.parameters]
            if len(with_data) != len(raw):
                raise TensorError("tensor", f"{len(raw)} raw contents for {len(specs)} tensors "
                                            f"({len(specs) - len(with_data)} in shared memory)")
            pairs = zip(with_data, raw)
        for spec, contents in pairs:
            shape = tuple(spec.shape)
            if not contents and math.prod(shape):
                continue  # its data is in shared memory
            tensors[spec.name] = _from_raw(spec.name, spec.datatype, shape, contents)
        return tensors
    for spec in specs:
        if spec.HasField("contents"):
            field = _GRPC_CONTENTS.get(spec.datatype)
            if field is None:
                raise TensorError("datatype", f"datatype {spec.datatype} is not read by edgecatch")
            tensors[spec.name] = _from_list(spec.name, spec.datatype, tuple(spec.shape),
                                            list(getattr(spec.contents, field)))
    return tensors
