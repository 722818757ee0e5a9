"""The collector's logic: observe, metrics, recall, verdicts, silent events, worker forwarding.

Delivery is replaced by a recording fake with the same small interface (submit/start/stop/health):
these tests are about what the collector decides and hands over; delivery has its own tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edgecatch.collector import Collector, _owner_pid
from edgecatch.config import EdgecatchConfig
from edgecatch.metrics import Metrics
from edgecatch.observation import Classification, Detection, Observation, Verdict

POLICY = """
version: 1
limits: {per_hour: 1000}
policies:
  - name: wrong
    feedback: incorrect
    limits: {per_minute: 2}
  - name: right
    feedback: correct
  - name: silent
    feedback: silent
  - name: low
    confidence_below: 0.5
"""


class RecordingDelivery:
    def __init__(self) -> None:
        self.samples = []
        self.started = self.stopped = False

    def submit(self, observation, image, decision, image_settings) -> bool:
        self.samples.append((observation, image, decision))
        return True

    def start(self) -> None:
        self.started = True

    def stop(self, timeout=None) -> None:
        self.stopped = True

    def health(self) -> dict:
        return {"spool_items": 0}


@pytest.fixture
def make_collector(tmp_path):
    made = []

    def make(policy: str = POLICY, spool: Path | None = None, **recall) -> Collector:
        path = tmp_path / "policies.yaml"
        path.write_text(textwrap.dedent(policy))
        config = EdgecatchConfig.model_validate({
            "policies": str(path), "recall": recall or {},
            "delivery": {"spool_dir": str(spool or tmp_path / "spool")},
            "metrics": {"max_class_labels": 2},
        })
        registry = CollectorRegistry()
        collector = Collector(config, metrics=Metrics(registry), delivery=RecordingDelivery())
        collector.registry = registry
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.stop()


def prediction(collector: Collector, confidence: float, classes=("person",)) -> Observation:
    return Observation(
        model="m", inference_id=collector.new_inference_id(), timestamp=time.time(),
        detections=tuple(Detection(c, confidence, (0, 0, 10, 10), i) for i, c in enumerate(classes)))


def test_observe_selects_counts_and_hands_off(make_collector):
    collector = make_collector()
    low = prediction(collector, 0.3)
    decision = collector.observe(low, b"jpeg")
    assert decision.policy == "low"
    assert collector.delivery.samples == [(low, b"jpeg", decision)]
    assert collector.observe(prediction(collector, 0.9), b"jpeg").selected is False
    value = collector.registry.get_sample_value
    assert value("edgecatch_predictions_total", {"model": "m"}) == 2
    assert value("edgecatch_samples_total", {"model": "m", "policy": "low"}) == 1
    assert value("edgecatch_detections_count", {"model": "m"}) == 2
    assert value("edgecatch_prediction_confidence_bucket", {"model": "m", "class": "person", "le": "0.5"}) == 1


def test_class_labels_beyond_the_cap_fold_into_other(make_collector):
    collector = make_collector()
    collector.observe(prediction(collector, 0.9, classes=("a", "b", "c", "d")), None)
    value = collector.registry.get_sample_value
    assert value("edgecatch_prediction_confidence_count", {"model": "m", "class": "a"}) == 1
    assert value("edgecatch_prediction_confidence_count", {"model": "m", "class": "other"}) == 2


def test_verdict_turns_the_recalled_prediction_into_a_feedback_event(make_collector):
    collector = make_collector()
    seen = prediction(collector, 0.9)
    collector.observe(seen, b"the image")
    outcome = collector.feedback(seen.inference_id, Verdict.INCORRECT, note="two people, not one",
                                 corrected=(Detection("person", 1.0, (1, 1, 5, 5)),) * 2)
    assert outcome.status == "accepted" and outcome.decision.policy == "wrong"
    event, image, decision = collector.delivery.samples[-1]
    assert image == b"the image" and event.feedback is Verdict.INCORRECT
    assert event.feedback_note == "two people, not one" and len(event.corrected) == 2
    assert event.detections == seen.detections  # policies and pre-labels keep the model's prediction
    assert collector.registry.get_sample_value("edgecatch_feedback_total", {"verdict": "incorrect"}) == 1


def test_one_verdict_per_prediction_and_unknown_ids(make_collector):
    collector = make_collector()
    seen = prediction(collector, 0.9)
    collector.observe(seen, b"x")
    assert collector.feedback(seen.inference_id, Verdict.CORRECT).status == "accepted"
    assert collector.feedback(seen.inference_id, Verdict.INCORRECT).status == "duplicate"
    assert collector.feedback(f"w{collector._worker_tag}-0123456789abcdef", Verdict.CORRECT).status == "unknown"


def test_feedback_obeys_limits_so_a_loop_cannot_flood(make_collector):
    collector = make_collector()
    selected = 0
    for _ in range(10):
        seen = prediction(collector, 0.9)
        collector.observe(seen, b"x")
        outcome = collector.feedback(seen.inference_id, Verdict.INCORRECT)
        selected += outcome.decision.selected
    assert selected == 2  # per_minute: 2


def test_unknown_id_with_prediction_and_image_is_accepted(make_collector):
    from edgecatch.feedback import PredictionPayload

    collector = make_collector()
    payload = PredictionPayload.model_validate(
        {"model": "m", "detections": [{"class": "cat", "confidence": 0.8, "box": [0, 0, 4, 4]}]})
    outcome = collector.feedback("client-made-id", Verdict.INCORRECT, prediction=payload, image=b"img")
    assert outcome.status == "accepted" and outcome.decision.policy == "wrong"
    event, image, _ = collector.delivery.samples[-1]
    assert image == b"img" and event.detections[0].class_name == "cat"


def test_a_verdict_sent_with_its_prediction_is_still_one_per_id(make_collector):
    from edgecatch.feedback import PredictionPayload

    collector = make_collector()
    payload = PredictionPayload.model_validate({"model": "m", "detections": []})
    first = collector.feedback("client-made-id", Verdict.INCORRECT, prediction=payload, image=b"img")
    again = collector.feedback("client-made-id", Verdict.CORRECT, prediction=payload, image=b"img")
    assert (first.status, again.status) == ("accepted", "duplicate")
    assert len(collector.delivery.samples) == 1


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("authorization, status", [
    ("Bearer s3cret", 202), ("bearer s3cret", 202), ("BEARER  s3cret ", 202),
    ("Bearer wrong", 401), ("Basic s3cret", 401), ("s3cret", 401), (None, 401)])
def test_the_feedback_token_scheme_is_case_insensitive(make_collector, authorization, status):
    from edgecatch.feedback import handle_feedback

    collector = make_collector()
    collector.feedback_token = "s3cret"
    seen = prediction(collector, 0.9)
    collector.observe(seen, b"x")
    body = ('{"inference_id": "%s", "verdict": "correct"}' % seen.inference_id).encode()
    answer = handle_feedback(collector, body=body, content_type="application/json", authorization=authorization)
    assert answer.status == status, answer.body


@pytest.mark.parametrize("form, message", [
    ({"image": "not a file"}, "'image' must be a file part"),
    ({"image": b"\xff\xd8 not really a jpeg"}, "'image' is not an image"),
    ({"image": b""}, "'image' is not an image"),
    ({"image": None}, "needs the 'image' too"),
    ({"image": "huge png"}, "has more than 89478485 pixels"),  # 90 MP of black in ~90 KB
])
def test_an_image_sent_with_a_verdict_must_be_usable_before_it_is_accepted(make_collector, form, message):
    from edgecatch.feedback import handle_feedback

    collector = make_collector()
    if form.get("image") == "huge png":
        import io

        from PIL import Image

        encoded = io.BytesIO()
        Image.new("L", (10_000, 9_000)).save(encoded, "PNG")
        form = {"image": encoded.getvalue()}
    fields = {"feedback": '{"inference_id": "client-1", "verdict": "incorrect"}',
              "prediction": '{"model": "m", "detections": []}', **form}
    fields = {k: v for k, v in fields.items() if v is not None}
    answer = handle_feedback(collector, body=b"", content_type="multipart/form-data", authorization=None, form=fields)
    assert answer.status == 400 and message in answer.body["error"], answer.body
    assert collector.delivery.samples == []
    fields["image"] = _jpeg()
    answer = handle_feedback(collector, body=b"", content_type="multipart/form-data", authorization=None, form=fields)
    assert answer.status == 202 and answer.body["selected"], answer.body


@pytest.mark.parametrize("field, value, message", [
    ("prediction", '{"model": "m", "detections": [{"class": "a", "confidence": 0.5, "box": [NaN, 0, 1, 1]}]}',
     "detections[0].box[0]: Input should be a finite number"),
    ("prediction", '{"model": "m", "classification": {"cat": Infinity}}', "finite number"),
    ("feedback", '{"inference_id": "client-1", "verdict": "incorrect", "corrected": {"detections": '
                 '[{"class": "a", "confidence": 0.5, "box": [0, 0, 1, NaN]}]}}', "finite number"),
    ("prediction", '{"model": "m", "detections": [%s]}' % ", ".join(
        ['{"class": "a", "confidence": 0.5, "box": [0, 0, 1, 1]}'] * 1001), "at most 1000 items"),
    ("prediction", '{"model": "not-served", "detections": []}', "not a model this service serves"),
])
def test_client_sent_labels_are_finite_bounded_and_for_a_served_model(make_collector, field, value, message):
    """Boxes and scores from a client reach YOLO label files and JSON manifests (`nan` breaks both),
    and the model name a metric label and a batch name."""
    from edgecatch.feedback import handle_feedback

    collector = make_collector()
    collector.serve_models(["m"])
    fields = {"feedback": '{"inference_id": "client-1", "verdict": "incorrect"}',
              "prediction": '{"model": "m", "detections": []}', "image": _jpeg(), field: value}
    answer = handle_feedback(collector, body=b"", content_type="multipart/form-data", authorization=None, form=fields)
    assert answer.status == 400 and message in answer.body["error"], answer.body
    assert collector.delivery.samples == []


def test_corrected_labels_are_detections_or_a_classification_not_both(make_collector):
    from edgecatch.feedback import handle_feedback

    collector = make_collector()
    seen = prediction(collector, 0.9)
    collector.observe(seen, b"x")
    body = ('{"inference_id": "%s", "verdict": "incorrect", "corrected": {"detections": [], '
            '"classification": {"cat": 1.0}}}' % seen.inference_id).encode()
    answer = handle_feedback(collector, body=body, content_type="application/json", authorization=None)
    assert answer.status == 400 and "not both" in answer.body["error"]


def test_predictions_leaving_the_buffer_unanswered_become_silent_events(make_collector):
    collector = make_collector(max_items=2)
    first, second, third = (prediction(collector, 0.9) for _ in range(3))
    collector.observe(first, b"1")
    collector.observe(second, b"2")
    collector.feedback(second.inference_id, Verdict.CORRECT)
    collector.observe(third, b"3")  # pushes `first` out, unanswered
    silent = [s for s in collector.delivery.samples if s[0].feedback is Verdict.SILENT]
    assert [(s[0].inference_id, s[1]) for s in silent] == [(first.inference_id, b"1")]
    collector.observe(prediction(collector, 0.9), b"4")  # pushes `second` out: answered, so no event
    assert len([s for s in collector.delivery.samples if s[0].feedback is Verdict.SILENT]) == 1


def test_silent_events_wait_for_whoever_evaluates_them_first(make_collector, monkeypatch):
    monkeypatch.setattr("edgecatch.collector._FLUSH_SECONDS", 3600.0)  # keep the background loop out of it
    collector = make_collector(max_items=1)
    collector.start()
    first, second = prediction(collector, 0.9), prediction(collector, 0.9)
    collector.observe(first, b"1")
    collector.observe(second, b"2")  # pushes `first` out: its silent event is left for later
    assert not [s for s in collector.delivery.samples if s[0].feedback is Verdict.SILENT]
    collector.evaluate_silent_events()  # e.g. the sidecar's loop, after a batch of observations
    silent = [s for s in collector.delivery.samples if s[0].feedback is Verdict.SILENT]
    assert [(s[0].inference_id, s[1], s[2].policy) for s in silent] == [(first.inference_id, b"1", "silent")]
    collector.evaluate_silent_events()  # nothing left: nothing twice
    assert len([s for s in collector.delivery.samples if s[0].feedback is Verdict.SILENT]) == 1


def test_aged_predictions_become_silent_in_the_background(make_collector):
    collector = make_collector(max_age_seconds=0.2)
    collector.start()
    seen = prediction(collector, 0.9)
    collector.observe(seen, b"x")
    deadline = time.monotonic() + 10
    while not collector.delivery.samples and time.monotonic() < deadline:
        time.sleep(0.05)
    ((event, image, decision),) = collector.delivery.samples
    assert event.feedback is Verdict.SILENT and decision.policy == "silent"


def test_classification_metrics_use_the_top_class(make_collector):
    collector = make_collector()
    obs = Observation(model="clf", classification=Classification.from_scores({"cat": 0.7, "dog": 0.3}),
                      inference_id=collector.new_inference_id())
    collector.observe(obs, None)
    assert collector.registry.get_sample_value(
        "edgecatch_prediction_confidence_count", {"model": "clf", "class": "cat"}) == 1


def test_inference_ids_name_their_worker(make_collector):
    collector = make_collector()
    assert _owner_pid(collector.new_inference_id()) == os.getpid()
    assert _owner_pid("no-such-worker-tag!") is None


def test_inference_ids_are_unpredictable_and_differ_in_a_forked_worker(make_collector):
    """The digits are a keyed hash of a counter, the key drawn per process: knowing earlier ids (or
    the generator's algorithm) does not tell the next, and a forked worker draws its own."""
    import random

    collector = make_collector()
    ids = [collector.new_inference_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(_owner_pid(i) == os.getpid() for i in ids)
    # What the previous generator allowed: Mersenne Twister outputs recovered from 312 ids (624
    # 32-bit words) predict every later one. Here a twister fed these ids predicts nothing.
    words = []
    for inference_id in ids[:312]:
        value = int(inference_id.split("-")[1], 16)
        words += [value & 0xFFFFFFFF, value >> 32]
    clone = random.Random()
    clone.setstate((3, tuple(_untemper(w) for w in words) + (624,), None))
    assert all(f"{clone.getrandbits(64):016x}" != i.split("-")[1] for i in ids[312:400])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, ",".join(collector.new_inference_id().split("-")[1] for _ in range(5)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = set(os.read(read, 4096).decode().split(","))
    parent = {collector.new_inference_id().split("-")[1] for _ in range(5)}
    assert len(child) == 5 and not child & parent


def _untemper(y: int) -> int:
    """The Mersenne Twister state word behind one 32-bit output (the inverse of its tempering)."""
    def undo_right(value: int, shift: int) -> int:
        x = value
        for _ in range(32 // shift + 1):
            x = value ^ (x >> shift)
        return x

    def undo_left(value: int, shift: int, mask: int) -> int:
        x = value
        for _ in range(32 // shift + 1):
            x = value ^ ((x << shift) & mask)
        return x & 0xFFFFFFFF

    y = undo_right(y, 18)
    y = undo_left(y, 15, 0xEFC60000)
    y = undo_left(y, 7, 0x9D2C5680)
    return undo_right(y, 11)


@pytest.mark.parametrize("deep", [False, True])
def test_a_verdict_sent_with_its_prediction_is_one_per_id_across_workers(make_collector, tmp_path, deep):
    """The id's worker has forgotten the prediction: the client sends it along with the image (the
    404's hint), to whichever worker. Only the first is accepted: the worker that served it decides,
    and once it is gone, the live worker with the lowest pid. A model not served here is refused.
    `deep`: a spool folder too deep for a Unix socket's 107-byte address, which workers still reach."""
    spool = tmp_path / ("d" * 120 if deep else "") / "spool"
    collector = make_collector(spool=spool)
    collector.start()
    collector.serve_models(["m"])
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_collector import RecordingDelivery
        from prometheus_client import CollectorRegistry
        from edgecatch.collector import Collector
        from edgecatch.feedback import PredictionPayload
        from edgecatch.metrics import Metrics
        from edgecatch.observation import Verdict
        collector = Collector(__import__('edgecatch.config').config.EdgecatchConfig.model_validate(
            {{"policies": {str(tmp_path / 'policies.yaml')!r},
              "delivery": {{"spool_dir": {str(spool)!r}}}}}),
            metrics=Metrics(CollectorRegistry()), delivery=RecordingDelivery())
        collector.start()
        print(collector.new_inference_id(), collector.new_inference_id(), flush=True)  # served, forgotten
        payload = PredictionPayload.model_validate({{"model": "m", "detections": []}})
        for line in sys.stdin:  # ids to give a verdict on, until an empty line
            if not line.strip():
                break
            print(collector.feedback(line.strip(), Verdict.INCORRECT, prediction=payload, image=b"img").status,
                  flush=True)
        collector.stop()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    from edgecatch.feedback import PredictionPayload

    payload = PredictionPayload.model_validate({"model": "m", "detections": []})
    try:
        first, second = child.stdout.readline().split()
        assert collector.feedback(first, Verdict.INCORRECT, prediction=payload, image=b"img").status == "accepted"
        child.stdin.write(first + "\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "duplicate"  # the owner remembered the claim
        assert collector.feedback(first, Verdict.INCORRECT, prediction=payload, image=b"img").status == "duplicate"
        # A worker killed long ago (its id's pid is gone) and a leftover socket whose pid is now
        # another process's, and the lowest: passed over, so the two workers still agree on one.
        import socket as sockets

        stale = sockets.socket(sockets.AF_UNIX)
        stale.bind(collector._socket_address(spool / "run" / "feedback-1.sock"))
        stale.close()  # nothing listens there: connections are refused
        orphan = "w2j9zz-0123456789abcdef"  # pid 4,258,655: above pid_max, no such process
        child.stdin.write(orphan + "\n")
        child.stdin.flush()
        answers = [child.stdout.readline().strip(),
                   collector.feedback(orphan, Verdict.INCORRECT, prediction=payload, image=b"img").status]
        assert sorted(answers) == ["accepted", "duplicate"]
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(20)
        # The owner is gone: the remaining worker decides, once.
        assert collector.feedback(second, Verdict.CORRECT, prediction=payload, image=b"img").status == "accepted"
        assert collector.feedback(second, Verdict.CORRECT, prediction=payload, image=b"img").status == "duplicate"
        evil = PredictionPayload.model_validate({"model": "made-up\nmodel", "detections": []})
        assert collector.feedback(f"w{collector._worker_tag}-0123456789abcdef", Verdict.INCORRECT,
                                  prediction=evil, image=b"img").status == "unknown_model"
        assert [sample[0].inference_id for sample in collector.delivery.samples if sample[0].inference_id != orphan] \
            == [first, second]
    finally:
        child.kill() if child.poll() is None else None
        child.wait(10)


def test_a_verdict_reaching_another_worker_is_forwarded(make_collector, tmp_path):
    """Two real processes share a spool folder: the verdict lands on the one that did not serve."""
    collector = make_collector()
    collector.start()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_collector import RecordingDelivery
        from prometheus_client import CollectorRegistry
        from edgecatch.collector import Collector
        from edgecatch.metrics import Metrics
        from edgecatch.observation import Observation, Detection
        collector = Collector(__import__('edgecatch.config').config.EdgecatchConfig.model_validate(
            {{"policies": {str(tmp_path / 'policies.yaml')!r},
              "delivery": {{"spool_dir": {str(tmp_path / 'spool')!r}}}}}),
            metrics=Metrics(CollectorRegistry()), delivery=RecordingDelivery())
        collector.start()
        obs = Observation(model="m", inference_id=collector.new_inference_id(), timestamp=time.time(),
                          detections=(Detection("person", 0.9, (0, 0, 1, 1)),))
        collector.observe(obs, b"served by the child")
        print(obs.inference_id, flush=True)
        sys.stdin.readline()
        print(len(collector.delivery.samples), collector.delivery.samples[-1][0].feedback.value, flush=True)
        collector.stop()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        inference_id = child.stdout.readline().strip()
        outcome = collector.feedback(inference_id, Verdict.INCORRECT, note="forwarded")
        assert outcome.status == "accepted" and outcome.decision.policy == "wrong"
        assert collector.delivery.samples == []  # the child, which remembers the image, handed it off
        assert collector.feedback(inference_id, Verdict.CORRECT).status == "duplicate"
        # Sent along with the prediction and the image, it still goes to the worker that remembers it.
        from edgecatch.feedback import PredictionPayload

        payload = PredictionPayload.model_validate({"model": "m", "detections": []})
        assert collector.feedback(inference_id, Verdict.CORRECT, prediction=payload, image=b"img").status == \
            "duplicate"
        assert collector.delivery.samples == []
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["1", "incorrect"]
    finally:
        child.kill() if child.poll() is None else None
        child.wait(10)


def test_an_unreadable_prediction_is_logged_once_on_one_line(make_collector, caplog):
    """What could not be read quotes the client's own names and types: escaped, so that a client
    cannot write lines of its own into the log."""
    import logging

    collector = make_collector()
    with caplog.at_level(logging.WARNING, logger="edgecatch"):
        for _ in range(3):
            collector.count_unparsed("http_tensor", detail="tensor X\nERROR forged line\x1b[31m", model="m")
    (record,) = [r for r in caplog.records if "could not read" in r.getMessage()]
    assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage()
    assert "tensor X\\x0aERROR forged line\\x1b[31m" in record.getMessage()
    assert collector.registry.get_sample_value("edgecatch_unparsed_total", {"reason": "http_tensor"}) == 3


def test_a_bug_reading_predictions_is_counted_each_time_and_logged_once_per_place(make_collector, caplog):
    """A bug hit by every call must not flood the log, nor hide another bug of the same type."""
    import logging

    collector = make_collector()

    def reads_a_list(index):
        return [][index]

    def reads_a_string(index):
        return ""[index]  # an IndexError too, in another place

    with caplog.at_level(logging.ERROR, logger="edgecatch"):
        for read in (reads_a_list, reads_a_list, reads_a_string, reads_a_list):
            try:
                read(1)
            except IndexError as exc:
                collector.count_internal_error(exc, "observing a call")
    logged = [r for r in caplog.records if r.getMessage().startswith("observing a call failed")]
    assert [record.exc_info[1].__traceback__.tb_next.tb_frame.f_code.co_name for record in logged] == \
        ["reads_a_list", "reads_a_string"]
    assert collector.registry.get_sample_value("edgecatch_unparsed_total", {"reason": "internal"}) == 4
