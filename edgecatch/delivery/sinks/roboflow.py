"""The Upload API sink (Roboflow's contract, `shared/upload-api.md`): image, then the pre-label.

HTTP goes through aiohttp: measured on this machine against the local Upload API server, 8 workers
each doing upload + annotate, httpx managed 113 samples/s at 2.35 ms of client CPU per sample and
aiohttp 212 samples/s at 0.66 ms (`benchmarks/README.md`).

The API key travels as the `api_key` query parameter, so anything that prints a URL could leak it.
aiohttp does not log requests; nothing here logs a URL, repr()s a request or response, or chains an
HTTP library's exception behind ours (`from None`), and every text taken from the destination (its
error answers may echo the URL) passes through a `Redactor` first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import quote

import aiohttp

from edgecatch.delivery.config import RoboflowSinkConfig
from edgecatch.delivery.errors import AuthError, DeliveryError, Redactor, RejectedError, TransientError
from edgecatch.delivery.sample import SampleRecord

from . import OnImageStored, Outcome

__all__ = ["RoboflowSink", "annotation_for"]

log = logging.getLogger("edgecatch.delivery.roboflow")

MAX_ANSWER_CHARS = 4000
MAX_ANSWER_BYTES = 64 * 1024  # the API answers a few hundred bytes; a huge error page is cut, not held


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


class _Answer:
    """What we keep of an HTTP response (read fully, connection released)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class RoboflowSink:
    name = "roboflow"

    def __init__(self, config: RoboflowSinkConfig, *, max_connections: int = 16) -> None:
        self._config = config
        self._api_key = config.resolved_api_key()
        self.redact = Redactor([self._api_key])
        self._base = f"{config.base_url}/dataset/{config.dataset}"
        self._max_connections = max_connections
        # Created on first use, inside the loop that will run it (aiohttp sessions belong to a loop).
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_seconds),
                raise_for_status=False)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        params: list[tuple[str, str]] = [("api_key", self._api_key)]
        if record.batch:
            params.append(("batch", record.batch))
        params.extend(("tag", tag) for tag in record.tags)
        if record.inference_id:
            params.append(("inference_id", record.inference_id))
        if self._config.split:
            params.append(("split", self._config.split))
        form = aiohttp.FormData()
        form.add_field("name", record.image_name)
        form.add_field("file", image, filename=record.image_name,
                       content_type="image/jpeg" if record.image_format == "jpeg" else "image/png")
        form.add_field("metadata", json.dumps(record.metadata(), separators=(",", ":")))
        answer = await self._post("upload", f"{self._base}/upload", params=params, data=form)
        document = answer.json()
        if answer.status == 200 and isinstance(document, dict) and document.get("id") and (
                document.get("success") or document.get("duplicate")):
            return str(document["id"]), bool(document.get("duplicate"))
        raise self._error(answer, "upload")

    async def _annotate(self, record: SampleRecord, image_id: str) -> None:
        name, text = annotation_for(record)
        answer = await self._post(
            "annotate", f"{self._base}/annotate/{quote(image_id, safe='')}",
            params=[("api_key", self._api_key), ("name", name), ("prediction", "true")],
            data=text.encode(), headers={"Content-Type": "text/plain"})
        if answer.status == 409:  # the image has its annotation already: done
            return
        document = answer.json()
        if answer.status == 200 and isinstance(document, dict) and document.get("success"):
            return
        raise self._error(answer, "annotate")

    async def _post(self, step: str, url: str, **kw: Any) -> _Answer:
        try:
            async with self._client().post(url, allow_redirects=False, **kw) as response:
                body = await response.content.read(MAX_ANSWER_BYTES)
                return _Answer(response.status, response.headers, body)
        except asyncio.TimeoutError as exc:  # aiohttp's timeouts derive from it
            raise TransientError(f"{step}: timeout ({type(exc).__name__})", step=step) from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"{step}: {type(exc).__name__}: {self.redact(str(exc))}", step=step) from None
        except OSError as exc:
            raise TransientError(f"{step}: {type(exc).__name__}: {self.redact(str(exc))}", step=step) from None

    def _error(self, answer: _Answer, step: str) -> DeliveryError:
        status = answer.status
        text = self.redact(answer.text)[:MAX_ANSWER_CHARS]  # redacted whole: a cut could split a key
        kind = answer.headers.get("Content-Type", "").split(";")[0] or "no content type"
        if status in (401, 403):
            return AuthError(f"{step}: HTTP {status}: the destination refused the API key", status=status,
                             step=step, answer=text)
        if status == 429:
            return TransientError(f"{step}: HTTP 429 (rate limited)", status=status, step=step,
                                  answer=text, retry_after=_retry_after(answer.headers.get("Retry-After")))
        if status >= 500 or status in (408, 425) or status == 200:
            return TransientError(f"{step}: HTTP {status} ({kind})", status=status, step=step, answer=text)
        if 300 <= status < 400:  # not followed (it would re-send the key elsewhere): fix base_url
            where = self.redact(answer.headers.get("Location", ""))[:200]
            return TransientError(f"{step}: HTTP {status} redirect to {where or 'nowhere'}: base_url needs changing",
                                  status=status, step=step, answer=text)
        return RejectedError(f"{step}: HTTP {status}", status=status, step=step, answer=text)
