"""The collector: what every integration calls, and the only thing it calls.

`observe()` runs on the request path: evaluate the policies, update the metrics, remember the
prediction for feedback, and — only when selected — hand the sample to delivery (a non-blocking
put). Everything slow (preparing images, the spool, uploads) happens in delivery's background.
`feedback()` turns a user's verdict into a feedback event; predictions that leave the recall buffer
without one come back as `silent` events.

One collector per process; several processes (BentoML workers) share the spool, and a verdict that
reaches a worker other than the one that served the prediction is forwarded to it over a Unix
socket in the spool's `run/` folder (the inference id names the worker).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgecatch.metrics import Metrics, MetricTally, forget_dead_workers, get_metrics
from edgecatch.observation import Classification, Detection, Observation, Verdict
from edgecatch.policies import Decision, EngineState, PolicyStore
from edgecatch.policies.redis_limiter import LimiterEvent, build_limiter
from edgecatch.processes import process_alive
from edgecatch.recall import RecallBuffer, Recalled

if TYPE_CHECKING:
    from edgecatch.config import EdgecatchConfig
    from edgecatch.feedback import PredictionPayload

__all__ = ["Collector", "FeedbackOutcome", "configure", "get_collector"]

log = logging.getLogger("edgecatch")
T = TypeVar("T")

_SWEEP_SECONDS = 1.0
#: How often a worker looks for killed workers' gauges to drop (multiprocess metrics only).
_DEAD_WORKER_SECONDS = 10.0
#: How often the background loop writes the request path's tallied metrics and silent events.
_FLUSH_SECONDS = 0.25
#: Evicted predictions (with their images) waiting for their silent event; beyond this the request
#: path evaluates them itself. About 100 wait at 400 predictions/s; the bound caps the memory.
_SILENT_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class FeedbackOutcome:
    #: "accepted", "unknown" (not recallable), "duplicate" (already answered), "forwarded_error"
    status: str
    decision: Decision | None = None


class Collector:
    """Policies, metrics, recall and the hand-off to delivery, for one process."""

    def __init__(
        self,
        config: EdgecatchConfig,
        *,
        metrics: Metrics | None = None,
        delivery: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self.limiter = build_limiter(config.limits, on_event=self._limiter_event)
        self.policies = PolicyStore(
            config.policies, state=EngineState(limiter=self.limiter),
            poll_interval=config.policy_reload_seconds, clock=clock, on_reload=self._policy_reloaded,
            last_good=config.delivery.spool_dir / "run" / "last-good-policies.yaml")
        self.recall = RecallBuffer(
            max_items=config.recall.max_items, max_bytes=config.recall.max_bytes,
            max_age_seconds=config.recall.max_age_seconds)
        metrics = self.metrics
        # Known label values at 0 from the start (increase() cannot see a series' first sample).
        for outcome in ("success", "failure"):
            metrics.policy_reloads.labels(outcome)
        for verdict in Verdict:
            metrics.feedback.labels(verdict.value)
        if self.policies.last_error is not None:  # started with the saved last good policies
            metrics.policy_reloads.labels("failure").inc()
        metrics.policy_reload_failing.set(1 if self.policies.last_error is not None else 0)
        for behaviour in ("fail_open", "fail_closed"):
            metrics.limiter_unavailable.labels(behaviour)
        if config.limits.resolved_backend() == "memory":
            # In-process budgets always answer; unset, the gauge would read 0 ("outage").
            metrics.limiter_available.set(1)
        if delivery is None:
            from edgecatch.delivery import Delivery

            delivery = Delivery(config.delivery, metrics=self.metrics)
        self.delivery = delivery
        self.feedback_token = config.feedback.resolved_token()
        if self.feedback_token is None and config.feedback.token_env:
            from edgecatch.delivery.config import shown_variable

            log.warning("feedback.token_env names the environment variable %s, which is not set: the feedback "
                        "route takes verdicts without a token", shown_variable(config.feedback.token_env))
        self.max_feedback_image_bytes = config.feedback.max_image_bytes
        self._max_classes = config.metrics.max_class_labels
        self._classes: dict[str, set[str]] = {}
        self._children: dict[tuple[str, str], Any] = {}
        # Request-path counts, written to the metrics by the background loop once it runs.
        self._tally = MetricTally()
        # Predictions that left the recall buffer without a verdict, awaiting their silent event
        # (evaluated by the background loop once it runs, or by an integration's own loop through
        # evaluate_silent_events(); inline before).
        self._silent_pending: collections.deque[Recalled] = collections.deque()
        self._pid = os.getpid()
        self._worker_tag = _base36(self._pid)
        self._state = "created"
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._peer_server: asyncio.AbstractServer | None = None
        self._unparsed_logged: set[tuple[str, str | None]] = set()
        self._internal_logged: set[tuple] = set()
        # Ids whose verdict came with its own prediction and image (the prediction forgotten): one
        # verdict each, as for remembered ones; bounded like the recall buffer's item count.
        self._late_verdicts: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._served_models: set[str] = set()
        self._run_fd: int | None = None  # the spool's run/ folder, to name deep sockets (see _socket_address)

    @classmethod
    def from_config(cls, config: EdgecatchConfig, **kwargs: Any) -> Collector:
        return cls(config, **kwargs)

    @property
    def metrics(self) -> Metrics:
        if self._metrics is None:  # lazily: BentoML sets up multiprocess metrics after import
            self._metrics = get_metrics()
        return self._metrics

    # -- the request path ----------------------------------------------------------------------

    def new_inference_id(self) -> str:
        """A fresh id: "w", the serving worker's tag (its pid in base 36), "-", 16 random hex digits.

        Unpredictable: without a feedback token the id is what stands between a client and other
        clients' predictions (a verdict, corrected labels, or a 409 for their owner), so the digits
        are a keyed BLAKE2b of a counter, the key drawn from os.urandom once per process. (A seeded
        Mersenne Twister can be predicted from 312 ids; os.urandom per id costs ~150 µs on some VMs.)
        """
        digest = blake2b(next(_id_counter).to_bytes(8, "little"), key=_id_key, digest_size=8)
        return f"w{self._worker_tag}-{digest.hexdigest()}"

    def observe(self, observation: Observation, image: Any) -> Decision:
        """Evaluate, count, remember and maybe hand off one prediction. Never blocks, never raises."""
        policies = self.policies.current
        decision = policies.evaluate(observation, now=observation.timestamp or None)
        self._count_prediction(observation, decision)
        if decision.selected:
            self.submit(observation, image, decision)
        if observation.inference_id:
            evicted = self.recall.put(observation.inference_id, observation, image)
            if evicted:
                # The background loop evaluates them, off the request path; should it fall behind
                # (their images are still held), the request path does it again.
                if self._tally.buffered and len(self._silent_pending) < _SILENT_BACKLOG:
                    self._silent_pending.extend(evicted)
                else:
                    for entry in evicted:
                        self._silent(entry)
        return decision

    def submit(self, observation: Observation, image: Any, decision: Decision) -> bool:
        """Hand a selected sample to delivery: a bounded non-blocking put (full: dropped and counted)."""
        return self.delivery.submit(observation, image, decision, self.policies.current.image)

    def _policy_reloaded(self, outcome: str) -> None:
        self.metrics.policy_reloads.labels(outcome).inc()
        self.metrics.policy_reload_failing.set(1 if outcome == "failure" else 0)

    def _limiter_event(self, event: LimiterEvent) -> None:
        metrics = self.metrics
        if event == "available":
            metrics.limiter_available.set(1)
        elif event == "unavailable":
            metrics.limiter_available.set(0)
            metrics.limiter_outages.inc()
        else:
            metrics.limiter_unavailable.labels(event).inc()

    def count_unparsed(self, reason: str, detail: str | None = None, *, model: str | None = None) -> None:
        self.metrics.unparsed.labels(reason).inc()
        key = (reason, model)
        if detail and key not in self._unparsed_logged and len(self._unparsed_logged) < 1000:
            # once per reason and model: a bad client must not flood the log, nor hide another model's problem
            self._unparsed_logged.add(key)
            where = f" of model {model}" if model else ""
            # The detail quotes what a client sent (tensor names, datatypes): one line, escaped.
            log.warning("edgecatch could not read a prediction%s (%s): %s", where, reason, _one_line(detail))

    def count_internal_error(self, exc: BaseException, what: str) -> None:
        """A bug met while reading a prediction: counted as unparsed "internal" every time, its
        traceback logged once per exception type and place (a bug hit by every call must not flood
        the log, nor hide another bug of the same type elsewhere)."""
        self.metrics.unparsed.labels("internal").inc()
        frames = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ is not None else []
        kind = (type(exc), *((frames[0].filename, frames[0].lineno) if frames else ()))
        if kind not in self._internal_logged and len(self._internal_logged) < 100:
            self._internal_logged.add(kind)
            log.error("%s failed (counted as edgecatch_unparsed_total{reason=\"internal\"}; logged once per "
                      "place)", what, exc_info=exc)

    def _class_label(self, model: str, name: str) -> str:
        seen = self._classes.get(model)
        if seen is None:
            seen = self._classes[model] = set()
        if name in seen:
            return name
        if len(seen) < self._max_classes:
            seen.add(name)
            return name
        return "other"

    def _confidence_child(self, model: str, name: str) -> Any:
        key = ("confidence", model, name)
        child = self._children.get(key)
        if child is None:
            child = self.metrics.confidence.labels(model, self._class_label(model, name))
            if len(self._children) < 100_000:
                self._children[key] = child
        return child

    def _child(self, metric: Any, *labels: str) -> Any:
        """A labelled child of a metric, cached: `labels()` costs microseconds on every call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < 100_000:
                self._children[key] = child
        return child

    def _count_prediction(self, observation: Observation, decision: Decision) -> None:
        metrics = self.metrics
        model = observation.model
        tally = self._tally
        child = self._child
        with tally.lock:
            if observation.feedback is not None:
                tally.inc(child(metrics.feedback, observation.feedback.value))
            else:
                tally.inc(child(metrics.predictions, model))
                if observation.classification is not None:
                    top = observation.classification.top_class
                    if top is not None:
                        tally.observe(self._confidence_child(model, top), observation.classification.top_confidence)
                else:
                    tally.observe(child(metrics.detections, model), len(observation.detections))
                    for detection in observation.detections:
                        tally.observe(self._confidence_child(model, detection.class_name), detection.confidence)
            for name in decision.matched:
                tally.inc(child(metrics.policy_matches, model, name))
            if decision.selected:
                tally.inc(child(metrics.samples, model, decision.policy))
            for name in decision.limited:
                tally.inc(child(metrics.limited, name))

    # -- feedback ------------------------------------------------------------------------------

    def feedback(
        self,
        inference_id: str,
        verdict: Verdict,
        *,
        note: str = "",
        corrected: tuple[Detection, ...] | Classification | None = None,
        prediction: PredictionPayload | None = None,
        image: bytes | None = None,
    ) -> FeedbackOutcome:
        """A user's verdict on an earlier prediction (thread-safe; may forward to another worker).

        A verdict that comes with its prediction and image (the prediction forgotten) is still one
        per id across workers: the worker that served it decides whether it is the first, or, when
        that worker is gone, the live worker with the lowest pid does (`_claim`)."""
        entry, first = self.recall.give_verdict(inference_id, verdict.value)
        if entry is None:
            if image is None:
                prediction = None  # a prediction is only of use with its image
            # The model name becomes a metric label and a dataset batch name: only models served here.
            servable = prediction is not None and (
                not self._served_models or prediction.model in self._served_models)
            owner = _owner_pid(inference_id)
            if owner is not None and owner != self._pid and self._peer_socket(owner).exists():
                # The worker that served it may still remember it, even when the client sent the
                # prediction along: asked first, so that one prediction gets one verdict. Sent
                # along, it also answers whether this is the id's first verdict ("claimed").
                outcome = self._forward_feedback(owner, inference_id, verdict, note, corrected, claim=servable)
                if outcome.status in ("accepted", "duplicate", "forwarded_error"):
                    return outcome  # decided there, or undecided (502: the client may send it again)
                claimed: bool | None = outcome.status == "claimed" or None
                if claimed is None and servable:  # the owner is gone after all: the others decide
                    claimed = self._claim(inference_id, skip=owner)
            elif servable:
                claimed = self._claim_here(inference_id) if owner == self._pid else self._claim(inference_id, skip=owner)
            else:
                claimed = None
            if prediction is None:
                return FeedbackOutcome("unknown")
            if not servable:
                return FeedbackOutcome("unknown_model")
            if claimed is None:
                return FeedbackOutcome("forwarded_error")
            if not claimed:
                return FeedbackOutcome("duplicate")
            base = Observation(
                model=prediction.model, model_version=prediction.model_version,
                detections=tuple(d.to_detection() for d in prediction.detections or ()),
                classification=(Classification.from_scores(prediction.classification)
                                if prediction.classification is not None else None),
                inference_id=inference_id)
            return FeedbackOutcome("accepted", self._feedback_event(base, lambda: image, verdict, note, corrected))
        if not first:
            return FeedbackOutcome("duplicate")
        decision = self._feedback_event(entry.observation, lambda: entry.image, verdict, note, corrected)
        return FeedbackOutcome("accepted", decision)

    def serve_models(self, names: Iterable[str]) -> None:
        """The model names this process serves (integrations say so at start): a verdict sent with its
        own prediction must name one of them."""
        self._served_models.update(names)

    def _claim(self, inference_id: str, skip: int | None = None) -> bool | None:
        """Whether a verdict sent with its prediction is the first for this id, when the worker that
        served it (`skip`) is gone: asked of the live worker with the lowest pid (every worker picks
        the same one; a socket nobody listens on is passed over), or decided here when that is this
        one. None: the arbiter did not answer, and nobody else may decide in its place."""
        for pid in sorted(pid for pid in self._peer_pids() if pid != skip):
            if pid == self._pid:
                return self._claim_here(inference_id)
            reply = self._ask_peer(pid, {"inference_id": inference_id, "claim_only": True})
            if reply is False:
                continue  # a leftover socket (its worker was killed; the pid may be another's now)
            return reply["status"] == "claimed" if isinstance(reply, dict) else None
        return self._claim_here(inference_id)

    def _claim_here(self, inference_id: str) -> bool:
        with self._lock:
            if inference_id in self._late_verdicts:
                return False
            self._late_verdicts[inference_id] = None
            if len(self._late_verdicts) > self.config.recall.max_items:
                self._late_verdicts.popitem(last=False)
            return True

    def _peer_pids(self) -> list[int]:
        """Live workers sharing this spool with a feedback socket (this one included)."""
        pids = [self._pid]
        try:
            names = os.listdir(self.config.delivery.spool_dir / "run")
        except OSError:
            return pids
        for name in names:
            match = _PEER_SOCKET.match(name)
            if match and int(match.group(1)) != self._pid and process_alive(int(match.group(1))):
                pids.append(int(match.group(1)))
        return pids

    def _feedback_event(self, base: Observation, image_of: Callable[[], Any], verdict: Verdict, note: str,
                        corrected: tuple[Detection, ...] | Classification | None) -> Decision:
        event = replace(base, feedback=verdict, feedback_note=note, corrected=corrected, timestamp=self._clock())
        return self._decide_event(event, image_of)

    def _silent(self, entry: Recalled) -> None:
        if entry.verdict is None:  # one for every prediction: the event is built straight from the entry
            self._decide_event(entry.as_event(Verdict.SILENT, self._clock()), lambda: entry.image)

    def _decide_event(self, event: Observation, image_of: Callable[[], Any]) -> Decision:
        """Evaluate and count a feedback event; hand it off if selected. The image is fetched (copied
        out of the recall buffer) only then; one that is gone by then is counted as dropped."""
        decision = self.policies.current.evaluate(event, now=event.timestamp)
        self._count_prediction(event, decision)
        if decision.selected:
            image = image_of()
            if image is None:
                self._child(self.metrics.dropped, "image_gone").inc()
            else:
                self.submit(event, image, decision)
        return decision

    # -- several workers: verdicts find the worker that remembers the prediction ---------------

    def _socket_address(self, path: Path) -> str:
        """What to bind or connect to for a socket at `path`. A Unix socket's address holds at most
        107 bytes, so a deeper spool folder is named through this process's descriptor of its
        run/ folder (/proc/self/fd/N/...), which the kernel resolves to the same file."""
        if len(os.fsencode(path)) <= 100:
            return str(path)
        if self._run_fd is None:  # (a race opens it twice: harmless)
            self._run_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._run_fd}/{path.name}"

    def _peer_socket(self, pid: int) -> Path:
        return self.config.delivery.spool_dir / "run" / f"feedback-{pid}.sock"

    def _forward_feedback(self, pid: int, inference_id: str, verdict: Verdict, note: str,
                          corrected: Any, claim: bool = False) -> FeedbackOutcome:
        """Hand a verdict to the worker that served it. With `claim` (the client sent the prediction
        along) a worker that does not remember it answers whether this is the id's first verdict."""
        message = {"inference_id": inference_id, "verdict": verdict.value, "note": note,
                   "corrected": _corrected_json(corrected), "claim": claim}
        reply = self._ask_peer(pid, message)
        if reply is None:
            return FeedbackOutcome("forwarded_error")
        if reply is False:
            return FeedbackOutcome("unknown")  # that worker is gone, and its memory with it
        decision = Decision(selected=reply.get("selected", False), policy=reply.get("policy"))
        return FeedbackOutcome(reply["status"], decision)

    def _ask_peer(self, pid: int, message: dict[str, Any]) -> dict[str, Any] | bool | None:
        """A peer worker's JSON reply; False when it is gone; None when it did not answer."""
        path = self._peer_socket(pid)
        if not path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5.0)
                sock.connect(self._socket_address(path))
                sock.sendall(json.dumps(message).encode() + b"\n")
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            return json.loads(answer)
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # the worker died without cleaning up its socket
        except (OSError, ValueError):
            log.warning("could not forward a verdict to worker %s", pid)
            return None

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            message = json.loads(await asyncio.wait_for(reader.readline(), 5.0))
            if message.get("claim_only"):
                outcome = FeedbackOutcome("claimed" if self._claim_here(message["inference_id"]) else "duplicate")
            else:
                outcome = await asyncio.get_running_loop().run_in_executor(None, lambda: self._peer_feedback(message))
            reply = {"status": outcome.status, "selected": bool(outcome.decision and outcome.decision.selected),
                     "policy": outcome.decision.policy if outcome.decision else None}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except Exception:
            log.exception("bad verdict forwarded by a peer worker")
        finally:
            writer.close()

    def _peer_feedback(self, message: dict[str, Any]) -> FeedbackOutcome:
        """A verdict forwarded by the worker that received it: decided here, never forwarded again."""
        inference_id = message["inference_id"]
        entry, first = self.recall.give_verdict(inference_id, message["verdict"])
        if entry is None:
            if message.get("claim"):
                return FeedbackOutcome("claimed" if self._claim_here(inference_id) else "duplicate")
            return FeedbackOutcome("unknown")
        if not first:
            return FeedbackOutcome("duplicate")
        decision = self._feedback_event(entry.observation, lambda: entry.image, Verdict(message["verdict"]),
                                        message.get("note", ""), _corrected_from_json(message.get("corrected")))
        return FeedbackOutcome("accepted", decision)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivery, policy reloads and the recall sweep (idempotent; call in the serving process)."""
        with self._lock:
            if self._state == "running":
                return
            self._pid = os.getpid()
            self._worker_tag = _base36(self._pid)
            self.delivery.start()
            self.policies.start()
            check_limiter = getattr(self.limiter, "check_now", None)  # a shared limiter: up or not?
            if check_limiter is not None:
                check_limiter()
            self._tally.buffered = True
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="edgecatch-collector",
                                            daemon=True)
            self._thread.start()
            ready.wait(10)
            self._state = "running"

    def _run_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            path = self._peer_socket(self._pid)
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                path.unlink(missing_ok=True)
                self._peer_server = await asyncio.start_unix_server(self._serve_peer, path=self._socket_address(path))
                os.chmod(path, 0o600)
            except OSError as exc:
                log.warning("verdicts for this worker cannot be forwarded from others: %s", exc)
            ready.set()
            next_sweep = loop.time() + _SWEEP_SECONDS
            next_dead_check = loop.time()
            while True:
                await asyncio.sleep(_FLUSH_SECONDS)
                now = loop.time()
                if now >= next_sweep:
                    next_sweep += _SWEEP_SECONDS
                    self._silent_pending.extend(self.recall.expire())
                if now >= next_dead_check:
                    next_dead_check = now + _DEAD_WORKER_SECONDS
                    self._forget_dead_workers()
                self._background_work()

        task = loop.create_task(main())
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:
            ready.set()
            loop.close()

    def _forget_dead_workers(self) -> None:
        try:
            forgotten = forget_dead_workers()
        except Exception:
            log.exception("could not drop the metrics of exited workers")
            return
        if forgotten:
            log.warning("dropped the gauges of worker process(es) %s, which exited without doing so (killed?)",
                        ", ".join(map(str, forgotten)))

    def _background_work(self) -> None:
        """Silent events of predictions that left the recall buffer, then the tallied metrics."""
        self.evaluate_silent_events()
        self._tally.flush()

    def evaluate_silent_events(self) -> None:
        """Evaluate the pending silent events now, on the calling thread (thread-safe).

        The background loop does it every `_FLUSH_SECONDS`, holding the GIL for the whole batch: at
        4,000 predictions/s that is ~1,000 events and ~20 ms every 250 ms, during which a serving
        thread that wants the GIL waits. An integration that runs its own batches of observation
        work (the sidecar's event loop) calls this after each batch instead, a few events at a time.
        A BentoML worker serves at most ~450 predictions/s, a batch of ~2.5 ms: the loop does it there.
        """
        pending = self._silent_pending
        while pending:
            try:
                entry = pending.popleft()
            except IndexError:  # the other caller took the last one
                return
            try:
                self._silent(entry)
            except Exception:
                log.exception("silent event failed")

    def stop(self, timeout: float | None = None) -> None:
        """Stop reloads and the sweep; delivery drains what it can and leaves the rest spooled."""
        with self._lock:
            if self._state != "running":
                return
            self._state = "stopping"
            self.policies.stop()
            loop = self._loop
            if loop is not None and not loop.is_closed():
                def cancel_all() -> None:
                    if self._peer_server is not None:
                        self._peer_server.close()
                    for task in asyncio.all_tasks(loop):
                        task.cancel()

                loop.call_soon_threadsafe(cancel_all)
            if self._thread is not None:
                self._thread.join(5)
            self._tally.buffered = False  # from now on inline again; what was gathered is written now
            self._background_work()
            self._peer_socket(self._pid).unlink(missing_ok=True)
            if self._run_fd is not None:
                os.close(self._run_fd)
                self._run_fd = None
            self.delivery.stop(timeout)
            close_limiter = getattr(self.limiter, "close", None)
            if close_limiter is not None:
                close_limiter()
            self._state = "stopped"

    async def run_in_background(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (a verdict that may be forwarded, a drain) off an event loop."""
        return await asyncio.to_thread(func, *args, **kwargs)

    @property
    def state(self) -> str:
        """created, running, stopping or stopped."""
        return self._state

    def health(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "policies": str(self.policies.path),
            "policy_error": str(self.policies.last_error) if self.policies.last_error else None,
            "recall_items": len(self.recall),
            # "memory", or the Redis URL (password redacted) and whether it answers right now.
            "limiter": getattr(self.limiter, "where", "memory"),
            "limiter_available": getattr(self.limiter, "available", True),
            **self.delivery.health(),
        }


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


_id_key = os.urandom(32)
_id_counter = itertools.count()


def _new_id_key() -> None:
    global _id_key
    _id_key = os.urandom(32)


os.register_at_fork(after_in_child=_new_id_key)  # forked workers (BentoML) must not draw the same ids

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_PEER_SOCKET = re.compile(r"^feedback-(\d+)\.sock$")
_ID = re.compile(r"^w([0-9a-z]{1,8})-[0-9a-f]{16}(?:\.\d+)*$")


def _owner_pid(inference_id: str) -> int | None:
    """The pid of the worker that issued an id (items of a batch add ".<index>")."""
    match = _ID.match(inference_id)
    return int(match.group(1), 36) if match else None


def _corrected_json(corrected: Any) -> Any:
    if isinstance(corrected, Classification):
        return {"classification": corrected.as_dict()}
    if corrected:
        return {"detections": [{"class": d.class_name, "class_id": d.class_id, "confidence": d.confidence,
                                "box": list(d.box)} for d in corrected]}
    return None


def _corrected_from_json(data: Any) -> Any:
    if not data:
        return None
    if "classification" in data:
        return Classification.from_scores(data["classification"])
    from edgecatch.records import DetectionRecord

    return tuple(DetectionRecord.model_validate(d).to_detection() for d in data.get("detections", ()))


# -- the process-wide collector of the serving integrations ------------------------------------

_collector_lock = threading.RLock()
_collector: Collector | None = None
_configured = False


def configure(config: EdgecatchConfig | str | os.PathLike[str] | None = None) -> Collector | None:
    """Create the process's collector from a config (or path, or $EDGECATCH_CONFIG). None if disabled."""
    global _collector, _configured
    from edgecatch.config import EdgecatchConfig, load_config

    with _collector_lock:
        if not isinstance(config, EdgecatchConfig):
            config = load_config(config)
        _collector = Collector(config) if config.enabled else None
        _configured = True
        return _collector


def get_collector() -> Collector | None:
    """The process's collector, configured from $EDGECATCH_CONFIG on first use; None when disabled."""
    if _configured:  # the hot path: one global read
        return _collector
    with _collector_lock:  # two first requests at once must not build two collectors
        if _configured:
            return _collector
        return configure()
