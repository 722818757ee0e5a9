"""Hot reload: the policies ops edit take effect without a redeploy.

A background thread looks at the file's signature (not on the request path: no disk I/O there)
and, when it changed, validates the new document and swaps the `PolicySet` in one assignment. A
file changed less than `settle_seconds` ago is read at the next poll instead: one rewritten in place
in several writes must not have a prefix that happens to parse (fewer policies, no limits) loaded.
An invalid document keeps the last good policies and says so in the log; the budgets already spent
and the every_nth counters carry over, so a reload is never a way around a limit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgecatch.policies.engine import EngineState, PolicySet
from edgecatch.policies.load import ConfigError, load_policy_text, read_config_text

__all__ = ["PolicyStore"]

log = logging.getLogger("edgecatch.policies")

ReloadListener = Callable[[str], None]
"""Called with the outcome of every reload attempt: "success" or "failure"."""


class PolicyStore:
    """The current policies of one file, reloaded when the file changes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        state: EngineState | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 1.0,
        on_reload: ReloadListener | None = None,
        settle_seconds: float = 0.25,
    ) -> None:
        self.path = Path(path)
        self._state = state or EngineState()
        self._clock = clock
        self._poll_interval = poll_interval
        self._on_reload = on_reload
        self._settle_ns = int(settle_seconds * 1e9)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature = self._stat()
        # No last good policies yet: an invalid file at start is an error for the caller.
        text = read_config_text(self.path)
        self._digest = hashlib.sha256(text.encode()).hexdigest()
        self.current: PolicySet = PolicySet(
            load_policy_text(text, str(self.path)), state=self._state, clock=clock, source=str(self.path))
        self.last_error: ConfigError | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> bool:
        """Reload if the file changed. Returns True when new policies were swapped in."""
        signature = self._stat()
        if signature == self._signature:
            return False
        if signature is not None and 0 <= time.time_ns() - signature[0] < self._settle_ns:
            return False  # still being written, perhaps: the next poll reads it (a future mtime: skew)
        self._signature = signature
        try:
            text = read_config_text(self.path)  # read once: what is checked is what is loaded
        except ConfigError as exc:
            self._failed(exc)
            return False
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._digest:  # touched, or rewritten with the same content
            if self.last_error is not None:  # a broken edit undone: the file is good again
                self.last_error = None
                log.info("%s is back to the policies in force", self.path)
                if self._on_reload:
                    self._on_reload("success")
            return False
        try:
            document = load_policy_text(text, str(self.path))
        except ConfigError as exc:
            self._failed(exc)
            return False
        self._digest = digest
        self.current = PolicySet(document, state=self._state, clock=self._clock, source=str(self.path))
        self.last_error = None
        log.info("reloaded policies from %s: %s", self.path, ", ".join(self.current.policy_names))
        if self._on_reload:
            self._on_reload("success")
        return True

    def _failed(self, error: ConfigError) -> None:
        self.last_error = error
        log.error("policy reload failed; keeping the last good policies:\n%s", error)
        if self._on_reload:
            self._on_reload("failure")

    # -- background polling -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="edgecatch-policy-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_interval):
            try:
                self.check()
            except Exception:  # the poller must outlive any surprise; the request path never sees it
                log.exception("unexpected error while checking %s", self.path)
