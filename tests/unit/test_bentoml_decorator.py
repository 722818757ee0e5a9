"""What `edgecatch.observe` refuses when a service is defined, with errors that say what to do."""

from __future__ import annotations

import inspect
import logging

import bentoml
import pytest

from edgecatch.integrations import bentoml as edgecatch


def test_streaming_apis_are_refused():
    with pytest.raises(TypeError, match="streams its output"):
        @edgecatch.observe(image="image")
        def stream(self, image: bytes):
            yield b"chunk"

    with pytest.raises(TypeError, match="streams its output"):
        @edgecatch.observe(image="image")
        async def astream(self, image: bytes):
            yield b"chunk"


def test_above_bentoml_api_is_refused():
    with pytest.raises(TypeError, match="below @bentoml.api"):
        @edgecatch.observe(image="image")
        @bentoml.api
        def detect(self, image: bytes) -> list[dict]:
            return []


def test_without_parentheses_is_refused():
    with pytest.raises(TypeError, match="with its parentheses"):
        @edgecatch.observe
        def detect(self, image: bytes) -> list[dict]:
            return []


def test_a_ctx_parameter_that_is_not_a_context_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="edgecatch.bentoml"):
        @edgecatch.observe(image="image")
        def detect(self, image: bytes, ctx: str = "") -> list[dict]:
            return []

    assert "cannot carry X-Edgecatch-Inference-Id" in caplog.text


@pytest.mark.parametrize("annotation", [bentoml.Context, "bentoml.Context", None])
def test_the_apis_own_context_is_used(annotation):
    def detect(self, image: bytes, ctx=None) -> list[dict]:
        return []

    if annotation is not None:
        detect.__annotations__["ctx"] = annotation
    wrapped = edgecatch.observe(image="image")(detect)
    # no second context parameter was added: BentoML passes the API's own
    assert list(inspect.signature(wrapped).parameters) == ["self", "image", "ctx"]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_of_an_upright_image_land_on_it_after_delivery_prepares_it(orientation):
    """A model that applies the EXIF orientation (as the example detector does) returns boxes in the
    upright image; the sample's box must be on the same pixels, also for flips and 180° turns."""
    import io

    from PIL import Image

    from edgecatch.delivery.prepare import build_record, prepare_image
    from edgecatch.integrations.bentoml import _captured, _Watcher
    from edgecatch.integrations.results import resolve_adapter
    from edgecatch.policies.decision import Decision

    from tests.exif_images import marked_exif_jpeg

    data, (x1, y1, x2, y2) = marked_exif_jpeg((400, 300), orientation)

    class Recording:
        def __init__(self):
            self.observed = []

        def observe(self, observation, image):
            self.observed.append((observation, image))

        def count_unparsed(self, reason, detail=None, **kw):
            raise AssertionError(reason)

    collector = Recording()
    watcher = _Watcher(resolve_adapter("detections"), "m", "", None)
    result = [{"class": "thing", "confidence": 0.9, "box": [float(x1), float(y1), float(x2), float(y2)]}]
    watcher._watch_one(collector, "w1-0", _captured(Image.open(io.BytesIO(data))), result)
    ((observation, image),) = collector.observed
    prepared, _ = prepare_image(image, max_size=1280, jpeg_quality=95)
    record = build_record("0" * 32, 1.0, observation, Decision(selected=True, policy="p"), prepared)
    assert tuple(round(v) for v in record.detections[0].box) == (x1, y1, x2, y2)
