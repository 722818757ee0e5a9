"""Hot reload: the policies ops edit take effect without a redeploy.

A background thread looks at the file's signature (not on the request path: no disk I/O there)
and, when it changed, validates the new document and swaps the `PolicySet` in one assignment. A
file changed less than `settle_seconds` ago is read at the next poll instead: one rewritten in place
in several writes must not have a prefix that happens to parse (fewer policies, no limits) loaded.
An invalid document keeps the last good policies and says so in the log; the budgets already spent
and the every_nth counters carry over, so a reload is never a way around a limit.

With `last_good` (a path in the spool's folder) every good text is also saved there, so that a
process started while the file is invalid (a BentoML worker replacing one that was killed, a pod
restarted) starts with the last good policies, as the processes already running keep them, instead
of failing to start until the file is fixed. With none saved, an invalid file at start is an error.
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
from edgecatch.policies.schema import PolicyDocument

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
        last_good: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._state = state or EngineState()
        self._clock = clock
        self._poll_interval = poll_interval
        self._on_reload = on_reload
        self._settle_ns = int(settle_seconds * 1e9)
        self._pending: tuple[int, int, int] | None = None  # a recent signature, waiting to settle
        self._pending_since = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_good = Path(last_good) if last_good is not None else None
        self._signature = self._stat()
        self.last_error: ConfigError | None = None
        try:
            text = read_config_text(self.path)
            document = load_policy_text(text, str(self.path))
        except ConfigError as error:
            saved = self._saved_last_good()
            if saved is None:
                raise  # no last good policies anywhere: an invalid file at start is an error for the caller
            text, document = saved
            self.last_error = error
            log.error("the policy file is invalid; starting with the last good policies, saved in %s when they "
                      "were loaded:\n%s", self._last_good, error)
        else:
            self._save_last_good(text)
        self._digest = hashlib.sha256(text.encode()).hexdigest()
        self.current: PolicySet = PolicySet(document, state=self._state, clock=clock, source=str(self.path))

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
        if self._settle_ns and signature is not None and time.time_ns() - signature[0] < self._settle_ns:
            # Changed just now (or stamped ahead of this host's clock: a shared volume): read once
            # it has stayed the same for settle_seconds, by this host's own clock.
            now = time.monotonic_ns()
            if self._pending != signature:
                self._pending, self._pending_since = signature, now
                return False
            if now - self._pending_since < self._settle_ns:
                return False
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
        self._save_last_good(text)
        log.info("reloaded policies from %s: %s", self.path, ", ".join(self.current.policy_names))
        if self._on_reload:
            self._on_reload("success")
        return True

    # The saved copy starts with a line naming the file it is a copy of: a copy of another file (the
    # config now names a different one) is not used.
    def _saved_header(self) -> str:
        return f"# edgecatch: the last good policies of {self.path.absolute()}\n"

    def _save_last_good(self, text: str) -> None:
        if self._last_good is None:
            return
        content = self._saved_header() + text
        try:
            if self._last_good.exists() and self._last_good.read_text(encoding="utf-8") == content:
                return
            self._last_good.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self._last_good.with_name(f".{self._last_good.name}.{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(content)
            os.replace(temporary, self._last_good)  # several processes save: each copy whole
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("could not save the last good policies in %s: %s", self._last_good, exc)

    def _saved_last_good(self) -> tuple[str, PolicyDocument] | None:
        if self._last_good is None:
            return None
        try:
            content = self._last_good.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        header = self._saved_header()
        if not content.startswith(header):
            return None
        text = content[len(header):]
        try:
            return text, load_policy_text(text, str(self._last_good))
        except ConfigError:
            return None

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
