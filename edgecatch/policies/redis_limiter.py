"""Limits shared by a fleet: rolling windows in Redis, one atomic server-side script per decision.

Each budget (a policy's window, or a window of the global limits) is one sorted set whose members
are the selections still inside the window, scored by their time in milliseconds. One Lua script
per matched prediction trims the sets to their windows, checks that each has room, and only then
adds the new selection to all of them — so a decision charges everything or nothing, and no two
replicas can both take the last unit of a budget. When several policies hold, the script tries them
in order (`acquire_first`) and charges the first with room: still one round trip. The script is loaded once (EVALSHA, falling back to EVAL when
the server answers NOSCRIPT, e.g. after a restart). Keys look like `edgecatch:{fleet}:p:<policy>:<s>`
and `edgecatch:{fleet}:g:<s>`: the fleet name separates fleets sharing one Redis, and the braces make
it a Redis Cluster hash tag, so all keys of one decision live on one shard.

Times are the callers' clocks (`now`), so replicas should run NTP: a clock d seconds off shifts
the window edges that replica sees by d seconds.

Redis unreachable, or slower than `timeout_ms`: the decision is taken locally at once by the
declared behaviour — `fail_open` (a per-process `MemoryLimiter` whose budgets are divided by
`expected_replicas`, rounded down but at least 1) or `fail_closed` (select nothing). The limiter then
stops calling Redis altogether (a circuit breaker): a background thread tries the script again every
`retry_seconds`, and the request path goes back to Redis when it answers. An outage is logged once
when it starts and once when it ends; `on_event` reports it for metrics. A decision that timed out
may still run on a server that was only stalled: Redis then holds one charge more than it granted
(over-counting by one per timeout, never under-counting).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

from edgecatch.policies.limits import Candidates, MemoryLimiter, Windows

__all__ = ["LimiterEvent", "RedisLimiter", "build_limiter", "redact_url", "scale_windows"]

log = logging.getLogger("edgecatch.limits")

LimiterEvent = Literal["available", "unavailable", "fail_open", "fail_closed"]
"""What `on_event` receives: the shared limiter answered for the first time or again ("available"),
stopped answering ("unavailable", once per outage), or one decision was taken without it, by the
declared behaviour ("fail_open" / "fail_closed")."""

# One decision for one or more candidate policies, tried in order (the first with room is charged).
# KEYS: the global budgets' sorted sets, then each candidate's. ARGV: now in ms, a member unique in the
# fleet, the number of global keys G, the number of candidates C; then (window ms, budget) for each
# global key; then for each candidate its number of keys N and (window ms, budget) for each.
# Every budget is checked before anything is written, so a refusal charges nothing. Returns the
# 0-based index of the candidate charged, or -1.
SCRIPT = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local g = tonumber(ARGV[3])
local c = tonumber(ARGV[4])
local function has_room(key, window, budget)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  return redis.call('ZCARD', key) < budget
end
local function charge(first_key, count, first_arg)
  for i = 0, count - 1 do
    redis.call('ZADD', KEYS[first_key + i], now, member)
    redis.call('PEXPIRE', KEYS[first_key + i], tonumber(ARGV[first_arg + 2 * i]) + 1000)
  end
end
local a = 5
for i = 1, g do
  if not has_room(KEYS[i], tonumber(ARGV[a]), tonumber(ARGV[a + 1])) then
    return -1
  end
  a = a + 2
end
local k = g + 1
for j = 1, c do
  local n = tonumber(ARGV[a])
  local first_arg = a + 1
  local room = true
  for i = 0, n - 1 do
    if room and not has_room(KEYS[k + i], tonumber(ARGV[first_arg + 2 * i]), tonumber(ARGV[first_arg + 2 * i + 1])) then
      room = false
    end
  end
  if room then
    charge(1, g, 5)
    charge(k, n, first_arg)
    return j - 1
  end
  k = k + n
  a = first_arg + 2 * n
end
return -1
"""

_Plan = tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]
"""Keys, the script's arguments after the member, and the candidates actually sent (indexes into the
caller's list: one with a budget of 0 is refused without asking)."""

# Limiters to repair in a forked child (new locks, a new member prefix, no probe thread).
_instances: weakref.WeakSet[RedisLimiter] = weakref.WeakSet()


def redact_url(url: str) -> str:
    """Where a Redis URL connects, as logs, errors and healthz may show it: the scheme, then host,
    port and db (or the socket path and db) as redis-py itself reads them. Credentials and every
    other option are left out, whatever the spelling (a password in the userinfo or the query,
    holding ':', '@', '#' or '/'); a URL redis-py cannot read shows its scheme only."""
    scheme = url.partition("://")[0] if "://" in url else ""
    try:
        from redis.connection import parse_url

        parts = parse_url(url)
    except Exception:
        return f"{scheme}://<unreadable>" if scheme.isalnum() else "<unparsable URL>"
    db = parts.get("db")
    if "path" in parts:  # unix:// socket
        return f"{scheme}://{parts['path']}" + (f"?db={db}" if db is not None else "")
    port = parts.get("port")
    return f"{scheme}://{parts.get('host') or 'localhost'}" + (f":{port}" if port else "") + \
        (f"/{db}" if db is not None else "")


def scale_windows(windows: Windows, replicas: int) -> Windows:
    """Each budget divided by `replicas`, rounded down but at least 1 when the budget is above 0."""
    return tuple((seconds, max(1, budget // replicas) if budget > 0 else 0) for seconds, budget in windows)


class RedisLimiter:
    """A `Limiter` whose budgets are shared by every process using the same Redis and fleet name."""

    def __init__(
        self,
        url: str,
        *,
        fleet: str = "default",
        on_unavailable: Literal["fail_open", "fail_closed"] = "fail_open",
        expected_replicas: int = 1,
        timeout_ms: float = 20.0,
        retry_seconds: float = 5.0,
        on_event: Callable[[LimiterEvent], None] | None = None,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:  # pragma: no cover - depends on the installation
            raise ImportError(
                "the Redis limiter backend needs the redis client: pip install 'edgecatch[redis]'") from None
        if on_unavailable not in ("fail_open", "fail_closed"):
            raise ValueError(f"on_unavailable must be fail_open or fail_closed, not {on_unavailable!r}")
        if expected_replicas < 1:
            raise ValueError("expected_replicas must be at least 1")
        self.where = redact_url(url)
        self.fleet = fleet
        self.on_unavailable = on_unavailable
        self.expected_replicas = expected_replicas
        self.retry_seconds = retry_seconds
        timeout = timeout_ms / 1000.0
        # No retries inside the client: one attempt per decision, bounded by the socket timeouts.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        self._script = self._client.register_script(SCRIPT)  # EVALSHA, EVAL on NOSCRIPT
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._prefix = f"edgecatch:{{{fleet}}}:"
        self._plans: dict[tuple[Candidates, Windows], _Plan] = {}
        self._scaled: dict[Windows, Windows] = {}
        self._fallback = MemoryLimiter()
        self._on_event = on_event
        self._closed = threading.Event()
        self._reset_process_state()
        _instances.add(self)

    def _reset_process_state(self) -> None:
        """What one process must not share with another it was forked from."""
        self._lock = threading.Lock()
        # Unique members: a random prefix per process and a counter (next() on it is atomic).
        self._member_prefix = f"{os.getpid():x}.{os.urandom(6).hex()}:"
        self._sequence = itertools.count()
        self._available = True
        self._announced = False
        self._down_since = 0.0
        self._local_decisions = 0
        self._probe: threading.Thread | None = None

    # -- the request path ----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False during an outage (decisions are then taken locally)."""
        return self._available

    def acquire(self, policy: str, policy_windows: Windows, global_windows: Windows, now: float) -> bool:
        if not policy_windows and not global_windows:
            return True
        return self.acquire_first(((policy, policy_windows),), global_windows, now) == 0

    def acquire_first(self, candidates: Candidates, global_windows: Windows, now: float) -> int:
        if self._available:
            key = (tuple(candidates), global_windows)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plan(key)
            keys, args, sent = plan
            if not keys:  # nothing to ask: no candidate, or the first one has no limits at all
                return sent[0] if sent else -1
            try:
                index = self._script(keys=keys, args=(
                    int(now * 1000), self._member_prefix + str(next(self._sequence)), *args))
            except self._errors as exc:
                self._went_down(exc)
            else:
                if not self._announced:
                    self._announced = True
                    self._emit("available")
                return sent[index] if index >= 0 else -1
        return self._decide_locally(candidates, global_windows, now)

    def check_now(self) -> None:
        """One round trip, when the service starts (off the request path): availability is known from
        the start, not from the first selection, which a quiet service may not make for hours."""
        if not self._available:
            return
        try:
            self._script(keys=(), args=(0, "", 0, 0))  # no keys: a round trip that also loads the script
        except self._errors as exc:
            self._went_down(exc)
            return
        if not self._announced:
            self._announced = True
            self._emit("available")

    def _plan(self, key: tuple[Candidates, Windows]) -> _Plan:
        candidates, global_windows = key
        keys = [f"{self._prefix}g:{seconds:g}" for seconds, _ in global_windows]
        args = [len(global_windows), 0]
        for seconds, budget in global_windows:
            args += (round(seconds * 1000), budget)
        sent = []
        if all(budget > 0 for _, budget in global_windows):
            for index, (policy, windows) in enumerate(candidates):
                if any(budget <= 0 for _, budget in windows):
                    continue  # refused whatever Redis holds
                sent.append(index)
                keys += [f"{self._prefix}p:{policy}:{seconds:g}" for seconds, _ in windows]
                args.append(len(windows))
                for seconds, budget in windows:
                    args += (round(seconds * 1000), budget)
                if not windows:
                    break  # only the global budgets can refuse it, and they would refuse the rest too
        args[1] = len(sent)
        plan = (tuple(keys), tuple(args), tuple(sent))
        if len(self._plans) < 10_000:  # policies are few; reloads may add some
            self._plans[key] = plan
        return plan

    def _decide_locally(self, candidates: Candidates, global_windows: Windows, now: float) -> int:
        self._local_decisions += 1  # for the recovery log line only: an approximate count is fine
        self._emit(self.on_unavailable)
        if self.on_unavailable == "fail_closed":
            if not global_windows:  # a policy without limits is not refused
                return next((i for i, (_, windows) in enumerate(candidates) if not windows), -1)
            return -1
        scaled = [(policy, self._scale(windows)) for policy, windows in candidates]
        return self._fallback.acquire_first(scaled, self._scale(global_windows), now)

    def _scale(self, windows: Windows) -> Windows:
        scaled = self._scaled.get(windows)
        if scaled is None:
            scaled = scale_windows(windows, self.expected_replicas)
            if len(self._scaled) < 10_000:
                self._scaled[windows] = scaled
        return scaled

    def _emit(self, event: LimiterEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # metrics must never break a decision
                log.exception("limiter event listener failed")

    # -- outages -------------------------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            if not self._available or self._closed.is_set():
                return
            self._available = False
            self._down_since = time.monotonic()
            self._local_decisions = 0
            probe = self._probe = threading.Thread(
                target=self._probe_until_back, name="edgecatch-limiter-probe", daemon=True)
        if self.on_unavailable == "fail_open":
            behaviour = (f"fail_open: local budgets divided by {self.expected_replicas}"
                         f" (expected_replicas) until it answers")
        else:
            behaviour = "fail_closed: nothing with a limit is selected until it answers"
        log.warning("shared limiter unavailable (Redis at %s, fleet %r): %s: %s; %s; retrying every %g s",
                    self.where, self.fleet, type(exc).__name__, exc, behaviour, self.retry_seconds)
        self._emit("unavailable")
        probe.start()

    def _probe_until_back(self) -> None:
        """Off the request path: try the script every retry_seconds until Redis answers."""
        while not self._closed.wait(self.retry_seconds):
            try:
                self._script(keys=(), args=(0, "", 0, 0))  # no keys: a round trip that also loads the script
            except self._errors:
                continue
            log.warning("shared limiter available again (Redis at %s, fleet %r) after %.1f s; "
                        "%d decisions were taken locally (%s)", self.where, self.fleet,
                        time.monotonic() - self._down_since, self._local_decisions, self.on_unavailable)
            self._announced = True
            self._emit("available")
            with self._lock:
                if self._probe is threading.current_thread():
                    self._available = True  # the request path uses Redis again from here on
                    self._probe = None
            return

    def close(self) -> None:
        """Stop the probe thread and close the connections."""
        self._closed.set()
        probe = self._probe
        if probe is not None and probe is not threading.current_thread() and probe.is_alive():
            probe.join(timeout=max(1.0, self.retry_seconds))
        self._client.close()

    # -- introspection (tests, tools) -----------------------------------------------------------

    def used(self, policy: str | None, seconds: float, now: float) -> int:
        """Selections charged in Redis within the last `seconds` (policy None: the global budget)."""
        scope = f"p:{policy}:" if policy else "g:"
        key = f"{self._prefix}{scope}{seconds:g}"
        now_ms = int(now * 1000)
        return int(self._client.zcount(key, f"({now_ms - round(seconds * 1000)}", "+inf"))

    def __repr__(self) -> str:
        return f"RedisLimiter({self.where!r}, fleet={self.fleet!r}, on_unavailable={self.on_unavailable!r})"


def _after_fork_in_child() -> None:
    for limiter in list(_instances):
        limiter._reset_process_state()  # redis-py's pool notices the new pid and reconnects itself


os.register_at_fork(after_in_child=_after_fork_in_child)


def build_limiter(config: Any, on_event: Callable[[LimiterEvent], None] | None = None) -> Any:
    """The limiter a `LimitsConfig` asks for: a `MemoryLimiter`, or a `RedisLimiter` for a redis URL."""
    backend = config.resolved_backend()
    if backend == "memory":
        return MemoryLimiter()
    return RedisLimiter(
        backend, fleet=config.fleet, on_unavailable=config.on_unavailable,
        expected_replicas=config.expected_replicas, timeout_ms=config.timeout_ms,
        retry_seconds=config.retry_seconds, on_event=on_event)
