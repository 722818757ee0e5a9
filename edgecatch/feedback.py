"""`POST /edgecatch/feedback`: a user's verdict on an earlier prediction.

Framework-agnostic: `handle_feedback()` takes the request's body, content type and Authorization
header and returns a status and a JSON-able answer, so the BentoML plugin (Starlette) and the Triton
sidecar (aiohttp) serve exactly the same route with a few lines each.

Body (JSON):
    {"inference_id": "…", "verdict": "incorrect" | "correct", "note": "optional text",
     "corrected": {"detections": [...]} | {"classification": {...}}}       # optional
When the id is unknown or expired (404), the client may send the prediction and the image itself as
`multipart/form-data`: a `feedback` field with the JSON above plus `prediction` (a record in the
`edgecatch replay` format, without timestamp) and an `image` file.

Answers: 202 accepted (with whether the verdict selected a sample), 400 bad request, 401 missing or
wrong token, 404 unknown id, 409 a verdict was already given for this id, 413 image too large.
"""

from __future__ import annotations

import hmac
import io
import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgecatch.observation import Verdict
from edgecatch.policies.load import format_path
from edgecatch.records import DetectionRecord

if TYPE_CHECKING:
    from edgecatch.collector import Collector

__all__ = ["MAX_JSON_BYTES", "FeedbackAnswer", "FeedbackRequest", "answer_before_reading", "feedback_body_limit",
           "handle_feedback", "handle_feedback_body", "malformed_multipart", "parse_multipart"]


#: Detections (or class scores) a client may send in one verdict: far more than an image holds.
MAX_DETECTIONS = 1000


class CorrectedLabels(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    detections: list[DetectionRecord] | None = Field(None, max_length=MAX_DETECTIONS)
    classification: dict[str, float] | None = Field(None, max_length=MAX_DETECTIONS)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inference_id: str = Field(min_length=1, max_length=200)
    verdict: Literal["incorrect", "correct"]
    note: str = Field("", max_length=2000)
    corrected: CorrectedLabels | None = None


class PredictionPayload(BaseModel):
    """The prediction sent along with a verdict for an id the service no longer remembers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=200)
    model_version: str = Field("", max_length=200)
    detections: list[DetectionRecord] | None = Field(None, max_length=MAX_DETECTIONS)
    classification: dict[str, float] | None = Field(None, max_length=MAX_DETECTIONS)


@dataclass(frozen=True, slots=True)
class FeedbackAnswer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None

    def json_bytes(self) -> bytes:
        return json.dumps(self.body).encode()


def _error(status: int, message: str, **extra: Any) -> FeedbackAnswer:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return FeedbackAnswer(status, {"error": message, **extra}, headers)


def _validation_message(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = format_path(tuple(error["loc"]))
    return f"{where}: {error['msg']}" if where else error["msg"]


def authorized(expected_token: str | None, authorization: str | None) -> bool:
    if expected_token is None:
        return True
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110, 11.1)
        return False
    return hmac.compare_digest(token.strip().encode(), expected_token.encode())


def _image_problem(image: Any) -> str | None:
    """Why an image sent along with a verdict cannot be used, or None. Checked before answering:
    a 202 must not turn into a sample that is dropped later."""
    if not isinstance(image, (bytes, bytearray)):
        return "'image' must be a file part with the encoded image (JPEG, PNG, ...)"
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # answered below instead
            with Image.open(io.BytesIO(image)) as opened:
                width, height = opened.size
                opened.verify()
    except Image.DecompressionBombError:
        width, height = MAX_FEEDBACK_PIXELS + 1, 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "'image' is not an image that can be read (JPEG, PNG, ...)"
    # A few hundred KB of PNG can hold 150 million pixels: decoded for delivery, that is ~450 MB in
    # the serving process. Pillow's own bound for untrusted images (89.5 MP) applies.
    if width * height > MAX_FEEDBACK_PIXELS:
        return f"'image' has more than {MAX_FEEDBACK_PIXELS} pixels"
    return None


MAX_FEEDBACK_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS default


MAX_JSON_BYTES = 1024 * 1024  # a verdict with corrected labels is a few KB


def answer_before_reading(collector: Collector, authorization: str | None, content_length: str | None,
                          multipart: bool) -> FeedbackAnswer | None:
    """401 or 413 from the headers alone, before a byte of the body is read: a client without the
    token, or with a body larger than the route takes, must not make the service hold it first."""
    if not authorized(collector.feedback_token, authorization):
        return _error(401, "missing or wrong bearer token")
    limit = feedback_body_limit(collector, multipart)
    try:
        too_large = content_length is not None and int(content_length) > limit
    except ValueError:
        return _error(400, "Content-Length is not a number")
    if too_large:
        return _error(413, f"body larger than {limit} bytes")
    return None


def feedback_body_limit(collector: Collector, multipart: bool) -> int:
    """The most body bytes the route reads: a verdict's JSON, plus the image for multipart. Also
    what a body without Content-Length (chunked) is cut off at."""
    return collector.max_feedback_image_bytes + MAX_JSON_BYTES if multipart else MAX_JSON_BYTES


def malformed_multipart(detail: str = "") -> FeedbackAnswer:
    return _error(400, f"malformed multipart body: {detail}" if detail else "malformed multipart body")


#: A verdict needs three parts (feedback, prediction, image); more are refused, not collected.
MAX_MULTIPART_PARTS = 16


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes | str]:
    """The fields of a multipart/form-data body, in memory (files as bytes, other fields as text),
    with python-multipart's streaming parser. Raises ValueError naming what is wrong."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ValueError("Content-Type is not multipart/form-data with a boundary")
    fields: dict[str, bytes | str] = {}
    part: dict[str, Any] = {}
    ended = []
    parts = [0]  # every part counts, named or not, repeated names too

    def on_part_begin() -> None:
        parts[0] += 1
        if parts[0] > MAX_MULTIPART_PARTS:
            raise ValueError(f"more than {MAX_MULTIPART_PARTS} parts")
        part.clear()
        part.update(headers={}, field=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"] = part["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name:
            data = b"".join(part["data"])
            fields[name.decode("utf-8", "replace")] = data if b"filename" in disposition else \
                data.decode("utf-8", "replace")

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": lambda: ended.append(True)}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except ValueError:
        raise
    except Exception as exc:  # the parser's own errors (MultipartParseError, ...)
        raise ValueError(str(exc) or type(exc).__name__) from None
    if not ended:
        raise ValueError("the body ends before its closing boundary")
    return fields


def handle_feedback_body(collector: Collector, body: bytes, content_type: str, authorization: str | None
                         ) -> FeedbackAnswer:
    """Serve one feedback request from its raw body (multipart parsed here: run it off the event loop)."""
    form = None
    if content_type.startswith("multipart/form-data"):
        try:
            form = parse_multipart(body, content_type)
        except ValueError as exc:
            return malformed_multipart(str(exc))
    return handle_feedback(collector, body=body, content_type=content_type, authorization=authorization,
                           form=form)


def handle_feedback(
    collector: Collector,
    *,
    body: bytes,
    content_type: str | None,
    authorization: str | None,
    form: dict[str, Any] | None = None,
) -> FeedbackAnswer:
    """Serve one feedback request. `form` holds already-parsed multipart fields, if any."""
    if not authorized(collector.feedback_token, authorization):
        return _error(401, "missing or wrong bearer token")
    image: bytes | None = None
    prediction: PredictionPayload | None = None
    try:
        if form is not None:
            raw = form.get("feedback")
            if raw is None:
                return _error(400, "multipart feedback needs a 'feedback' field with the JSON verdict")
            request = FeedbackRequest.model_validate_json(raw)
            if "prediction" in form:
                prediction = PredictionPayload.model_validate_json(form["prediction"])
            image = form.get("image")
        else:
            if content_type and "json" not in content_type:
                return _error(400, f"expected application/json or multipart/form-data, got {content_type}")
            request = FeedbackRequest.model_validate_json(body)
    except ValidationError as exc:
        return _error(400, _validation_message(exc))
    if prediction is not None and image is None:
        return _error(400, "a verdict sent with its 'prediction' needs the 'image' too")
    if image is not None:
        if isinstance(image, (bytes, bytearray)) and len(image) > collector.max_feedback_image_bytes:
            return _error(413, f"image larger than {collector.max_feedback_image_bytes} bytes")
        problem = _image_problem(image)
        if problem:
            return _error(400, problem)
    corrected_labels = request.corrected
    if corrected_labels is not None and corrected_labels.detections is not None \
            and corrected_labels.classification is not None:
        return _error(400, "corrected: give either 'detections' or 'classification', not both")

    verdict = Verdict(request.verdict)
    corrected = None
    if request.corrected is not None:
        if request.corrected.detections is not None:
            corrected = tuple(d.to_detection() for d in request.corrected.detections)
        elif request.corrected.classification is not None:
            from edgecatch.observation import Classification

            corrected = Classification.from_scores(request.corrected.classification)
    outcome = collector.feedback(
        request.inference_id, verdict, note=request.note, corrected=corrected,
        prediction=prediction, image=image)
    if outcome.status == "unknown":
        return _error(
            404, "unknown or expired inference id",
            hint="send the verdict as multipart/form-data with 'feedback', 'prediction' and 'image'")
    if outcome.status == "duplicate":
        return _error(409, "a verdict was already given for this inference id")
    if outcome.status == "unknown_model":
        return _error(400, "prediction.model: not a model this service serves")
    if outcome.status == "forwarded_error":
        return _error(502, "the worker that served this prediction did not answer")
    decision = outcome.decision
    return FeedbackAnswer(202, {
        "inference_id": request.inference_id,
        "verdict": verdict.value,
        "selected": bool(decision and decision.selected),
        "policy": decision.policy if decision else None,
    })
