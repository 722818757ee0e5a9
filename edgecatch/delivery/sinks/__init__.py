"""Where samples go. One small interface; the config's `sink.type` picks the implementation."""

from __future__ import annotations

from typing import Awaitable, Callable, Literal, Protocol

from edgecatch.delivery.config import DirectorySinkConfig, RoboflowSinkConfig
from edgecatch.delivery.sample import SampleRecord

__all__ = ["Outcome", "Sink", "make_sink"]

Outcome = Literal["delivered", "duplicate"]
OnImageStored = Callable[[str], Awaitable[None]]


class Sink(Protocol):
    #: Low-cardinality name used as the `sink` metric label.
    name: str

    async def deliver(self, record: SampleRecord, image: bytes, image_id: str | None,
                      on_image_stored: OnImageStored) -> Outcome:
        """Store one sample. `image_id` is set when an earlier attempt stored the image already; a
        sink with a two-step protocol calls `on_image_stored(id)` (which makes it durable) between
        the steps. Raises `edgecatch.delivery.errors.DeliveryError` subclasses only."""
        ...

    async def aclose(self) -> None: ...


def make_sink(config: DirectorySinkConfig | RoboflowSinkConfig) -> Sink:
    if isinstance(config, RoboflowSinkConfig):
        from .roboflow import RoboflowSink

        return RoboflowSink(config)
    from .directory import DirectorySink

    return DirectorySink(config)
