"""The `Delivery` lifecycle through its synchronous face: hand-off, states, graceful stop, restart."""

from __future__ import annotations

import io
import threading
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from edgecatch.delivery import Delivery, State
from edgecatch.delivery.config import DeliveryConfig
from edgecatch.delivery.schedule import Windows
from edgecatch.observation import Detection, Observation
from edgecatch.policies.decision import Decision
from edgecatch.policies.schema import ImageSettings

from .conftest import jpeg, open_spool, wait_for

DECISION = Decision(selected=True, policy="low", tags=("low",), batch="b")


def observation(i: int = 0) -> Observation:
    return Observation(model="people", model_version="1", image_width=48, image_height=32,
                       detections=(Detection("person", 0.4, (1, 2, 30, 31), 0),), inference_id=f"w1-{i:016x}")


def test_queue_full_drops_and_counts_without_waiting(tmp_path, metrics, registry):
    config = DeliveryConfig.model_validate({"spool_dir": str(tmp_path / "s"), "queue_size": 3})
    delivery = Delivery(config, metrics=metrics)  # not started: nothing drains the queue
    results = [delivery.submit(observation(i), b"img", DECISION) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert registry.get_sample_value("edgecatch_dropped_total", {"reason": "queue_full"}) == 2


def test_states_and_submit_after_stop(tmp_path, metrics, registry):
    config = DeliveryConfig.model_validate({"spool_dir": str(tmp_path / "s"),
                                            "sink": {"type": "directory", "path": str(tmp_path / "ds")}})
    delivery = Delivery(config, metrics=metrics)
    assert delivery.state is State.NEW
    delivery.start()
    delivery.start()  # idempotent
    assert delivery.state is State.RUNNING
    assert delivery.stop() is True
    assert delivery.state is State.STOPPED
    assert delivery.submit(observation(), b"img", DECISION) is False
    assert registry.get_sample_value("edgecatch_dropped_total", {"reason": "not_running"}) == 1


def test_every_image_kind_from_any_thread_reaches_the_destination(server, roboflow_config, metrics, registry):
    config = roboflow_config()
    delivery = Delivery(config, metrics=metrics)
    delivery.start()
    rgb = np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb[::-1].copy()).save(png, "PNG")
    images = [jpeg(), Image.fromarray(rgb), png.getvalue(), rgb[:, ::-1].copy()]

    def submit_from_thread(i: int, image) -> None:
        assert delivery.submit(observation(i), image, DECISION, ImageSettings(max_size=40, jpeg_quality=70))

    threads = [threading.Thread(target=submit_from_thread, args=(i, image)) for i, image in enumerate(images)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert delivery.submit(observation(9), b"garbage", DECISION)  # counted as bad_image in the background
    try:
        wait_for(lambda: len(server.annotated()) == 4, what="four deliveries")
        wait_for(lambda: registry.get_sample_value("edgecatch_dropped_total", {"reason": "bad_image"}) == 1,
                 what="the bad image to be counted")
    finally:
        assert delivery.stop() is True
    for stored in server.images_by_name().values():
        image = Image.open(io.BytesIO(stored.data))
        assert image.format == "JPEG" and image.size == (40, 27)  # 48x32 scaled to fit 40
        assert stored.metadata["model"] == "people" and stored.params["inference_id"][0].startswith("w1-")


def test_graceful_stop_leaves_the_rest_spooled_and_a_restart_delivers_it(server, roboflow_config, metrics):
    config = roboflow_config(concurrency=2)
    server.down()
    delivery = Delivery(config, metrics=metrics)
    delivery.start()
    for i in range(30):
        assert delivery.submit(observation(i), jpeg(), DECISION)
    # The destination is down: the drain cannot finish; the deadline ends it, nothing is lost.
    assert delivery.stop(timeout=0.5) is False
    assert delivery.state is State.STOPPED
    assert len(open_spool(config, metrics)) == 30

    server.up()
    again = Delivery(config, metrics=metrics)
    again.start()
    try:
        wait_for(lambda: len(server.annotated()) == 30, what="delivery after the restart")
    finally:
        assert again.stop() is True
    assert all(count == 1 for count in server.store.stored_names.values())
    assert again.health()["delivery_state"] == "stopped" and again.health()["delivered"] == 30


@pytest.mark.parametrize("overflow", ["drop_oldest", "drop_newest"])
def test_spool_full_applies_the_overflow_rule_end_to_end(overflow, server, roboflow_config, metrics, registry):
    config = roboflow_config(max_items=5, overflow=overflow, windows=["01:00-02:00"])
    now = [datetime(2026, 11, 24, 12, 0)]  # outside the window: nothing is claimed, the spool fills
    delivery = Delivery(config, metrics=metrics, windows=Windows(config.parsed_windows(), now=lambda: now[0]))
    delivery.start()
    try:
        def full_drops() -> float:
            return registry.get_sample_value("edgecatch_dropped_total", {"reason": "spool_full"}) or 0

        for i in range(8):  # one at a time, so the order of arrival is known
            assert delivery.submit(observation(i), jpeg(), DECISION)
            wait_for(lambda: delivery.spooled + (full_drops() if overflow == "drop_newest" else 0) == i + 1,
                     what="the sample to be spooled")
        assert full_drops() == 3
        assert len(delivery.spool) == 5
        now[0] = datetime(2026, 11, 25, 1, 0)
        wait_for(lambda: len(server.annotated()) == 5, what="the five kept samples")
    finally:
        delivery.stop()
    kept = sorted(image.params["inference_id"][0] for image in server.images_by_name().values())
    expected = range(3, 8) if overflow == "drop_oldest" else range(0, 5)
    assert kept == [f"w1-{i:016x}" for i in expected]


EXIT_WITHOUT_STOP = r"""
import sys, time
from pathlib import Path
from edgecatch.collector import configure
from edgecatch.observation import Detection, Observation

base = Path(sys.argv[1])
(base / "e.yaml").write_text(
    "policies: " + sys.argv[2] + "\n"
    "delivery: {spool_dir: " + str(base / "spool") + ", sink: {type: directory, path: " + str(base / "ds") + "}}\n")
collector = configure(base / "e.yaml")
collector.start()
collector.observe(Observation(model="m", detections=(Detection("person", 0.3, (1, 1, 5, 5)),),
                              inference_id=collector.new_inference_id(), timestamp=time.time()), None)
time.sleep(0.5)
print("exiting without stop()")
import atexit
atexit.register(time.sleep, 2.5)  # a slow exit: runs after the thread pools are shut down
"""


def test_a_program_that_exits_without_stopping_delivery_exits_quietly(tmp_path):
    """A script that starts edgecatch and ends without stop(): no tracebacks from delivery's workers
    finding the interpreter's thread pool shut down (they used to log one per poll until exit)."""
    import subprocess
    import sys

    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\npolicies: [{name: never, detections: {min: 1000}}]\n")
    result = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_STOP, str(tmp_path), str(policy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "exiting without stop()" in result.stdout
    assert "Traceback" not in result.stderr and "failed" not in result.stderr, result.stderr


def test_preparation_stops_at_the_drain_deadline_mid_batch(tmp_path, metrics):
    """A batch of large images takes a second or more to prepare: past the deadline, what is not
    prepared yet goes back to the queue (counted as dropped at shutdown) instead of overshooting."""
    config = DeliveryConfig.model_validate({"spool_dir": str(tmp_path / "s"),
                                            "sink": {"type": "directory", "path": str(tmp_path / "ds")}})
    delivery = Delivery(config, metrics=metrics)
    delivery.spool = open_spool(config, metrics)
    for i in range(5):
        assert delivery.submit(observation(i), jpeg(), DECISION)
    batch = [delivery._queue.popleft() for _ in range(5)]
    delivery._prep_stop.set()
    delivery._prep_deadline = 0.0  # long past
    delivery._spool_batch(batch)
    assert len(delivery.spool) == 0 and list(delivery._queue) == batch


def test_a_busy_worker_still_sees_what_other_processes_spool(server, roboflow_config, metrics, registry):
    """Workers of several processes share one spool folder, and its gauges are said to report the
    folder. A process whose delivery is busy with a backlog (here: a bandwidth limit of about one
    sample a second) never goes idle, where it used to look at the folder: it must look anyway."""
    from prometheus_client import CollectorRegistry

    from edgecatch.metrics import Metrics

    from .conftest import fill_spool

    config = roboflow_config(concurrency=1, max_bytes_per_second=len(jpeg()) + 2000, drain_seconds=0.5)
    fill_spool(open_spool(config, metrics), 40)
    delivery = Delivery(config, metrics=metrics)
    delivery.start()
    try:
        items = lambda: registry.get_sample_value("edgecatch_spool_items")  # noqa: E731
        wait_for(lambda: len(server.annotated()) >= 1, timeout=30, what="a first delivery")
        fill_spool(open_spool(config, Metrics(CollectorRegistry())), 30)  # another process's samples
        wait_for(lambda: items() > 40, timeout=30, what="the other process's samples in the gauge")
    finally:
        delivery.stop()
