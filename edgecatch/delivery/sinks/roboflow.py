"""The Upload API sink (Roboflow's contract, `shared/upload-api.md`): image, then the pre-label.

The API key travels as the `api_key` query parameter, so it must never reach anything that prints
URLs. It is added by `_KeyTransport` *below* httpx's client: the requests httpx logs ("HTTP Request:
POST ..."), attaches to responses and exceptions carry no key. Error texts pass through a `Redactor`
anyway (a server may echo the URL back in its error page).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from edgecatch.delivery.config import RoboflowSinkConfig
from edgecatch.delivery.errors import AuthError, DeliveryError, Redactor, RejectedError, TransientError
from edgecatch.delivery.sample import SampleRecord

from . import OnImageStored, Outcome

__all__ = ["RoboflowSink", "annotation_for"]

log = logging.getLogger("edgecatch.delivery.roboflow")

MAX_ANSWER_CHARS = 4000


class _KeyTransport(httpx.AsyncBaseTransport):
    """Adds `api_key` to each request's query string on its way to the socket."""

    def __init__(self, inner: httpx.AsyncBaseTransport, api_key: str) -> None:
        self._inner = inner
        self._api_key = api_key

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        keyed = httpx.Request(
            request.method,
            request.url.copy_merge_params({"api_key": self._api_key}),
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return await self._inner.handle_async_request(keyed)

    async def aclose(self) -> None:
        await self._inner.aclose()


def annotation_for(record: SampleRecord) -> tuple[str, str]:
    """(annotation file name, its text): detections as centre-box JSON, classification as the top class."""
    if record.task == "classification":
        return f"{record.sample_id}.txt", record.top_class or ""
    predictions = []
    for d in record.detections:
        x1, y1, x2, y2 = d.box
        predictions.append({
            "x": round((x1 + x2) / 2, 2), "y": round((y1 + y2) / 2, 2),
            "width": round(x2 - x1, 2), "height": round(y2 - y1, 2),
            "confidence": round(d.confidence, 4), "class": d.class_name, "class_id": d.class_id,
        })
    body = {"image": {"width": record.width, "height": record.height}, "predictions": predictions}
    return f"{record.sample_id}.json", json.dumps(body, separators=(",", ":"))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime
        from datetime import datetime, timezone

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class RoboflowSink:
    name = "roboflow"

    def __init__(self, config: RoboflowSinkConfig, *, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 16) -> None:
        self._config = config
        api_key = config.resolved_api_key()
        self.redact = Redactor([api_key])
        inner = transport or httpx.AsyncHTTPTransport(
            retries=0, limits=httpx.Limits(max_connections=max_connections,
                                           max_keepalive_connections=max_connections))
        self._client = httpx.AsyncClient(
            base_url=config.base_url, transport=_KeyTransport(inner, api_key),
            timeout=httpx.Timeout(config.timeout_seconds), follow_redirects=False)
        self._dataset = config.dataset

    async def aclose(self) -> None:
        await self._client.aclose()

    async def deliver(self, record: SampleRecord, image: bytes, image_id: str | None,
                      on_image_stored: OnImageStored) -> Outcome:
        outcome: Outcome = "delivered"
        if image_id is None:
            image_id, duplicate = await self._upload(record, image)
            await on_image_stored(image_id)
            if duplicate:
                outcome = "duplicate"
        await self._annotate(record, image_id)
        return outcome

    async def _upload(self, record: SampleRecord, image: bytes) -> tuple[str, bool]:
        params: list[tuple[str, str]] = []
        if record.batch:
            params.append(("batch", record.batch))
        params.extend(("tag", tag) for tag in record.tags)
        if record.inference_id:
            params.append(("inference_id", record.inference_id))
        if self._config.split:
            params.append(("split", self._config.split))
        mime = "image/jpeg" if record.image_format == "jpeg" else "image/png"
        response = await self._post(
            "upload", f"/dataset/{self._dataset}/upload", params=params,
            data={"name": record.image_name, "metadata": json.dumps(record.metadata(), separators=(",", ":"))},
            files={"file": (record.image_name, image, mime)})
        answer = self._json(response, "upload")
        if response.status_code == 200 and isinstance(answer, dict) and answer.get("id") and (
                answer.get("success") or answer.get("duplicate")):
            return str(answer["id"]), bool(answer.get("duplicate"))
        raise self._error(response, "upload")

    async def _annotate(self, record: SampleRecord, image_id: str) -> None:
        name, text = annotation_for(record)
        response = await self._post(
            "annotate", f"/dataset/{self._dataset}/annotate/{image_id}",
            params=[("name", name), ("prediction", "true")], content=text.encode(),
            headers={"Content-Type": "text/plain"})
        if response.status_code == 409:  # the image has its annotation already: done
            return
        answer = self._json(response, "annotate")
        if response.status_code == 200 and isinstance(answer, dict) and answer.get("success"):
            return
        raise self._error(response, "annotate")

    async def _post(self, step: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = await self._client.post(path, **kw)
            await response.aread()
            return response
        except httpx.TimeoutException as exc:
            raise TransientError(f"{step}: timeout ({type(exc).__name__})", step=step) from None
        except httpx.TransportError as exc:
            raise TransientError(f"{step}: {type(exc).__name__}: {self.redact(str(exc))}", step=step) from None
        except httpx.HTTPError as exc:  # anything else httpx raises: treat as transient, say what
            raise TransientError(f"{step}: {type(exc).__name__}: {self.redact(str(exc))}", step=step) from None

    @staticmethod
    def _json(response: httpx.Response, step: str) -> Any:
        try:
            return response.json()
        except ValueError:
            return None

    def _error(self, response: httpx.Response, step: str) -> DeliveryError:
        status = response.status_code
        answer = self.redact(response.text[:MAX_ANSWER_CHARS])
        kind = response.headers.get("content-type", "").split(";")[0] or "no content type"
        if status in (401, 403):
            return AuthError(f"{step}: HTTP {status}: the destination refused the API key", status=status,
                             step=step, answer=answer)
        if status == 429:
            return TransientError(f"{step}: HTTP 429 (rate limited)", status=status, step=step,
                                  answer=answer, retry_after=_retry_after(response.headers.get("retry-after")))
        if status >= 500 or status in (408, 425) or status == 200:
            return TransientError(f"{step}: HTTP {status} ({kind})", status=status, step=step, answer=answer)
        return RejectedError(f"{step}: HTTP {status}", status=status, step=step, answer=answer)
