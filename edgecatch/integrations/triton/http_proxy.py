"""The sidecar's HTTP/REST side: a byte-level HTTP/1.1 proxy in front of Triton.

Why not a web framework: a framework parses a request into objects and serialises a new one, which
costs time on every request and risks changing what Triton receives or the client gets back. This
proxy parses only to find message boundaries (httptools, the C parser uvicorn uses), forwards the
request line and headers as received, relays Triton's response bytes as they arrive on a pool of
persistent upstream connections, and splices exactly one header, `X-Edgecatch-Inference-Id`, into
the successful (200) responses of observed inference calls. `on_exchange` receives each observed
pair once the response has been written, and must only queue it: observation never delays an answer.

Differences from a raw TCP relay, all hop-by-hop: `Expect: 100-continue` is answered here (and not
forwarded), a chunked request body is forwarded with a Content-Length, the answer to a HEAD ends
with its head (Triton sends a body after some), an upgrade offer (`Upgrade: h2c`) is forwarded and
the connection goes on in HTTP/1.1 as Triton answers it, and requests under `/edgecatch/` are served
by edgecatch itself. A client is read at most `_MAX_QUEUED` complete requests ahead of its answers,
as Triton reads, so pipelining cannot make the sidecar hold more than that. A request that cannot be
read, or whose body is larger than allowed, is answered (400, 413) in its turn, after the answers
before it, and ends the connection; a connection is closed in stages (our side first, then what the
client still sends is read and dropped for `_LINGER_SECONDS`), so that a client still sending reads
its last answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import httptools

from edgecatch.integrations.triton.stopping import close_gracefully

__all__ = ["Exchange", "HttpProxy", "LocalResponse"]

log = logging.getLogger("edgecatch.sidecar.http")

INFERENCE_ID_HEADER = b"X-Edgecatch-Inference-Id"
#: Inference calls: `infer` is read along; `generate` / `generate_stream` (Triton's generate extension)
#: are relayed and, for an observed model, counted as unread.
_INFER_PATH = re.compile(rb"^/v2/models/([^/?]+)(?:/versions/([^/?]+))?/(infer|generate|generate_stream)(?:\?.*)?$")
_ABSOLUTE_URL = re.compile(rb"^https?://[^/?#]*", re.IGNORECASE)
_MAX_QUEUED = 2  # complete requests of a connection waiting behind the one with Triton
_LINGER_SECONDS = 2.0  # a closing connection drops what the client still sends for this long
# Idle pooled connections to Triton are closed after this long: a stopping Triton waits (up to its
# --exit-timeout-secs, 30 s by default) for every open HTTP connection, idle ones included.
_UPSTREAM_IDLE_SECONDS = 2.0


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

LocalPrecheck = Callable[[bytes, bytes, list[tuple[bytes, bytes]]], "LocalResponse | int"]
"""(method, url, headers) -> for a request under /edgecatch/ once its headers are in: an answer
given without its body (which is then skipped as it arrives, never held: a client without the
token cannot make the sidecar read and keep a large upload), or the most body bytes the route takes
(more: 413)."""

_TOO_LARGE = b'{"error":"request body larger than the sidecar accepts"}'

_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            409: b"Conflict", 413: b"Payload Too Large", 502: b"Bad Gateway", 503: b"Service Unavailable",
            500: b"Internal Server Error"}


def _response_bytes(status: int, body: bytes, content_type: bytes = b"application/json",
                    extra: tuple[tuple[bytes, bytes], ...] = (), keep_alive: bool = True,
                    head_only: bool = False) -> bytes:
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown")),
            b"Content-Type: " + content_type, b"Content-Length: %d" % len(body)]
    head += [name + b": " + value for name, value in extra]
    if not keep_alive:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + (b"" if head_only else body)


def _origin_form(url: bytes) -> bytes:
    """The path (and query) of a request target, also when a client sends it in absolute form."""
    if url[:1] == b"/":
        return url
    match = _ABSOLUTE_URL.match(url)
    return (url[match.end():] or b"/") if match else url


class _Request:
    __slots__ = ("method", "url", "headers", "body", "keep_alive", "version", "awaits_continue", "early",
                 "early_sent", "limit", "resumed")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = True
        self.version = "1.1"
        self.awaits_continue = False  # sent `Expect: 100-continue`, not yet answered with 100
        self.early: LocalResponse | None = None  # an edgecatch route's answer decided from the headers
        self.early_sent = False  # ... and already written, before the body
        self.limit: int | None = None  # an edgecatch route's own body limit
        self.resumed = False  # an upgrade offer whose body is read by a new parser

    @property
    def head_only(self) -> bool:
        return self.method == b"HEAD"


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
        on_unparsed: Callable[[str], None] = lambda reason: None,
        on_repository_change: Callable[[], None] = lambda: None,
        local_handler: LocalHandler | None = None,
        local_precheck: LocalPrecheck | None = None,
        max_request_bytes: int = 256 * 1024 * 1024,
        max_idle_upstream: int = 64,
        upstream_timeout: float = 600.0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.observed_models = observed_models
        self.new_inference_id = new_inference_id
        self.on_exchange = on_exchange
        self.on_unparsed = on_unparsed
        self.on_repository_change = on_repository_change  # a model load/unload call passes through
        self.local_handler = local_handler
        self.local_precheck = local_precheck
        self.max_request_bytes = max_request_bytes
        self.max_idle_upstream = max_idle_upstream
        self.upstream_timeout = upstream_timeout
        self._idle: deque[_Upstream] = deque()
        self._server: asyncio.base_events.Server | None = None
        self._names: dict[bytes, str] = {}  # model names as they appear in URLs, decoded
        self._busy: set[_Upstream] = set()  # exchanges in progress, watched for the timeout
        self._clients: set[_Client] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), host, port, reuse_address=True)
        self._watch()
        return self._server.sockets[0].getsockname()[1]

    def _watch(self) -> None:
        # One timer for all exchanges (checked every second or so) instead of one timer per request.
        loop = asyncio.get_running_loop()
        now = loop.time()
        for upstream in [u for u in self._busy if u.deadline <= now]:
            upstream.timed_out()
        idle, stale = self._idle, time.monotonic() - _UPSTREAM_IDLE_SECONDS
        while idle and idle[0].idle_since <= stale:  # the oldest first: the pool is used last in, first out
            upstream = idle.popleft()
            upstream.closed = True
            upstream.transport.close()
        self._watchdog = loop.call_later(min(1.0, self.upstream_timeout / 4), self._watch)

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting connections, answer the requests already read (for up to `grace` seconds:
        no new ones are read), then close every connection."""
        await close_gracefully(self._server, self._clients, grace)
        if self._watchdog is not None:
            self._watchdog.cancel()
        while self._idle:
            self._idle.popleft().transport.close()

    def _model(self, raw: bytes) -> tuple[str, bool]:
        """(model name, observed?) for a model name as it appears in the URL. Whether it is observed
        is asked each time (it changes: a model reloaded as decoupled); the decoded name is kept."""
        name = self._names.get(raw)
        if name is None:
            name = unquote_to_bytes(raw).decode("utf-8", "replace")
            if len(self._names) < 1024:  # names come from clients: never grow without bound
                self._names[raw] = name
        return name, self.observed_models(name)

    def _idle_upstream(self) -> _Upstream | None:
        while self._idle:
            upstream = self._idle.pop()
            if not upstream.closed:
                return upstream
        return None

    def _release(self, upstream: _Upstream) -> None:
        if upstream.closed or not upstream.keep_alive or len(self._idle) >= self.max_idle_upstream:
            upstream.closed = True
            upstream.transport.close()
        else:
            upstream.idle_since = time.monotonic()
            self._idle.append(upstream)


class _Pending:
    """A request on its way to Triton: what is needed to send it, retry it once, and observe it."""

    __slots__ = ("request", "message", "inject", "observe_as", "inference_id", "body", "reused", "repository")

    def __init__(self, request: _Request, message: list[bytes], inject: bytes, observe_as: tuple[str, str] | None,
                 inference_id: str, body: bytes) -> None:
        self.request = request
        self.message = message  # the head and the body, written without joining them
        self.inject = inject
        self.observe_as = observe_as
        self.inference_id = inference_id
        self.body = body
        self.reused = False
        self.repository = False  # a model load or unload: reported when sent and when answered


class _Upstream(asyncio.Protocol):
    """One persistent connection to Triton; carries one exchange at a time, driven by callbacks."""

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self._parser = httptools.HttpResponseParser(self)
        self._client: _Client | None = None
        self._pending: _Pending | None = None
        self._inject = b""
        self._head = b""  # response bytes held until the end of the head, where the id is spliced
        self._head_sent = True
        self._keep_body = False
        self._body: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_only = False
        self._head_done = False  # a HEAD answer's head has been parsed: the exchange ends there
        self.deadline = 0.0  # loop time after which the exchange in progress times out
        self.idle_since = 0.0  # time.monotonic() when it went back to the pool
        self.status = 0
        self.sent_anything = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._client is not None:
            self._fail(ConnectionError("upstream closed the connection"))

    def pause_writing(self) -> None:  # Triton reads slowly: stop reading the client
        if self._client is not None:
            self._client.hold_reading(True)

    def resume_writing(self) -> None:
        if self._client is not None:
            self._client.hold_reading(False)

    def send(self, client: _Client, pending: _Pending) -> None:
        self._client = client
        self._pending = pending
        self._inject = pending.inject
        self._head = b""
        self._head_sent = False
        self._keep_body = pending.observe_as is not None
        self._body = []
        self._headers = []
        self._head_only = pending.request.method == b"HEAD"
        self.sent_anything = False
        self.deadline = asyncio.get_running_loop().time() + self.proxy.upstream_timeout
        self.proxy._busy.add(self)
        self.transport.writelines(pending.message)

    def timed_out(self) -> None:
        if self._client is not None:
            self.closed = True
            self._fail(asyncio.TimeoutError())
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        client = self._client
        if client is None:
            self.closed = True  # bytes nobody asked for: this connection cannot be trusted again
            self.transport.close()
            return
        if self._head_sent:
            client.write(data)
        else:
            head = self._head + data if self._head else data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
            else:
                self._head = b""
                self._head_sent = True
                self.sent_anything = True
                inject = self._inject
                if self._head_only:
                    client.write(head[:end + 4])  # an answer to HEAD is its head, whatever follows
                elif inject and head[8:13] in (b" 200 ", b" 200\r"):  # an id only for a prediction
                    client.write(head[:end + 2] + inject + head[end + 2:])
                else:
                    client.write(head)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.closed = True
            self.transport.close()
            if self._client is not None:
                self._fail(ConnectionError(f"bad response from upstream: {exc}"))
            return
        if self._head_done:  # ended here, after the parser is done with these bytes, not inside it
            self._head_done = False
            self.keep_alive = False  # the parser expects the body Content-Length announced: start afresh
            self._complete()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self._keep_body:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_only:  # a response to HEAD has no body whatever its Content-Length says
            self._head_done = True

    def on_body(self, body: bytes) -> None:
        if self._keep_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._head_only:
            self._complete()

    # outcomes
    def _detach(self) -> tuple[_Client | None, _Pending | None]:
        client, pending = self._client, self._pending
        self._client = self._pending = None
        self.proxy._busy.discard(self)
        return client, pending

    def _complete(self) -> None:
        client, pending = self._detach()
        if client is None:
            return
        if pending.observe_as is not None:
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            exchange = Exchange(pending.observe_as[0], pending.observe_as[1], pending.inference_id,
                                pending.request.headers, pending.body, self.status, self._headers, body)
            self._body, self._headers = [], []
            # The response is written already; on_exchange only queues the pair for observation.
            self.proxy.on_exchange(exchange)
        self.proxy._release(self)
        client.answered(pending)

    def _fail(self, exc: BaseException) -> None:
        sent = self.sent_anything
        client, pending = self._detach()
        if client is not None:
            client.upstream_failed(pending, exc, sent)


class _Client(asyncio.Protocol):
    """One client connection: parses requests, forwards them in order, relays the answers."""

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._current: _Request | None = None
        self._size = 0
        self._queue: deque[_Request] = deque()
        self._busy = False  # a request of this connection is with Triton (or a local handler)
        self._closing = False
        self._too_large = False
        self._failure: bytes | None = None  # the answer to an unreadable request, due after those before it
        self._linger: asyncio.TimerHandle | None = None  # the end of a staged close
        self._final_sent = False  # an answer with Connection: close was written before its turn ended
        self._paused = False  # the client does not read its answers fast enough
        self._reading = True
        self._held = False  # Triton does not read this client's request fast enough
        self._eof = False  # no more requests are read (the client half-closed, the sidecar stops, or a refusal)
        self._client_eof = False  # the client half-closed: nothing more will come from it
        self._refused = False  # a request was refused (400, 413) and the client may still be sending it
        # A request with an upgrade offer whose body is still to come, and the framing of that body
        # (see data_received); `_synthetic` while a new parser reads the head made up for it.
        self._resume: tuple[_Request, bytes] | None = None
        self._synthetic = False

    def hold_reading(self, held: bool) -> None:
        self._held = held
        self._update_reading()

    def _update_reading(self) -> None:
        reading = not self._eof and not self._held and len(self._queue) < _MAX_QUEUED
        if reading != self._reading and not self._closing:
            self._reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy._clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._queue.clear()
        self.proxy._clients.discard(self)
        if self._linger is not None:
            self._linger.cancel()

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._closing:  # the client is done too: the staged close is over
            self.transport.close()
            return True
        self.finish()
        return True  # keep the transport open to write the answers still due

    def finish(self) -> None:
        """Read no more requests; close once those already read are answered (and, last, the
        request that could not be read, if that is why)."""
        self._eof = True
        if not self._busy and not self._queue:
            self._end()
        else:
            self._update_reading()

    def _end(self) -> None:
        if self._failure is not None:
            self.write(self._failure)
            self._failure = None
        self._close()

    def abort(self) -> None:
        self._closing = True
        self._queue.clear()
        self.transport.abort()  # not close(): a client that does not read would keep it open
        self.proxy._clients.discard(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if not self._busy:
            self._next()

    def data_received(self, data: bytes) -> None:
        if self._failure is not None or self._closing:
            return  # nothing after an unreadable request is read; nothing while closing
        while data:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # An upgrade offer (`Upgrade: h2c` from curl --http2, Java's client): Triton does not
                # take it up and answers in HTTP/1.1, so parsing goes on in HTTP/1.1 with a new
                # parser. llhttp leaves the offer's body to the "new protocol": the new parser reads
                # it under a made-up head that has only the body's framing (Content-Length or
                # chunked), so that it is read, limited and skipped like any other body.
                self._parser = httptools.HttpRequestParser(self)
                data = data[exc.args[0]:]
                if self._resume is not None:
                    self._synthetic = True
                    try:
                        self._parser.feed_data(b"POST / HTTP/1.1\r\n" + self._resume[1] + b"\r\n\r\n")
                    except httptools.HttpParserError:  # cannot happen with this head; never hang on it
                        self._fail(400, b'{"error":"malformed HTTP request"}')
                        return
            except httptools.HttpParserError:
                current = self._current
                if current is not None and current.early_sent:
                    self._close()  # answered already
                elif self._too_large:
                    self._fail(413, _TOO_LARGE)
                else:
                    self._fail(400, b'{"error":"malformed HTTP request"}')
                return

    def write(self, data: bytes) -> None:
        if not self._closing:
            self.transport.write(data)

    def _fail(self, status: int, body: bytes) -> None:
        """A request that cannot be read (or is too large): answered once the answers before it are
        out (never in the middle of one), then the connection is closed; nothing after it is read."""
        if self._final_sent:  # an answer that ends the connection is out already: no second one
            self._close()
            return
        self._failure = _response_bytes(status, body, keep_alive=False)
        self._refused = True
        self.finish()

    def _close(self) -> None:
        self._closing = True
        self._queue.clear()
        transport = self.transport
        if self._client_eof or (self._eof and not self._refused) or not transport.can_write_eof():
            # Nothing more comes from the client, or the sidecar stops (reading no more, with no
            # request refused half-read): closed at once.
            transport.close()
            return
        # A staged close (RFC 9112, 9.6): end our side, then read and drop what the client still
        # sends, for a moment: closed at once, unread bytes would make the kernel send a reset, and
        # a client still sending would lose the answer it was just sent (a 401, a 413).
        transport.write_eof()
        if not self._reading:
            transport.resume_reading()
            self._reading = True
        self._linger = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._synthetic:  # the made-up head of an upgrade offer's body: that request goes on
            self._current = self._resume[0]
            self._resume = None
            return
        self._current = _Request()
        self._size = 0

    def on_url(self, url: bytes) -> None:
        if not self._synthetic:
            self._current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._synthetic:
            self._current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._synthetic:
            self._synthetic = False  # its own headers were read (and checked) already
            return
        request = self._current
        request.method = self._parser.get_method()
        request.version = self._parser.get_http_version()
        limit = self.proxy.max_request_bytes
        early: LocalResponse | None = None
        if b"/edgecatch/" in request.url and self.proxy.local_precheck is not None \
                and _origin_form(request.url).startswith(b"/edgecatch/"):
            verdict = self.proxy.local_precheck(request.method, _origin_form(request.url), request.headers)
            if isinstance(verdict, LocalResponse):
                early = verdict
            else:
                request.limit = limit = min(limit, verdict)
        if early is None and (_content_length(request) or 0) > limit:
            # Said before the body comes (an upgrade offer's body included, which on_body never sees).
            early = LocalResponse(413, _TOO_LARGE)
            request.limit = None
        if early is not None:
            request.early = early  # its body is skipped as it arrives (up to max_request_bytes), never held
            if not self._busy and not self._queue:
                # Its turn: answered at once, and the connection closed once the body has passed
                # (read, not refused: a client still sending would get a reset instead of this answer).
                self.write(_response_bytes(early.status, early.body, early.content_type, early.headers,
                                           keep_alive=False, head_only=request.head_only))
                request.early_sent = self._final_sent = True
        for name, value in request.headers:
            if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
                if request.early_sent:  # the client waits to hear whether to send its body: it need not
                    raise httptools.HttpParserError("answered without its body")
                request.awaits_continue = True
                if not self._busy and not self._queue:  # otherwise when the answers before it are out
                    self._continue(request)

    def _continue(self, request: _Request) -> None:
        request.awaits_continue = False
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        current = self._current
        if self._size > (self.proxy.max_request_bytes if current.limit is None else current.limit):
            self._too_large = True
            raise httptools.HttpParserError("body too large")  # answered with 413 in data_received
        if current.early is None:
            current.body.append(body)

    def on_message_complete(self) -> None:
        request = self._current
        if request.resumed:  # an upgrade offer's body is complete (its keep-alive was decided before)
            self._current = None
            self._queue_request(request)
            return
        request.keep_alive = self._parser.should_keep_alive() and not request.early_sent
        if self._parser.should_upgrade():
            framing = _body_framing(request)
            if framing is not None:  # its body is still to come: read in data_received
                request.resumed = True
                self._resume = (request, framing)
                return
        self._current = None
        self._queue_request(request)

    def _queue_request(self, request: _Request) -> None:
        self._queue.append(request)
        if not self._busy:
            self._next()
        self._update_reading()

    # forwarding, one request at a time per connection (HTTP/1.1 answers in order)
    def _next(self) -> None:
        while self._queue and not self._closing and not self._paused and not self._busy:
            request = self._queue.popleft()
            try:
                self._start(request)
            except Exception:  # never leave a client hanging
                log.exception("unexpected error while proxying %s %s", request.method, request.url[:200])
                self.write(_response_bytes(502, b'{"error":"edgecatch sidecar: internal error"}', keep_alive=False))
                self._close()
                return
        if self._closing:
            return
        if self._failure is not None and not self._busy and not self._queue:
            self._end()
            return
        current = self._current
        if not self._busy and not self._queue and current is not None and current.awaits_continue:
            if current.early is not None:  # refused from its headers: the client need not send its body
                early = current.early
                self.write(_response_bytes(early.status, early.body, early.content_type, early.headers,
                                           keep_alive=False, head_only=current.head_only))
                self._close()
                return
            self._continue(current)  # its turn has come
        if self._eof and not self._busy and not self._queue:
            self._close()
            return
        self._update_reading()

    def _start(self, request: _Request) -> None:
        parts = request.body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        path = _origin_form(request.url)
        if path.startswith(b"/edgecatch/") and self.proxy.local_handler is not None:
            self._busy = True
            asyncio.get_running_loop().create_task(self._local(request, path, body))
            return
        observe_as: tuple[str, str] | None = None
        inference_id = ""
        inject = b""
        repository = False
        if request.method == b"POST":
            repository = path.startswith(b"/v2/repository/models/")  # a model load or unload
            if repository:
                self.proxy.on_repository_change()
            match = _INFER_PATH.match(path)
            if match is not None:
                model, observed = self.proxy._model(match.group(1))
                if observed and match.group(3) != b"infer":
                    self.proxy.on_unparsed("http_generate")
                elif observed:
                    observe_as = (model, (match.group(2) or b"").decode("utf-8", "replace"))
                    inference_id = self.proxy.new_inference_id()
                    inject = b"%s: %s\r\n" % (INFERENCE_ID_HEADER, inference_id.encode())
        pending = _Pending(request, [_request_head(request, len(body)), body], inject, observe_as, inference_id,
                           body)
        pending.repository = repository
        self._busy = True
        self._send(pending)

    def _send(self, pending: _Pending) -> None:
        upstream = self.proxy._idle_upstream()
        if upstream is not None:
            pending.reused = True
            upstream.send(self, pending)
        else:
            pending.reused = False
            asyncio.get_running_loop().create_task(self._connect_and_send(pending))

    async def _connect_and_send(self, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(proxy), proxy.upstream_host,
                                                       proxy.upstream_port)
        except OSError as exc:
            self.upstream_failed(pending, exc, False)
            return
        if self._closing:
            proxy._release(upstream)
            return
        upstream.send(self, pending)

    async def _local(self, request: _Request, path: bytes, body: bytes) -> None:
        if request.early_sent:
            self.answered_request(request)
            return
        try:
            answer = request.early or await self.proxy.local_handler(request.method, path, request.headers, body)
            self.write(_response_bytes(answer.status, answer.body, answer.content_type, answer.headers,
                                       keep_alive=request.keep_alive, head_only=request.head_only))
        except Exception:
            log.exception("edgecatch route %s failed", path[:200])
            self.write(_response_bytes(500, b'{"error":"edgecatch sidecar: internal error"}',
                                       keep_alive=request.keep_alive, head_only=request.head_only))
        self.answered_request(request)

    def answered(self, pending: _Pending) -> None:
        if pending.repository:  # Triton answers a load once the model is loaded: its config may be new
            self.proxy.on_repository_change()
        self.answered_request(pending.request)

    def answered_request(self, request: _Request) -> None:
        self._busy = False
        self._held = False  # whatever held the client's reading was this request's
        if not request.keep_alive:
            self._close()
            return
        self._next()

    def upstream_failed(self, pending: _Pending, exc: BaseException, sent_anything: bool) -> None:
        if self._closing:
            self._busy = False
            return
        if isinstance(exc, ConnectionError) and pending.reused and not sent_anything:
            # A kept-alive connection Triton closed while idle (a restart): one retry on a fresh
            # connection, only when not a byte of the answer arrived.
            pending.reused = False
            asyncio.get_running_loop().create_task(self._connect_and_send(pending))
            return
        if sent_anything:
            self._close()  # part of the answer is already out: all we can do is end the connection
            return
        reason = b"timed out" if isinstance(exc, asyncio.TimeoutError) else b"is unreachable"
        self.write(_response_bytes(502, b'{"error":"edgecatch sidecar: Triton %s"}' % reason,
                                   keep_alive=pending.request.keep_alive, head_only=pending.request.head_only))
        self.answered(pending)


def _body_framing(request: _Request) -> bytes | None:
    """The header that frames a request's body (chunked, or a Content-Length above 0), or None."""
    for name, value in request.headers:
        if len(name) == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            return b"Transfer-Encoding: chunked"
    length = _content_length(request)
    return b"Content-Length: %d" % length if length else None


def _content_length(request: _Request) -> int | None:
    for name, value in request.headers:
        if len(name) == 14 and name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _request_head(request: _Request, body_length: int) -> bytes:
    """The request line and headers as received, minus what this hop answers itself."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.url, request.version.encode())]
    chunked = False
    for name, value in request.headers:
        if len(name) == 6 and name.lower() == b"expect":
            continue  # answered here
        if len(name) == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
            continue
        lines.append(b"%s: %s" % (name, value))
    if chunked:
        lines.append(b"Content-Length: %d" % body_length)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
