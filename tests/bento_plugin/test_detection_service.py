"""The example detection service under a real `bentoml serve` (2 workers), delivering to a real
Upload-API server on 127.0.0.1 through the Roboflow sink."""

from __future__ import annotations

import io
import json
import re
import textwrap

import bentoml
import httpx
import pytest
from PIL.Image import Image

from bento_service.service import Detection
from tests.upload_api_server import UploadApiServer

from .harness import start_bento, stop_bento, wait_for, write_config

FEEDBACK_TOKEN = "test-feedback-token-123"

POLICY = textwrap.dedent("""
    version: 1
    batch: "test-{model}-{date}"
    tags: [bento-test]
    policies:
      - name: user-says-wrong
        feedback: incorrect
        tags: [feedback-incorrect]
      - name: user-says-right
        feedback: correct
        tags: [feedback-correct]
      - name: low-confidence
        confidence_between: [0.2, 0.6]
        tags: [low-confidence]
      - name: nothing-detected
        detections: {max: 0}
        tags: [no-detections]
""")

ID_PATTERN = re.compile(r"^w[0-9a-z]+-[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def upload_api():
    server = UploadApiServer().up()
    yield server
    server.down()


@pytest.fixture(scope="module")
def service(tmp_path_factory, upload_api):
    workdir = tmp_path_factory.mktemp("detector")
    config_path, policy_path = write_config(
        workdir, POLICY,
        delivery={"retry": {"initial_seconds": 0.05, "max_seconds": 0.5},
                  "sink": {"type": "roboflow", "base_url": upload_api.url, "dataset": upload_api.dataset,
                           "api_key_env": "TEST_ROBOFLOW_KEY"}},
        feedback={"token_env": "TEST_FEEDBACK_TOKEN"})
    server = start_bento("bento_service.service:DetectionService", workdir, config_path, policy_path,
                         env={"TEST_ROBOFLOW_KEY": upload_api.api_key, "TEST_FEEDBACK_TOKEN": FEEDBACK_TOKEN},
                         workers=2)
    yield server
    stop_bento(server)
    assert upload_api.api_key not in server.log()  # the key never reaches the service's log


def detect(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/detect", files={"image": (name, data, "image/jpeg")})


def uploads_for(upload_api: UploadApiServer, inference_id: str) -> list:
    return [image for image in upload_api.annotated().values() if image.params.get("inference_id") == [inference_id]]


def test_results_are_the_detectors_own_and_carry_an_inference_id(service, sample_jpegs):
    from bento_service.detector import Detector, decode_image

    detector = Detector(["person", "face"])
    with service.client() as client:
        for name in ("astronaut", "coins", "grass"):
            response = detect(client, f"{name}.jpg", sample_jpegs[name])
            assert response.status_code == 200
            assert response.json() == json.loads(json.dumps(detector(decode_image(sample_jpegs[name]))))
            assert ID_PATTERN.match(response.headers["x-edgecatch-inference-id"])


class PlainDetectionService:
    """The example API without edgecatch, to compare OpenAPI schemas with."""

    @bentoml.api
    def detect(self, image: Image) -> list[Detection]:
        """Detect people and faces in one image."""
        return []


def test_openapi_schema_is_unchanged(service):
    plain = bentoml.service(name="edgecatch-detector")(PlainDetectionService).openapi_spec.asdict()
    served = httpx.get(f"{service.url}/docs.json", timeout=30).json()
    assert served["paths"]["/detect"] == json.loads(json.dumps(plain["paths"]["/detect"]))
    assert "ctx" not in json.dumps(served["paths"]["/detect"])


def test_selected_predictions_reach_the_upload_api_with_their_pre_labels(service, upload_api, sample_jpegs,
                                                                      unique_jpeg):
    sent = {}
    with service.client() as client:
        for name in sample_jpegs:
            response = detect(client, f"{name}.jpg", unique_jpeg(name))
            assert response.status_code == 200
            sent[response.headers["x-edgecatch-inference-id"]] = (name, response.json())
    # Selected: a detection in [0.2, 0.6], or no detection at all.
    expected = {i for i, (_, dets) in sent.items() if not dets or any(0.2 <= d["confidence"] <= 0.6 for d in dets)}
    assert expected

    def delivered() -> set[str]:
        return {img.params["inference_id"][0] for img in upload_api.annotated().values()
                if img.params.get("inference_id")}

    wait_for(lambda: expected <= delivered(), timeout=60)
    missing = {i: sent[i] for i in expected - delivered()}
    assert not missing, (missing, service.metric("edgecatch_samples_total"), service.metric("edgecatch_dropped_total"))
    for inference_id in expected:
        (stored,) = uploads_for(upload_api, inference_id)
        name, detections = sent[inference_id]
        annotation = json.loads(stored.annotation["text"])
        import PIL.Image

        width, height = PIL.Image.open(io.BytesIO(stored.data)).size
        assert annotation["image"] == {"width": width, "height": height}
        # The shipped images are at most 1280 px, so the boxes are the model's, as centre + size.
        got = sorted((p["class"], round(p["x"]), round(p["y"]), round(p["width"]), round(p["height"]))
                     for p in annotation["predictions"])
        want = sorted((d["class"], round((d["box"][0] + d["box"][2]) / 2), round((d["box"][1] + d["box"][3]) / 2),
                       round(d["box"][2] - d["box"][0]), round(d["box"][3] - d["box"][1])) for d in detections)
        assert got == want
        assert stored.metadata["model"] == "people-detector"
        assert stored.params["batch"][0].startswith("test-people-detector-")
        assert "bento-test" in stored.params["tag"]
    # Nothing that was not selected was uploaded.
    assert not ({img.params.get("inference_id", [""])[0] for img in upload_api.annotated().values()}
                & (set(sent) - expected))


def test_feedback_end_to_end(service, upload_api, sample_jpegs, unique_jpeg):
    auth = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
    with service.client() as client:
        response = detect(client, "astronaut.jpg", unique_jpeg("astronaut"))
        inference_id = response.headers["x-edgecatch-inference-id"]
        verdict = {"inference_id": inference_id, "verdict": "incorrect", "note": "missed a person"}
        assert client.post("/edgecatch/feedback", json=verdict).status_code == 401
        assert client.post("/edgecatch/feedback", json=verdict,
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = client.post("/edgecatch/feedback", json=verdict, headers=auth)
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"inference_id": inference_id, "verdict": "incorrect", "selected": True,
                                 "policy": "user-says-wrong"}
        assert client.post("/edgecatch/feedback", json=verdict, headers=auth).status_code == 409
        unknown = client.post("/edgecatch/feedback", headers=auth,
                              json={"inference_id": "w1-0123456789abcdef", "verdict": "correct"})
        assert unknown.status_code == 404 and "hint" in unknown.json()
        assert client.post("/edgecatch/feedback", headers=auth, json={"verdict": "incorrect"}).status_code == 400
        assert client.post("/edgecatch/feedback", headers=auth,
                           json={"inference_id": inference_id, "verdict": "maybe"}).status_code == 400
        # An id nobody remembers, sent with the prediction and the image itself.
        with_image = client.post("/edgecatch/feedback", headers=auth, files={
            "feedback": (None, json.dumps({"inference_id": "client-42", "verdict": "correct"})),
            "prediction": (None, json.dumps({"model": "people-detector", "detections": []})),
            "image": ("coins.jpg", unique_jpeg("coins"), "image/jpeg"),
        })
        assert with_image.status_code == 202, with_image.text
        assert with_image.json()["policy"] == "user-says-right"

    def feedback_uploads():
        images = upload_api.annotated().values()
        return ([i for i in images if i.params.get("inference_id") == [inference_id]
                 and "feedback-incorrect" in i.params.get("tag", [])],
                [i for i in images if i.params.get("inference_id") == ["client-42"]])

    assert wait_for(lambda: all(feedback_uploads()), timeout=60)
    wrong, right = feedback_uploads()
    assert wrong[0].metadata["policy"] == "user-says-wrong"
    assert "feedback-correct" in right[0].params["tag"]


def _answer_to_a_huge_body(service, headers: str) -> bytes:
    """The answer to a request announcing 10 GB of which a byte is sent: only a route that answers
    from the headers alone answers at all."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(service.url)
    with socket.create_connection((url.hostname, url.port), timeout=20) as sock:
        sock.sendall(b"POST /edgecatch/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n"
                     + headers.encode() + b"\r\n{")
        return sock.recv(65536)


def test_feedback_refuses_from_the_headers_and_answers_errors_in_json(service):
    auth = f"Authorization: Bearer {FEEDBACK_TOKEN}\r\n"
    assert _answer_to_a_huge_body(service, "Content-Type: application/json\r\n").startswith(b"HTTP/1.1 401")
    assert _answer_to_a_huge_body(service, auth + "Content-Type: application/json\r\n").startswith(b"HTTP/1.1 413")
    assert _answer_to_a_huge_body(service, auth + "Content-Type: multipart/form-data; boundary=x\r\n").startswith(
        b"HTTP/1.1 413")
    with service.client() as client:
        broken = client.post("/edgecatch/feedback", content=b"--x\r\nnot a part",
                             headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}",
                                      "Content-Type": "multipart/form-data; boundary=x"})
        assert broken.status_code == 400 and "malformed multipart" in broken.json()["error"]

        def chunked_parts():  # no Content-Length: cut off at the image limit plus 1 MB, not read on
            yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
            for _ in range(64):
                yield bytes(1024 * 1024)

        endless = client.post("/edgecatch/feedback", content=chunked_parts(),
                              headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}",
                                       "Content-Type": "multipart/form-data; boundary=x"})
        assert endless.status_code == 413 and "body larger than" in endless.json()["error"]
        lowercase = client.post("/edgecatch/feedback", json={"inference_id": "w1-0123456789abcdef",
                                                              "verdict": "correct"},
                                headers={"Authorization": f"bearer {FEEDBACK_TOKEN}"})
        assert lowercase.status_code == 404


def test_metrics_on_bentomls_own_endpoint(service, sample_jpegs):
    before = service.metric("edgecatch_predictions_total", {"model": "people-detector"})
    with service.client() as client:
        for _ in range(3):
            assert detect(client, "coins.jpg", sample_jpegs["coins"]).status_code == 200
    # The request path tallies; a background loop writes the tally every 0.25 s.
    assert wait_for(lambda: service.metric("edgecatch_predictions_total", {"model": "people-detector"}) == before + 3)
    assert service.metric("edgecatch_detections_count", {"model": "people-detector"}) >= 3
    assert service.metric("edgecatch_prediction_confidence_count", {"model": "people-detector"}) >= 3
    assert service.metric("edgecatch_samples_total", {"model": "people-detector", "policy": "low-confidence"}) >= 1
    assert service.metric("bentoml_service_request_total") > 0  # BentoML's own metrics are still there


def test_broken_policy_on_reload_keeps_serving_with_the_old_one(service, upload_api, sample_jpegs):
    good = service.policy_path.read_text()
    try:
        service.policy_path.write_text(good.replace("confidence_between", "confidence_betwen"))
        assert wait_for(lambda: service.metric("edgecatch_policy_reloads_total", {"outcome": "failure"}) >= 2,
                        timeout=30)  # both workers noticed
        with service.client() as client:
            response = detect(client, "astronaut.jpg", sample_jpegs["astronaut"])
            assert response.status_code == 200
            inference_id = response.headers["x-edgecatch-inference-id"]
        # The last good policies are still in force: a verdict is still selected by them.
        with service.client() as client:
            answer = client.post("/edgecatch/feedback", json={"inference_id": inference_id, "verdict": "incorrect"},
                                 headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}"})
        assert answer.status_code == 202 and answer.json()["policy"] == "user-says-wrong"
        assert "policies[2].confidence_betwen" in service.log()  # the error names the place
    finally:
        service.policy_path.write_text(good.replace("tags: [bento-test]", "tags: [bento-test, reloaded]"))
    assert wait_for(lambda: service.metric("edgecatch_policy_reloads_total", {"outcome": "success"}) >= 2,
                    timeout=30)
    # Ops read in the log that the edit took effect (INFO, as verbose as BentoML's own logger).
    assert wait_for(lambda: service.log().count("reloaded policies from") >= 2, timeout=10)


def test_destination_down_does_not_fail_predictions_and_nothing_is_lost(service, upload_api, unique_jpeg):
    upload_api.down()
    ids = []
    try:
        with service.client() as client:
            for name in ("grass", "moon", "brick", "text"):  # nothing detected: all selected
                response = detect(client, f"{name}.jpg", unique_jpeg(name))
                assert response.status_code == 200 and response.json() == []
                ids.append(response.headers["x-edgecatch-inference-id"])
        assert wait_for(lambda: service.metric("edgecatch_uploads_total", {"outcome": "transient_error"}) >= 1,
                        timeout=30)
        assert not any(uploads_for(upload_api, i) for i in ids)
    finally:
        upload_api.up()
    assert wait_for(lambda: all(len(uploads_for(upload_api, i)) == 1 for i in ids), timeout=60)
    assert service.metric("edgecatch_dropped_total") == 0


def test_undecodable_images_get_the_services_own_error_and_are_counted(service, sample_jpegs):
    before = service.metric("edgecatch_unparsed_total", {"reason": "api_error"})
    truncated = sample_jpegs["astronaut"][:2000]  # a valid header, then nothing: fails when decoded
    with service.client() as client:
        garbage = detect(client, "x.jpg", b"this is not an image")
        assert garbage.status_code >= 400  # BentoML's own input validation answers
        broken = detect(client, "t.jpg", truncated)
        assert broken.status_code == 500
        assert detect(client, "coins.jpg", sample_jpegs["coins"]).status_code == 200
    assert service.metric("edgecatch_unparsed_total", {"reason": "api_error"}) == before + 1
