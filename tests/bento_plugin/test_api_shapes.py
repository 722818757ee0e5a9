"""The decorator on async, batchable and classification APIs, delivering to the directory sink;
and `enabled: false`. Real `bentoml serve` processes."""

from __future__ import annotations

import json
import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from .harness import start_bento, stop_bento, wait_for, write_config

POLICY = textwrap.dedent("""
    version: 1
    policies:
      - name: everything
        random: 1.0
""")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shapes")
    config_path, policy_path = write_config(
        workdir, POLICY, delivery={"sink": {"type": "directory", "path": str(workdir / "dataset")}})
    server = start_bento("tests.bento_plugin.extra_service:ExtraShapes", workdir, config_path, policy_path, env={})
    yield server
    stop_bento(server)


def manifest(server) -> list[dict]:
    path = server.workdir / "dataset" / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_async_api(service, unique_jpeg):
    with service.client() as client:
        response = client.post("/detect_async", files={"image": ("a.jpg", unique_jpeg("chelsea"), "image/jpeg")})
    assert response.status_code == 200
    inference_id = response.headers["x-edgecatch-inference-id"]
    entry = wait_for(lambda: [e for e in manifest(service) if e["inference_id"] == inference_id])
    (sample,) = entry
    assert sample["model"] == "async-detector" and sample["task"] == "detection"
    # The box covers the top-left quarter of the image as the API saw it; the sink keeps it in pixels.
    (detection,) = sample["detections"]
    assert detection["box"] == [0.0, 0.0, sample["width"] / 2, sample["height"] / 2]
    label = (service.workdir / "dataset" / sample["label"]).read_text().split()
    assert label == ["0", "0.250000", "0.250000", "0.500000", "0.500000"]  # YOLO: centre and size, normalised


def test_batchable_api_gives_one_observation_per_item(service, unique_jpeg):
    before = service.metric("edgecatch_predictions_total", {"model": "batch-detector"})
    images = [unique_jpeg(name) for name in ("coffee", "rocket", "horse", "clock")]

    def call(data: bytes) -> httpx.Response:
        with service.client() as client:
            return client.post("/detect_batch", files={"images": ("x.jpg", data, "image/jpeg")})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(call, images))
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json() == [[{"class": "dog", "class_id": 1, "confidence": 0.4, "box": [1.0, 2.0, 3.0, 4.0]}]]
               or r.json() == [{"class": "dog", "class_id": 1, "confidence": 0.4, "box": [1.0, 2.0, 3.0, 4.0]}]
               for r in responses)
    assert wait_for(lambda: service.metric("edgecatch_predictions_total", {"model": "batch-detector"}) == before + 4)
    assert wait_for(lambda: len([e for e in manifest(service) if e["model"] == "batch-detector"]) >= 4)


def test_class_scores_and_custom_adapter(service, unique_jpeg):
    with service.client() as client:
        plain = client.post("/classify", files={"image": ("m.jpg", unique_jpeg("moon"), "image/jpeg")})
        custom = client.post("/classify_custom", files={"image": ("c.jpg", unique_jpeg("chelsea"), "image/jpeg")})
    assert plain.status_code == custom.status_code == 200
    assert set(plain.json()) == {"bright", "dark"}
    assert custom.json() == {"label": "cat", "probabilities": {"cat": 0.52, "dog": 0.48}}
    ids = {plain.headers["x-edgecatch-inference-id"]: "classifier",
           custom.headers["x-edgecatch-inference-id"]: "custom-classifier"}
    samples = wait_for(lambda: [e for e in manifest(service) if e["inference_id"] in ids] if len(
        [e for e in manifest(service) if e["inference_id"] in ids]) == 2 else None)
    for sample in samples:
        assert sample["task"] == "classification" and sample["model"] == ids[sample["inference_id"]]
        top = "cat" if sample["model"] == "custom-classifier" else max(plain.json(), key=plain.json().get)
        # one folder per class: the image sits in its top class's folder
        assert sample["image"].split("/")[-2] == top
        assert (service.workdir / "dataset" / sample["image"]).exists()


def test_custom_adapters_results_and_failures(service, unique_jpeg):
    with service.client() as client:
        listed = client.post("/detect_listed", files={"image": ("l.jpg", unique_jpeg("coffee"), "image/jpeg")})
        broken = [client.post("/detect_broken", files={"image": ("b.jpg", unique_jpeg("coins"), "image/jpeg")})
                  for _ in range(2)]
    assert listed.status_code == 200 and all(b.status_code == 200 and b.json() == {"what": "cat"} for b in broken)
    inference_id = listed.headers["x-edgecatch-inference-id"]
    (sample,) = wait_for(lambda: [e for e in manifest(service) if e["inference_id"] == inference_id])
    assert [(d["class"], d["box"]) for d in sample["detections"]] == [("cat", [0.0, 0.0, 8.0, 8.0])]
    # an adapter that raises: the API's answer as is, counted as an unreadable result, logged once
    assert wait_for(lambda: service.metric("edgecatch_unparsed_total", {"reason": "result"}) >= 2)
    assert service.log().count("KeyError") <= 1  # once per reason, not a traceback per request


def test_numpy_image_sent_as_json_numbers(service):
    pixels = [[[(x * 20) % 256, (y * 30) % 256, 128] for x in range(12)] for y in range(10)]
    with service.client() as client:
        response = client.post("/detect_array", json={"pixels": pixels})
    assert response.status_code == 200
    inference_id = response.headers["x-edgecatch-inference-id"]
    (sample,) = wait_for(lambda: [e for e in manifest(service) if e["inference_id"] == inference_id])
    assert (sample["width"], sample["height"]) == (12, 10)
    assert (service.workdir / "dataset" / sample["image"]).exists()


def test_a_parameter_named_context_that_is_not_bentomls(service, unique_jpeg):
    with service.client() as client:
        response = client.post("/detect_with_context", data={"context": "dog"},
                               files={"image": ("c.jpg", unique_jpeg("horse"), "image/jpeg")})
    assert response.status_code == 200 and response.json()[0]["class"] == "dog"
    assert response.headers["x-edgecatch-inference-id"]


def test_a_service_without_the_feedback_app_still_delivers(tmp_path, unique_jpeg):
    config_path, policy_path = write_config(tmp_path, POLICY, delivery={"sink": {"type": "directory",
                                                                                  "path": str(tmp_path / "ds")}})
    server = start_bento("tests.bento_plugin.extra_service:Unmounted", tmp_path, config_path, policy_path, env={})
    try:
        with server.client() as client:
            response = client.post("/detect", files={"image": ("u.jpg", unique_jpeg("rocket"), "image/jpeg")})
        assert response.status_code == 200
        inference_id = response.headers["x-edgecatch-inference-id"]
        manifest_path = tmp_path / "ds" / "manifest.jsonl"
        assert wait_for(lambda: manifest_path.exists() and inference_id in manifest_path.read_text())
        assert "edgecatch.app is not mounted on this service" in server.log()
    finally:
        stop_bento(server)


def test_disabled_costs_nothing_and_changes_nothing(tmp_path, unique_jpeg):
    config_path, policy_path = write_config(tmp_path, POLICY, delivery={"sink": {"type": "directory",
                                                                                  "path": str(tmp_path / "ds")}})
    config = yaml.safe_load(config_path.read_text())
    config["enabled"] = False
    config_path.write_text(yaml.safe_dump(config))
    server = start_bento("bento_service.trivial_service:TrivialDetectionService", tmp_path, config_path,
                         policy_path, env={})
    try:
        with server.client() as client:
            response = client.post("/detect", files={"image": ("x.jpg", unique_jpeg("coins"), "image/jpeg")})
            assert response.status_code == 200 and len(response.json()) == 3
            assert "x-edgecatch-inference-id" not in response.headers
            feedback = client.post("/edgecatch/feedback", json={"inference_id": "w1-0123456789abcdef",
                                                                "verdict": "correct"})
            assert feedback.status_code == 503
        assert server.metric("edgecatch_predictions_total") == 0
        assert not (tmp_path / "spool").exists() and not (tmp_path / "ds").exists()
    finally:
        stop_bento(server)
