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
