"""The collector with the real delivery behind it: observe() on the request path, a dataset at the end."""

from __future__ import annotations

import json
import textwrap
import time

import yaml
from prometheus_client import CollectorRegistry

from edgecatch.collector import Collector
from edgecatch.config import EdgecatchConfig
from edgecatch.metrics import Metrics
from edgecatch.observation import Detection, Observation

from .conftest import jpeg, wait_for

POLICY = """
version: 1
image: {max_size: 40, jpeg_quality: 80}
policies:
  - name: low
    confidence_below: 0.5
"""


def test_observe_to_directory_dataset(tmp_path):
    policy = tmp_path / "policies.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    config = EdgecatchConfig.model_validate({
        "policies": str(policy),
        "delivery": {"spool_dir": str(tmp_path / "spool"),
                     "sink": {"type": "directory", "path": str(tmp_path / "dataset")}}})
    registry = CollectorRegistry()
    collector = Collector(config, metrics=Metrics(registry))
    collector.start()
    try:
        for i, confidence in enumerate((0.3, 0.9, 0.2)):
            observation = Observation(
                model="people", image_width=48, image_height=32, timestamp=time.time(),
                inference_id=collector.new_inference_id(),
                detections=(Detection("person", confidence, (0, 0, 48, 32), 0),))
            collector.observe(observation, jpeg())
        manifest = tmp_path / "dataset" / "manifest.jsonl"
        wait_for(lambda: manifest.exists() and len(manifest.read_text().splitlines()) == 2, what="two samples")
    finally:
        collector.stop()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [line["policy"] for line in lines] == ["low", "low"]
    assert all((line["width"], line["height"]) == (40, 27) for line in lines)  # the policy's image settings
    assert yaml.safe_load((tmp_path / "dataset" / "data.yaml").read_text())["names"] == {0: "person"}
    assert registry.get_sample_value("edgecatch_uploads_total", {"sink": "directory", "outcome": "delivered"}) == 2
