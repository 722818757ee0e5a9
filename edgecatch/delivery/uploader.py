"""Uploader workers: take the oldest spooled sample, deliver it, and decide what a failure means.

Failure handling is per sink, not per sample: when the destination is down, every sample would
fail the same way, so one backoff (exponential, with jitter, capped) holds all workers back instead
of each sample burning its own retries. A 429 sets that backoff from `Retry-After`. A 401/403 pauses
the sink (metric `edgecatch_sink_paused` = 1 and an error log: an alarm) and sends one probe after
`auth_pause_seconds`. A rejected sample goes to the dead-letter folder with the answer beside it; so
does a sample that failed transiently `max_attempts` times while others got through: after its
first failure a sample waits behind the others for a while, and its failures count only once
another sample was delivered after that first one, so a destination that is down for everyone
(however long) sends nothing to the dead letters.

Spool calls that fsync run in threads (`asyncio.to_thread`) so the loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Callable

from edgecatch.metrics import UPLOAD_FAILURE_REASONS, Metrics, upload_failure_reason

from .config import DeliveryConfig
from .errors import AuthError, DeliveryError, RejectedError, TransientError
from .schedule import ByteRateLimiter, Windows
from .sinks import Sink
from .spool import Claim, Spool

__all__ = ["Uploader"]

log = logging.getLogger("edgecatch.delivery.uploader")

#: How often a busy delivery worker re-reads the spool folder (idle ones do so every poll_seconds).
_BUSY_RESCAN_SECONDS = 5.0


class Uploader:
    def __init__(self, spool: Spool, sink: Sink, config: DeliveryConfig, metrics: Metrics, *,
                 windows: Windows | None = None, rng: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.sink = sink
        self.config = config
        self.metrics = metrics
        self.windows = windows or Windows(config.parsed_windows())
        self.rate = ByteRateLimiter(config.max_bytes_per_second, monotonic)
        self._rng = rng or random.Random()
        self._monotonic = monotonic
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._draining = False
        self._tasks: list[asyncio.Task] = []
        # Sink health, shared by the workers.
        self._failures = 0
        #: Bumped whenever a backoff starts: a failure of an attempt that began before the current
        #: backoff is the same outage seen by another worker, and must not escalate the delay again.
        self._backoff_epoch = 0
        self._not_before = 0.0
        self._paused = False
        self._probing = False
        # sample -> (failures counted, samples delivered when it first failed)
        self._attempts: dict[str, tuple[int, int]] = {}
        self._sink_paused = metrics.sink_paused.labels(sink.name)
        self._sink_paused.set(0)
        self._outcomes = {name: metrics.uploads.labels(sink.name, name) for name in (
            "delivered", "duplicate", "transient_error", "rate_limited", "auth_error", "rejected")}
        self._seconds = metrics.upload_seconds.labels(sink.name)
        # Known label values exported at 0 from the start, so rate()/increase() see the first one.
        self._failures_by_reason = {reason: metrics.upload_failures.labels(sink.name, reason)
                                    for reason in UPLOAD_FAILURE_REASONS}
        for reason in ("rejected", "too_many_attempts"):
            metrics.dead_letters.labels(sink.name, reason)
        self.delivered = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers on the running loop."""
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(i), name=f"edgecatch-upload-{i}")
                       for i in range(self.config.concurrency)]

    def wake(self) -> None:
        """New samples were spooled (call from the loop's thread)."""
        if self._wake is not None:
            self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Deliver what can be delivered within `timeout`, then stop; True when nothing was cut short."""
        self._draining = True
        self.wake()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._stopping = True
        return not pending

    @property
    def paused(self) -> bool:
        return self._paused

    # -- the worker --------------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        while not self._stopping:
            try:
                if not await self._step():
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # the disk (EMFILE, EACCES, ...) or a bug: keep the worker alive, say so
                if not threading.main_thread().is_alive():
                    # The program is exiting without having stopped delivery (the thread pool is
                    # already shut down): what is spooled stays for the next start, quietly.
                    return
                log.exception("delivery worker %d failed; retrying in %.1f s", index, self.config.poll_seconds)
                await asyncio.sleep(self.config.poll_seconds)

    async def _step(self) -> bool:
        """One turn of a worker: wait if it must, else deliver one sample. False: a drain is over."""
        if self.spool.scan_due(_BUSY_RESCAN_SECONDS):
            # With a backlog the workers are never idle, and other processes sharing the folder
            # spool and deliver too: without a look at the folder now and then, this process's
            # view (its spool gauges, its bounds) would hold only its own share.
            await asyncio.to_thread(self.spool.maybe_rescan, _BUSY_RESCAN_SECONDS)
        wait = self._gate_delay()
        if wait > 0:
            if self._draining:
                return False  # nothing more can go out before the deadline: leave it spooled
            await self._sleep(wait)
            return True
        claim = await asyncio.to_thread(self.spool.claim)
        if claim is None:
            self._probing = False  # nothing to probe with: the next sample will be the probe
            if self._draining:
                return False
            await self._idle()
            return True
        try:
            await self._deliver(claim)
        except BaseException:
            claim.release()  # cut short (drain deadline) or failed: stays spooled, image id kept
            raise
        return True

    def _gate_delay(self) -> float:
        """How long this worker must wait before taking a sample (0: go)."""
        closed = self.windows.seconds_until_open()
        if closed > 0:
            # Outside a window: look again now and then (clocks get adjusted; windows are coarse).
            return min(closed, 30 * self.config.poll_seconds)
        now = self._monotonic()
        if self._paused:
            if self._probing:
                return 0.2  # another worker is probing the credentials
            if now < self._not_before:
                return self._not_before - now
            self._probing = True  # this worker sends the probe
            return 0.0
        return max(0.0, self._not_before - now)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early for a stop or drain (capped so window/pause changes are noticed)."""
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=min(seconds, 60.0))
        except asyncio.TimeoutError:
            pass
        if self._draining or self._stopping:
            return
        self._wake.clear()

    async def _idle(self) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self.config.poll_seconds)
            self._wake.clear()
        except asyncio.TimeoutError:
            # Other processes may have spooled samples: look at the folder again.
            await asyncio.to_thread(self.spool.maybe_rescan, self.config.poll_seconds)

    async def _deliver(self, claim: Claim) -> None:
        await self.rate.acquire(claim.size)
        started = self._monotonic()
        epoch = self._backoff_epoch

        async def on_image_stored(image_id: str) -> None:
            try:
                await asyncio.to_thread(claim.record_image_id, image_id)
            except OSError as exc:  # a full disk: a transient failure of ours, not a bug in the sink
                raise TransientError(f"cannot record the image id in the spool: {exc.strerror or exc}",
                                     step="upload") from None

        try:
            outcome = await self.sink.deliver(claim.record, claim.image, claim.image_id, on_image_stored)
        except TransientError as exc:
            self._transient(claim, exc, epoch)
        except AuthError as exc:
            self._outcomes["auth_error"].inc()
            self._count_failure(exc)
            claim.release()
            self._pause(exc)
        except RejectedError as exc:
            self._outcomes["rejected"].inc()
            self._count_failure(exc)
            self._healthy()
            await self._dead_letter(claim, "rejected", exc)
        except DeliveryError as exc:  # a new kind nobody mapped: treat as transient, loudly
            self._transient(claim, TransientError(str(exc), status=exc.status, step=exc.step, answer=exc.answer),
                            epoch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a sink must not kill the worker or lose the sample
            log.exception("sink %s failed unexpectedly on sample %s", self.sink.name, claim.sample_id)
            self._transient(claim, TransientError(f"unexpected {type(exc).__name__}"), epoch)
        else:
            await asyncio.to_thread(claim.done)
            self._outcomes[outcome].inc()
            self._seconds.observe(self._monotonic() - started)
            self._attempts.pop(claim.name, None)
            self.delivered += 1
            self._healthy()

    # -- sink health -------------------------------------------------------------------------------

    def _healthy(self) -> None:
        self._failures = 0
        if self._paused:
            log.warning("sink %s accepted the credentials again: delivery resumed", self.sink.name)
        self._paused = False
        self._probing = False
        self._sink_paused.set(0)

    def backoff_delay(self, failures: int) -> float:
        retry = self.config.retry
        try:
            delay = min(retry.max_seconds, retry.initial_seconds * retry.multiplier ** max(0, failures - 1))
        except OverflowError:  # after ~1000 rounds of a long outage: the cap, long since reached
            delay = retry.max_seconds
        return delay * (1.0 - retry.jitter * self._rng.random())

    def _count_failure(self, exc: DeliveryError) -> None:
        self._failures_by_reason[upload_failure_reason(exc.status, str(exc))].inc()

    def _transient(self, claim: Claim, exc: TransientError, epoch: int) -> None:
        retry = self.config.retry
        rate_limited = exc.status == 429
        self._outcomes["rate_limited" if rate_limited else "transient_error"].inc()
        self._count_failure(exc)
        if self._paused:  # a probe that hit a transient error: stay paused, probe again later
            self._probing = False
            self._not_before = self._monotonic() + retry.auth_pause_seconds
            claim.release()
            return
        counted, delivered_then = self._attempts.get(claim.name, (0, self.delivered))
        # The first failure counts; the next ones only once others got through after it.
        attempts = counted + 1 if counted == 0 or self.delivered > delivered_then else counted
        self._attempts[claim.name] = (attempts, delivered_then)
        now = self._monotonic()
        new_round = epoch == self._backoff_epoch  # not one more worker hitting the same failure
        if new_round:
            self._failures += 1
            self._backoff_epoch += 1
        if rate_limited and exc.retry_after is not None:
            delay = min(exc.retry_after, retry.max_retry_after_seconds)
        elif new_round:
            delay = self.backoff_delay(self._failures)
        else:
            delay = max(0.0, self._not_before - now)  # already backing off from this failure
        self._not_before = max(self._not_before, now + delay)
        # One warning per round of failure; the other workers' view of it only at debug level.
        (log.warning if new_round else log.debug)(
            "sink %s: %s; retrying in %.1f s (sample %s, attempt %d)",
            self.sink.name, exc, delay, claim.sample_id, attempts)
        if retry.max_attempts is not None and attempts >= retry.max_attempts:
            # Cannot await here (sync); the dead-letter move is quick and rare.
            try:
                claim.dead_letter("too_many_attempts", {**exc.as_dict(), "attempts": attempts})
            except OSError:  # a full disk: it stays spooled, its count kept, and is tried again
                claim.release()
                return
            self._attempts.pop(claim.name, None)
            self.metrics.dead_letters.labels(self.sink.name, "too_many_attempts").inc()
            return
        # The others go first for a while: whether they get through tells a sample the destination
        # refuses from a destination that is down.
        claim.release(behind_others_for=max(delay, retry.initial_seconds) * 2)

    def _pause(self, exc: AuthError) -> None:
        pause = self.config.retry.auth_pause_seconds
        first = not self._paused
        self._paused = True
        self._probing = False
        self._not_before = self._monotonic() + pause
        self._sink_paused.set(1)
        if first:
            log.error("ALARM: sink %s refused the API key (HTTP %s on %s); delivery to it is paused and "
                      "samples stay spooled. Fix the key; a probe is sent every %g s.",
                      self.sink.name, exc.status, exc.step, pause)

    async def _dead_letter(self, claim: Claim, reason: str, exc: DeliveryError) -> None:
        self._attempts.pop(claim.name, None)
        await asyncio.to_thread(claim.dead_letter, reason, exc.as_dict())
        self.metrics.dead_letters.labels(self.sink.name, reason).inc()
        log.error("sink %s rejected sample %s (%s): moved to the dead-letter folder",
                  self.sink.name, claim.sample_id, exc)
