"""Rolling-window budgets for policies and for the document as a whole.

A limit of N per hour means: at no moment do the selections of the last 3600 seconds exceed N.
That is a rolling window, so there is no double burst at a calendar boundary. The memory backend
keeps one timestamp per selection still inside its window, so its memory is bounded by the budget.

`Limiter` is the seam for other backends (`redis_limiter.RedisLimiter` shares budgets across a
fleet): one call per *matched* prediction that checks the policy's and the global budgets and charges
both, atomically. When several policies hold, `acquire_first` tries them in order in that one call
(for the Redis backend: one round trip whatever the number of policies).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Protocol

__all__ = ["Candidates", "Limiter", "MemoryLimiter", "Windows"]

Windows = tuple[tuple[float, int], ...]
"""(window length in seconds, budget) pairs."""


Candidates = Sequence[tuple[str, Windows]]
"""(policy name, its windows) in the order the policies are tried."""


class Limiter(Protocol):
    def acquire(self, policy: str, policy_windows: Windows, global_windows: Windows, now: float) -> bool:
        """Charge one selection to `policy` and to the global budget if both have room; else charge nothing."""
        ...

    def acquire_first(self, candidates: Candidates, global_windows: Windows, now: float) -> int:
        """`acquire` for each candidate in order, stopping at the first charged: its index, or -1."""
        ...


class MemoryLimiter:
    """Exact rolling windows for one process. Thread-safe; the lock is only taken for matches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._history: dict[tuple[str, float], deque[float]] = {}

    def acquire(self, policy: str, policy_windows: Windows, global_windows: Windows, now: float) -> bool:
        if not policy_windows and not global_windows:
            return True
        with self._lock:
            return self._acquire(policy, policy_windows, global_windows, now)

    def acquire_first(self, candidates: Candidates, global_windows: Windows, now: float) -> int:
        with self._lock:
            for index, (policy, policy_windows) in enumerate(candidates):
                if self._acquire(policy, policy_windows, global_windows, now):
                    return index
            return -1

    def _acquire(self, policy: str, policy_windows: Windows, global_windows: Windows, now: float) -> bool:
        if not policy_windows and not global_windows:
            return True
        keys = [((policy, seconds), budget, seconds) for seconds, budget in policy_windows]
        # "" cannot be a policy name (the schema requires one character), so it names the global budget.
        keys += [(("", seconds), budget, seconds) for seconds, budget in global_windows]
        histories = []
        for key, budget, seconds in keys:
            history = self._history.get(key)
            if history is None:
                history = self._history[key] = deque()
            horizon = now - seconds
            while history and history[0] <= horizon:
                history.popleft()
            if len(history) >= budget:
                return False
            histories.append(history)
        for history in histories:
            history.append(now)
        return True

    def used(self, policy: str | None, seconds: float, now: float) -> int:
        """Selections charged within the last `seconds` (policy None: the global budget)."""
        with self._lock:
            history = self._history.get((policy or "", seconds), ())
            return sum(1 for t in history if t > now - seconds)
