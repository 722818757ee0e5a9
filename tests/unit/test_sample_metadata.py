"""What travels with a sample: why it was collected, and what the user said."""

from __future__ import annotations

import io

from PIL import Image

from edgecatch.delivery.prepare import build_record, prepare_image
from edgecatch.delivery.sample import SampleRecord, new_sample_id
from edgecatch.observation import Detection, Observation, Verdict
from edgecatch.policies.decision import Decision


def test_reason_feedback_note_and_corrected_labels_travel_in_the_pixels_of_the_prepared_image():
    out = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(out, format="PNG")
    prepared, _ = prepare_image(out.getvalue(), max_size=1000, jpeg_quality=80)  # scaled by 0.5
    observation = Observation(
        model="m", image_width=2000, image_height=1000, inference_id="w1-0123456789abcdef",
        detections=(Detection("person", 0.4, (100, 100, 300, 500), 0),),
        feedback=Verdict.INCORRECT, feedback_note="two people, not one",
        corrected=(Detection("person", 1.0, (100, 100, 300, 500), 0), Detection("person", 1.0, (400, 0, 600, 200), 0)))
    decision = Decision(selected=True, policy="user-says-wrong", matched=("user-says-wrong",),
                        reasons={"user-says-wrong": "always"}, tags=("feedback",))
    record = build_record(new_sample_id(), 1.0, observation, decision, prepared)
    meta = record.metadata()
    assert meta["reason"] == "always" and meta["feedback"] == "incorrect"
    assert meta["feedback_note"] == "two people, not one"
    assert [c["box"] for c in meta["corrected"]] == [[50.0, 50.0, 150.0, 250.0], [200.0, 0.0, 300.0, 100.0]]
    assert record.detections[0].box == (50.0, 50.0, 150.0, 250.0)  # pre-labels stay the model's own
    assert SampleRecord.from_json(record.to_json()) == record


def test_records_spooled_before_these_fields_existed_still_read():
    import json

    record = build_record(new_sample_id(), 1.0, Observation(model="m", image_width=10, image_height=10),
                          Decision(selected=True, policy="p"), prepare_image(_png(), 100, 80)[0])
    old = json.loads(record.to_json())
    for key in ("feedback_note", "corrected", "corrected_classification"):
        del old[key]
    assert SampleRecord.from_json(json.dumps(old).encode()) == record


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (10, 10)).save(out, format="PNG")
    return out.getvalue()
