"""The sidecar's gRPC side: an HTTP/2 relay that forwards Triton's gRPC traffic frame for frame.

Why not a gRPC server and client: grpc-python costs ~0.5 ms of CPU per proxied call on this
machine (both `grpc.aio` and a sync server with a thread pool, whatever the options), three times
what Triton itself spends on a small model, and it re-frames, re-times and re-orders what it relays.
This relay instead pairs every client connection with one upstream connection to Triton and
copies the bytes both ways. HTTP/2 keeps per-connection state (HPACK tables, stream ids, flow-control
windows, settings), and because the two ends of that state are the client and Triton themselves,
relaying bytes unchanged keeps it consistent: status codes, details, metadata, deadlines, pings,
flow control and compression are whatever the two ends agree on.

Observation reads along:
- client -> Triton: frames are parsed (not changed) and each request header block is decoded with
  an HPACK decoder kept in step with the client's encoder, to learn each stream's `:path`. For
  `ModelInfer` and `ModelStreamInfer` streams the request messages are collected from DATA frames.
- Triton -> client: frames are parsed at their boundaries. The response messages of those streams
  are collected, and edgecatch adds its one header, `x-edgecatch-inference-id`, by appending an
  HPACK *literal without indexing* to a header block: the client's decoder does not add it to its
  dynamic table, so Triton's encoder and the client's decoder stay in step. For `ModelInfer` the id
  goes into the trailers (trailing metadata) of a call that returned a message; for
  `ModelStreamInfer` into the response headers (initial metadata), and the n-th response of the
  stream is observed as `<id>.<n>`.
- A stream's responses are paired with its requests by position: Triton answers the requests of a
  stream to a model that is not decoupled once each, in order. Each request keeps its place in the
  line even when its bytes are not kept (a model not observed, more than `_MAX_UNANSWERED` awaiting
  answers), so a burst never shifts the pairing. A response that names another model or another
  request id than the request in its place, or one with no request left (a decoupled model answers
  a request several times), ends the observation of that stream, counted as `grpc_stream_unpaired`:
  from then on it is only relayed, and holds no memory. (A request edgecatch cannot read keeps its
  place unchecked.)
- A message larger than `max_message_bytes` (the sidecar's `max_request_bytes`), as sent or once
  inflated, is relayed without being held or observed (`grpc_request`).
Parsing happens as bytes pass; `on_exchange` gets each observed pair once its answer has been
written to the client, and only queues it for observation. A connection whose header blocks cannot be
decoded is relayed blind (counted in `edgecatch_unparsed_total{reason="grpc_headers"}`).

Stopping: no new connections are accepted, each client is sent a GOAWAY that lets no new call
start on its connection (last stream id 2^31-1, as RFC 9113 says a graceful shutdown begins), and a
connection is closed once its calls in progress have ended (or the grace period has).

Triton unreachable: the client connection is closed before any HTTP/2 byte, which gRPC clients
report as UNAVAILABLE, as for an unreachable Triton; a Triton that goes away closes its paired
client connections the same way. A new client connection tries Triton again, so recovery needs
nothing from the sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import hpack

from edgecatch.integrations.triton.stopping import close_gracefully
from edgecatch.integrations.triton.tensors import inflate

__all__ = ["GrpcExchange", "GrpcProxy", "INFERENCE_ID_KEY"]

log = logging.getLogger("edgecatch.sidecar.grpc")

INFERENCE_ID_KEY = "x-edgecatch-inference-id"
SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer".encode()
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer".encode()

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _GOAWAY, _CONTINUATION = 0x0, 0x1, 0x3, 0x7, 0x9
# GOAWAY on stream 0: last stream id 2^31-1 (every call begun may finish), error code NO_ERROR
_GRACEFUL_GOAWAY = struct.pack(">HBBBIII", 0, 8, _GOAWAY, 0, 0, 0x7FFFFFFF, 0)
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_MIN_MAX_FRAME_SIZE = 16384  # every peer accepts frames this large; an id that would not fit is left out
_HEADER = struct.Struct(">HBBBI")  # length (3 bytes, split 2+1), type, flags, stream id (31 bits)
_ID_LITERAL = b"\x00" + bytes([len(INFERENCE_ID_KEY)]) + INFERENCE_ID_KEY.encode()
_UNARY, _STREAM = 1, 2
_REPOSITORY_CHANGES = frozenset((b"/inference.GRPCInferenceService/RepositoryModelLoad",
                                 b"/inference.GRPCInferenceService/RepositoryModelUnload"))
_MAX_UNANSWERED = 64  # stream requests whose bytes are kept while they wait for their responses
_MAX_AWAITED = 4096  # stream requests awaiting a response at all (past this the stream is not observed)


@dataclass(slots=True)
class GrpcExchange:
    """One observed ModelInfer (or one request/response pair of a stream), handed over after the answer."""

    inference_id: str
    request: bytes  # a serialised ModelInferRequest
    response: bytes  # a serialised ModelInferResponse (unary) or ModelStreamInferResponse (stream)
    streamed: bool = False


def _id_literal(inference_id: str) -> bytes:
    value = inference_id.encode()
    return _ID_LITERAL + bytes([len(value)]) + value  # ids are far shorter than 127 bytes


def _model_name(message: bytes) -> str | None:
    """`model_name` of a serialised ModelInferRequest: field 1, which encoders write first."""
    if len(message) >= 2 and message[0] == 0x0A and message[1] < 0x80:
        end = 2 + message[1]
        if end <= len(message):
            try:
                return message[2:end].decode()
            except UnicodeDecodeError:
                return None
    from tritonclient.grpc import service_pb2

    try:
        return service_pb2.ModelInferRequest.FromString(message).model_name
    except Exception:
        return None


def _varint(message: bytes | memoryview, offset: int) -> tuple[int, int]:
    """A protobuf varint at `offset`: (its value, the offset after it)."""
    value, shift, size = 0, 0, len(message)
    while offset < size:
        byte = message[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    return value, offset


def _name_and_id(message: bytes | memoryview) -> tuple[bytes, bytes]:
    """`model_name` and `id` of a serialised ModelInferRequest or ModelInferResponse (fields 1 and 3
    of both, strings, written first and in order; field 2 is the version). Empty when absent."""
    fields = [b"", b"", b""]
    offset, size = 0, len(message)
    while offset < size:
        tag = message[offset]
        number = tag >> 3
        if tag & 7 != 2 or not 1 <= number <= 3:
            break  # past the leading strings: the rest is tensors
        length, offset = _varint(message, offset + 1)
        fields[number - 1] = bytes(message[offset:offset + length])
        offset += length
    return fields[0], fields[2]


def _stream_response_name_and_id(message: bytes) -> tuple[bytes, bytes] | None:
    """`model_name` and `id` of a ModelStreamInferResponse's `infer_response` (field 2), None for an
    error answer (field 1, `error_message`, first)."""
    if not message or message[0] != 0x12:
        return None
    length, offset = _varint(message, 1)
    return _name_and_id(memoryview(message)[offset:offset + length])


class _Messages:
    """gRPC length-prefixed messages reassembled from DATA frame payloads.

    A message larger than `max_bytes` (as sent, or once inflated) is not held: it counts as one
    empty (unreadable) message, so the messages after it keep their places."""

    __slots__ = ("parts", "size", "need", "done", "max_bytes", "skip")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parts: list[bytes] = []
        self.size = 0
        self.need = 5  # bytes that complete the next prefix or message
        self.done: list[bytes] = []
        self.skip = 0  # bytes of an oversized message still to come, dropped as they pass

    def feed(self, payload: bytes) -> None:
        if self.skip:
            if len(payload) <= self.skip:
                self.skip -= len(payload)
                return
            payload = payload[self.skip:]
            self.skip = 0
        self.parts.append(payload)
        self.size += len(payload)
        if self.size < self.need:
            return  # the common case for a large message arriving frame by frame: no copying yet
        buffer = b"".join(self.parts) if len(self.parts) > 1 else self.parts[0]
        offset, size = 0, len(buffer)
        while size - offset >= 5:
            length = int.from_bytes(buffer[offset + 1:offset + 5], "big")
            if length > self.max_bytes:
                self.done.append(b"")
                if size - offset - 5 < length:
                    self.skip = length - (size - offset - 5)
                    offset = size
                    break
                offset += 5 + length
                continue
            if size - offset < 5 + length:
                self.need = 5 + length
                break
            message = buffer[offset + 5:offset + 5 + length]
            if buffer[offset]:  # compressed: gzip and deflate (zlib) both decode with wbits=47
                try:
                    message = inflate(message, 47, self.max_bytes)
                except ValueError:  # unreadable, or too large once inflated
                    message = b""
            self.done.append(message)
            offset += 5 + length
            self.need = 5
        rest = buffer[offset:] if offset else buffer
        self.parts = [rest] if rest else []
        self.size = len(rest)


class _Stream:
    __slots__ = ("kind", "requests", "responses", "inference_id", "model_ok", "count", "answered", "awaited",
                 "kept", "unpaired")

    def __init__(self, kind: int, max_message_bytes: int) -> None:
        self.kind = kind
        self.requests = _Messages(max_message_bytes)
        self.responses = _Messages(max_message_bytes)
        self.inference_id: str | None = None
        self.model_ok: bool | None = None  # unary: decided when the request message is complete
        self.count = 0  # stream: requests answered so far
        self.answered = False
        # stream: (model name, id, the message if it is observed) per request awaiting its response
        self.awaited: deque[tuple[bytes, bytes, bytes | None]] = deque()
        self.kept = 0  # how many of those keep their message
        self.unpaired = False  # responses no longer pair with requests: relayed, not observed


class GrpcProxy:
    def __init__(
        self,
        upstream: str,
        *,
        observed_models: Callable[[str], bool],
        new_inference_id: Callable[[], str],
        on_exchange: Callable[[GrpcExchange], None],
        on_unparsed: Callable[[str], None],
        on_repository_change: Callable[[], None] = lambda: None,
        connect_timeout: float = 10.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream_host, self.upstream_port = host.strip("[]"), int(port)
        self.observed_models = observed_models
        self.new_inference_id = new_inference_id
        self.on_exchange = on_exchange
        self.on_unparsed = on_unparsed
        self.on_repository_change = on_repository_change  # a model load/unload call passes through
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes  # larger messages are relayed, not read along
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Downstream] = set()

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Downstream(self), host.strip("[]"), int(port),
                                                reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting connections; let the calls in progress finish (for up to `grace` seconds,
        no new call starting), then close every connection."""
        await close_gracefully(self._server, self._connections, grace)


class _Downstream(asyncio.Protocol):
    """A client connection, relayed to its own upstream connection to Triton."""

    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self._pending: list[bytes] = []  # what the client sent before the upstream connection was up
        self._closed = False
        self._buffer = b""  # an incomplete frame (or frame header) from the client
        self._skip = 0  # payload bytes of a DATA frame still to come
        self._skip_stream: _Stream | None = None
        self._skip_id = 0
        self._preface = True
        self._decoder = hpack.Decoder()
        self._decoder.max_allowed_table_size = 1 << 30  # passive: the two ends negotiate, not us
        self._decoder.max_header_list_size = 1 << 30
        self._block: bytearray | None = None  # a header block continued in CONTINUATION frames
        self._block_stream = 0
        # Clients repeat the same header block byte for byte once their HPACK table holds every
        # field: such a block (only one-byte indexed fields) changes nothing, so its :path is
        # remembered per table version instead of decoding it again.
        self._paths: dict[bytes, tuple[int, bytes | None]] = {}
        self._table_version = 0
        self.blind = False
        self.streams: dict[int, _Stream] = {}
        self.active: set[int] = set()  # every call in progress (not only observed ones), for stopping
        self.repository_calls: set[int] = set()  # model loads and unloads in progress
        self.finishing = False  # stopping: close once no call is in progress

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=1 << 20)  # type: ignore[attr-defined]
        self.proxy._connections.add(self)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self), proxy.upstream_host, proxy.upstream_port),
                proxy.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            log.debug("Triton's gRPC port is unreachable (%s): closing the client connection", exc)
            self.close()
            return
        if self._closed:
            upstream.transport.close()
            return
        self.upstream = upstream
        if self._pending:
            upstream.transport.write(b"".join(self._pending))
            self._pending = []

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.proxy._connections.discard(self)
        if self.upstream is not None:
            self.upstream.transport.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.transport.close()
        if self.upstream is not None:
            self.upstream.transport.close()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    def finish(self) -> None:
        """Stopping: no new call on this connection; close it once the calls in progress are done."""
        self.finishing = True
        upstream = self.upstream
        if upstream is None or not upstream.forwarded:
            self.close()  # Triton has not even sent its settings: nothing can be in progress
            return
        if upstream._skip:  # in the middle of one of Triton's frames: the GOAWAY goes after it
            upstream.goaway_due = True
        else:
            self.transport.write(_GRACEFUL_GOAWAY)
        self.close_if_done()

    def close_if_done(self) -> None:
        if self.finishing and not self.active and not self.blind and self.upstream is not None \
                and not self.upstream.goaway_due:
            self.close()

    def pause_writing(self) -> None:  # the client reads slowly: stop reading Triton
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- client -> Triton: forwarded first, then read along ------------------------------------------

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)
        else:
            self._pending.append(data)
        if self.blind:
            return
        try:
            self._parse(data)
        except Exception as exc:  # never let reading along break the relay
            self.go_blind("grpc_headers", exc)

    def go_blind(self, reason: str, exc: BaseException) -> None:
        log.warning("a gRPC connection is relayed without observation from now on (%s): %r", reason, exc)
        self.proxy.on_unparsed(reason)
        self.blind = True
        self._buffer = b""
        self.streams.clear()

    def _parse(self, data: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if self._skip_stream is not None:
                self._request_data(self._skip_id, self._skip_stream, data[:n] if n < len(data) else data)
            if n == len(data):
                return
            data = data[n:]
        buffer = self._buffer + data if self._buffer else data
        if self._preface:
            if len(buffer) < len(_PREFACE):
                self._buffer = buffer
                return
            buffer = buffer[len(_PREFACE):]
            self._preface = False
        offset, size = 0, len(buffer)
        unpack = _HEADER.unpack_from
        streams = self.streams
        while size - offset >= 9:
            high, low, kind, flags, stream_id = unpack(buffer, offset)
            length = (high << 8) | low
            end = offset + 9 + length
            stream_id &= 0x7FFFFFFF
            if kind == _DATA and not flags & _PADDED:
                stream = streams.get(stream_id)
                if end > size:  # stream the payload through as it comes
                    self._skip, self._skip_stream, self._skip_id = end - size, stream, stream_id
                    if stream is not None:
                        self._request_data(stream_id, stream, buffer[offset + 9:])
                    offset = size
                    break
                if stream is not None:
                    self._request_data(stream_id, stream, buffer[offset + 9:end])
            elif end > size:
                break
            elif kind == _HEADERS or kind == _CONTINUATION:
                self._header_fragment(kind, flags, stream_id, buffer, offset + 9, end)
            elif kind == _DATA:
                stream = streams.get(stream_id)
                if stream is not None:
                    self._request_data(stream_id, stream, _unpadded(buffer, offset + 9, end))
            elif kind == _RST_STREAM:
                streams.pop(stream_id, None)
                self.active.discard(stream_id)
                self._repository_call_over(stream_id)
                self.close_if_done()
            offset = end
        self._buffer = buffer[offset:] if offset < size else b""

    def _header_fragment(self, kind: int, flags: int, stream_id: int, buffer: bytes, start: int, end: int) -> None:
        if kind == _HEADERS:
            if flags & _PADDED:
                end -= buffer[start]
                start += 1
            if flags & _PRIORITY:
                start += 5
            self._block_stream = stream_id
            if not flags & _END_HEADERS:
                self._block = bytearray(buffer[start:end])
                return
            block = buffer[start:end]
        elif self._block is not None:
            self._block += buffer[start:end]
            if not flags & _END_HEADERS:
                return
            block, self._block = bytes(self._block), None
        else:
            raise ValueError("CONTINUATION without HEADERS")
        stream_id = self._block_stream
        self.active.add(stream_id)
        if block.translate(None, _HIGH_BYTES):  # literals or table updates: decode, table may change
            path = _path_of(self._decoder.decode(block, raw=True))
            self._table_version += 1
        else:
            cached = self._paths.get(block)
            if cached is not None and cached[0] == self._table_version:
                path = cached[1]
            else:
                path = _path_of(self._decoder.decode(block, raw=True))
                if len(self._paths) >= 256:
                    self._paths.clear()
                self._paths[block] = (self._table_version, path)
        if stream_id in self.streams:
            return
        if path in _REPOSITORY_CHANGES:  # reported when sent and when answered (the model is loaded then)
            self.repository_calls.add(stream_id)
            self.proxy.on_repository_change()
        elif path == MODEL_INFER:
            self.streams[stream_id] = _Stream(_UNARY, self.proxy.max_message_bytes)
        elif path == MODEL_STREAM_INFER:
            stream = self.streams[stream_id] = _Stream(_STREAM, self.proxy.max_message_bytes)
            stream.inference_id = self.proxy.new_inference_id()

    def _repository_call_over(self, stream_id: int) -> None:
        """A model load or unload was answered or reset by either side: Triton may have (re)loaded it
        by now, so the model configs read before are forgotten once more."""
        if stream_id in self.repository_calls:
            self.repository_calls.discard(stream_id)
            self.proxy.on_repository_change()

    def _request_data(self, stream_id: int, stream: _Stream, payload: bytes) -> None:
        if stream.kind == _STREAM:
            if not stream.unpaired:
                stream.requests.feed(payload)
                if stream.requests.done:
                    self._stream_requests(stream)
            return
        stream.requests.feed(payload)
        if stream.model_ok is None and stream.requests.done:
            model = _model_name(stream.requests.done[0])
            if not model:  # unreadable (or inflated past the limit: empty), or a request naming no model
                self.proxy.on_unparsed("grpc_request")
                stream.model_ok = False
            else:
                stream.model_ok = self.proxy.observed_models(model)
            if not stream.model_ok:
                self.streams.pop(stream_id, None)  # nothing of this call is observed
                if self._skip_stream is stream:
                    self._skip_stream = None

    def _stream_requests(self, stream: _Stream) -> None:
        """Line up a stream's complete requests for their responses, keeping the messages observed."""
        proxy = self.proxy
        for message in stream.requests.done:
            name, request_id = _name_and_id(message)
            keep = None
            if not name:
                proxy.on_unparsed("grpc_request")
            elif proxy.observed_models(name.decode("utf-8", "replace")):
                if stream.kept < _MAX_UNANSWERED:
                    keep = message
                    stream.kept += 1
                else:  # a burst larger than this is relayed, not all of it observed
                    proxy.on_unparsed("grpc_stream_unanswered")
            stream.awaited.append((name, request_id, keep))
        stream.requests.done.clear()
        if len(stream.awaited) > _MAX_AWAITED:
            _stop_pairing(stream, proxy)


def _stop_pairing(stream: _Stream, proxy: GrpcProxy, counted: bool = True) -> None:
    if counted:
        proxy.on_unparsed("grpc_stream_unpaired")
    stream.unpaired = True
    stream.awaited.clear()
    stream.kept = 0
    stream.requests = _Messages(stream.requests.max_bytes)
    stream.responses = _Messages(stream.responses.max_bytes)


_HIGH_BYTES = bytes(range(0x80, 0x100))


def _path_of(headers) -> bytes | None:
    for name, value in headers:
        if name == b":path":
            return value
    return None


def _unpadded(buffer: bytes, start: int, end: int) -> bytes:
    return buffer[start + 1:end - buffer[start]]


class _Upstream(asyncio.Protocol):
    """The connection to Triton paired with one client connection."""

    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream
        self.transport: asyncio.Transport | None = None
        self._buffer = b""  # an incomplete frame (or frame header) from Triton
        self._skip = 0
        self._skip_stream: _Stream | None = None
        self.forwarded = False  # Triton's first bytes (its settings) have reached the client
        self.goaway_due = False  # the sidecar is stopping: a GOAWAY goes out at the next frame boundary

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=1 << 20)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.downstream.close()

    def pause_writing(self) -> None:  # Triton reads slowly: stop reading the client
        self.downstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.downstream.transport.resume_reading()

    # -- Triton -> client: forwarded at frame boundaries, the id spliced in where due ----------------

    def data_received(self, data: bytes) -> None:
        downstream = self.downstream
        if downstream.blind:
            if self._buffer:
                data, self._buffer = self._buffer + data, b""
            self.forwarded = True
            downstream.transport.write(data)
            return
        try:
            out = self._relay(data)
        except Exception as exc:  # reading along must never break the relay
            downstream.go_blind("grpc_response", exc)
            out, self._buffer = self._buffer + data, b""
        if out:
            self.forwarded = True
            downstream.transport.write(out)
        if downstream.finishing:
            if self.goaway_due and not self._skip:
                self.goaway_due = False
                downstream.transport.write(_GRACEFUL_GOAWAY)
            downstream.close_if_done()

    def _relay(self, data: bytes) -> bytes:
        head = b""
        if self._skip:  # the rest of a DATA frame: forward as it comes
            n = min(self._skip, len(data))
            self._skip -= n
            chunk = data[:n] if n < len(data) else data
            if self._skip_stream is not None:
                self._response_data(self._skip_stream, chunk)
            if n == len(data):
                return data
            head, data = chunk, data[n:]
        buffer = self._buffer + data if self._buffer else data
        streams = self.downstream.streams
        active = self.downstream.active
        offset, size = 0, len(buffer)
        unpack = _HEADER.unpack_from
        pieces: list[bytes] | None = None
        copied = 0  # buffer[copied:offset] is forwarded unchanged
        while size - offset >= 9:
            high, low, kind, flags, stream_id = unpack(buffer, offset)
            length = (high << 8) | low
            end = offset + 9 + length
            stream = streams.get(stream_id & 0x7FFFFFFF) if streams else None
            if kind == _DATA and not flags & _PADDED:
                if end > size:
                    self._skip, self._skip_stream = end - size, stream
                    if stream is not None:
                        self._response_data(stream, buffer[offset + 9:])
                    offset = size
                    break
                if stream is not None:
                    self._response_data(stream, buffer[offset + 9:end])
            elif end > size:
                break
            elif kind == _HEADERS:
                if stream is not None:
                    literal = self._literal_for(stream, flags)
                    if literal is not None:
                        if flags & _END_HEADERS and length + len(literal) <= _MIN_MAX_FRAME_SIZE:
                            if pieces is None:
                                pieces = [head] if head else []
                            pieces.append(buffer[copied:offset])
                            pieces.append(_with_literal(buffer, offset, end, length, kind, flags, literal))
                            copied = end
                        elif stream.kind == _UNARY:
                            stream.inference_id = None  # it could not be added: do not observe it under it
                        else:
                            _stop_pairing(stream, self.downstream.proxy, counted=False)
                    if flags & _END_STREAM:
                        self._finish(stream_id & 0x7FFFFFFF, stream)
                if flags & _END_STREAM:  # the trailers: the call is over
                    active.discard(stream_id & 0x7FFFFFFF)
                    if self.downstream.repository_calls:
                        self.downstream._repository_call_over(stream_id & 0x7FFFFFFF)
            elif kind == _RST_STREAM:
                streams.pop(stream_id & 0x7FFFFFFF, None)
                active.discard(stream_id & 0x7FFFFFFF)
                self.downstream._repository_call_over(stream_id & 0x7FFFFFFF)
            elif stream is not None and kind == _DATA:
                self._response_data(stream, _unpadded(buffer, offset + 9, end))
            offset = end
        self._buffer = buffer[offset:] if offset < size else b""
        if pieces is not None:
            pieces.append(buffer[copied:offset])
            return b"".join(pieces)
        out = buffer if offset >= size else buffer[:offset]
        return head + out if head else out

    def _literal_for(self, stream: _Stream, flags: int) -> bytes | None:
        if stream.kind == _UNARY:
            # Only a call that returned a message edgecatch could read (an empty one: unreadable, too
            # large, or none with an error status) is observed and gets its id.
            if flags & _END_STREAM and stream.model_ok and stream.responses.done and stream.responses.done[0]:
                stream.inference_id = self.downstream.proxy.new_inference_id()
                return _id_literal(stream.inference_id)
            return None
        if not stream.answered:
            stream.answered = True
            if flags & _END_STREAM:  # trailers only (no answer at all): no response headers to carry it
                stream.unpaired = True
                return None
            return _id_literal(stream.inference_id)  # the stream's response headers: its id goes there
        return None

    def _response_data(self, stream: _Stream, payload: bytes) -> None:
        if stream.unpaired:
            return
        stream.responses.feed(payload)
        if stream.kind == _STREAM and stream.responses.done:
            self._stream_responses(stream)

    def _finish(self, stream_id: int, stream: _Stream) -> None:
        self.downstream.streams.pop(stream_id, None)
        if self._skip_stream is stream:
            self._skip_stream = None
        if stream.kind == _UNARY and stream.inference_id is not None and stream.requests.done \
                and stream.responses.done:
            exchange = GrpcExchange(stream.inference_id, stream.requests.done[0], stream.responses.done[0])
            self.downstream.proxy.on_exchange(exchange)  # written already; on_exchange only queues it

    def _stream_responses(self, stream: _Stream) -> None:
        proxy = self.downstream.proxy
        awaited = stream.awaited
        for response in stream.responses.done:  # the n-th response answers the n-th request
            if not awaited:
                _stop_pairing(stream, proxy)  # more answers than requests: a decoupled model
                return
            name, request_id, request = awaited.popleft()
            answers = _stream_response_name_and_id(response)  # None: Triton refused the request
            # A request edgecatch could not read (no name) cannot be checked against its answer.
            if answers is not None and name and (answers[0] != name or answers[1] != request_id):
                _stop_pairing(stream, proxy)
                return
            if request is not None:
                stream.kept -= 1
                if response:  # empty: too large or unreadable, relayed only
                    exchange = GrpcExchange(f"{stream.inference_id}.{stream.count}", request, response,
                                            streamed=True)
                    proxy.on_exchange(exchange)
            stream.count += 1
        stream.responses.done.clear()


def _with_literal(buffer: bytes, offset: int, end: int, length: int, kind: int, flags: int,
                  literal: bytes) -> bytes:
    """The HEADERS frame at `offset` with `literal` appended to its header block (before any padding)."""
    start = offset + 9
    block_end = end - buffer[start] if flags & _PADDED else end
    new_length = length + len(literal)
    head = new_length.to_bytes(3, "big") + bytes((kind, flags)) + buffer[offset + 5:offset + 9]
    return head + buffer[start:block_end] + literal + buffer[block_end:end]
