"""The recall buffer: recent observations, kept so that a user's verdict can find them.

Every observed prediction is remembered for a while (bounded in items, bytes and age) together with
its image — encoded bytes where the integration has them, which are 10-20x smaller than pixels.
A verdict (`incorrect` / `correct`) takes the entry and turns it into a feedback event. An entry
that leaves the buffer without a verdict comes back once as a `silent` event: the implicit
affirmation the policies may sample.

Memory: each entry costs its image bytes plus about 1 KB of bookkeeping and prediction (20
detections). At 20 predictions/s of 60 KB JPEGs and `max_age_seconds: 300`, that is 6,000 entries
and about 370 MB — so `max_bytes` (default 256 MB) is what bounds it in practice.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgecatch.observation import Observation

__all__ = ["RecallBuffer", "Recalled", "image_nbytes"]

ENTRY_OVERHEAD_BYTES = 1024
"""Bookkeeping and prediction of one entry, counted against `max_bytes` with its image."""


def image_nbytes(image: Any) -> int:
    """What keeping `image` alive costs: the encoded length, or the decoded pixel buffer."""
    if image is None:
        return 0
    if isinstance(image, (bytes, bytearray, memoryview)):
        return len(image)
    nbytes = getattr(image, "nbytes", None)  # numpy arrays
    if isinstance(nbytes, int):
        return nbytes
    size = getattr(image, "size", None)  # PIL images: width, height; bands per pixel
    if isinstance(size, tuple) and len(size) == 2:
        bands = len(image.getbands()) if hasattr(image, "getbands") else 3
        return int(size[0]) * int(size[1]) * bands
    return 0


@dataclass(slots=True)
class Recalled:
    observation: Observation
    image: Any
    nbytes: int
    expires: float
    #: The verdict already given, if any: one verdict per prediction, and no `silent` event after it.
    verdict: str | None = None


class RecallBuffer:
    """A bounded, thread-safe map from inference id to recent observations, oldest first."""

    def __init__(
        self,
        *,
        max_items: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
        max_age_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._entries: OrderedDict[str, Recalled] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, inference_id: str, observation: Observation, image: Any, nbytes: int | None = None) -> list[Recalled]:
        """Remember an observation. Returns the entries pushed out to make room (oldest first)."""
        cost = (image_nbytes(image) if nbytes is None else nbytes) + ENTRY_OVERHEAD_BYTES
        now = self._clock()
        entry = Recalled(observation, image, cost, now + self.max_age_seconds)
        evicted: list[Recalled] = []
        with self._lock:
            if cost > self.max_bytes:
                # Too big to remember at all: it leaves at once (and may still become a silent event).
                return [entry]
            old = self._entries.pop(inference_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[inference_id] = entry
            self._bytes += cost
            entries = self._entries
            while entries and (
                len(entries) > self.max_items
                or self._bytes > self.max_bytes
                or next(iter(entries.values())).expires <= now
            ):
                _, oldest = entries.popitem(last=False)
                self._bytes -= oldest.nbytes
                evicted.append(oldest)
        return evicted

    def give_verdict(self, inference_id: str, verdict: str) -> tuple[Recalled | None, bool]:
        """Mark the entry as answered. Returns (entry, first): entry None when unknown or expired."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(inference_id)
            if entry is None or entry.expires <= now:
                return None, False
            if entry.verdict is not None:
                return entry, False
            entry.verdict = verdict
            return entry, True

    def expire(self) -> list[Recalled]:
        """Remove and return the entries whose time is up (called periodically, off the request path)."""
        now = self._clock()
        evicted: list[Recalled] = []
        with self._lock:
            entries = self._entries
            while entries and next(iter(entries.values())).expires <= now:
                _, oldest = entries.popitem(last=False)
                self._bytes -= oldest.nbytes
                evicted.append(oldest)
        return evicted
