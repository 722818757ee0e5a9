"""Fixtures for the delivery tests: a real Upload API server on 127.0.0.1, fresh metrics, samples."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from edgecatch.delivery.config import DeliveryConfig
from edgecatch.delivery.sample import SampleDetection, SampleRecord, new_sample_id
from edgecatch.delivery.spool import Spool
from edgecatch.metrics import Metrics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from upload_api_server import UploadApiServer  # noqa: E402


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


@pytest.fixture
def server():
    api = UploadApiServer().up()
    yield api
    api.clear()
    api.down()


def jpeg(width: int = 48, height: int = 32, seed: bytes | None = None) -> bytes:
    """A small JPEG whose bytes are unique (random pixels), like distinct camera frames."""
    pixels = seed if seed is not None else os.urandom(width * height * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels[: width * height * 3].ljust(width * height * 3, b"\0")).save(
        out, "JPEG", quality=80)
    return out.getvalue()


def make_record(task: str = "detection", **kw) -> SampleRecord:
    fields = dict(sample_id=new_sample_id(), created=time.time(), model="people", width=48, height=32,
                  task=task, model_version="3", policy="low-confidence", tags=("low-confidence", "cam-7"),
                  batch="edgecatch-2026-11-24", inference_id="w1-0123456789abcdef")
    if task == "detection":
        fields["detections"] = (SampleDetection("person", 0, 0.42, (4.0, 2.0, 20.0, 30.0)),
                                SampleDetection("dog", 16, 0.31, (24.0, 10.0, 47.0, 31.0)))
    else:
        fields["classification"] = (("cat", 0.55), ("dog", 0.45))
    fields.update(kw)
    return SampleRecord(**fields)


def fill_spool(spool: Spool, n: int, task: str = "detection") -> list[str]:
    """Put n distinct samples into the spool; returns their sample ids, oldest first."""
    ids = []
    batch = []
    for _ in range(n):
        record = make_record(task)
        ids.append(record.sample_id)
        batch.append((record, jpeg()))
        if len(batch) == 64:
            assert all(spool.put_many(batch))
            batch = []
    if batch:
        assert all(spool.put_many(batch))
    return ids


def fast_retry() -> dict:
    return {"initial_seconds": 0.02, "max_seconds": 0.2, "jitter": 0.5, "auth_pause_seconds": 0.3}


@pytest.fixture
def roboflow_config(tmp_path: Path, server: UploadApiServer, monkeypatch) -> Callable[..., DeliveryConfig]:
    monkeypatch.setenv("TEST_ROBOFLOW_KEY", server.api_key)

    def make(**overrides) -> DeliveryConfig:
        data = {
            "spool_dir": str(tmp_path / "spool"),
            "concurrency": 4,
            "retry": fast_retry(),
            "poll_seconds": 0.05,
            "drain_seconds": 10,
            "sink": {"type": "roboflow", "base_url": server.url, "dataset": server.dataset,
                     "api_key_env": "TEST_ROBOFLOW_KEY", "timeout_seconds": 5},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return DeliveryConfig.model_validate(data)

    return make


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll until true (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def open_spool(config: DeliveryConfig, metrics: Metrics) -> Spool:
    return Spool(config.spool_dir, max_bytes=config.max_bytes, max_items=config.max_items,
                 overflow=config.overflow, metrics=metrics).open()
