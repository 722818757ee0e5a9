"""The byte-level HTTP proxy against a real HTTP server on 127.0.0.1 (the Triton tests come later).

An aiohttp server stands in for the upstream here only to exercise HTTP mechanics Triton rarely
shows (chunked answers, HEAD, slow bodies, abrupt closes); transparency against the real Triton is
tested in test_sidecar_triton.py.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

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

    app = web.Application(client_max_size=64 * 1024 * 1024)
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

    async def local(method, url, headers, body):
        return LocalResponse(200, b'{"local":true}')

    async def setup():
        runner = web.AppRunner(await upstream_app())
        await runner.setup()
        up_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", up_port).start()
        proxy = HttpProxy("127.0.0.1", up_port, observed_models=lambda m: m == "seen",
                          new_inference_id=lambda: next(ids), on_exchange=exchanges.append,
                          local_handler=local, max_request_bytes=1024 * 1024)
        port = await proxy.start("127.0.0.1", 0)
        return runner, proxy, port, up_port

    runner, proxy, port, up_port = loop.run_until_complete(setup())

    class H:
        pass

    h = H()
    h.loop, h.port, h.up_port, h.exchanges, h.proxy = loop, port, up_port, exchanges, proxy
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
