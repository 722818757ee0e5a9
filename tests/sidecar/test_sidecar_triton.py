"""The sidecar in front of a real Triton (`tritonserver` from the nvidia-pytriton wheel).

One Triton per session (explicit model control, every model loaded at start, so repository
load/unload can be exercised), one sidecar process (`python -m edgecatch sidecar`) per module, with
a policy that selects every prediction and every "incorrect" verdict into a directory sink. Each
transparency test sends the very same request to Triton and to the sidecar and compares what comes
back: status, headers and body over HTTP (minus the one header edgecatch adds), response bytes,
status code, details and metadata over gRPC. The test that stops and restarts Triton runs last.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import re
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
import tritonclient.http as tritonclient_http
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests.sidecar.processes import SidecarProcess, TritonProcess, triton_available

ID_HEADER = "X-Edgecatch-Inference-Id"
ID_KEY = "x-edgecatch-inference-id"
ID_PATTERN = re.compile(r"^w[0-9a-z]+-[0-9a-f]{16}$")
SERVICE = "/inference.GRPCInferenceService/"
NAMES = ["person", "face", "cat_face"]
TRIVIAL = "trivial_detector"
PEOPLE = "people_detector"

POLICY = """\
version: 1
batch: "test-{model}"
tags: [test]
policies:
  - name: user-says-wrong
    feedback: incorrect
    tags: [feedback-incorrect]
  - name: everything
    random: 1.0
    tags: [all]
"""


# -- images --------------------------------------------------------------------------------------

def _jpeg(array: np.ndarray, size: tuple[int, int] = (640, 480)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    from skimage import data

    return [_jpeg(data.astronaut()), _jpeg(data.chelsea()), _jpeg(data.coffee()), _jpeg(data.rocket())]


# -- processes -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def triton(tmp_path_factory) -> TritonProcess:
    reason = triton_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs Triton: missing there is a broken pipeline, not a skip
        pytest.skip(reason)
    server = TritonProcess(tmp_path_factory.mktemp("triton") / "triton.log",
                           args=("--model-control-mode", "explicit", "--load-model", "*"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(triton, tmp_path_factory) -> SidecarProcess:
    workdir = tmp_path_factory.mktemp("sidecar")
    policies = workdir / "policies.yaml"
    policies.write_text(POLICY)
    process = SidecarProcess(workdir, triton, policies=policies,
                             sink={"type": "directory", "path": str(workdir / "dataset")})
    process.start()
    yield process
    process.stop()
    assert "Traceback" not in process.log_tail(200_000), process.log_tail()


@pytest.fixture
def dataset(sidecar) -> Path:
    return sidecar.workdir / "dataset"


# -- HTTP helpers --------------------------------------------------------------------------------

def _unaddressed(body: bytes) -> bytes:
    """The body with Python object addresses masked: the example model's error for an undecodable
    image names a `<_io.BytesIO object at 0x...>`, which differs between any two calls."""
    return re.sub(rb" at 0x[0-9a-f]+>", b" at 0x?>", body)


class Answer:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.reason, self.body = status, reason, body
        self.inference_id = next((v for k, v in headers if k.lower() == ID_HEADER.lower()), None)
        self.headers = [(k, v) for k, v in headers if k.lower() != ID_HEADER.lower()]

    def same_as(self, other: Answer) -> bool:
        return (self.status, self.reason, self.headers, _unaddressed(self.body)) == (
            other.status, other.reason, other.headers, _unaddressed(other.body))

    def __repr__(self) -> str:
        return f"<{self.status} {self.reason} {self.headers} {self.body[:300]!r}>"


def request(address: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Answer:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.reason, response.getheaders(), response.read())
    finally:
        connection.close()


def both(triton, sidecar, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[Answer, Answer]:
    """The same request to Triton and through the sidecar; asserts the answers are identical."""
    direct = request(triton.http, method, path, body, headers)
    proxied = request(sidecar.http, method, path, body, headers)
    assert proxied.same_as(direct), f"\ndirect:  {direct}\nsidecar: {proxied}"
    return direct, proxied


def json_infer_body(images: list[bytes], binary_output: bool = False) -> bytes:
    outputs = [{"name": n, "parameters": {"binary_data": binary_output}} for n in ("BOXES", "SCORES", "CLASSES")]
    return json.dumps({
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(images), 1],
                    "data": [base64.b64encode(i).decode() for i in images]}],
        "outputs": outputs,
    }).encode()


def binary_infer_body(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A request in Triton's binary tensor extension, as tritonclient builds it."""
    http = tritonclient_http
    image = http.InferInput("IMAGE", [len(images), 1], "BYTES")
    image.set_data_from_numpy(np.array([[i] for i in images], dtype=object), binary_data=True)
    outputs = [http.InferRequestedOutput(n, binary_data=True) for n in ("BOXES", "SCORES", "CLASSES")]
    body, json_size = http.InferenceServerClient.generate_request_body([image], outputs=outputs)
    return body, {"Inference-Header-Content-Length": str(json_size), "Content-Type": "application/octet-stream"}


def http_outputs(answer: Answer) -> dict[str, np.ndarray]:
    length = dict((k.lower(), v) for k, v in answer.headers).get("inference-header-content-length")
    result = tritonclient_http.InferenceServerClient.parse_response_body(
        answer.body, header_length=int(length) if length else None)
    return {n: result.as_numpy(n) for n in ("BOXES", "SCORES", "CLASSES")}


# -- gRPC helpers --------------------------------------------------------------------------------

def bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def infer_request(model: str, images: list[bytes], raw: bool = True) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model)
    tensor = message.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(images), 1])
    if raw:
        message.raw_input_contents.append(bytes_tensor(images))
    else:
        tensor.contents.bytes_contents.extend(images)
    return message


_MAP_RESPONSES = {"TraceSetting": service_pb2.TraceSettingResponse, "LogSettings": service_pb2.LogSettingsResponse}


class GrpcAnswer:
    def __init__(self, method: str, response: bytes | None, code: grpc.StatusCode, details: str | None,
                 initial: tuple, trailing: tuple) -> None:
        self.method, self.response, self.code, self.details = method, response, code, details
        self.inference_id = next((v for k, v in trailing if k == ID_KEY), None)
        self.initial = [m for m in (initial or ()) if m[0] != ID_KEY]
        self.trailing = [m for m in (trailing or ()) if m[0] != ID_KEY]

    def key(self) -> tuple:
        response = self.response
        if response is not None and self.method in _MAP_RESPONSES:
            # Protobuf maps serialise in no fixed order: two identical answers from Triton differ in bytes.
            response = _MAP_RESPONSES[self.method].FromString(response)
        return response, self.code, self.details, self.initial, self.trailing

    def __repr__(self) -> str:
        return f"<{self.code} {self.details!r} {self.initial} {self.trailing} {(self.response or b'')[:200]!r}>"


def grpc_call(address: str, method: str, request: bytes) -> GrpcAnswer:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(SERVICE + method)  # no serialisers: bytes in, bytes out
        try:
            response, state = call.with_call(request, timeout=60)
        except grpc.RpcError as error:
            return GrpcAnswer(method, None, error.code(), error.details(), error.initial_metadata(),
                              error.trailing_metadata())
        return GrpcAnswer(method, response, state.code(), state.details(), state.initial_metadata(),
                          state.trailing_metadata())


def grpc_both(triton, sidecar, method: str, request: bytes) -> tuple[GrpcAnswer, GrpcAnswer]:
    direct = grpc_call(triton.grpc, method, request)
    proxied = grpc_call(sidecar.grpc, method, request)
    assert proxied.key() == direct.key(), f"\ndirect:  {direct}\nsidecar: {proxied}"
    return direct, proxied


# -- what reached the sink -----------------------------------------------------------------------

def manifest(dataset: Path) -> dict[str, dict]:
    path = dataset / "manifest.jsonl"
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(e["inference_id"], e.get("feedback") or ""): e for e in entries}


def wait_for_samples(dataset: Path, ids: list[str], feedback: str = "", timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = manifest(dataset)
        if all((i, feedback) in found for i in ids):
            return [found[(i, feedback)] for i in ids]
        if time.monotonic() > deadline:
            missing = [i for i in ids if (i, feedback) not in found]
            raise AssertionError(f"samples {missing} never reached the sink; it holds {sorted(found)}")
        time.sleep(0.05)


def assert_prelabels(entry: dict, outputs: dict[str, np.ndarray], item: int, dataset: Path) -> None:
    """The sample's pre-labels are exactly what Triton answered for that item (padding skipped)."""
    expected = [(NAMES[c], float(s), [float(v) for v in b])
                for b, s, c in zip(outputs["BOXES"][item], outputs["SCORES"][item], outputs["CLASSES"][item])
                if c >= 0]
    got = [(d["class"], d["confidence"], d["box"]) for d in entry["detections"]]
    assert len(got) == len(expected), (got, expected)
    for (name, score, box), (name2, score2, box2) in zip(got, expected):
        assert name == name2
        assert score == pytest.approx(score2, abs=1e-6)
        assert box == pytest.approx(box2, abs=1e-3)
    assert (entry["width"], entry["height"]) == (640, 480)
    assert (dataset / entry["image"]).read_bytes()[:3] == b"\xff\xd8\xff"


def metric(sidecar, name: str, **labels: str) -> float:
    text = request(f"127.0.0.1:{sidecar.admin_port}", "GET", "/metrics").body.decode()
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- inference over HTTP -------------------------------------------------------------------------

@pytest.mark.parametrize("model", [TRIVIAL, PEOPLE])
def test_http_json_inference_is_byte_identical_and_observed(triton, sidecar, dataset, images, model):
    body = json_infer_body(images[:1])
    headers = {"Content-Type": "application/json"}
    direct, proxied = both(triton, sidecar, "POST", f"/v2/models/{model}/infer", body, headers)
    assert direct.status == 200 and direct.inference_id is None
    assert ID_PATTERN.match(proxied.inference_id)
    (entry,) = wait_for_samples(dataset, [proxied.inference_id])
    assert entry["model"] == model.replace("_", "-") and entry["policy"] == "everything"
    assert_prelabels(entry, http_outputs(direct), 0, dataset)


def test_http_versioned_path_and_binary_outputs(triton, sidecar, dataset, images):
    body = json_infer_body(images[1:2], binary_output=True)
    direct, proxied = both(triton, sidecar, "POST", f"/v2/models/{TRIVIAL}/versions/1/infer", body)
    assert "inference-header-content-length" in {k.lower() for k, _ in direct.headers}
    (entry,) = wait_for_samples(dataset, [proxied.inference_id])
    assert entry["model_version"] == "1"
    assert_prelabels(entry, http_outputs(direct), 0, dataset)


def test_http_binary_tensor_batch_is_byte_identical_one_sample_per_item(triton, sidecar, dataset, images):
    body, headers = binary_infer_body(images[:3])
    direct, proxied = both(triton, sidecar, "POST", f"/v2/models/{PEOPLE}/infer", body, headers)
    outputs = http_outputs(direct)
    assert outputs["BOXES"].shape[0] == 3
    ids = [f"{proxied.inference_id}.{i}" for i in range(3)]
    for item, entry in enumerate(wait_for_samples(dataset, ids)):
        assert_prelabels(entry, outputs, item, dataset)


def test_http_keep_alive_connection_carries_many_requests(triton, sidecar, images):
    body, headers = binary_infer_body(images[:1])
    host, port = sidecar.http.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    seen = set()
    for _ in range(20):
        connection.request("POST", f"/v2/models/{TRIVIAL}/infer", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        response.read()
        seen.add(response.getheader(ID_HEADER))
    connection.close()
    assert len(seen) == 20


def test_http_compressed_request_and_response(triton, sidecar, dataset, images):
    """tritonclient's gzip request/response compression passes through and is still observed."""
    import gzip

    body, headers = binary_infer_body(images[:1])
    headers = dict(headers, **{"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
    direct, proxied = both(triton, sidecar, "POST", f"/v2/models/{TRIVIAL}/infer", gzip.compress(body, mtime=0),
                           headers)
    assert dict((k.lower(), v) for k, v in direct.headers).get("content-encoding") == "gzip"
    wait_for_samples(dataset, [proxied.inference_id])


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_sync_gives_the_same_results(triton, sidecar, images, binary):
    def run(address: str):
        client = tritonclient_http.InferenceServerClient(address)
        image = tritonclient_http.InferInput("IMAGE", [2, 1], "BYTES")
        data = images[:2] if binary else [base64.b64encode(i) for i in images[:2]]
        image.set_data_from_numpy(np.array([[d] for d in data], dtype=object), binary_data=binary)
        outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("BOXES", "SCORES", "CLASSES")]
        result = client.infer(PEOPLE, [image], outputs=outputs)
        client.close()
        return result.get_response(), {n: result.as_numpy(n) for n in ("BOXES", "SCORES", "CLASSES")}

    direct, proxied = run(triton.http), run(sidecar.http)
    assert proxied[0] == direct[0]
    for name in direct[1]:
        assert np.array_equal(proxied[1][name], direct[1][name])


def test_tritonclient_http_asyncio_gives_the_same_results(triton, sidecar, images):
    import tritonclient.http.aio as http_aio

    async def run(address: str):
        client = http_aio.InferenceServerClient(address)
        try:
            image = http_aio.InferInput("IMAGE", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[images[0]]], dtype=object), binary_data=True)
            results = await asyncio.gather(*(client.infer(TRIVIAL, [image]) for _ in range(8)))
            return ([r.get_response() for r in results], [r.as_numpy("BOXES").tobytes() for r in results],
                    await client.is_server_ready(), await client.get_model_metadata(TRIVIAL))
        finally:
            await client.close()

    assert asyncio.run(run(sidecar.http)) == asyncio.run(run(triton.http))


# -- inference over gRPC -------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [True, False], ids=["raw_contents", "typed_contents"])
@pytest.mark.parametrize("model", [TRIVIAL, PEOPLE])
def test_grpc_inference_is_byte_identical_and_observed(triton, sidecar, dataset, images, model, raw):
    message = infer_request(model, images[:2], raw=raw).SerializeToString()
    direct, proxied = grpc_both(triton, sidecar, "ModelInfer", message)
    assert direct.code == grpc.StatusCode.OK and direct.inference_id is None
    assert ID_PATTERN.match(proxied.inference_id)
    response = service_pb2.ModelInferResponse.FromString(direct.response)
    result = tritonclient_grpc.InferResult(response)
    outputs = {n: result.as_numpy(n) for n in ("BOXES", "SCORES", "CLASSES")}
    ids = [f"{proxied.inference_id}.{i}" for i in range(2)]
    for item, entry in enumerate(wait_for_samples(dataset, ids)):
        assert_prelabels(entry, outputs, item, dataset)


def test_tritonclient_grpc_sync_gives_the_same_results(triton, sidecar, images):
    def run(address: str):
        client = tritonclient_grpc.InferenceServerClient(address)
        image = tritonclient_grpc.InferInput("IMAGE", [3, 1], "BYTES")
        image.set_data_from_numpy(np.array([[i] for i in images[:3]], dtype=object))
        result = client.infer(PEOPLE, [image], headers={"x-test": "1"})
        client.close()
        return result.get_response().SerializeToString()

    assert run(sidecar.grpc) == run(triton.grpc)


def test_tritonclient_grpc_asyncio_gives_the_same_results(triton, sidecar, images):
    import tritonclient.grpc.aio as grpc_aio

    async def run(address: str):
        client = grpc_aio.InferenceServerClient(address)
        try:
            image = grpc_aio.InferInput("IMAGE", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[images[1]]], dtype=object))
            results = await asyncio.gather(*(client.infer(TRIVIAL, [image]) for _ in range(8)))
            return ([r.get_response().SerializeToString() for r in results], await client.is_server_live(),
                    (await client.get_model_config(TRIVIAL)).SerializeToString())
        finally:
            await client.close()

    assert asyncio.run(run(sidecar.grpc)) == asyncio.run(run(triton.grpc))


def stream_raw(address: str, requests: list[bytes]) -> tuple[list[bytes], tuple, grpc.StatusCode]:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(SERVICE + "ModelStreamInfer")(iter(requests), timeout=60)
        responses = list(call)
        return responses, call.initial_metadata(), call.code()


def test_grpc_stream_is_byte_identical_and_each_response_observed(triton, sidecar, dataset, images):
    requests = [infer_request(m, [i]).SerializeToString()
                for m, i in ((TRIVIAL, images[0]), (PEOPLE, images[1]), (TRIVIAL, images[2]))]
    direct, initial, code = stream_raw(triton.grpc, requests)
    proxied, proxied_initial, proxied_code = stream_raw(sidecar.grpc, requests)
    assert proxied == direct and proxied_code == code == grpc.StatusCode.OK
    stream_id = dict(proxied_initial)[ID_KEY]
    assert ID_PATTERN.match(stream_id)
    assert [m for m in proxied_initial if m[0] != ID_KEY] == list(initial)
    entries = wait_for_samples(dataset, [f"{stream_id}.{n}" for n in range(3)])
    for raw, entry in zip(direct, entries):
        result = tritonclient_grpc.InferResult(service_pb2.ModelStreamInferResponse.FromString(raw).infer_response)
        assert_prelabels(entry, {n: result.as_numpy(n) for n in ("BOXES", "SCORES", "CLASSES")}, 0, dataset)


def test_grpc_stream_burst_pairs_each_observed_response_with_its_own_request(triton, sidecar, dataset, images):
    # A slow first request holds back the answers of the 99 quick ones behind it (Triton answers a
    # stream in order), so more requests wait than the relay keeps: those are served, not observed,
    # and every observed sample must still carry its own request's image (told apart by width).
    sizes = [(640, 480)] + [(160 + n, 120) for n in range(1, 100)]
    pictures = [images[1]] + [_jpeg(np.full((120, 160, 3), n, np.uint8), size) for n, size in enumerate(sizes) if n]
    requests = []
    for n, picture in enumerate(pictures):
        message = infer_request(PEOPLE if n == 0 else TRIVIAL, [picture])
        message.id = f"r{n}"
        requests.append(message.SerializeToString())
    unanswered_before = metric(sidecar, "edgecatch_unparsed_total", reason="grpc_stream_unanswered")
    proxied, initial, code = stream_raw(sidecar.grpc, requests)
    assert code == grpc.StatusCode.OK
    assert [service_pb2.ModelStreamInferResponse.FromString(r).infer_response.id for r in proxied] == \
        [f"r{n}" for n in range(100)]
    stream_id = dict(initial)[ID_KEY]
    deadline = time.monotonic() + 30
    while True:
        observed = {key[0]: entry for key, entry in manifest(dataset).items() if key[0].startswith(stream_id + ".")}
        unanswered = metric(sidecar, "edgecatch_unparsed_total", reason="grpc_stream_unanswered") - unanswered_before
        if len(observed) + unanswered >= 100 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(observed) + unanswered == 100 and len(observed) >= 64, (len(observed), unanswered)
    for inference_id, entry in observed.items():
        n = int(inference_id.rsplit(".", 1)[1])
        assert (entry["width"], entry["height"]) == sizes[n], inference_id


def test_grpc_stream_errors_travel_in_the_stream(triton, sidecar, images):
    requests = [infer_request("no_such_model", images[:1]).SerializeToString(),
                infer_request(TRIVIAL, images[:1]).SerializeToString()]
    direct, _, code = stream_raw(triton.grpc, requests)
    proxied, _, proxied_code = stream_raw(sidecar.grpc, requests)
    assert service_pb2.ModelStreamInferResponse.FromString(direct[0]).error_message
    assert (proxied, proxied_code) == (direct, code)


def test_tritonclient_grpc_streams_sync_and_asyncio(triton, sidecar, images):
    import queue

    import tritonclient.grpc.aio as grpc_aio

    def sync_stream(address: str) -> list[bytes]:
        client = tritonclient_grpc.InferenceServerClient(address)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for image in images[:3]:
            tensor = tritonclient_grpc.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[image]], dtype=object))
            client.async_stream_infer(TRIVIAL, [tensor])
        out = []
        for _ in range(3):
            result, error = results.get(timeout=30)
            assert error is None
            out.append(result.get_response().SerializeToString())
        client.stop_stream()
        client.close()
        return out

    async def aio_stream(address: str) -> list[bytes]:
        client = grpc_aio.InferenceServerClient(address)

        async def requests():
            for image in images[:3]:
                tensor = grpc_aio.InferInput("IMAGE", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[image]], dtype=object))
                yield {"model_name": PEOPLE, "inputs": [tensor]}

        out = []
        try:
            async for result, error in client.stream_infer(requests()):
                assert error is None
                out.append(result.get_response().SerializeToString())
        finally:
            await client.close()
        return out

    assert sync_stream(sidecar.grpc) == sync_stream(triton.grpc)
    assert asyncio.run(aio_stream(sidecar.grpc)) == asyncio.run(aio_stream(triton.grpc))


DECOUPLED = "decoupled_detector"

#: A decoupled model, loaded through Triton's repository API with its config and file given in the
#: call: it answers each request from a thread (the first it ever gets last), with a box as wide as the
#: request's image bytes are long, so which request an answer belongs to shows in the answer.
DECOUPLED_CONFIG = {
    "name": DECOUPLED, "backend": "python", "max_batch_size": 0,
    "model_transaction_policy": {"decoupled": True},
    "input": [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [1, 1]}],
    "output": [{"name": "BOXES", "data_type": "TYPE_FP32", "dims": [1, -1, 4]},
               {"name": "SCORES", "data_type": "TYPE_FP32", "dims": [1, -1]},
               {"name": "CLASSES", "data_type": "TYPE_INT32", "dims": [1, -1]}],
    "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
}
DECOUPLED_MODEL = """\
import threading, time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.seen = 0

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.answer, args=(request, 0.5 if self.seen == 0 else 0.0)).start()
            self.seen += 1
        return None

    def answer(self, request, delay):
        time.sleep(delay)
        size = len(pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)[0])
        request.get_response_sender().send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("BOXES", np.array([[[0, 0, size, 10]]], dtype=np.float32)),
            pb_utils.Tensor("SCORES", np.array([[0.5]], dtype=np.float32)),
            pb_utils.Tensor("CLASSES", np.array([[0]], dtype=np.int32))]),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


PLAIN_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            size = len(pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)[0])
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("BOXES", np.array([[[0, 0, size, 10]]], dtype=np.float32)),
                pb_utils.Tensor("SCORES", np.array([[0.5]], dtype=np.float32)),
                pb_utils.Tensor("CLASSES", np.array([[0]], dtype=np.int32))]))
        return responses
"""


def _load_probe_model(address: str, decoupled: bool) -> None:
    """Load DECOUPLED into Triton (through `address`) with its config and model.py given in the call."""
    config = {**DECOUPLED_CONFIG, "model_transaction_policy": {"decoupled": decoupled}}
    code = DECOUPLED_MODEL if decoupled else PLAIN_MODEL
    load = {"parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(code.encode()).decode()}}
    answer = request(address, "POST", f"/v2/repository/models/{DECOUPLED}/load", json.dumps(load).encode())
    assert answer.status == 200, answer.body


def _unload_probe_model(triton) -> None:
    """Unload DECOUPLED and wait until Triton is ready again (it is not while a model unloads)."""
    request(triton.http, "POST", f"/v2/repository/models/{DECOUPLED}/unload", b"{}")
    deadline = time.monotonic() + 30
    while request(triton.http, "GET", "/v2/health/ready").status != 200 and time.monotonic() < deadline:
        time.sleep(0.05)


def _sidecar_observing_the_probe_model(triton, tmp_path: Path, decoupled: bool) -> tuple[SidecarProcess, Path]:
    """DECOUPLED loaded (decoupled or not), and a sidecar started that is configured to observe it."""
    from tests.sidecar.processes import example_models

    _load_probe_model(triton.http, decoupled=decoupled)
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICY)
    dataset = tmp_path / "dataset"
    models = example_models()
    models[DECOUPLED] = {**models[TRIVIAL], "model": "decoupled-detector"}
    process = SidecarProcess(tmp_path, triton, policies=policies, sink={"type": "directory", "path": str(dataset)},
                             models=models)
    return process.start(), dataset


def _stream_widths(address: str, model: str, images: list[bytes]) -> list[int]:
    """The width of the first box of each answer of one ModelStreamInfer stream, in arrival order."""
    import queue

    client = tritonclient_grpc.InferenceServerClient(address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for image in images:
        tensor = tritonclient_grpc.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=object))
        client.async_stream_infer(model, [tensor])
    widths = []
    for _ in images:
        result, error = results.get(timeout=30)
        assert error is None
        widths.append(int(result.as_numpy("BOXES")[0, 0, 2]))
    client.stop_stream()
    client.close()
    return widths


def test_a_decoupled_model_is_relayed_not_observed(triton, tmp_path, images):
    """A decoupled model answers a stream's requests in any order, with nothing in its answers (empty
    request ids) that says which request each belongs to: paired by position, a prediction would be
    stored with another request's image. Triton's model config says the model is decoupled, and the
    sidecar relays its calls without reading them."""
    process, dataset = _sidecar_observing_the_probe_model(triton, tmp_path, decoupled=True)
    try:
        widths = _stream_widths(process.grpc, DECOUPLED, images[:3])
        sent = [len(image) for image in images[:3]]
        assert widths != sent and sorted(widths) == sorted(sent)  # the first request was answered last
        assert metric(process, "edgecatch_unparsed_total", reason="decoupled_model") >= 3
        # The example models are still read along.
        assert request(process.http, "POST", f"/v2/models/{TRIVIAL}/infer", *binary_infer_body(images[:1])).status == 200
        time.sleep(0.5)
        models_stored = {entry["model"] for entry in manifest(dataset).values()}
        assert models_stored == {"trivial-detector"}
        assert "model decoupled_detector is decoupled" in process.log_tail(200_000)
        health = json.loads(request(process.http, "GET", "/edgecatch/healthz").body)
        assert health["models"] == {TRIVIAL: "observed", PEOPLE: "observed", DECOUPLED: "decoupled"}
    finally:
        process.stop()
        _unload_probe_model(triton)
    assert "Traceback" not in process.log_tail(200_000), process.log_tail()


def test_a_model_reloaded_as_decoupled_through_the_sidecar_is_not_observed_from_then_on(triton, tmp_path, images):
    """A load through the sidecar may bring a model back decoupled: no model is read along again
    before its config has been read again (without it, the 5 s check left a window in which the
    stream below was paired by position)."""
    process, dataset = _sidecar_observing_the_probe_model(triton, tmp_path, decoupled=False)

    def stored() -> int:
        return sum(entry["model"] == "decoupled-detector" for entry in manifest(dataset).values())

    try:
        assert _stream_widths(process.grpc, DECOUPLED, images[:1]) == [len(images[0])]
        deadline = time.monotonic() + 30
        while stored() < 1 and time.monotonic() < deadline:  # observed while not decoupled
            time.sleep(0.05)
        assert stored() == 1
        _load_probe_model(process.http, decoupled=True)  # through the sidecar
        widths = _stream_widths(process.grpc, DECOUPLED, images[:3])
        assert widths != [len(image) for image in images[:3]]  # the first request was answered last
        # HTTP asks too (Triton refuses /infer on a decoupled model: nothing to observe either way).
        request(process.http, "POST", f"/v2/models/{DECOUPLED}/infer", *binary_infer_body(images[:1]))
        not_read = sum(metric(process, "edgecatch_unparsed_total", reason=reason)
                       for reason in ("decoupled_model", "model_config_unknown"))
        assert not_read >= 4
        time.sleep(0.5)
        assert stored() == 1
    finally:
        process.stop()
        _unload_probe_model(triton)
    assert "Traceback" not in process.log_tail(200_000), process.log_tail()


def test_a_triton_serving_only_grpc_is_still_observed(triton, tmp_path, images):
    """Triton's HTTP endpoint may be off (--allow-http=false): model configs are then read over gRPC,
    and gRPC calls are observed as before."""
    from types import SimpleNamespace

    from tests.sidecar.processes import free_port

    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICY)
    dataset = tmp_path / "dataset"
    grpc_only = SimpleNamespace(http=f"127.0.0.1:{free_port()}", grpc=triton.grpc)  # nothing listens on that port
    process = SidecarProcess(tmp_path, grpc_only, policies=policies, sink={"type": "directory", "path": str(dataset)})
    process.start()
    try:
        answer = grpc_call(process.grpc, "ModelInfer", infer_request(TRIVIAL, images[:1]).SerializeToString())
        assert answer.code == grpc.StatusCode.OK and ID_PATTERN.match(answer.inference_id)
        wait_for_samples(dataset, [answer.inference_id])
        assert metric(process, "edgecatch_unparsed_total", reason="model_config_unknown") == 0
        health = request(f"127.0.0.1:{process.admin_port}", "GET", "/edgecatch/healthz")
        assert health.status == 200 and json.loads(health.body)["upstream"] == "ready", health.body
    finally:
        process.stop()
    assert "Traceback" not in process.log_tail(200_000), process.log_tail()


# -- every other KServe endpoint ---------------------------------------------------------------

HTTP_ENDPOINTS = [
    ("GET", "/v2/health/live", None),
    ("GET", "/v2/health/ready", None),
    ("GET", "/v2", None),
    ("GET", f"/v2/models/{TRIVIAL}", None),
    ("GET", f"/v2/models/{TRIVIAL}/versions/1", None),
    ("GET", f"/v2/models/{TRIVIAL}/ready", None),
    ("GET", f"/v2/models/{PEOPLE}/versions/1/ready", None),
    ("GET", f"/v2/models/{PEOPLE}/config", None),
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v2/repository/index", b'{"ready": true}'),
    ("GET", "/v2/models/stats", None),
    ("GET", f"/v2/models/{TRIVIAL}/stats", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("GET", "/v2/systemsharedmemory/region/none/status", None),
    ("POST", "/v2/systemsharedmemory/unregister", b""),
    ("POST", "/v2/systemsharedmemory/region/r1/register", b'{"key":"/edgecatch-none","offset":0,"byte_size":64}'),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("POST", "/v2/cudasharedmemory/unregister", b""),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/logging", None),
    ("HEAD", "/v2/health/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/v2/no/such/route", None),
]


@pytest.mark.parametrize(("method", "path", "body"), HTTP_ENDPOINTS)
def test_http_endpoint_is_transparent(triton, sidecar, method, path, body):
    direct, proxied = both(triton, sidecar, method, path, body)
    assert proxied.inference_id is None


def test_http_repository_unload_and_load(triton, sidecar):
    for address in (sidecar.http, triton.http):
        unload = request(address, "POST", f"/v2/repository/models/{TRIVIAL}/unload", b"{}")
        assert unload.status == 200, unload
        assert _wait_ready(triton, TRIVIAL, False)
        both(triton, sidecar, "GET", f"/v2/models/{TRIVIAL}/ready")
        both(triton, sidecar, "POST", f"/v2/models/{TRIVIAL}/infer", json_infer_body([b"x"]))  # unavailable
        load = request(address, "POST", f"/v2/repository/models/{TRIVIAL}/load", b"{}")
        assert load.status == 200, load
        assert _wait_ready(triton, TRIVIAL, True)
    both(triton, sidecar, "POST", "/v2/repository/index", b"{}")


def _wait_ready(triton, model: str, ready: bool, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (request(triton.http, "GET", f"/v2/models/{model}/ready").status == 200) == ready:
            return True
        time.sleep(0.05)
    return False


GRPC_ENDPOINTS = [
    ("ServerLive", service_pb2.ServerLiveRequest()),
    ("ServerReady", service_pb2.ServerReadyRequest()),
    ("ModelReady", service_pb2.ModelReadyRequest(name=TRIVIAL)),
    ("ModelReady", service_pb2.ModelReadyRequest(name="no_such_model")),
    ("ServerMetadata", service_pb2.ServerMetadataRequest()),
    ("ModelMetadata", service_pb2.ModelMetadataRequest(name=PEOPLE, version="1")),
    ("ModelConfig", service_pb2.ModelConfigRequest(name=TRIVIAL)),
    ("RepositoryIndex", service_pb2.RepositoryIndexRequest()),
    ("ModelStatistics", service_pb2.ModelStatisticsRequest(name=TRIVIAL)),
    ("ModelStatistics", service_pb2.ModelStatisticsRequest()),
    ("SystemSharedMemoryStatus", service_pb2.SystemSharedMemoryStatusRequest()),
    ("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(
        name="r1", key="/edgecatch-none", byte_size=64)),
    ("SystemSharedMemoryUnregister", service_pb2.SystemSharedMemoryUnregisterRequest()),
    ("CudaSharedMemoryStatus", service_pb2.CudaSharedMemoryStatusRequest()),
    ("CudaSharedMemoryUnregister", service_pb2.CudaSharedMemoryUnregisterRequest()),
    ("TraceSetting", service_pb2.TraceSettingRequest()),
    ("LogSettings", service_pb2.LogSettingsRequest()),
    ("NoSuchMethod", service_pb2.ServerLiveRequest()),
]


@pytest.mark.parametrize(("method", "message"), GRPC_ENDPOINTS, ids=lambda v: v if isinstance(v, str) else "")
def test_grpc_endpoint_is_transparent(triton, sidecar, method, message):
    direct, proxied = grpc_both(triton, sidecar, method, message.SerializeToString())
    assert proxied.inference_id is None


def test_grpc_repository_unload_and_load(triton, sidecar):
    unload = service_pb2.RepositoryModelUnloadRequest(model_name=TRIVIAL).SerializeToString()
    load = service_pb2.RepositoryModelLoadRequest(model_name=TRIVIAL).SerializeToString()
    for address in (sidecar.grpc, triton.grpc):
        assert grpc_call(address, "RepositoryModelUnload", unload).code == grpc.StatusCode.OK
        assert _wait_ready(triton, TRIVIAL, False)
        grpc_both(triton, sidecar, "ModelReady", service_pb2.ModelReadyRequest(name=TRIVIAL).SerializeToString())
        assert grpc_call(address, "RepositoryModelLoad", load).code == grpc.StatusCode.OK
        assert _wait_ready(triton, TRIVIAL, True)


def test_tritonclient_control_calls_sync_and_asyncio(triton, sidecar):
    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http.aio as http_aio

    def sync_calls(address_http: str, address_grpc: str):
        h = tritonclient_http.InferenceServerClient(address_http)
        g = tritonclient_grpc.InferenceServerClient(address_grpc)
        out = (h.is_server_live(), h.get_server_metadata(), h.get_model_repository_index(),
               h.get_model_config(PEOPLE), h.get_system_shared_memory_status(), h.get_log_settings(),
               g.is_model_ready(TRIVIAL), g.get_server_metadata(as_json=True), g.get_model_repository_index(as_json=True),
               g.get_inference_statistics(PEOPLE, as_json=True), g.get_cuda_shared_memory_status(as_json=True),
               g.get_trace_settings(as_json=True))
        h.close()
        g.close()
        return out

    async def aio_calls(address_http: str, address_grpc: str):
        h = http_aio.InferenceServerClient(address_http)
        g = grpc_aio.InferenceServerClient(address_grpc)
        try:
            return (await h.is_model_ready(PEOPLE), await h.get_model_metadata(PEOPLE),
                    await h.get_inference_statistics(TRIVIAL), await g.is_server_ready(),
                    await g.get_model_metadata(TRIVIAL, as_json=True),
                    await g.get_system_shared_memory_status(as_json=True))
        finally:
            await h.close()
            await g.close()

    assert sync_calls(sidecar.http, sidecar.grpc) == sync_calls(triton.http, triton.grpc)
    assert asyncio.run(aio_calls(sidecar.http, sidecar.grpc)) == asyncio.run(aio_calls(triton.http, triton.grpc))


# -- errors ----------------------------------------------------------------------------------------

def _wrong_shape_body() -> bytes:
    return json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 2],
                                   "data": ["a", "b"]}]}).encode()


HTTP_ERRORS = {
    "unknown_model": ("/v2/models/no_such_model/infer", json_infer_body([b"x"])),
    "wrong_shape": (f"/v2/models/{TRIVIAL}/infer", _wrong_shape_body()),
    "wrong_datatype": (f"/v2/models/{TRIVIAL}/infer", json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}).encode()),
    "malformed_json": (f"/v2/models/{TRIVIAL}/infer", b'{"inputs": [{"name": '),
    "empty_body": (f"/v2/models/{PEOPLE}/infer", b""),
    "bad_image": (f"/v2/models/{PEOPLE}/infer", json_infer_body([b"this is not an image"])),
    "unknown_version": (f"/v2/models/{TRIVIAL}/versions/7/infer", json_infer_body([b"x"])),
    "bad_binary_header": (f"/v2/models/{TRIVIAL}/infer", b"{}"),
}


@pytest.mark.parametrize("case", sorted(HTTP_ERRORS))
def test_http_errors_come_back_as_triton_gives_them(triton, sidecar, case):
    path, body = HTTP_ERRORS[case]
    headers = {"Inference-Header-Content-Length": "9999"} if case == "bad_binary_header" else {}
    direct, proxied = both(triton, sidecar, "POST", path, body, headers)
    assert direct.status >= 400


def test_tritonclient_http_error_is_the_same(triton, sidecar, images):
    def error(address: str) -> tuple:
        client = tritonclient_http.InferenceServerClient(address)
        image = tritonclient_http.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[b"not an image"]], dtype=object), binary_data=True)
        with pytest.raises(InferenceServerException) as raised:
            client.infer(PEOPLE, [image])
        client.close()
        return raised.value.status(), raised.value.message()

    assert error(sidecar.http) == error(triton.http)


GRPC_ERRORS = {
    "unknown_model": infer_request("no_such_model", [b"x"]).SerializeToString(),
    "wrong_shape": service_pb2.ModelInferRequest(model_name=TRIVIAL, inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1, 2])],
        raw_input_contents=[bytes_tensor([b"a", b"b"])]).SerializeToString(),
    "missing_input": service_pb2.ModelInferRequest(model_name=PEOPLE).SerializeToString(),
    "bad_image": infer_request(PEOPLE, [b"this is not an image"]).SerializeToString(),
    "garbage_message": b"\xff\xff\xff\xff not a protobuf",
}


@pytest.mark.parametrize("case", sorted(GRPC_ERRORS))
def test_grpc_errors_come_back_as_triton_gives_them(triton, sidecar, case):
    direct, proxied = grpc_both(triton, sidecar, "ModelInfer", GRPC_ERRORS[case])
    assert direct.code != grpc.StatusCode.OK


def test_tritonclient_grpc_error_is_the_same(triton, sidecar):
    def error(address: str) -> tuple:
        client = tritonclient_grpc.InferenceServerClient(address)
        image = tritonclient_grpc.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[b"not an image"]], dtype=object))
        with pytest.raises(InferenceServerException) as raised:
            client.infer(PEOPLE, [image])
        client.close()
        return raised.value.status(), raised.value.message()

    code, message = error(sidecar.grpc)
    assert (code, message) == error(triton.grpc)
    assert code == "StatusCode.INVALID_ARGUMENT"


# -- what edgecatch adds ---------------------------------------------------------------------------

def test_unreadable_predictions_are_served_and_counted(triton, sidecar, images):
    image_before = metric(sidecar, "edgecatch_unparsed_total", reason="image")
    request_before = metric(sidecar, "edgecatch_unparsed_total", reason="grpc_request")
    unconfigured_before = metric(sidecar, "edgecatch_unparsed_total", reason="unconfigured_model")
    # trivial_detector never decodes the image: Triton answers 200, edgecatch cannot read the image.
    body, headers = binary_infer_body([b"not an image at all"])
    direct, proxied = both(triton, sidecar, "POST", f"/v2/models/{TRIVIAL}/infer", body, headers)
    assert direct.status == 200
    grpc_both(triton, sidecar, "ModelInfer", GRPC_ERRORS["garbage_message"])
    both(triton, sidecar, "POST", "/v2/models/no_such_model/infer", json_infer_body([b"x"]))
    deadline = time.monotonic() + 10
    while metric(sidecar, "edgecatch_unparsed_total", reason="image") < image_before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(sidecar, "edgecatch_unparsed_total", reason="grpc_request") == request_before + 1
    assert metric(sidecar, "edgecatch_unparsed_total", reason="unconfigured_model") >= unconfigured_before + 1


def _feedback(address: str, inference_id: str, verdict: str) -> Answer:
    return request(address, "POST", "/edgecatch/feedback",
                   json.dumps({"inference_id": inference_id, "verdict": verdict, "note": "test"}).encode(),
                   {"Content-Type": "application/json"})


@pytest.mark.parametrize("port", ["http", "admin"])
def test_feedback_by_inference_id(triton, sidecar, dataset, images, port):
    address = sidecar.http if port == "http" else f"127.0.0.1:{sidecar.admin_port}"
    body, headers = binary_infer_body(images[3:4])
    answer = request(sidecar.http, "POST", f"/v2/models/{TRIVIAL}/infer", body, headers)
    grpc_answer = grpc_call(sidecar.grpc, "ModelInfer", infer_request(TRIVIAL, images[3:4]).SerializeToString())

    accepted = _feedback(address, answer.inference_id, "incorrect")  # at once: no wait for the sample
    assert accepted.status == 202, accepted
    assert json.loads(accepted.body) == {"inference_id": answer.inference_id, "verdict": "incorrect",
                                         "selected": True, "policy": "user-says-wrong"}
    assert _feedback(address, answer.inference_id, "incorrect").status == 409
    assert _feedback(address, grpc_answer.inference_id, "correct").status == 202
    assert _feedback(address, "w1-0123456789abcdef", "incorrect").status == 404
    assert request(address, "POST", "/edgecatch/feedback", b"{}", {"Content-Type": "application/json"}).status == 400
    (entry,) = wait_for_samples(dataset, [answer.inference_id], feedback="incorrect")
    assert entry["policy"] == "user-says-wrong" and "feedback-incorrect" in entry["tags"]
    assert [d["class"] for d in entry["detections"]] == ["person", "face", "person"]


def test_feedback_refuses_an_oversized_body_from_its_headers_on_both_ports(sidecar):
    """A verdict's JSON takes at most 1 MB: a larger one is refused before its body is read, on the
    admin port and on the client-facing HTTP port alike (where inference requests may be far larger)."""
    import socket

    for port in (sidecar.admin_port, int(sidecar.http.rsplit(":", 1)[1])):
        for announced in (b"10000000000", b"2000000"):  # 10 GB, 2 MB announced; a byte sent
            with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
                sock.sendall(b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + announced + b"\r\n\r\n{")
                assert sock.recv(65536).startswith(b"HTTP/1.1 413"), (port, announced)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:  # no length: cut off at 1 MB
            sock.sendall(b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
            try:
                for _ in range(32):  # 2 MB
                    sock.sendall(chunk)
            except OSError:
                pass  # answered and closed before all of it was sent
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer, (port, answer[:200])


def test_metrics_and_health(triton, sidecar):
    admin = f"127.0.0.1:{sidecar.admin_port}"
    assert metric(sidecar, "edgecatch_predictions_total", model="trivial-detector") > 0
    assert metric(sidecar, "edgecatch_predictions_total", model="people-detector") > 0
    assert metric(sidecar, "edgecatch_samples_total", model="trivial-detector", policy="everything") > 0
    assert metric(sidecar, "edgecatch_prediction_confidence_count", model="trivial-detector", **{"class": "face"}) > 0
    for address in (admin, sidecar.http):
        health = request(address, "GET", "/edgecatch/healthz")
        assert health.status == 200 and json.loads(health.body)["upstream"] == "ready"
        assert json.loads(health.body)["models"] == {TRIVIAL: "observed", PEOPLE: "observed"}
    assert request(sidecar.http, "GET", "/edgecatch/nothing").status == 404


def test_predictions_leaving_the_recall_buffer_unanswered_become_silent_samples(triton, tmp_path, images):
    """A sidecar that remembers one prediction: each new one pushes the previous out, unanswered,
    and its `silent` event (evaluated on the sidecar's loop after a batch of observations) selects
    it with its image and pre-labels; an answered prediction gets no silent event."""
    policies = tmp_path / "policies.yaml"
    policies.write_text("version: 1\npolicies:\n  - name: nobody-complained\n    feedback: silent\n"
                        "    tags: [implicit-affirmation]\n")
    dataset = tmp_path / "dataset"
    process = SidecarProcess(tmp_path, triton, policies=policies, sink={"type": "directory", "path": str(dataset)},
                             extra={"recall": {"max_items": 1}})
    process.start()
    try:
        body, headers = binary_infer_body(images[:1])

        def infer() -> Answer:
            return request(process.http, "POST", f"/v2/models/{TRIVIAL}/infer", body, headers)

        answers = [infer(), infer()]  # the second pushes the first out
        assert _feedback(process.http, answers[1].inference_id, "correct").status == 202
        answers.append(infer())  # pushes the answered second out
        infer()  # pushes the third out
        silent = wait_for_samples(dataset, [answers[0].inference_id, answers[2].inference_id], feedback="silent")
        time.sleep(0.5)  # long enough for a wrong silent event of the answered one to arrive too
        assert (answers[1].inference_id, "silent") not in manifest(dataset)
    finally:
        process.stop()
    outputs = http_outputs(answers[0])
    for entry in silent:
        assert entry["policy"] == "nobody-complained" and "implicit-affirmation" in entry["tags"]
        assert_prelabels(entry, outputs, 0, dataset)
    assert "Traceback" not in process.log_tail(200_000), process.log_tail()


# -- the Upload API sink (Roboflow's contract), with its own sidecar -------------------------------------

def test_selected_predictions_reach_the_upload_api_with_their_prelabels(triton, tmp_path, images):
    from tests.upload_api_server import UploadApiServer

    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICY)
    with UploadApiServer() as upload_api:
        sink = {"type": "roboflow", "base_url": upload_api.url, "dataset": upload_api.dataset,
                "api_key_env": "TEST_UPLOAD_KEY"}
        process = SidecarProcess(tmp_path, triton, policies=policies, sink=sink)
        process.start(env={"TEST_UPLOAD_KEY": upload_api.api_key})
        try:
            sent = {}  # inference id -> Triton's outputs for that item
            body, headers = binary_infer_body(images[:2])
            answer = request(process.http, "POST", f"/v2/models/{PEOPLE}/infer", body, headers)
            outputs = http_outputs(answer)
            sent.update({f"{answer.inference_id}.{i}": (outputs, i) for i in range(2)})
            grpc_answer = grpc_call(process.grpc, "ModelInfer", infer_request(TRIVIAL, images[2:3]).SerializeToString())
            result = tritonclient_grpc.InferResult(service_pb2.ModelInferResponse.FromString(grpc_answer.response))
            sent[grpc_answer.inference_id] = ({n: result.as_numpy(n) for n in ("BOXES", "SCORES", "CLASSES")}, 0)

            deadline = time.monotonic() + 30
            while True:
                stored = {image.metadata.get("inference_id"): image for image in upload_api.annotated().values()}
                if set(sent) <= set(stored):
                    break
                assert time.monotonic() < deadline, f"uploaded: {sorted(stored)}, expected {sorted(sent)}"
                time.sleep(0.1)
        finally:
            process.stop()
    assert upload_api.api_key not in process.log_tail(1_000_000)
    for inference_id, (outputs, item) in sent.items():
        image = stored[inference_id]
        assert image.data[:3] == b"\xff\xd8\xff" and image.metadata["policy"] == "everything"
        annotation = json.loads(image.annotation["text"])
        assert annotation["image"] == {"width": 640, "height": 480}
        expected = [(NAMES[c], float(s), [float(v) for v in b]) for b, s, c in
                    zip(outputs["BOXES"][item], outputs["SCORES"][item], outputs["CLASSES"][item]) if c >= 0]
        assert len(annotation["predictions"]) == len(expected)
        for got, (name, score, (x1, y1, x2, y2)) in zip(annotation["predictions"], expected):
            assert got["class"] == name and got["confidence"] == pytest.approx(score, abs=1e-4)
            assert (got["x"], got["y"], got["width"], got["height"]) == pytest.approx(
                ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), abs=0.01)


# -- Triton goes away and comes back (keep last: it restarts the session's Triton) --------------------

def test_stopping_the_sidecar_lets_the_calls_in_progress_finish(triton, tmp_path, images):
    """SIGTERM with slow calls under way over both protocols: each gets its answer, then it exits."""
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICY)
    process = SidecarProcess(tmp_path, triton, policies=policies,
                             sink={"type": "directory", "path": str(tmp_path / "dataset")})
    process.start()
    try:
        message = infer_request(PEOPLE, images[:1]).SerializeToString()
        body, headers = binary_infer_body(images[:1])
        with grpc.insecure_channel(process.grpc) as channel, ThreadPoolExecutor(2) as pool:
            call = channel.unary_unary(SERVICE + "ModelInfer")
            call(message, timeout=60)  # the connection is up
            under_way = [call.future(message, timeout=60) for _ in range(3)]
            http_answer = pool.submit(request, process.http, "POST", f"/v2/models/{PEOPLE}/infer", body, headers)
            time.sleep(0.1)  # each people_detector call takes ~150 ms, four of them ~300 ms
            os.killpg(process.pid, signal.SIGTERM)
            answers = [service_pb2.ModelInferResponse.FromString(f.result()) for f in under_way]
            answer = http_answer.result()
        assert [a.model_name for a in answers] == [PEOPLE] * 3
        assert answer.status == 200 and answer.inference_id is not None
        assert process.process.wait(30) == 0
        assert "Traceback" not in process.log_tail(200_000), process.log_tail()
    finally:
        process.stop()


def test_triton_stopped_and_restarted_is_survived(triton, sidecar, images):
    body, headers = binary_infer_body(images[:1])
    infer = infer_request(TRIVIAL, images[:1]).SerializeToString()
    assert request(sidecar.http, "POST", f"/v2/models/{TRIVIAL}/infer", body, headers).status == 200
    pid = sidecar.pid

    triton.kill()
    down = request(sidecar.http, "POST", f"/v2/models/{TRIVIAL}/infer", body, headers)
    assert down.status == 502 and b"Triton" in down.body
    assert request(sidecar.http, "GET", "/v2/health/ready").status == 502
    assert grpc_call(sidecar.grpc, "ModelInfer", infer).code == grpc.StatusCode.UNAVAILABLE
    assert grpc_call(sidecar.grpc, "ServerLive", b"").code == grpc.StatusCode.UNAVAILABLE
    health = request(sidecar.http, "GET", "/edgecatch/healthz")
    assert health.status == 503 and json.loads(health.body)["upstream"] == "unreachable"
    assert tritonclient_http.InferenceServerClient(sidecar.http).is_server_ready() is False
    with pytest.raises(InferenceServerException) as raised:
        tritonclient_grpc.InferenceServerClient(sidecar.grpc).is_server_ready()
    assert raised.value.status() == "StatusCode.UNAVAILABLE"

    triton.start()
    deadline = time.monotonic() + 30
    while grpc_call(sidecar.grpc, "ModelInfer", infer).code != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "gRPC did not recover"
        time.sleep(0.1)
    both(triton, sidecar, "POST", f"/v2/models/{TRIVIAL}/infer", body, headers)
    grpc_both(triton, sidecar, "ModelInfer", infer)
    assert sidecar.pid == pid and sidecar.running()
