"""The Redis limiter against a real redis-server: semantics, atomicity, fleets, outages, recovery.

Every test starts its own redis-server on a free loopback port (tests/redis_server.py) and kills it
at the end. Windows roll with controlled `now` values, never by sleeping through them; the only
waits are bounded polls for a background recovery.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis  # noqa: F401  (the test extra installs it; a missing client is a failure, not a skip)

from edgecatch.config import EdgecatchConfig, LimitsConfig
from edgecatch.policies import MemoryLimiter
from edgecatch.policies.load import ConfigError, load_model_text
from edgecatch.policies.redis_limiter import RedisLimiter, build_limiter, redact_url, scale_windows
from tests.redis_server import RedisServer, free_port


REPO = Path(__file__).resolve().parents[2]
T0 = 1_795_132_800.0  # 2026-11-20T00:00:00Z
MINUTE = ((60.0, 3),)
HOUR = ((3600.0, 5),)


@pytest.fixture
def server(tmp_path):
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    yield redis_server
    redis_server.kill()


@pytest.fixture
def make_limiter(server):
    made = []

    def make(url: str | None = None, **kwargs) -> RedisLimiter:
        kwargs.setdefault("timeout_ms", 2000)  # generous: these tests are about semantics, not speed
        limiter = RedisLimiter(url or server.url, **kwargs)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        limiter.close()


def wait_until(predicate, timeout: float = 20.0) -> None:
    """A bounded poll for something a background thread does (a liveness bound, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the liveness bound")
        time.sleep(0.01)


# -- semantics --------------------------------------------------------------------------------


def test_windows_roll_with_the_callers_clock(make_limiter):
    limiter = make_limiter()
    assert [limiter.acquire("p", MINUTE, (), T0 + i) for i in range(4)] == [True, True, True, False]
    assert limiter.acquire("p", MINUTE, (), T0 + 59.999) is False
    assert limiter.acquire("p", MINUTE, (), T0 + 60) is True  # the selection at T0 left the window
    assert limiter.acquire("p", MINUTE, (), T0 + 60.5) is False  # T0+1 and T0+2 are still inside
    assert limiter.acquire("p", MINUTE, (), T0 + 62) is True
    assert limiter.used("p", 60.0, T0 + 62) == 2  # T0+60 and T0+62


def test_decisions_are_exactly_those_of_the_memory_limiter(make_limiter):
    # A random schedule of matches over three hours, two policies with minute and hour budgets and a
    # global budget: the shared limiter must decide exactly as the single-process one does.
    redis_limiter = make_limiter()
    memory = MemoryLimiter()
    windows = {"a": ((60.0, 3), (3600.0, 20)), "b": ((60.0, 2),)}
    global_windows = ((3600.0, 30), (600.0, 8))
    rng = random.Random(5)
    now = T0
    decisions = []
    for _ in range(1500):
        now += rng.choice([0.001, 0.5, 3.0, 7.0, 20.0])
        now = round(now, 3)  # Redis keeps milliseconds
        policy = rng.choice("ab")
        expected = memory.acquire(policy, windows[policy], global_windows, now)
        assert redis_limiter.acquire(policy, windows[policy], global_windows, now) is expected
        decisions.append(expected)
    assert decisions.count(True) > 50 and decisions.count(False) > 50  # both outcomes exercised


def test_several_candidates_decide_as_the_memory_limiter_in_order(make_limiter):
    redis_limiter = make_limiter()
    memory = MemoryLimiter()
    windows = {"a": ((60.0, 2),), "b": ((60.0, 3), (3600.0, 10)), "c": ((600.0, 4),), "z": ((60.0, 0),),
               "free": ()}
    rng = random.Random(11)
    now = T0
    seen = set()
    for _ in range(1500):
        now = round(now + rng.choice([0.001, 1.0, 5.0, 30.0]), 3)
        names = rng.sample(sorted(windows), rng.randint(1, 4))
        candidates = [(name, windows[name]) for name in names]
        global_windows = rng.choice([(), ((3600.0, 40),)])
        expected = memory.acquire_first(candidates, global_windows, now)
        assert redis_limiter.acquire_first(candidates, global_windows, now) == expected, (names, now)
        seen.add(expected)
    assert seen == {-1, 0, 1, 2, 3}


def evalsha_calls(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return stats.get("cmdstat_evalsha", {}).get("calls", 0) + stats.get("cmdstat_eval", {}).get("calls", 0)


def test_one_round_trip_per_matched_prediction_whatever_the_number_of_policies(make_limiter, server):
    from edgecatch.observation import Detection, Observation
    from edgecatch.policies import EngineState, PolicySet, load_policy_text

    document = load_policy_text(textwrap.dedent("""
        version: 1
        limits: {per_day: 100}
        policies:
          - {name: first, confidence_below: 0.5, limits: {per_hour: 1}}
          - {name: second, confidence_below: 0.6, limits: {per_hour: 1}}
          - {name: third, confidence_below: 0.7, limits: {per_hour: 2}}
          - {name: never, confidence_above: 0.99}
    """), "t.yaml")
    policies = PolicySet(document, state=EngineState(limiter=make_limiter()))
    low = Observation(model="m", detections=(Detection("box", 0.3, (0.0, 0.0, 1.0, 1.0), 0),))
    high = Observation(model="m", detections=(Detection("box", 0.9, (0.0, 0.0, 1.0, 1.0), 0),))
    decisions = [policies.evaluate(low, now=T0)]
    before = evalsha_calls(server)  # the first call also loaded the script (NOSCRIPT, then load)
    decisions += [policies.evaluate(low, now=T0 + i) for i in range(1, 6)]
    assert [d.policy for d in decisions] == ["first", "second", "third", "third", None, None]
    assert decisions[2].limited == ("first", "second") and decisions[4].limited == ("first", "second", "third")
    for _ in range(50):
        assert not policies.evaluate(high, now=T0 + 10).matched  # no policy holds: Redis is not asked
    assert evalsha_calls(server) - before == 5  # one per matched prediction


def test_a_refusal_charges_nothing(make_limiter, server):
    limiter = make_limiter()
    client = server.client()
    glob = ((3600.0, 2),)
    assert limiter.acquire("a", HOUR, glob, T0) and limiter.acquire("a", HOUR, glob, T0 + 1)
    # b has room, the global budget has none: b must not be charged either.
    assert limiter.acquire("b", HOUR, glob, T0 + 2) is False
    assert client.zcard("edgecatch:{default}:p:b:3600") == 0
    assert client.zcard("edgecatch:{default}:g:3600") == 2
    assert client.pttl("edgecatch:{default}:p:a:3600") > 0  # keys expire when idle


def test_zero_budget_refuses_without_charging(make_limiter, server):
    limiter = make_limiter()
    assert limiter.acquire("p", ((86400.0, 0),), ((3600.0, 5),), T0) is False
    assert server.client().keys("*") == []
    assert limiter.acquire("p", (), (), T0) is True  # no limits: nothing to ask


def test_two_fleets_on_one_redis_do_not_share_budgets(make_limiter, server):
    east, west = make_limiter(fleet="east"), make_limiter(fleet="west")
    assert [east.acquire("p", MINUTE, (), T0) for _ in range(4)] == [True, True, True, False]
    assert [west.acquire("p", MINUTE, (), T0) for _ in range(4)] == [True, True, True, False]
    another_east = make_limiter(fleet="east")
    assert another_east.acquire("p", MINUTE, (), T0) is False  # the same fleet shares
    keys = sorted(k.decode() for k in server.client().keys("*"))
    assert keys == ["edgecatch:{east}:p:p:60", "edgecatch:{west}:p:p:60"]


def test_the_script_is_loaded_again_after_the_server_forgets_it(make_limiter, server):
    limiter = make_limiter()
    assert limiter.acquire("p", MINUTE, (), T0)
    server.client().script_flush()
    assert limiter.acquire("p", MINUTE, (), T0 + 1)  # NOSCRIPT, then EVAL: still one decision
    assert limiter.used("p", 60.0, T0 + 1) == 2
    assert limiter.available


# -- many processes -----------------------------------------------------------------------------


class Replicas:
    """Worker processes (tests/limiter_worker.py), each its own interpreter with its own PolicySet."""

    def __init__(self, server: RedisServer, policy_text: str, tmp_path: Path, replicas: int,
                 fleet: str = "default", *options: str) -> None:
        path = tmp_path / f"policies-{fleet}.yaml"
        path.write_text(textwrap.dedent(policy_text))
        self.processes = [
            subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "limiter_worker.py"), "--url", server.url,
                 "--fleet", fleet, "--policies", str(path), "--n", "0", *options],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(replicas)]
        for process in self.processes:
            assert process.stdout.readline().strip() == "ready"
        self.command("go")  # all start together; the first command runs 0 predictions

    def command(self, line: str) -> list:
        for process in self.processes:  # sent to all before reading any: they run concurrently
            process.stdin.write(line + "\n")
            process.stdin.flush()
        replies = [process.stdout.readline().strip() for process in self.processes]
        return [json.loads(reply) if reply.startswith("{") else reply for reply in replies]

    def run(self, n: int) -> list[dict]:
        return self.command(f"run {n}")

    def close(self) -> None:
        for process in self.processes:
            try:
                process.stdin.write("quit\n")
                process.stdin.close()
                assert process.wait(timeout=60) == 0
            finally:
                if process.poll() is None:
                    process.kill()


def run_replicas(server: RedisServer, policy_text: str, tmp_path: Path, replicas: int, n: int,
                 fleet: str = "default") -> list[dict]:
    fleet_processes = Replicas(server, policy_text, tmp_path, replicas, fleet)
    try:
        return fleet_processes.run(n)
    finally:
        fleet_processes.close()


def selected(results: list[dict]) -> int:
    return sum(sum(r["selected"].values()) for r in results)


FLEET_POLICY = """
version: 1
limits: {per_hour: 300}
policies:
  - name: a
    confidence_below: 0.5
    sample: 0.5
    limits: {per_hour: 200}
  - name: b
    confidence_below: 0.5
    limits: {per_hour: 200}
"""


def test_processes_hammering_one_budget_never_exceed_it_and_reach_it(server, tmp_path):
    results = run_replicas(server, FLEET_POLICY, tmp_path, replicas=4, n=250)
    a = sum(r["selected"].get("a", 0) for r in results)
    b = sum(r["selected"].get("b", 0) for r in results)
    # 1000 matches against a global budget of 300 within one hour: exactly 300 selected, none over.
    assert a + b == 300
    assert a <= 200 and b <= 200
    assert all(r["events"] == {"available": 1} for r in results)  # every decision went to Redis
    # Atomicity: every budget holds exactly the selections granted, no half-charged decision.
    client = server.client()
    assert client.zcard("edgecatch:{default}:g:3600") == 300
    assert client.zcard("edgecatch:{default}:p:a:3600") == a
    assert client.zcard("edgecatch:{default}:p:b:3600") == b


def _forked_acquires(limiter: RedisLimiter, queue) -> None:
    queue.put([limiter.acquire("p", HOUR, (), T0 + 1) for _ in range(3)])


def test_a_limiter_used_before_a_fork_works_in_the_children_with_their_own_members(make_limiter, server):
    import multiprocessing

    limiter = make_limiter()
    assert limiter.acquire("p", HOUR, (), T0)  # the parent holds a pooled connection now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_forked_acquires, args=(limiter, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sorted(r.count(True) for r in results) in ([1, 3], [2, 2])  # 4 left after the parent's one
    members = server.client().zrange("edgecatch:{default}:p:p:3600", 0, -1)
    assert len(members) == 5  # no two processes wrote the same member (that would overwrite)
    assert len({m.split(b":")[0] for m in members}) == 3  # three processes, three member prefixes
    assert not limiter.acquire("p", HOUR, (), T0 + 2)  # the parent's connection still works


def test_threads_sharing_one_limiter_are_atomic_too(make_limiter, server):
    limiter = make_limiter()
    granted = []
    start = threading.Barrier(8)

    def hammer(policy: str) -> None:
        start.wait()
        granted.extend(policy for _ in range(100) if limiter.acquire(policy, HOUR, ((3600.0, 7),), T0))

    threads = [threading.Thread(target=hammer, args=("ab"[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(granted) == 7 and granted.count("a") <= 5 and granted.count("b") <= 5
    assert server.client().zcard("edgecatch:{default}:g:3600") == 7


def test_two_fleets_of_processes_each_get_their_own_budget(server, tmp_path):
    east = run_replicas(server, FLEET_POLICY, tmp_path, replicas=2, n=250, fleet="east")
    west = run_replicas(server, FLEET_POLICY, tmp_path, replicas=2, n=250, fleet="west")
    for fleet in (east, west):
        assert selected(fleet) == 300


# -- outages ------------------------------------------------------------------------------------


OUTAGE_POLICY = """
version: 1
policies:
  - name: low
    confidence_below: 0.5
    limits: {per_hour: 40}
"""


@pytest.mark.parametrize("behaviour", ["fail_open", "fail_closed"])
def test_redis_killed_under_a_fleet_of_processes_then_back(server, tmp_path, behaviour):
    fleet = Replicas(server, OUTAGE_POLICY, tmp_path, 4, "default",
                     "--on-unavailable", behaviour, "--expected-replicas", "4")
    try:
        before = fleet.run(20)  # 80 matches, budget 40 for the fleet
        assert selected(before) == 40
        server.kill()
        during = fleet.run(20)
        for result in during:
            assert result["events"].get("unavailable") == 1 and result["events"][behaviour] == 20
        if behaviour == "fail_open":
            # Each process falls back to 40 / 4 expected replicas = 10 of its own.
            assert [sum(r["selected"].values()) for r in during] == [10, 10, 10, 10]
        else:
            assert selected(during) == 0 and all(r["limited"] == 20 for r in during)
        server.start()  # empty, as after a crash without persistence
        assert fleet.command("wait") == ["ok"] * 4
        after = fleet.run(20)
        assert selected(after) == 40  # the fleet's budget again, shared through Redis
        assert all(behaviour not in r["events"] for r in after)
    finally:
        fleet.close()



def test_redis_killed_fail_open_uses_scaled_local_budgets_then_recovers(tmp_path, caplog):
    server = RedisServer(tmp_path / "redis", password="s3cret-pw")
    server.start()
    events = []
    limiter = RedisLimiter(server.url, on_unavailable="fail_open", expected_replicas=4, timeout_ms=500,
                           retry_seconds=0.1, on_event=events.append)
    budget = ((3600.0, 100),)
    try:
        caplog.set_level(logging.INFO, logger="edgecatch.limits")
        assert sum(limiter.acquire("p", budget, (), T0 + i * 0.001) for i in range(10)) == 10
        server.kill()
        # Down: decisions are local, the budget divided by the 4 expected replicas: 25 of 100.
        assert sum(limiter.acquire("p", budget, (), T0 + 1 + i * 0.001) for i in range(100)) == 25
        assert not limiter.available
        assert events[:2] == ["available", "unavailable"] and events[2:] == ["fail_open"] * 100
        server.start()  # same port, empty: like a replacement
        wait_until(lambda: limiter.available)
        assert events[-1] == "available" and events.count("unavailable") == 1  # the recovery, announced
        events.clear()
        assert sum(limiter.acquire("p", budget, (), T0 + 2 + i * 0.001) for i in range(150)) == 100
        assert events == []  # every decision went to Redis again
        assert limiter.used("p", 3600.0, T0 + 3) == 100
    finally:
        limiter.close()
        server.kill()
    warnings = [r.getMessage() for r in caplog.records if r.name == "edgecatch.limits"]
    assert len(warnings) == 2  # once when the outage starts, once when it ends
    assert "unavailable" in warnings[0] and "fail_open" in warnings[0]
    assert "available again" in warnings[1] and "100 decisions were taken locally" in warnings[1]
    assert all("s3cret-pw" not in text for text in warnings)
    assert "Redis at redis://127.0.0.1:" in warnings[0]  # where it connects, without the password


def test_redis_killed_fail_closed_selects_nothing_then_recovers(server, make_limiter):
    events = []
    limiter = make_limiter(on_unavailable="fail_closed", retry_seconds=0.1, on_event=events.append)
    assert limiter.acquire("p", MINUTE, (), T0)
    server.kill()
    assert [limiter.acquire("p", MINUTE, (), T0 + 1 + i) for i in range(5)] == [False] * 5
    assert limiter.acquire("p", (), (), T0 + 7) is True  # a policy without limits is not refused
    assert limiter.acquire_first([("p", MINUTE), ("free", ())], (), T0 + 7) == 1
    assert limiter.acquire_first([("p", MINUTE), ("free", ())], ((60.0, 5),), T0 + 7) == -1
    assert events.count("unavailable") == 1 and events.count("fail_closed") == 7
    server.start()
    wait_until(lambda: limiter.available)
    assert limiter.acquire("p", MINUTE, (), T0 + 10)


def test_a_stalled_redis_costs_one_timeout_then_decisions_are_local_until_it_answers(server, make_limiter):
    events = []
    limiter = make_limiter(timeout_ms=50, retry_seconds=0.2, on_event=events.append)
    assert limiter.acquire("p", MINUTE, (), T0)
    stall = threading.Thread(target=lambda: server.client().execute_command("DEBUG", "SLEEP", "1.5"))
    stall.start()
    wait_until(lambda: _stalled(server))
    # The server is busy for 1.5 s: the next decision times out after 50 ms and the circuit opens.
    assert limiter.acquire("p", MINUTE, (), T0 + 1) is True  # fail_open, local budget (3 / 1 replica)
    assert not limiter.available and events.count("unavailable") == 1
    results = [limiter.acquire("p", MINUTE, (), T0 + 2) for _ in range(500)]
    assert results.count(True) == 2 and events.count("fail_open") == 501  # all local, none waited
    stall.join(timeout=30)
    wait_until(lambda: limiter.available)
    calls = server.client().info("commandstats")["cmdstat_evalsha"]["calls"]
    # One decision before the stall, the one that timed out, the probe's tries: not the 500 others.
    assert calls < 20
    assert limiter.acquire("p", MINUTE, (), T0 + 3) is True  # Redis again
    # T0 and T0+3, and maybe T0+1: the decision that timed out had been sent, and a stalled server
    # runs it when it wakes up. A timeout can only over-charge by that one decision, never under.
    assert limiter.used("p", 60.0, T0 + 3) in (2, 3)


def _stalled(server: RedisServer) -> bool:
    """True once the server no longer answers within 20 ms (the DEBUG SLEEP has begun)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        sock.settimeout(0.02)
        try:
            sock.recv(16)
        except socket.timeout:
            return True
    return False


class Blackhole:
    """A TCP server that accepts and reads but never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = 0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.received += len(data)

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


def test_a_hanging_redis_costs_one_timeout_then_is_not_asked_until_the_retry():
    blackhole = Blackhole()
    limiter = RedisLimiter(f"redis://127.0.0.1:{blackhole.port}/0", timeout_ms=50, retry_seconds=3600)
    try:
        first: list[bool] = []
        caller = threading.Thread(target=lambda: first.append(limiter.acquire("p", MINUTE, (), T0)))
        caller.start()
        caller.join(timeout=30)  # liveness: without the socket timeout this call never returns
        assert not caller.is_alive() and first == [True]  # fail_open: the local budget had room
        assert not limiter.available
        sent = blackhole.received
        assert blackhole.connections == 1 and sent > 0
        # The circuit is open: the next thousand decisions never touch the network.
        results = [limiter.acquire("p", MINUTE, (), T0 + 1) for _ in range(1000)]
        assert results.count(True) == 2  # the local per-minute budget of 3, one spent above
        assert blackhole.connections == 1 and blackhole.received == sent
    finally:
        limiter.close()
        blackhole.close()


# -- configuration --------------------------------------------------------------------------------


def test_availability_is_known_from_the_start_not_from_the_first_selection(make_limiter, server):
    events = []
    make_limiter(on_event=events.append).check_now()
    assert events == ["available"]
    down = []
    unreachable = make_limiter(f"redis://127.0.0.1:{free_port()}/0", on_event=down.append, retry_seconds=60)
    unreachable.check_now()
    assert down == ["unavailable"] and not unreachable.available


def test_scaled_budgets_round_down_but_keep_at_least_one():
    assert scale_windows(((60.0, 10), (3600.0, 3), (86400.0, 0)), 4) == ((60.0, 2), (3600.0, 1), (86400.0, 0))


def test_limits_config_validates_and_never_shows_a_password():
    text = "limits: {backend: 'http://user:hunter2@example:6379', fleet: 'a b'}\n"
    with pytest.raises(ConfigError) as error:
        load_model_text(EdgecatchConfig, text, "edgecatch.yaml")
    message = str(error.value)
    assert "edgecatch.yaml:1: limits.backend: " in message and "limits.fleet" in message
    assert "hunter2" not in message
    config = LimitsConfig(backend="redis://:hunter2@10.0.0.1:6379/0")
    assert "hunter2" not in repr(config) and "hunter2" not in repr(EdgecatchConfig(limits=config))
    for url, shown in (
            ("redis://user:hunter2@h:6379/1", "redis://h:6379/1"),
            ("redis://h:6379/1", "redis://h:6379/1"),
            ("redis://127.0.0.1:6379/0?password=hunter2", "redis://127.0.0.1:6379/0"),
            ("unix:///run/redis.sock?db=2&password=hunter2", "unix:///run/redis.sock?db=2"),
            ("unix:///run/redis.sock?password=hun:ter@2&db=0", "unix:///run/redis.sock?db=0"),
            ("redis://host/0?client_name=a@b", "redis://host/0"),
            ("redis://:hun#ter2@h:6379", "redis://<unreadable>"),
            ("redis://u:hun/ter?2@h/0", "redis://<unreadable>"),
            ("rediss://hunter2@h", "rediss://h"),
            ("redis://h/0#hunter2", "redis://h/0"),
            ("hunter2", "<unparsable URL>")):
        assert redact_url(url) == shown, url
        assert "hunter" not in redact_url(url) and "ter2" not in redact_url(url)
    with pytest.raises(ConfigError):
        load_model_text(EdgecatchConfig, "limits: {on_unavailable: fail_maybe}\n", "e.yaml")


def test_build_limiter_follows_the_config(server, monkeypatch):
    assert isinstance(build_limiter(LimitsConfig()), MemoryLimiter)
    limiter = build_limiter(LimitsConfig(backend=server.url, fleet="f1", on_unavailable="fail_closed",
                                         expected_replicas=3, timeout_ms=15, retry_seconds=2))
    try:
        assert isinstance(limiter, RedisLimiter)
        assert (limiter.fleet, limiter.on_unavailable, limiter.expected_replicas) == ("f1", "fail_closed", 3)
        assert limiter.acquire("p", MINUTE, (), T0)
        assert server.client().keys("*") == [b"edgecatch:{f1}:p:p:60"]
    finally:
        limiter.close()
    monkeypatch.setenv("EDGECATCH_TEST_REDIS", server.url)
    from_env = build_limiter(LimitsConfig(backend_env="EDGECATCH_TEST_REDIS"))
    try:
        assert isinstance(from_env, RedisLimiter) and from_env.acquire("p", MINUTE, (), T0)
    finally:
        from_env.close()


class _NoDelivery:
    def submit(self, *args) -> bool:
        return True

    def start(self) -> None: ...

    def stop(self, timeout=None) -> None: ...

    def health(self) -> dict:
        return {}


def test_collector_uses_the_configured_backend_and_counts_outages(server, tmp_path):
    from prometheus_client import CollectorRegistry

    from edgecatch.collector import Collector
    from edgecatch.metrics import Metrics
    from edgecatch.observation import Detection, Observation

    policies = tmp_path / "policies.yaml"
    policies.write_text("version: 1\npolicies:\n  - name: low\n    confidence_below: 0.5\n"
                        "    limits: {per_hour: 100}\n")
    config = EdgecatchConfig.model_validate({
        "policies": str(policies), "delivery": {"spool_dir": str(tmp_path / "spool")},
        "limits": {"backend": server.url, "fleet": "shop", "on_unavailable": "fail_closed",
                   "retry_seconds": 0.1, "timeout_ms": 1000}})
    registry = CollectorRegistry()
    collector = Collector(config, metrics=Metrics(registry), delivery=_NoDelivery())
    value = registry.get_sample_value
    observation = Observation(model="m", detections=(Detection("box", 0.3, (0.0, 0.0, 1.0, 1.0), 0),),
                              timestamp=T0)
    try:
        assert isinstance(collector.limiter, RedisLimiter)
        assert collector.health()["limiter"] == server.url and collector.health()["limiter_available"]
        assert collector.observe(observation, b"jpeg").selected
        assert server.client().zcard("edgecatch:{shop}:p:low:3600") == 1
        assert value("edgecatch_limiter_available") == 1
        server.kill()
        decision = collector.observe(observation, b"jpeg")
        assert not decision.selected and decision.limited == ("low",)
        assert value("edgecatch_limiter_available") == 0 and not collector.health()["limiter_available"]
        assert value("edgecatch_limiter_outages_total") == 1
        assert value("edgecatch_limiter_unavailable_total", {"behaviour": "fail_closed"}) == 1
        assert value("edgecatch_limited_total", {"policy": "low"}) == 1
        server.start()
        wait_until(lambda: collector.limiter.available)
        assert value("edgecatch_limiter_available") == 1
        assert collector.observe(observation, b"jpeg").selected
    finally:
        collector.limiter.close()
