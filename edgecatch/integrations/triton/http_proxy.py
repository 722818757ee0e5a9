"""The sidecar's HTTP/REST side: a byte-level HTTP/1.1 proxy in front of Triton.

Why not a web framework: a framework parses a request into objects and serialises a new one, which
costs time on every request and risks changing what Triton receives or the client gets back. This
proxy parses only to find message boundaries (httptools, the C parser uvicorn uses), forwards the
request line and headers as received, relays Triton's response bytes as they arrive on a pool of
persistent upstream connections, and splices exactly one header, `X-Edgecatch-Inference-Id`, into
the responses of observed inference calls. Observation work runs after the response has been
written (`on_exchange`), never before.

Differences from a raw TCP relay, all hop-by-hop: `Expect: 100-continue` is answered here (and not
forwarded), a chunked request body is forwarded with a Content-Length, and requests under
`/edgecatch/` are served by edgecatch itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools

__all__ = ["Exchange", "HttpProxy", "LocalResponse"]

log = logging.getLogger("edgecatch.sidecar.http")

INFERENCE_ID_HEADER = b"X-Edgecatch-Inference-Id"
_INFER_PATH = re.compile(rb"^/v2/models/([^/?]+)(?:/versions/([^/?]+))?/infer(?:\?.*)?$")


@dataclass(slots=True)
class Exchange:
    """One observed inference call, handed over once the response has been relayed."""

    model: str
    version: str
    inference_id: str
    request_headers: list[tuple[bytes, bytes]]
    request_body: bytes
    status: int
    response_headers: list[tuple[bytes, bytes]]
    response_body: bytes


@dataclass(slots=True)
class LocalResponse:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


LocalHandler = Callable[[bytes, bytes, list[tuple[bytes, bytes]], bytes], Awaitable[LocalResponse]]
"""(method, url, headers, body) -> response, for requests under /edgecatch/."""

_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            409: b"Conflict", 413: b"Payload Too Large", 502: b"Bad Gateway", 503: b"Service Unavailable",
            500: b"Internal Server Error"}


def _response_bytes(status: int, body: bytes, content_type: bytes = b"application/json",
                    extra: tuple[tuple[bytes, bytes], ...] = (), keep_alive: bool = True) -> bytes:
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown")),
            b"Content-Type: " + content_type, b"Content-Length: %d" % len(body)]
    head += [name + b": " + value for name, value in extra]
    if not keep_alive:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _Request:
    __slots__ = ("method", "url", "headers", "body", "keep_alive", "version")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = True
        self.version = "1.1"


class HttpProxy:
    """Accepts client connections and forwards them to one upstream Triton HTTP endpoint."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        observed_models: Callable[[str], bool],
        new_inference_id: Callable[[], str],
        on_exchange: Callable[[Exchange], None],
        local_handler: LocalHandler | None = None,
        max_request_bytes: int = 256 * 1024 * 1024,
        max_idle_upstream: int = 64,
        upstream_timeout: float = 600.0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.observed_models = observed_models
        self.new_inference_id = new_inference_id
        self.on_exchange = on_exchange
        self.local_handler = local_handler
        self.max_request_bytes = max_request_bytes
        self.max_idle_upstream = max_idle_upstream
        self.upstream_timeout = upstream_timeout
        self._idle: deque[_Upstream] = deque()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), host, port, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        while self._idle:
            self._idle.popleft().transport.close()

    async def _acquire(self) -> tuple[_Upstream, bool]:
        """An upstream connection, and whether it was reused from the pool."""
        while self._idle:
            upstream = self._idle.pop()
            if not upstream.closed:
                return upstream, True
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(_Upstream, self.upstream_host, self.upstream_port)
        return upstream, False

    def _release(self, upstream: _Upstream) -> None:
        if upstream.closed or len(self._idle) >= self.max_idle_upstream:
            upstream.transport.close()
        else:
            self._idle.append(upstream)


class _Upstream(asyncio.Protocol):
    """One persistent connection to Triton; carries one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._done: asyncio.Future[None] | None = None
        self._client: _Client | None = None
        self._inject: bytes = b""
        self._head_pending = bytearray()
        self._head_sent = True
        self._keep_body = False
        self._body: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_only = False
        self.status = 0
        self.keep_alive = True
        self.sent_anything = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("upstream closed the connection"))

    def pause_writing(self) -> None:
        if self._client is not None:
            self._client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._client is not None:
            self._client.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._done is None or self._done.done():
            self.closed = True  # bytes nobody asked for: this connection cannot be trusted again
            self.transport.close()
            return
        client = self._client
        if not self._head_sent:
            self._head_pending += data
            end = self._head_pending.find(b"\r\n\r\n")
            if end >= 0:
                head = self._head_pending
                out = bytes(head[:end + 2]) + self._inject + bytes(head[end + 2:]) if self._inject else bytes(head)
                self._head_sent = True
                self._head_pending = bytearray()
                client.write(out)
                self.sent_anything = True
        else:
            client.write(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.closed = True
            self.transport.close()
            if not self._done.done():
                self._done.set_exception(ConnectionError(f"bad response from upstream: {exc}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self._keep_body:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_only:  # a response to HEAD has no body whatever its Content-Length says
            self._finish()
            self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        if self._keep_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._head_only:
            self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def exchange(self, client: _Client, request: bytes, inject: bytes, keep_body: bool,
                       head_only: bool, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._client = client
        self._inject = inject
        self._head_sent = False
        self._head_pending = bytearray()
        self._keep_body = keep_body
        self._body = []
        self._headers = []
        self._head_only = head_only
        self.sent_anything = False
        self.transport.write(request)
        try:
            await asyncio.wait_for(self._done, timeout)
        finally:
            self._client = None
            if not self._done.done():
                self._done.cancel()
        if not self.keep_alive:
            self.closed = True

    def take_body(self) -> tuple[list[tuple[bytes, bytes]], bytes]:
        body, self._body = b"".join(self._body), []
        headers, self._headers = self._headers, []
        return headers, body


class _Client(asyncio.Protocol):
    """One client connection: parses requests, forwards them in order, relays the answers."""

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._current: _Request | None = None
        self._size = 0
        self._queue: deque[_Request] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._too_large = False
        self._writable = asyncio.Event()
        self._writable.set()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._writable.set()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b'{"error":"protocol upgrades are not supported by the edgecatch sidecar"}')
        except httptools.HttpParserError:
            if self._too_large:
                self._fail(413, b'{"error":"request body larger than the sidecar accepts"}')
            else:
                self._fail(400, b'{"error":"malformed HTTP request"}')

    def write(self, data: bytes) -> None:
        if not self._closing:
            self.transport.write(data)

    def _fail(self, status: int, body: bytes) -> None:
        self.write(_response_bytes(status, body, keep_alive=False))
        self._closing = True
        self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = _Request()
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self._current
        request.method = self._parser.get_method()
        request.version = self._parser.get_http_version()
        for name, value in request.headers:
            if name.lower() == b"expect" and value.lower() == b"100-continue":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.proxy.max_request_bytes:
            self._too_large = True
            raise httptools.HttpParserError("body too large")  # answered with 413 in data_received
        self._current.body.append(body)

    def on_message_complete(self) -> None:
        request, self._current = self._current, None
        request.keep_alive = self._parser.should_keep_alive()
        self._queue.append(request)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._serve())

    # forwarding
    async def _serve(self) -> None:
        while self._queue and not self._closing:
            request = self._queue.popleft()
            try:
                await self._handle(request)
            except asyncio.CancelledError:
                raise
            except Exception:  # never leave a client hanging
                log.exception("unexpected error while proxying %s %s", request.method, request.url[:200])
                self._fail(502, b'{"error":"edgecatch sidecar: internal error"}')
                return
            if not request.keep_alive:
                self._closing = True
                self.transport.close()
                return
            if not self._writable.is_set():
                await self._writable.wait()

    async def _handle(self, request: _Request) -> None:
        body = b"".join(request.body)
        if request.url.startswith(b"/edgecatch/") and self.proxy.local_handler is not None:
            answer = await self.proxy.local_handler(request.method, request.url, request.headers, body)
            self.write(_response_bytes(answer.status, answer.body, answer.content_type, answer.headers,
                                       keep_alive=request.keep_alive))
            return

        observe_as: tuple[str, str] | None = None
        inject = b""
        if request.method == b"POST":
            match = _INFER_PATH.match(request.url)
            if match is not None:
                model = match.group(1).decode("utf-8", "replace")
                if self.proxy.observed_models(model):
                    observe_as = (model, (match.group(2) or b"").decode("utf-8", "replace"))
        inference_id = ""
        if observe_as is not None:
            inference_id = self.proxy.new_inference_id()
            inject = INFERENCE_ID_HEADER + b": " + inference_id.encode() + b"\r\n"

        message = self._request_head(request, len(body)) + body
        upstream = None
        try:
            for attempt in (1, 2):
                upstream, reused = await self.proxy._acquire()
                try:
                    await upstream.exchange(self, message, inject, observe_as is not None,
                                            request.method == b"HEAD", self.proxy.upstream_timeout)
                    break
                except ConnectionError:
                    # A kept-alive connection Triton closed while idle (a restart): one retry on a
                    # fresh connection, only when not a byte of the answer arrived.
                    if attempt == 2 or not reused or upstream.sent_anything:
                        raise
                    upstream.transport.close()
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            if upstream is not None:
                upstream.closed = True
                upstream.transport.close()
            if upstream is not None and upstream.sent_anything:
                # Part of the answer is already out: all we can do is end the connection.
                self._closing = True
                self.transport.close()
                return
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else "is unreachable"
            self.write(_response_bytes(
                502, b'{"error":"edgecatch sidecar: Triton %s"}' % reason.encode(), keep_alive=request.keep_alive))
            return
        self.proxy._release(upstream)
        if observe_as is not None:
            headers, response_body = upstream.take_body()
            exchange = Exchange(observe_as[0], observe_as[1], inference_id, request.headers, body,
                                upstream.status, headers, response_body)
            # After the response is on its way: observation never delays it.
            asyncio.get_running_loop().call_soon(self.proxy.on_exchange, exchange)

    @staticmethod
    def _request_head(request: _Request, body_length: int) -> bytes:
        lines = [request.method + b" " + request.url + b" HTTP/" + request.version.encode()]
        chunked = False
        for name, value in request.headers:
            lowered = name.lower()
            if lowered == b"expect":
                continue  # answered here
            if lowered == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
                continue
            lines.append(name + b": " + value)
        if chunked:
            lines.append(b"Content-Length: %d" % body_length)
        return b"\r\n".join(lines) + b"\r\n\r\n"
