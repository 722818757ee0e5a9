"""Delivery to a real Upload API server on 127.0.0.1, through every switch of the server."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime

import pytest

from edgecatch.delivery import Delivery
from edgecatch.delivery.schedule import Windows
from edgecatch.delivery.spool import decode_entry

from .conftest import fill_spool, open_spool, wait_for


def value(registry, name, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def delivered(registry, outcome="delivered") -> float:
    return value(registry, "edgecatch_uploads_total", sink="roboflow", outcome=outcome)


def assert_exactly_once(server, ids: list[str]) -> None:
    images = server.images_by_name()
    names = {f"{sample_id}.jpg" for sample_id in ids}
    assert set(images) == names
    assert all(server.store.stored_names[name] == 1 for name in names)
    for image in images.values():
        assert image.annotation is not None, image.name
        assert server.store.annotate_requests[image.image_id] >= 1


def run_delivery(config, metrics, **kw) -> Delivery:
    delivery = Delivery(config, metrics=metrics, **kw)
    delivery.start()
    return delivery


def test_destination_down_then_back_delivers_thousands_exactly_once(server, roboflow_config, metrics, registry):
    config = roboflow_config(concurrency=8)
    ids = fill_spool(open_spool(config, metrics), 3000)
    server.down()
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: value(registry, "edgecatch_uploads_total", sink="roboflow", outcome="transient_error") >= 5,
                 what="failed attempts while the destination is down")
        assert delivered(registry) == 0
        assert len(delivery.spool) == 3000
        server.up()  # same port
        wait_for(lambda: len(delivery.spool) == 0, timeout=120, what="the backlog to drain")
    finally:
        delivery.stop(timeout=5)
    assert_exactly_once(server, ids)
    assert delivered(registry) == 3000
    assert value(registry, "edgecatch_spool_items") == 0
    # Oldest first: with 8 workers and retries, a sample can be overtaken by some others, but the
    # first half the server stored is (almost all) the older half of the backlog.
    order = [image.name[:32] for image in server.store.images.values()]
    older_half = set(ids[:1500])
    assert sum(1 for sample_id in order[:1500] if sample_id in older_half) >= 0.95 * 1500


def test_annotation_annotated_as_prediction_with_metadata(server, roboflow_config, metrics, registry):
    config = roboflow_config()
    spool = open_spool(config, metrics)
    ids = fill_spool(spool, 3, task="detection") + fill_spool(spool, 2, task="classification")
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    assert_exactly_once(server, ids)
    for image in server.images_by_name().values():
        assert image.params["batch"] == ["edgecatch-2026-11-24"]
        assert image.params["tag"] == ["low-confidence", "cam-7"]
        assert image.params["inference_id"] == ["w1-0123456789abcdef"]
        assert image.metadata["model"] == "people" and image.metadata["policy"] == "low-confidence"
        assert image.metadata["sample_id"] == image.name[:32]
        annotation = image.annotation
        assert annotation["params"]["prediction"] == ["true"]
        if annotation["name"].endswith(".json"):
            document = json.loads(annotation["text"])
            assert document["image"] == {"width": 48, "height": 32}
            person = document["predictions"][0]
            # Box (4, 2, 20, 30) as centre + size.
            assert (person["x"], person["y"], person["width"], person["height"]) == (12, 16, 16, 28)
            assert person["class"] == "person" and person["class_id"] == 0
        else:
            assert annotation["name"].endswith(".txt") and annotation["text"] == "cat"


@pytest.mark.parametrize("kind", ["500", "502"])
def test_server_errors_are_retried(kind, server, roboflow_config, metrics, registry):
    config = roboflow_config(concurrency=1)
    ids = fill_spool(open_spool(config, metrics), 5)
    server.fault(kind, step="upload", times=3)
    server.fault(kind, step="annotate", times=2)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    assert_exactly_once(server, ids)
    assert delivered(registry) == 5
    assert value(registry, "edgecatch_uploads_total", sink="roboflow", outcome="transient_error") == 5
    statuses = [status for _, status, _ in server.store.log]
    assert statuses.count(int(kind)) == 5
    # The annotation failures did not cause a second upload of the same image.
    assert all(count == 1 for count in server.store.upload_requests.values())


def test_annotation_failure_after_upload_redoes_only_the_annotation(server, roboflow_config, metrics):
    config = roboflow_config(concurrency=1)
    ids = fill_spool(open_spool(config, metrics), 3)
    server.fault("500", step="annotate", times=1)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    assert_exactly_once(server, ids)
    assert sorted(server.store.upload_requests.values()) == [1, 1, 1]
    assert sorted(server.store.annotate_requests.values()) == [1, 1, 1]
    assert sorted(status for step, status, _ in server.store.log if step == "annotate") == [200, 200, 200, 500]


def test_slow_destination_times_out_and_is_retried(server, roboflow_config, metrics, registry):
    config = roboflow_config(concurrency=1, sink={"timeout_seconds": 0.3})
    ids = fill_spool(open_spool(config, metrics), 2)
    server.fault("slow", step="upload", times=1, delay=1.5)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    assert value(registry, "edgecatch_uploads_total", sink="roboflow", outcome="transient_error") >= 1
    wait_for(lambda: server.in_flight["upload"] == 0, what="the slow request to finish")
    # The slow request may still have stored its image after the client gave up; the retry then
    # got "duplicate": one image per sample either way.
    assert_exactly_once(server, ids)


def test_429_honours_retry_after(server, roboflow_config, metrics, registry, caplog):
    config = roboflow_config(concurrency=1)
    ids = fill_spool(open_spool(config, metrics), 2)
    server.fault("429", step="upload", times=1, retry_after="1")
    caplog.set_level(logging.WARNING, logger="edgecatch")
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    assert_exactly_once(server, ids)
    assert value(registry, "edgecatch_uploads_total", sink="roboflow", outcome="rate_limited") == 1
    # The wait came from Retry-After (1 s), not from the backoff (0.02 s initial).
    assert any("HTTP 429" in r.getMessage() and "retrying in 1.0 s" in r.getMessage() for r in caplog.records)


def test_400_goes_to_dead_letters_with_the_answer_and_the_rest_is_delivered(server, roboflow_config, metrics,
                                                                            registry):
    config = roboflow_config(concurrency=1)
    ids = fill_spool(open_spool(config, metrics), 4)
    server.fault("400", step="upload", times=1)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    dead = config.spool_dir / "dead"
    (entry,) = dead.glob("*.ecs")
    rejected_id = entry.stem
    assert rejected_id == ids[0]  # oldest first
    answer = json.loads((dead / f"{rejected_id}.answer.json").read_text())
    assert answer["status"] == 400 and answer["step"] == "upload" and answer["reason"] == "rejected"
    assert "bad request" in answer["answer"] and "api_key=***" in answer["answer"]
    record, _ = decode_entry(entry.read_bytes())
    assert record.sample_id == rejected_id
    assert value(registry, "edgecatch_dead_letters_total", sink="roboflow", reason="rejected") == 1
    assert_exactly_once(server, ids[1:])

    # Ops fix the cause and retry the dead letters.
    spool = open_spool(config, metrics)
    assert spool.retry_dead_letters() == 1
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery of the retried dead letter")
    finally:
        delivery.stop()
    assert_exactly_once(server, ids)
    assert not list(dead.iterdir())


def test_401_pauses_the_sink_with_an_alarm_and_keeps_the_spool(server, roboflow_config, metrics, registry, caplog):
    config = roboflow_config(concurrency=4, retry={"auth_pause_seconds": 0.3})
    ids = fill_spool(open_spool(config, metrics), 50)
    server.fault("401")
    caplog.set_level(logging.INFO)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: value(registry, "edgecatch_sink_paused", sink="roboflow") == 1, what="the pause")
        wait_for(lambda: value(registry, "edgecatch_uploads_total", sink="roboflow", outcome="auth_error") >= 3,
                 what="a few probes")
        refused = value(registry, "edgecatch_uploads_total", sink="roboflow", outcome="auth_error")
        # Not burning through the spool: everything is still there, nothing dead-lettered, and the
        # server saw at most the first wave (one per worker) plus one probe per pause period.
        assert len(delivery.spool) == 50
        assert not list((config.spool_dir / "dead").iterdir())
        assert len(server.store.log) <= refused + 4 and refused < 50  # +4: answered, not yet counted
        assert delivery.health()["sink_paused"] is True
        alarms = [r for r in caplog.records if r.levelno == logging.ERROR and "ALARM" in r.getMessage()]
        assert len(alarms) == 1 and "API key" in alarms[0].getMessage()
        server.clear()  # the key works again
        wait_for(lambda: len(delivery.spool) == 0, what="delivery after the key was fixed")
    finally:
        delivery.stop()
    assert value(registry, "edgecatch_sink_paused", sink="roboflow") == 0
    assert_exactly_once(server, ids)


def test_wrong_key_is_a_real_401(server, roboflow_config, metrics, registry, monkeypatch):
    config = roboflow_config()
    monkeypatch.setenv("TEST_ROBOFLOW_KEY", "not-the-key")
    fill_spool(open_spool(config, metrics), 3)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: value(registry, "edgecatch_sink_paused", sink="roboflow") == 1, what="the pause")
    finally:
        delivery.stop(timeout=0)
    assert len(server.images_by_name()) == 0
    assert len(open_spool(config, metrics)) == 3


def test_duplicate_answer_counts_as_delivered_and_is_annotated(server, roboflow_config, metrics, registry):
    config = roboflow_config(concurrency=1)
    ids = fill_spool(open_spool(config, metrics), 3)
    server.fault("duplicate", step="upload", times=2)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    assert_exactly_once(server, ids)
    assert delivered(registry, "duplicate") == 2 and delivered(registry) == 1


def test_409_on_annotate_means_done(server, roboflow_config, metrics, registry):
    config = roboflow_config(concurrency=1)
    spool = open_spool(config, metrics)
    (sample_id,) = fill_spool(spool, 1)
    claim = spool.claim()
    # A previous life stored the image and its annotation, and died before removing the entry.
    import httpx

    image_id = httpx.post(f"{server.url}/dataset/{server.dataset}/upload", params={"api_key": server.api_key},
                          files={"file": ("x.jpg", claim.image, "image/jpeg")},
                          data={"name": f"{sample_id}.jpg"}).json()["id"]
    assert httpx.post(f"{server.url}/dataset/{server.dataset}/annotate/{image_id}",
                      params={"api_key": server.api_key, "name": f"{sample_id}.txt", "prediction": "true"},
                      content=b"person", headers={"Content-Type": "text/plain"}).status_code == 200
    claim.record_image_id(image_id)
    claim.release()
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="delivery")
    finally:
        delivery.stop()
    assert [status for step, status, _ in server.store.log if step == "annotate"] == [200, 409]
    assert server.store.upload_requests[f"{sample_id}.jpg"] == 1
    assert delivered(registry) == 1


def test_outside_the_window_nothing_is_sent(server, roboflow_config, metrics, registry):
    config = roboflow_config(windows=["01:00-05:00"])
    ids = fill_spool(open_spool(config, metrics), 10)
    now = [datetime(2026, 11, 24, 12, 0)]
    delivery = run_delivery(config, metrics, windows=Windows(config.parsed_windows(), now=lambda: now[0]))
    try:
        time.sleep(0.5)  # the workers had many chances to send (poll_seconds is 0.05)
        assert server.store.log == [] and len(delivery.spool) == 10
        now[0] = datetime(2026, 11, 25, 1, 30)  # the window opens
        wait_for(lambda: len(delivery.spool) == 0, what="delivery inside the window", timeout=120)
    finally:
        delivery.stop()
    assert_exactly_once(server, ids)


def test_a_sample_failing_transiently_too_often_becomes_a_dead_letter(server, roboflow_config, metrics, registry):
    # One sample the destination keeps failing while it takes the others: a poison sample.
    config = roboflow_config(concurrency=1, retry={"max_attempts": 3, "initial_seconds": 0.05, "max_seconds": 0.05})
    spool = open_spool(config, metrics)
    poison, *others = fill_spool(spool, 6)
    server.fault("500", step="upload", sample=poison)
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len(delivery.spool) == 0, what="the dead letter")
    finally:
        delivery.stop()
    answer = json.loads((config.spool_dir / "dead" / f"{poison}.answer.json").read_text())
    assert answer["reason"] == "too_many_attempts" and answer["attempts"] == 3 and answer["status"] == 500
    assert value(registry, "edgecatch_dead_letters_total", sink="roboflow", reason="too_many_attempts") == 1
    assert set(server.store.stored_names) >= {f"{sample_id}.jpg" for sample_id in others}


def test_a_destination_down_for_everyone_sends_nothing_to_the_dead_letters(server, roboflow_config, metrics,
                                                                             registry):
    config = roboflow_config(concurrency=2, retry={"max_attempts": 2, "initial_seconds": 0.02, "max_seconds": 0.05})
    sample_ids = fill_spool(open_spool(config, metrics), 5)
    server.fault("500", step="upload")
    delivery = run_delivery(config, metrics)
    try:
        wait_for(lambda: len([s for _, s, _ in server.store.log if s == 500]) >= 20, what="twenty failed attempts")
        assert not list((config.spool_dir / "dead").glob("*.ecs"))  # far past max_attempts for each
        server.clear()  # it comes back: everything is delivered
        wait_for(lambda: len(delivery.spool) == 0, what="the backlog")
    finally:
        delivery.stop()
    assert set(server.store.stored_names) == {f"{sample_id}.jpg" for sample_id in sample_ids}
    assert value(registry, "edgecatch_dead_letters_total", sink="roboflow", reason="too_many_attempts") == 0

def test_answers_that_are_not_the_apis_are_bounded_and_retried(tmp_path, monkeypatch):
    """A destination behind a misconfigured proxy: a redirect, a 500 with a 20 MB error page, an
    image id that needs escaping in the annotate URL. Real HTTP on 127.0.0.1."""
    import asyncio

    from aiohttp import web

    from edgecatch.delivery.config import RoboflowSinkConfig
    from edgecatch.delivery.errors import TransientError
    from edgecatch.delivery.sinks.roboflow import MAX_ANSWER_CHARS, RoboflowSink

    from .conftest import jpeg, make_record

    answers = ["redirect", "huge", "ok"]
    annotated: list[str] = []

    async def upload(request: web.Request) -> web.Response:
        await request.read()
        kind = answers.pop(0)
        if kind == "redirect":
            return web.Response(status=307, headers={"Location": "https://elsewhere.invalid/upload"})
        if kind == "huge":
            return web.Response(status=500, body=b"<html>" + b"x" * 20_000_000, content_type="text/html")
        return web.json_response({"success": True, "id": "a#b/c d"})

    async def annotate(request: web.Request) -> web.Response:
        annotated.append(request.match_info["image_id"])
        return web.json_response({"success": True})

    async def run() -> list[str]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/dataset/d/upload", upload)
        app.router.add_post("/dataset/d/annotate/{image_id}", annotate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        monkeypatch.setenv("K", "secret-key")
        sink = RoboflowSink(RoboflowSinkConfig.model_validate(
            {"type": "roboflow", "base_url": f"http://127.0.0.1:{port}", "dataset": "d", "api_key_env": "K"}))
        failures = []
        try:
            for _ in range(2):
                with pytest.raises(TransientError) as caught:  # retried, not dead-lettered
                    await sink.deliver(make_record(), jpeg(), None, lambda image_id: asyncio.sleep(0))
                failures.append(caught.value)
            stored = []

            async def on_stored(image_id: str) -> None:
                stored.append(image_id)

            assert await sink.deliver(make_record(), jpeg(), None, on_stored) == "delivered"
            assert stored == ["a#b/c d"]
        finally:
            await sink.aclose()
            await runner.cleanup()
        return failures

    redirect, huge = asyncio.run(run())
    assert redirect.status == 307 and "base_url" in str(redirect) and "elsewhere.invalid" in str(redirect)
    assert huge.status == 500 and len(huge.answer) <= MAX_ANSWER_CHARS
    assert annotated == ["a#b/c d"]  # the whole id, escaped on the way and decoded by the server
