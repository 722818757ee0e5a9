"""The recall buffer: recent observations, kept so that a user's verdict can find them.

Every observed prediction is remembered for a while (bounded in items, bytes and age) together with
its image — encoded bytes where the integration has them, which are 10-20x smaller than pixels.
A verdict (`incorrect` / `correct`) takes the entry and turns it into a feedback event. An entry
that leaves the buffer without a verdict comes back once as a `silent` event: the implicit
affirmation the policies may sample.

Entries are stored as tuples of plain values (strings, numbers, bytes), not as objects: such
tuples are untracked by Python's cyclic garbage collector, whose full collections otherwise walk
every remembered prediction again and again (in a BentoML worker at 400 requests/s that was tens of
µs per request). The `Observation` is rebuilt when an entry leaves the buffer or gets a verdict.

Memory: each entry costs its image bytes plus about 1 KB of bookkeeping and prediction (20
detections). At 20 predictions/s of 60 KB JPEGs and `max_age_seconds: 300`, that is 6,000 entries
and about 370 MB — so `max_bytes` (default 256 MB) is what bounds it in practice.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edgecatch.observation import Classification, Detection, Observation, Verdict

__all__ = ["RecallBuffer", "Recalled", "image_nbytes"]

ENTRY_OVERHEAD_BYTES = 1024
"""Bookkeeping and prediction of one entry, counted against `max_bytes` with its image."""


def image_nbytes(image: Any) -> int:
    """What keeping `image` alive costs: the encoded length, or the decoded pixel buffer."""
    if image is None:
        return 0
    if isinstance(image, (bytes, bytearray)):
        return len(image)
    nbytes = getattr(image, "nbytes", None)  # memoryviews, numpy arrays
    if isinstance(nbytes, int):
        return nbytes
    size = getattr(image, "size", None)  # PIL images: width, height; bands per pixel
    if isinstance(size, tuple) and len(size) == 2:
        bands = len(image.getbands()) if hasattr(image, "getbands") else 3
        return int(size[0]) * int(size[1]) * bands
    return 0


class Recalled:
    """A remembered prediction handed back by the buffer (evicted, expired, or given a verdict)."""

    __slots__ = ("_packed", "_image", "_ring", "_slot", "nbytes", "expires", "verdict")

    def __init__(self, packed: Any, image: Any, nbytes: int, expires: float, verdict: str | None = None,
                 ring: _ImageRing | None = None, slot: int = -1) -> None:
        self._packed = packed
        self._image = image
        self._ring = ring
        self._slot = slot
        self.nbytes = nbytes
        self.expires = expires
        #: The verdict already given, if any: one verdict per prediction, and no `silent` event after it.
        self.verdict = verdict

    @property
    def observation(self) -> Observation:
        return _unpack(self._packed)

    @property
    def image(self) -> Any:
        """The image (encoded bytes are copied out of the buffer's ring: ask only when it is needed).

        None if it was never kept, or if the ring has since reused its place: an entry that left
        the buffer keeps its bytes only until about `max_bytes / 8` more have been remembered.
        """
        if self._ring is None:
            return self._image
        return self._ring.load(self._slot, self._image)

    def as_event(self, verdict: Verdict, timestamp: float) -> Observation:
        """The remembered prediction as a feedback event (without a note or corrected labels)."""
        return _unpack(self._packed, verdict, timestamp)

    def __repr__(self) -> str:
        return f"Recalled({self.observation!r}, nbytes={self.nbytes}, verdict={self.verdict!r})"


class _ImageRing:
    """The buffer's encoded images, copied into one region of memory that is reused in a circle.

    Keeping each upload's own bytes object alive for the recall window (thousands of 50-100 KB
    objects, held for seconds, freed in arrival order) fragments the heap that the next uploads are
    read into; in a BentoML worker at 400 requests/s that cost the event loop ~40-90 µs per request,
    against ~10 µs for this copy. Images are written at increasing absolute positions (an image
    that does not fit before the end starts over at offset 0); the one at position p is intact
    while nothing has been written past p + capacity. The memory is reserved at the first image and
    touched as it fills: at most `capacity` bytes of RSS. It is private anonymous memory: a process
    forked later gets its own copy-on-write view instead of writing into this process's images
    (Python's default for `mmap(-1, ...)` is a shared mapping).
    """

    def __init__(self, capacity: int, largest: int) -> None:
        self.capacity = capacity
        self.largest = largest
        self._memory: mmap.mmap | None = None
        self._written = 0
        self._lock = threading.Lock()

    def store(self, data: bytes | bytearray | memoryview) -> int:
        """Copy an image in; its absolute position (-1: larger than the ring takes, or not flat bytes)."""
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:  # e.g. a cast memoryview: keep the object as it is
            return -1
        size = view.nbytes
        if size > self.largest or size == 0:
            return -1
        with self._lock:
            if self._memory is None:
                self._memory = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            offset = self._written % self.capacity
            if offset + size > self.capacity:
                self._written += self.capacity - offset
                offset = 0
            self._memory[offset:offset + size] = view
            position = self._written
            self._written += size
            return position

    def intact(self, position: int) -> bool:
        return position >= 0 and position >= self._written - self.capacity

    def load(self, position: int, size: int) -> bytes | None:
        with self._lock:
            if self._memory is None or not self.intact(position):
                return None
            offset = position % self.capacity
            return self._memory[offset:offset + size]


# An entry in the buffer is one flat tuple: image (its size when it lives in the ring), its ring
# position (-1: not in the ring), nbytes, expires, verdict, then the observation (see _pack). Flat,
# because the GC untracks a tuple only once everything in it is untracked, and a young collection
# visits a nested structure outer tuple first: a nested entry would reach the old generation still
# tracked. Everything in a flat entry is a str, number or None (or an image that is not bytes).
_IMAGE, _SLOT, _NBYTES, _EXPIRES, _VERDICT = range(5)
_HEAD = 5


def _pack(observation: Observation) -> list[Any]:
    """The observation as a flat list of plain values (the entry's tail)."""
    if observation.feedback is not None or observation.corrected is not None:
        return [observation]  # feedback events are never remembered; kept whole just in case
    classification = observation.classification
    ranked = classification.ranked if classification is not None else None
    extra = observation.extra
    values = [observation.model, observation.model_version, observation.image_width, observation.image_height,
              observation.inference_id, observation.timestamp, len(observation.detections),
              -1 if ranked is None else len(ranked), len(extra)]
    for d in observation.detections:
        values += (d.class_name, d.confidence, *d.box, d.class_id)
    if ranked:
        for name, probability in ranked:
            values += (name, probability)
    for key, value in extra.items():
        values += (key, value)
    return values


def _unpack(packed: tuple[Any, ...], feedback: Verdict | None = None, event_time: float | None = None) -> Observation:
    if len(packed) == 1:
        observation = packed[0]
        return observation if feedback is None else replace(observation, feedback=feedback, timestamp=event_time)
    model, version, width, height, inference_id, timestamp, n_detections, n_ranked, n_extra = packed[:9]
    at = 9
    detections = []
    for _ in range(n_detections):
        name, confidence, x1, y1, x2, y2, class_id = packed[at:at + 7]
        detections.append(Detection(name, confidence, (x1, y1, x2, y2), class_id))
        at += 7
    classification = None
    if n_ranked >= 0:
        classification = Classification(tuple(packed[at + 2 * i:at + 2 * i + 2] for i in range(n_ranked)))
        at += 2 * n_ranked
    extra = {packed[at + 2 * i]: packed[at + 2 * i + 1] for i in range(n_extra)}
    return Observation(
        model=model, model_version=version, image_width=width, image_height=height, detections=tuple(detections),
        classification=classification, feedback=feedback, inference_id=inference_id,
        timestamp=timestamp if event_time is None else event_time, extra=extra)


def _recalled(entry: tuple[Any, ...], ring: _ImageRing) -> Recalled:
    slot = entry[_SLOT]
    return Recalled(entry[_HEAD:], entry[_IMAGE], entry[_NBYTES], entry[_EXPIRES], entry[_VERDICT],
                    ring if slot >= 0 else None, slot)


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
        self._entries: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._bytes = 0
        # Room for the live images plus a margin: evicted entries keep their image a little longer
        # (their silent event is evaluated shortly after, in the background), and a wrap wastes
        # less than one image (images larger than the margin are kept as they are).
        margin = max(max_bytes // 8, min(max_bytes, 1024 * 1024))
        self._ring = _ImageRing(max_bytes + margin, largest=margin)
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
        packed = _pack(observation)
        evicted: list[Recalled] = []
        if cost > self.max_bytes:
            # Too big to remember at all: it leaves at once (and may still become a silent event).
            return [Recalled(packed, image, cost, now)]
        slot = -1
        if isinstance(image, (bytes, bytearray, memoryview)):
            slot = self._ring.store(image)
            if slot >= 0:
                image = memoryview(image).nbytes
        entry = tuple([image, slot, cost, now + self.max_age_seconds, None] + packed)
        with self._lock:
            old = self._entries.pop(inference_id, None)
            if old is not None:
                self._bytes -= old[_NBYTES]
            self._entries[inference_id] = entry
            self._bytes += cost
            entries = self._entries
            while entries and (
                len(entries) > self.max_items
                or self._bytes > self.max_bytes
                or next(iter(entries.values()))[_EXPIRES] <= now
            ):
                _, oldest = entries.popitem(last=False)
                self._bytes -= oldest[_NBYTES]
                evicted.append(_recalled(oldest, self._ring))
        return evicted

    def give_verdict(self, inference_id: str, verdict: str) -> tuple[Recalled | None, bool]:
        """Mark the entry as answered. Returns (entry, first): entry None when unknown or expired."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(inference_id)
            if entry is None or entry[_EXPIRES] <= now:
                return None, False
            if entry[_VERDICT] is not None:
                return _recalled(entry, self._ring), False
            entry = self._entries[inference_id] = (*entry[:_VERDICT], verdict, *entry[_VERDICT + 1:])  # keeps its place
            return _recalled(entry, self._ring), True

    def expire(self) -> list[Recalled]:
        """Remove and return the entries whose time is up (called periodically, off the request path)."""
        now = self._clock()
        evicted: list[Recalled] = []
        with self._lock:
            entries = self._entries
            while entries and next(iter(entries.values()))[_EXPIRES] <= now:
                _, oldest = entries.popitem(last=False)
                self._bytes -= oldest[_NBYTES]
                evicted.append(_recalled(oldest, self._ring))
        return evicted
