"""The gRPC relay's frame handling, on hand-built HTTP/2 byte streams fed in awkward pieces.

The real-Triton tests (test_sidecar_triton.py) show the relay with grpc-core at both ends; these
cover what grpc-core rarely sends: CONTINUATION frames, padding, compressed messages, messages split
over frames and reads, and a header block the relay cannot decode.
"""

from __future__ import annotations

import asyncio
import gzip
import struct

import hpack
import pytest
from tritonclient.grpc import service_pb2

from edgecatch.integrations.triton.grpc_proxy import (
    MODEL_INFER, MODEL_STREAM_INFER, GrpcExchange, GrpcProxy, _Downstream, _Messages, _Upstream)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, DATA, CONTINUATION, SETTINGS, PING = 0x1, 0x0, 0x9, 0x4, 0x6
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def message(body: bytes, compressed: bool = False) -> bytes:
    if compressed:
        body = gzip.compress(body)
    return bytes((1 if compressed else 0,)) + struct.pack(">I", len(body)) + body


def infer_request(model: str, request_id: str = "") -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x03\x00\x00\x00abc")
    return request.SerializeToString()


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 3], "big")
        kind, flags = data[offset + 3], data[offset + 4]
        stream = struct.unpack(">I", data[offset + 5:offset + 9])[0]
        out.append((kind, flags, stream, data[offset + 9:offset + 9 + length]))
        offset += 9 + length
    return out


class Wire:
    """A transport stand-in: collects what the relay writes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Relay:
    def __init__(self, observed: set[str], **options) -> None:
        self.exchanges: list[GrpcExchange] = []
        self.unparsed: list[str] = []
        ids = iter(f"w1-{n:016x}" for n in range(100))
        self.proxy = GrpcProxy("127.0.0.1:1", observed_models=lambda m: m in observed,
                               new_inference_id=lambda: next(ids), on_exchange=self.exchanges.append,
                               on_unparsed=self.unparsed.append, **options)
        self.down = _Downstream(self.proxy)
        self.down.transport = Wire()
        self.up = _Upstream(self.down)
        self.up.transport = Wire()
        self.down.upstream = self.up

    def client_sends(self, data: bytes, piece: int) -> None:
        for start in range(0, len(data), piece):
            self.down.data_received(data[start:start + piece])

    def triton_sends(self, data: bytes, piece: int) -> None:
        for start in range(0, len(data), piece):
            self.up.data_received(data[start:start + piece])


def client_stream(encoder: hpack.Encoder, stream: int, path: bytes, body: bytes, split_headers: bool) -> bytes:
    block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path.decode()),
                            (":authority", "triton"), ("content-type", "application/grpc"), ("te", "trailers"),
                            ("x-custom", "1" * 50)])
    if split_headers:
        out = frame(HEADERS, 0, stream, block[:10]) + frame(CONTINUATION, 0, stream, block[10:20]) + \
            frame(CONTINUATION, END_HEADERS, stream, block[20:])
    else:
        out = frame(HEADERS, END_HEADERS, stream, block)
    half = len(body) // 2
    padded = bytes((3,)) + body[half:] + b"\x00\x00\x00"
    return out + frame(DATA, 0, stream, body[:half]) + frame(DATA, END_STREAM | PADDED, stream, padded)


def triton_stream(encoder: hpack.Encoder, stream: int, body: bytes, status: str = "0") -> bytes:
    head = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    trailers = encoder.encode([("grpc-status", status), ("grpc-message", "")])
    return frame(HEADERS, END_HEADERS, stream, head) + frame(DATA, 0, stream, body) + \
        frame(HEADERS, END_HEADERS | END_STREAM, stream, trailers)


@pytest.mark.parametrize("piece", [1, 7, 64, 100_000])
def test_unary_calls_relay_unchanged_but_for_the_id_in_the_trailers(piece):
    async def run():
        relay = Relay({"seen"})
        client_enc, triton_enc = hpack.Encoder(), hpack.Encoder()
        request_seen, request_other = infer_request("seen"), infer_request("other")
        response = service_pb2.ModelInferResponse(model_name="seen").SerializeToString()
        sent = PREFACE + frame(SETTINGS, 0, 0, b"") + \
            client_stream(client_enc, 1, MODEL_INFER, message(request_seen), split_headers=True) + \
            client_stream(client_enc, 3, MODEL_INFER, message(request_other), split_headers=False) + \
            client_stream(client_enc, 5, MODEL_INFER, message(request_seen, compressed=True), split_headers=False) + \
            client_stream(client_enc, 7, b"/inference.GRPCInferenceService/ServerLive", message(b""), False) + \
            frame(PING, 0, 0, b"12345678")
        relay.client_sends(sent, piece)
        assert relay.up.transport.data == sent  # client -> Triton: byte for byte

        answer = frame(SETTINGS, 0, 0, b"") + triton_stream(triton_enc, 1, message(response)) + \
            triton_stream(triton_enc, 3, message(response)) + triton_stream(triton_enc, 5, message(response)) + \
            triton_stream(triton_enc, 7, message(b""))
        relay.triton_sends(answer, piece)
        await asyncio.sleep(0)

        got, expected = frames(relay.down.transport.data), frames(answer)
        assert len(got) == len(expected)
        decoder = hpack.Decoder()
        ids = {}
        for (kind, flags, stream, payload), (kind2, flags2, stream2, payload2) in zip(got, expected):
            assert (kind, flags, stream) == (kind2, flags2, stream2)
            if kind != HEADERS:
                assert payload == payload2
                continue
            headers = decoder.decode(payload)  # one decoder for the whole connection: HPACK state holds
            extra = [v for k, v in headers if k == "x-edgecatch-inference-id"]
            if extra:
                ids[stream] = extra[0]
                assert payload.startswith(payload2)  # the id is appended, nothing else changes
            else:
                assert payload == payload2
        assert set(ids) == {1, 5}  # observed model, including the gzip-compressed request
        assert [e.inference_id for e in relay.exchanges] == [ids[1], ids[5]]
        assert relay.exchanges[0].request == request_seen and relay.exchanges[1].request == request_seen
        assert relay.exchanges[0].response == response
        assert relay.down.streams == {}
        assert relay.unparsed == []

    asyncio.run(run())


def test_stream_gets_one_id_in_its_headers_and_pairs_responses_with_requests():
    async def run():
        relay = Relay({"seen"})
        client_enc, triton_enc = hpack.Encoder(), hpack.Encoder()
        block = client_enc.encode([(":method", "POST"), (":path", MODEL_STREAM_INFER.decode())])
        models = ("seen", "other", "seen")
        requests = b"".join(message(infer_request(m)) for m in models)
        relay.client_sends(PREFACE + frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, requests), 5)
        responses = [stream_response(m, output=str(n)) for n, m in enumerate(models)]
        head = triton_enc.encode([(":status", "200"), ("content-type", "application/grpc")])
        answer = frame(HEADERS, END_HEADERS, 1, head) + b"".join(frame(DATA, 0, 1, message(r)) for r in responses)
        relay.triton_sends(answer, 3)
        await asyncio.sleep(0)
        (first, *rest) = frames(relay.down.transport.data)
        stream_id = dict(hpack.Decoder().decode(first[3]))["x-edgecatch-inference-id"]
        assert [e.inference_id for e in relay.exchanges] == [f"{stream_id}.0", f"{stream_id}.2"]
        assert [e.response for e in relay.exchanges] == [responses[0], responses[2]]
        assert all(e.streamed for e in relay.exchanges)
        assert b"".join(frame(*f) for f in rest) == answer[9 + len(head):]

    asyncio.run(run())


def test_undecodable_headers_leave_the_connection_relayed_blind():
    async def run():
        relay = Relay({"seen"})
        sent = PREFACE + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f") + frame(DATA, END_STREAM, 1, b"x")
        relay.client_sends(sent, 4)
        assert relay.up.transport.data == sent
        assert relay.unparsed == ["grpc_headers"] and relay.down.blind
        answer = frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x88")
        relay.triton_sends(answer, 2)
        assert relay.down.transport.data == answer

    asyncio.run(run())


def test_garbage_request_message_is_counted_and_not_observed():
    async def run():
        relay = Relay({"seen"})
        block = hpack.Encoder().encode([(":method", "POST"), (":path", MODEL_INFER.decode())])
        relay.client_sends(PREFACE + frame(HEADERS, END_HEADERS, 1, block) +
                           frame(DATA, END_STREAM, 1, message(b"\xff\xff not protobuf")), 1000)
        assert relay.unparsed == ["grpc_request"] and relay.down.streams == {}

    asyncio.run(run())


def test_a_compressed_message_is_inflated_only_up_to_the_limit():
    """A message that inflates past `max_message_bytes` (a gzip bomb: 64 MB of zeros in ~64 KB) is
    relayed byte for byte but not observed, and never held inflated; so is a message larger than the
    limit as sent, which is not held either."""
    async def run():
        relay = Relay({"seen"}, max_message_bytes=1024 * 1024)
        request = service_pb2.ModelInferRequest(model_name="seen")
        request.raw_input_contents.append(bytes(64 * 1024 * 1024))
        bomb = message(request.SerializeToString(), compressed=True)
        assert len(bomb) < 200_000
        small = message(infer_request("seen"), compressed=True)
        encoder = hpack.Encoder()
        sent = PREFACE + client_stream(encoder, 1, MODEL_INFER, bomb, split_headers=False) + \
            client_stream(encoder, 3, MODEL_INFER, small, split_headers=False)
        relay.client_sends(sent, 16384)
        assert relay.up.transport.data == sent
        assert relay.unparsed == ["grpc_request"] and set(relay.down.streams) == {3}  # the small one is read

    asyncio.run(run())


def test_an_oversized_message_keeps_the_places_of_the_others_and_is_not_held():
    messages = _Messages(max_bytes=1024 * 1024)
    small = infer_request("seen")
    big = message(bytes(3 * 1024 * 1024))
    wire = message(small) + big + message(small, compressed=True) + message(small)
    held = 0
    for start in range(0, len(wire), 65536):
        messages.feed(wire[start:start + 65536])
        held = max(held, messages.size)
    assert messages.done == [small, b"", small, small]
    assert held < 2 * 65536 and messages.parts == [] and messages.skip == 0


def test_a_stream_with_an_oversized_request_pairs_the_rest():
    async def run():
        relay = Relay({"seen"}, max_message_bytes=1024 * 1024)
        client_enc, triton_enc = hpack.Encoder(), hpack.Encoder()
        block = client_enc.encode([(":method", "POST"), (":path", MODEL_STREAM_INFER.decode())])
        oversized = service_pb2.ModelInferRequest(model_name="seen")
        oversized.raw_input_contents.append(bytes(2 * 1024 * 1024))
        requests = message(infer_request("seen")) + message(oversized.SerializeToString()) + \
            message(infer_request("seen"))
        relay.client_sends(PREFACE + frame(HEADERS, END_HEADERS, 1, block), 100)
        for start in range(0, len(requests), 16384):
            relay.client_sends(frame(DATA, 0, 1, requests[start:start + 16384]), 100_000)
        responses = [stream_response("seen", output=str(n)) for n in range(3)]
        head = triton_enc.encode([(":status", "200"), ("content-type", "application/grpc")])
        relay.triton_sends(frame(HEADERS, END_HEADERS, 1, head) +
                           b"".join(frame(DATA, 0, 1, message(r)) for r in responses), 1000)
        await asyncio.sleep(0)
        assert relay.unparsed == ["grpc_request"]
        assert [e.response for e in relay.exchanges] == [responses[0], responses[2]]
        assert [e.inference_id.rsplit(".", 1)[1] for e in relay.exchanges] == ["0", "2"]

    asyncio.run(run())


def stream_response(model: str, request_id: str = "", output: str = "0") -> bytes:
    response = service_pb2.ModelInferResponse(model_name=model, model_version="1", id=request_id)
    response.outputs.add(name=output, datatype="FP32", shape=[1])
    return service_pb2.ModelStreamInferResponse(infer_response=response).SerializeToString()


def open_stream(relay: Relay) -> tuple[hpack.Encoder, str]:
    """Stream 1 of a new connection, opened by the client and answered with headers by Triton: its id."""
    block = hpack.Encoder().encode([(":method", "POST"), (":path", MODEL_STREAM_INFER.decode())])
    relay.client_sends(PREFACE + frame(HEADERS, END_HEADERS, 1, block), 1000)
    triton_enc = hpack.Encoder()
    relay.triton_sends(frame(HEADERS, END_HEADERS, 1, triton_enc.encode([(":status", "200")])), 1000)
    (first,) = frames(relay.down.transport.data)
    return triton_enc, dict(hpack.Decoder().decode(first[3]))["x-edgecatch-inference-id"]


def test_a_burst_of_stream_requests_keeps_a_bounded_number_and_the_pairing():
    async def run():
        relay = Relay({"seen"})
        _, stream_id = open_stream(relay)
        for n in range(100):  # a burst: none answered yet
            relay.client_sends(frame(DATA, 0, 1, message(infer_request("seen", f"r{n}"))), 1000)
        (stream,) = relay.down.streams.values()
        assert stream.kept == 64 and sum(1 for *_, kept in stream.awaited if kept is not None) == 64
        assert relay.unparsed == ["grpc_stream_unanswered"] * 36
        for n in range(100):
            relay.triton_sends(frame(DATA, 0, 1, message(stream_response("seen", f"r{n}"))), 1000)
        # the first 64 are observed with their own requests; the rest are relayed only
        assert [e.inference_id for e in relay.exchanges] == [f"{stream_id}.{n}" for n in range(64)]
        assert all(service_pb2.ModelInferRequest.FromString(e.request).id ==
                   service_pb2.ModelStreamInferResponse.FromString(e.response).infer_response.id
                   for e in relay.exchanges)
        # after the burst, requests are kept again, and numbered by their place in the stream
        relay.client_sends(frame(DATA, 0, 1, message(infer_request("seen", "r100"))), 1000)
        relay.triton_sends(frame(DATA, 0, 1, message(stream_response("seen", "r100"))), 1000)
        assert relay.exchanges[-1].inference_id == f"{stream_id}.100" and stream.kept == 0

    asyncio.run(run())


def test_an_error_answer_takes_its_request_place_in_the_stream():
    async def run():
        relay = Relay({"seen"})
        _, stream_id = open_stream(relay)
        relay.client_sends(b"".join(frame(DATA, 0, 1, message(infer_request(m))) for m in ("nope", "seen")), 1000)
        refused = service_pb2.ModelStreamInferResponse(error_message="unknown model").SerializeToString()
        relay.triton_sends(frame(DATA, 0, 1, message(refused)) +
                           frame(DATA, 0, 1, message(stream_response("seen"))), 1000)
        assert [e.inference_id for e in relay.exchanges] == [f"{stream_id}.1"]
        assert relay.unparsed == []

    asyncio.run(run())


@pytest.mark.parametrize("answer", ["another model", "another id", "more answers than requests"])
def test_answers_that_do_not_pair_end_the_streams_observation(answer):
    async def run():
        relay = Relay({"seen", "other"})
        open_stream(relay)
        relay.client_sends(frame(DATA, 0, 1, message(infer_request("seen", "a"))), 1000)
        wrong = {"another model": stream_response("other", "a"), "another id": stream_response("seen", "b"),
                 "more answers than requests": stream_response("seen", "a")}[answer]
        first = [] if answer != "more answers than requests" else [stream_response("seen", "a")]
        relay.triton_sends(b"".join(frame(DATA, 0, 1, message(r)) for r in first + [wrong]), 1000)
        assert relay.unparsed == ["grpc_stream_unpaired"]
        (stream,) = relay.down.streams.values()
        observed = len(relay.exchanges)
        # from then on the stream is relayed only: nothing is held for it, nothing observed
        for _ in range(50):
            relay.client_sends(frame(DATA, 0, 1, message(infer_request("seen", "a"))), 1000)
            relay.triton_sends(frame(DATA, 0, 1, message(stream_response("seen", "a"))), 1000)
        assert not stream.awaited and not stream.requests.done and not stream.responses.done
        assert len(relay.exchanges) == observed

    asyncio.run(run())


def test_stopping_sends_a_goaway_between_frames_and_closes_when_the_calls_are_done():
    async def run():
        relay = Relay(set())
        block = hpack.Encoder().encode([(":method", "POST"), (":path", MODEL_INFER.decode())])
        relay.client_sends(PREFACE + frame(HEADERS, END_HEADERS, 1, block) +
                           frame(DATA, END_STREAM, 1, message(infer_request("other"))), 1000)
        triton_enc = hpack.Encoder()
        answer = frame(SETTINGS, 0, 0, b"") + triton_stream(triton_enc, 1, message(b"x" * 1000))
        split = answer.index(message(b"x" * 1000)) + 100  # in the middle of the DATA frame
        relay.triton_sends(answer[:split], 10_000)
        relay.down.finish()  # the sidecar stops while the answer is on its way
        assert not relay.down.transport.closed
        relay.triton_sends(answer[split:], 10_000)
        got = frames(relay.down.transport.data)
        assert b"".join(frame(*f) for f in got[:-1]) == answer  # the answer whole, then the GOAWAY
        assert got[-1] == (0x7, 0, 0, struct.pack(">II", 0x7FFFFFFF, 0))
        assert relay.down.transport.closed and relay.up.transport.closed

    asyncio.run(run())


def test_only_answers_edgecatch_can_read_are_observed_and_get_an_id():
    """From a randomized comparison with a real grpc.aio server: a unary answer over the limit (or
    none, with an error status) gets no id and no observation; a stream answered trailers-only gets
    no id in its trailers; a stream's answer over the limit keeps its place, unobserved."""
    async def run():
        relay = Relay({"seen"}, max_message_bytes=1000)
        client_enc, triton_enc = hpack.Encoder(), hpack.Encoder()
        big = service_pb2.ModelInferResponse(model_name="seen")
        big.raw_output_contents.append(bytes(5000))
        relay.client_sends(PREFACE + client_stream(client_enc, 1, MODEL_INFER, message(infer_request("seen")), False),
                           100_000)
        relay.triton_sends(triton_stream(triton_enc, 1, message(big.SerializeToString())), 100_000)
        await asyncio.sleep(0)
        assert b"x-edgecatch-inference-id" not in relay.down.transport.data and relay.exchanges == []

        block = client_enc.encode([(":method", "POST"), (":path", MODEL_STREAM_INFER.decode())])
        relay.client_sends(frame(HEADERS, END_HEADERS, 3, block) + frame(DATA, END_STREAM, 3, message(b"")), 100_000)
        before = len(relay.down.transport.data)
        trailers_only = triton_enc.encode([(":status", "200"), ("content-type", "application/grpc"),
                                           ("grpc-status", "3"), ("grpc-message", "bad")])
        relay.triton_sends(frame(HEADERS, END_HEADERS | END_STREAM, 3, trailers_only), 100_000)
        assert b"x-edgecatch-inference-id" not in relay.down.transport.data[before:]

        requests = b"".join(message(infer_request("seen", request_id=str(n))) for n in range(3))
        relay.client_sends(frame(HEADERS, END_HEADERS, 5, block) + frame(DATA, 0, 5, requests), 100_000)
        oversized = service_pb2.ModelInferResponse(model_name="seen", id="1")
        oversized.raw_output_contents.append(bytes(5000))
        answers = [stream_response("seen", "0"),
                   service_pb2.ModelStreamInferResponse(infer_response=oversized).SerializeToString(),
                   stream_response("seen", "2")]
        head = triton_enc.encode([(":status", "200"), ("content-type", "application/grpc")])
        relay.triton_sends(frame(HEADERS, END_HEADERS, 5, head) +
                           b"".join(frame(DATA, 0, 5, message(a)) for a in answers), 100_000)
        await asyncio.sleep(0)
        assert [e.inference_id.rsplit(".", 1)[1] for e in relay.exchanges] == ["0", "2"]
        assert [e.response for e in relay.exchanges] == [answers[0], answers[2]]

    asyncio.run(run())


@pytest.mark.parametrize("reset_by", ["client", "triton"])
def test_a_model_load_reset_before_its_answer_still_ends_as_a_repository_change(reset_by):
    """A load the client cancels may still go on in Triton: the configs are forgotten again at the
    reset, as at an answer, and the call is not remembered for the rest of the connection."""
    async def run():
        changes = []
        relay = Relay(set(), on_repository_change=lambda: changes.append(1))
        path = "/inference.GRPCInferenceService/RepositoryModelLoad"
        block = hpack.Encoder().encode([(":method", "POST"), (":path", path)])
        relay.client_sends(PREFACE + frame(HEADERS, END_HEADERS, 1, block), 1000)
        assert changes == [1] and relay.down.repository_calls == {1}
        reset = frame(0x3, 0, 1, struct.pack(">I", 8))  # RST_STREAM, CANCEL
        if reset_by == "client":
            relay.client_sends(reset, 1000)
        else:
            relay.triton_sends(frame(SETTINGS, 0, 0, b"") + reset, 1000)
        assert changes == [1, 1] and relay.down.repository_calls == set()

    asyncio.run(run())
