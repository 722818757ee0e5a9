"""When delivery may send, and how fast: connectivity windows and a byte-rate limit.

Both take their clock as a parameter, so tests drive them without sleeping or patching.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Callable

from .config import Window

__all__ = ["ByteRateLimiter", "Windows"]


class Windows:
    """Daily local-time windows; none means always open."""

    def __init__(self, windows: tuple[Window, ...], now: Callable[[], datetime] = datetime.now) -> None:
        self._windows = windows
        self._now = now

    def is_open(self, at: datetime | None = None) -> bool:
        if not self._windows:
            return True
        t = (at or self._now()).time()
        for start, end in self._windows:
            if start < end:
                if start <= t < end:
                    return True
            elif t >= start or t < end:  # crosses midnight
                return True
        return False

    def seconds_until_open(self, at: datetime | None = None) -> float:
        """0 when open; otherwise the time to the next window's start."""
        at = at or self._now()
        if self.is_open(at):
            return 0.0
        best = None
        for start, _ in self._windows:
            candidate = at.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
            if candidate <= at:
                candidate += timedelta(days=1)
            delta = (candidate - at).total_seconds()
            best = delta if best is None else min(best, delta)
        return float(best or 0.0)


class ByteRateLimiter:
    """A token bucket in bytes per second (burst: one second's worth). `None` rate = unlimited.

    A sample larger than the bucket still goes: the bucket goes into debt and later senders wait it
    off, so the average rate holds.
    """

    def __init__(self, bytes_per_second: int | None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rate = bytes_per_second
        self._monotonic = monotonic
        self._tokens = float(bytes_per_second or 0)
        self._last = monotonic()

    def reserve(self, size: int) -> float:
        """Take `size` bytes; returns how long to wait before sending them."""
        if not self.rate:
            return 0.0
        now = self._monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= size
        return max(0.0, -self._tokens / self.rate)

    async def acquire(self, size: int) -> None:
        delay = self.reserve(size)
        if delay > 0:
            await asyncio.sleep(delay)
