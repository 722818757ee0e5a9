"""The byte-level HTTP proxy against a real HTTP server on 127.0.0.1 (the Triton tests come later).

An aiohttp server stands in for the upstream here only to exercise HTTP mechanics Triton rarely
shows (chunked answers, HEAD, slow bodies, abrupt closes); transparency against the real Triton is
tested in test_sidecar_triton.py.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import web

from edgecatch.integrations.triton import http_proxy
from edgecatch.integrations.triton.http_proxy import Exchange, HttpProxy, LocalResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def upstream_app() -> web.Application:
    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=b'{"echo":%d}' % len(body), content_type="application/json",
                            headers={"X-Upstream": "1"})

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"alpha-", b"beta-", b"gamma"):
            await response.write(part)
        await response.write_eof()
        return response

    async def error(request: web.Request) -> web.Response:
        return web.Response(status=400, body=b'{"error":"unknown model"}', content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200, body=b"")

    async def refused_infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, body=b'{"error":"unexpected shape"}', content_type="application/json")

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"text_output":"x"}', content_type="application/json")

    async def slow_infer(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(0.2)
        return web.Response(body=b'{"echo":%d}' % len(body), content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v2/models/slow/infer", slow_infer)
    app.router.add_post("/v2/models/refused/infer", refused_infer)
    app.router.add_post("/v2/models/{name}/generate", generate)
    app.router.add_post("/v2/models/{name}/generate_stream", generate)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{v}/infer", infer)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/v2/models/{name}/error", error)
    app.router.add_route("*", "/v2/health/ready", health)
    return app


@pytest.fixture
def harness():
    loop = asyncio.new_event_loop()
    exchanges: list[Exchange] = []
    ids = iter(f"id-{n}" for n in range(10_000))

    local_bodies: list[bytes] = []
    unparsed: list[str] = []

    async def local(method, url, headers, body):
        local_bodies.append(body)
        return LocalResponse(200, b'{"local":true}')

    def precheck(method, url, headers):
        # as the sidecar's feedback route: a token from the headers, and a route's own body limit
        if url.startswith(b"/edgecatch/feedback") and (b"authorization", b"Bearer t") not in \
                [(name.lower(), value) for name, value in headers]:
            return LocalResponse(401, b'{"error":"token"}')
        return 1000

    async def setup():
        runner = web.AppRunner(await upstream_app())
        await runner.setup()
        up_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", up_port).start()
        proxy = HttpProxy("127.0.0.1", up_port, observed_models=lambda m: m in ("seen", "refused"),
                          new_inference_id=lambda: next(ids), on_exchange=exchanges.append,
                          on_unparsed=unparsed.append, local_handler=local, local_precheck=precheck, max_request_bytes=1024 * 1024)
        port = await proxy.start("127.0.0.1", 0)
        return runner, proxy, port, up_port

    runner, proxy, port, up_port = loop.run_until_complete(setup())

    class H:
        pass

    h = H()
    h.loop, h.port, h.up_port, h.exchanges, h.proxy = loop, port, up_port, exchanges, proxy
    h.local_bodies = local_bodies
    h.unparsed = unparsed
    yield h
    loop.run_until_complete(proxy.close())
    loop.run_until_complete(runner.cleanup())
    loop.close()


def raw_exchange(h, data: bytes, read_until_close: bool = True) -> bytes:
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(data)
        await writer.drain()
        out = await asyncio.wait_for(reader.read(-1), 10) if read_until_close else await reader.read(65536)
        writer.close()
        return out

    return h.loop.run_until_complete(go())


def test_observed_infer_gets_the_id_header_and_is_handed_over(harness):
    body = b'{"inputs":[]}'
    out = raw_exchange(harness, b"POST /v2/models/seen/versions/2/infer HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    head, _, payload = out.partition(b"\r\n\r\n")
    assert payload == b'{"echo":13}'
    assert b"\r\nX-Edgecatch-Inference-Id: id-0\r\n" in head + b"\r\n"
    assert b"X-Upstream: 1" in head
    harness.loop.run_until_complete(asyncio.sleep(0.01))
    (exchange,) = harness.exchanges
    assert (exchange.model, exchange.version, exchange.inference_id) == ("seen", "2", "id-0")
    assert exchange.request_body == body and exchange.response_body == b'{"echo":13}'
    assert exchange.status == 200


def test_an_observed_call_that_triton_refuses_carries_no_id(harness):
    """No prediction, so no id a client could send a verdict on (gRPC adds one only on success too)."""
    out = raw_exchange(harness, b"POST /v2/models/refused/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                       b"Connection: close\r\n\r\n{}")
    assert out.startswith(b"HTTP/1.1 400 ") and out.endswith(b'{"error":"unexpected shape"}')
    assert b"X-Edgecatch" not in out


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_generate_calls_to_observed_models_are_relayed_and_counted_unread(harness, route):
    call = b"POST /v2/models/%s/%s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    out = raw_exchange(harness, call % (b"seen", route.encode()))
    assert out.endswith(b'{"text_output":"x"}') and b"X-Edgecatch" not in out
    raw_exchange(harness, call % (b"other", route.encode()))
    harness.loop.run_until_complete(asyncio.sleep(0.01))
    assert harness.unparsed == ["http_generate"] and harness.exchanges == []


def test_unobserved_models_pass_untouched(harness):
    out = raw_exchange(harness, b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                       b"Connection: close\r\n\r\n{}")
    assert b"X-Edgecatch" not in out and out.endswith(b'{"echo":2}')
    assert harness.exchanges == []


def test_keep_alive_pipelined_requests_answered_in_order(harness):
    one = b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
    two = b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    three = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(harness, one + two + three)
    assert out.count(b"HTTP/1.1 200") == 3
    assert out.index(b'{"echo":1}') < out.index(b'{"echo":3}')


def test_chunked_response_relayed_as_is(harness):
    out = raw_exchange(harness, b"GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in out
    assert out.endswith(b"6\r\nalpha-\r\n5\r\nbeta-\r\n5\r\ngamma\r\n0\r\n\r\n")


def test_chunked_request_forwarded_with_length(harness):
    out = raw_exchange(harness, b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert out.endswith(b'{"echo":5}')


def test_head_request_does_not_hang(harness):
    out = raw_exchange(harness, b"HEAD /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 2


def test_expect_continue_answered(harness):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"data")
        rest = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        return interim, rest

    interim, rest = harness.loop.run_until_complete(go())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.endswith(b'{"echo":4}')


def test_upstream_errors_pass_through(harness):
    out = raw_exchange(harness, b"GET /v2/models/x/error HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and out.endswith(b'{"error":"unknown model"}')


def test_local_routes_are_served_by_edgecatch(harness):
    out = raw_exchange(harness, b"GET /edgecatch/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b'{"local":true}')


def test_edgecatch_routes_answer_from_the_headers_without_holding_the_body(harness):
    """No token: answered from the headers alone, before the body is sent; the body is then read
    and skipped (a client still sending gets to read the answer, not a reset) and the connection
    closed. Behind another request of the connection: the body is skipped as it arrives (never
    held, the local handler never called) and answered in turn, the connection still in step. A
    body over the route's own limit: 413, though it is under max_request_bytes."""
    async def answered_before_the_body():
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b'{"error":"token"}'), 10)
        writer.write(b"x" * 900000)
        rest = await asyncio.wait_for(reader.read(-1), 10)  # closed once the body has passed
        writer.close()
        return answer, rest

    answer, rest = harness.loop.run_until_complete(answered_before_the_body())
    assert answer.startswith(b"HTTP/1.1 401") and b"Connection: close" in answer and rest == b""
    assert harness.local_bodies == []
    expecting = raw_exchange(harness, b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n"
                                      b"Expect: 100-continue\r\n\r\n")  # told not to send its body: closed
    assert expecting.startswith(b"HTTP/1.1 401") and b"100 Continue" not in expecting

    big = b"x" * (900 * 1024)
    out = raw_exchange(harness, b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                       b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big +
                       b"GET /edgecatch/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = out.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"401", b"200"]
    assert answers[0].endswith(b'{"echo":2}') and answers[2].endswith(b'{"local":true}')
    assert harness.local_bodies == [b""]  # only the healthz request reached the handler

    over = b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: 1001\r\n\r\n"
    assert raw_exchange(harness, over + b"x" * 1001).startswith(b"HTTP/1.1 413")
    chunked = b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n" \
        b"Transfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"y" * 512 + b"\r\n" + b"200\r\n" + b"y" * 512 + b"\r\n0\r\n\r\n"
    assert raw_exchange(harness, chunked).startswith(b"HTTP/1.1 413")
    fits = b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: 5\r\n" \
        b"Connection: close\r\n\r\nhello"
    assert raw_exchange(harness, fits).startswith(b"HTTP/1.1 200") and harness.local_bodies[-1] == b"hello"


def test_a_body_announced_too_large_is_refused_before_it_comes_upgrade_offer_or_not(harness):
    """413 from the Content-Length, before the body is sent; then the body is skipped (not held),
    also for a request with an upgrade offer, whose body the parser leaves to the proxy."""
    async def announce(extra: bytes) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(b"POST /v2/models/seen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n" + extra +
                     b"\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"accepts\"}"), 10)
        try:
            writer.write(b"x" * 3_000_000)
            await writer.drain()
        except ConnectionError:
            pass  # closed after max_request_bytes of it
        try:
            rest = await asyncio.wait_for(reader.read(-1), 10)
        except ConnectionError:
            rest = b""  # a reset: the client was still sending past max_request_bytes
        writer.close()
        return answer, rest

    for extra in (b"", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"):
        answer, rest = harness.loop.run_until_complete(announce(extra))
        assert answer.startswith(b"HTTP/1.1 413") and b"Connection: close" in answer and rest == b"", extra
        harness.loop.run_until_complete(asyncio.sleep(0.2))  # the client's close reaches the proxy
        assert harness.exchanges == [] and not harness.proxy._clients


def test_a_refused_request_waiting_for_100_continue_behind_another_is_not_told_to_send(harness):
    out = raw_exchange(harness, b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                       b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n"
                       b"Expect: 100-continue\r\n\r\n")
    assert [a[:3] for a in out.split(b"HTTP/1.1 ")[1:]] == [b"200", b"401"] and b"100 Continue" not in out


UPGRADE_OFFER = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
SLOW = b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_a_client_still_sending_a_refused_body_reads_its_413(harness):
    """A chunked body found too large mid-way is refused while the client is still sending it: the
    proxy must keep reading (and dropping) what comes after its 413, or the kernel answers the late
    bytes with a reset and the client never reads why it was refused."""
    import socket

    def go():
        with socket.create_connection(("127.0.0.1", harness.port)) as sock:
            sock.sendall(b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"110000\r\n" + b"C" * 0x108000)
            time.sleep(0.3)  # the proxy has refused it by now, and goes on reading what comes
            for _ in range(8):  # more than the socket buffers hold: a closed socket would reset it
                sock.sendall(b"C" * 0x40000)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    out = harness.loop.run_until_complete(harness.loop.run_in_executor(None, go))
    assert out.startswith(b"HTTP/1.1 413 ")


def test_framing_found_by_fuzzing_stays_in_step(harness):
    """Sequences a randomized test sent through the proxy (one final answer per request, in order,
    never inside another answer, and a closing answer read by the client, not reset)."""
    def statuses(out: bytes) -> list[bytes]:
        return [answer[:3] for answer in out.split(b"HTTP/1.1 ")[1:]]

    # An upgrade offer with a chunked body: the body is read and forwarded (with its length).
    out = raw_exchange(harness, b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\n" + UPGRADE_OFFER +
                       b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert statuses(out) == [b"200"] and out.endswith(b'{"echo":5}')
    # Too large, behind an answer in progress (with an upgrade offer, or chunked behind a streamed
    # answer): the 413 comes after that answer, whole.
    out = raw_exchange(harness, SLOW + b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\n" + UPGRADE_OFFER +
                       b"Content-Length: 2000000\r\n\r\n" + b"B" * 1_100_000)
    assert statuses(out) == [b"200", b"413"] and b'{"echo":2}HTTP/1.1 413' in out
    out = raw_exchange(harness, b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"110000\r\n" + b"C" * 0x110000 + b"\r\n0\r\n\r\n")
    assert statuses(out) == [b"200", b"413"] and b"gamma\r\n0\r\n\r\nHTTP/1.1 413" in out
    # Answered from its headers with the connection closing: nothing after it gets a second answer,
    # and pipelined uploads behind it do not turn the close into a reset.
    unauthorised = b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    assert statuses(raw_exchange(harness, unauthorised + b"GARBAGE\r\n\r\n")) == [b"401"]
    upload = b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n" + b"e" * 60000
    assert statuses(raw_exchange(harness, unauthorised + upload * 6)) == [b"401"]


def test_malformed_and_oversized_requests(harness):
    assert raw_exchange(harness, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
    big = b"x" * (1024 * 1024 + 10)
    out = raw_exchange(harness, b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                       % len(big) + big)
    assert out.startswith(b"HTTP/1.1 413")


def test_upstream_down_gives_502_then_recovers(harness):
    async def stop_and_restart():
        await harness.proxy.close()
        # Point the proxy at a port where nothing listens.
        harness.proxy.upstream_port = free_port()
        harness.port = await harness.proxy.start("127.0.0.1", 0)

    harness.loop.run_until_complete(stop_and_restart())
    out = raw_exchange(harness, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 502")
    harness.proxy.upstream_port = harness.up_port
    out = raw_exchange(harness, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")


def test_slow_upstream_times_out_with_502():
    async def run():
        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(1)  # past the proxy's 0.2 s timeout
            return web.Response(body=b"late")

        app = web.Application()
        app.router.add_get("/slow", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        up_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", up_port).start()
        proxy = HttpProxy("127.0.0.1", up_port, observed_models=lambda m: False, new_inference_id=lambda: "x",
                          on_exchange=lambda e: None, upstream_timeout=0.2)
        port = await proxy.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        writer.close()
        await proxy.close()
        await runner.cleanup()
        return answer

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 502") and answer.endswith(b'{"error":"edgecatch sidecar: Triton timed out"}')


def test_a_client_that_does_not_read_its_answers_is_not_read_either(harness):
    # Triton reads a few requests ahead of its answers, then stops reading; so must the sidecar, or
    # a pipelining client makes it hold everything it sends.
    body = b"x" * 900_000
    one = b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    count = 60

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.transport.set_write_buffer_limits(high=1 << 30)
        writer.write(one * count)
        await asyncio.sleep(1.0)  # the proxy reads what it takes; Triton stand-in answers every 0.2 s
        accepted = len(one) * count - writer.transport.get_write_buffer_size()
        writer.close()
        await asyncio.sleep(1.0)  # what the proxy had read finishes before the loop closes
        return accepted

    accepted = harness.loop.run_until_complete(go())
    # 2 queued + 1 with the upstream + 5 answered in that second, plus what the kernel's socket
    # buffers hold on the way (a few MB on loopback), against 54 MB sent
    assert accepted < 25 * len(one), accepted / len(one)


class _LaxUpstream:
    """An upstream that answers every request with a body, HEAD included (as Triton does for HEAD on
    its endpoints: 405 and a JSON error), and echoes the request line in the body otherwise."""

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                length = 0
                for header in head.split(b"\r\n")[1:]:
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                await reader.readexactly(length)
                if line.startswith(b"HEAD "):
                    body, status = b'{"error":"Method not allowed"}', b"405 Method Not Allowed"
                else:
                    body, status = b'{"line":"%s"}' % line, b"200 OK"
                writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % (status, len(body)) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


def test_head_answers_end_with_their_head_and_pipelining_after_them_stays_in_step():
    async def run():
        upstream = _LaxUpstream()
        up_port = await upstream.start()
        exchanges: list[Exchange] = []
        ids = iter(f"id-{n}" for n in range(100))
        proxy = HttpProxy("127.0.0.1", up_port, observed_models=lambda m: m == "seen",
                          new_inference_id=lambda: next(ids), on_exchange=exchanges.append)
        port = await proxy.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        infer = b"POST /v2/models/seen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        writer.write(b"HEAD /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n" + infer + infer +
                     b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        await proxy.close()
        upstream.server.close()
        return out, exchanges

    out, exchanges = asyncio.run(run())

    def answer(line: bytes, inference_id: bytes = b"") -> bytes:
        body = b'{"line":"%s"}' % line
        extra = b"X-Edgecatch-Inference-Id: %s\r\n" % inference_id if inference_id else b""
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
            len(body), extra, body)

    infer_line = b"POST /v2/models/seen/infer HTTP/1.1"
    assert out == (b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n"
                   + answer(infer_line, b"id-0") + answer(infer_line, b"id-1") +
                   answer(b"GET /v2/health/live HTTP/1.1"))
    assert [(e.inference_id, e.response_body) for e in exchanges] == [
        (f"id-{n}", b'{"line":"%s"}' % infer_line) for n in range(2)]


def test_local_answers_to_head_have_no_body(harness):
    out = raw_exchange(harness, b"HEAD /edgecatch/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"GET /edgecatch/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first, _, second = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 14" in first
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(b'\r\n\r\n{"local":true}')


def test_a_client_that_half_closes_after_its_requests_gets_its_answers(harness):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(b"POST /v2/models/seen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                     b"GET /edgecatch/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        out = await asyncio.wait_for(reader.read(-1), 10)  # then the proxy closes
        writer.close()
        return out

    out = harness.loop.run_until_complete(go())
    assert out.count(b"HTTP/1.1 200") == 2 and b'{"echo":2}' in out and out.endswith(b'{"local":true}')


def test_upgrade_offers_are_answered_in_http_1_1(harness):
    offer = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    out = raw_exchange(harness, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n" + offer + b"\r\n" +
                       b"POST /v2/models/seen/infer HTTP/1.1\r\nHost: x\r\n" + offer + b"Content-Length: 5\r\n\r\nhello" +
                       b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
    assert out.count(b"HTTP/1.1 200") == 3 and b'{"echo":5}' in out and out.endswith(b'{"echo":3}')
    harness.loop.run_until_complete(asyncio.sleep(0.01))
    (exchange,) = harness.exchanges
    assert exchange.request_body == b"hello"


def test_absolute_form_request_targets_are_observed(harness):
    out = raw_exchange(harness, b"POST http://127.0.0.1:8000/v2/models/seen/infer HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert b"X-Edgecatch-Inference-Id: id-0" in out and out.endswith(b'{"echo":2}')


def test_expect_continue_waits_for_its_turn_and_is_refused_when_too_large(harness):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
                     b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b'{"echo":1}'), 5)  # the slow answer comes first
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"data")
        rest = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        refused = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        return first, interim, rest, refused

    first, interim, rest, refused = harness.loop.run_until_complete(go())
    assert first.startswith(b"HTTP/1.1 200") and b"100 Continue" not in first
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n" and rest.endswith(b'{"echo":4}')
    assert refused.startswith(b"HTTP/1.1 413") and b"100 Continue" not in refused


def test_closing_answers_the_requests_in_progress_then_closes(harness):
    async def go():
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", harness.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
        writer.write(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(harness.proxy.close(grace=5))
        answer = await asyncio.wait_for(reader.read(-1), 5)  # its answer, then the end of the connection
        idle = await asyncio.wait_for(idle_reader.read(-1), 5)
        await closing
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", harness.port)
        writer.close()
        idle_writer.close()
        return answer, idle

    answer, idle = harness.loop.run_until_complete(go())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"echo":1}')
    assert idle == b""


def test_idle_connections_to_triton_are_closed_so_a_stopping_triton_need_not_wait(monkeypatch):
    """Triton's stop waits for every open HTTP connection (30 s by default): the sidecar's pool must
    not hold idle ones for long, and still reuse a connection between requests close together."""
    monkeypatch.setattr(http_proxy, "_UPSTREAM_IDLE_SECONDS", 0.3)

    async def run():
        opened, ended = [], []

        async def triton(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            opened.append(time.monotonic())
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except asyncio.IncompleteReadError:  # the proxy closed the connection
                ended.append(time.monotonic())

        server = await asyncio.start_server(triton, "127.0.0.1", 0)
        proxy = HttpProxy("127.0.0.1", server.sockets[0].getsockname()[1], observed_models=lambda m: False,
                          new_inference_id=lambda: "x", on_exchange=lambda e: None, upstream_timeout=0.4)
        port = await proxy.start("127.0.0.1", 0)
        for _ in range(3):  # one client connection each, 50 ms apart: one connection to Triton
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
            await asyncio.sleep(0.05)
        assert len(opened) == 1 and ended == []
        for _ in range(50):
            if ended:
                break
            await asyncio.sleep(0.1)
        await proxy.close()
        server.close()
        return opened, ended

    opened, ended = asyncio.run(run())
    assert len(ended) == 1 and ended[0] - opened[0] < 2.0
