"""The cost of a matched prediction's limit decision: memory backend vs Redis on loopback.

Starts its own redis-server (Debian's `redis-server` on PATH) on a free 127.0.0.1 port without
persistence, and kills it at the end. One policy that holds for the prediction, with a per-policy
and a global rolling limit, evaluated with `PolicySet.evaluate` one call at a time
(perf_counter_ns): so each figure is the whole decision, engine included, and the difference between
the rows is what the backend adds. Cases:

- granted: budgets large enough that every decision is charged (trim, check, ZADD in every set);
- refused: budgets spent, every decision refused (trim and check only);
- N processes: decisions per second of N replicas deciding at once against one Redis (the
  machine's cores are shared by the replicas, redis-server and this script).

    .venv/bin/python benchmarks/bench_limiter.py [--n 20000] [--processes 4]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import textwrap
import time

from edgecatch.observation import Detection, Observation
from edgecatch.policies import EngineState, MemoryLimiter, PolicySet, load_policy_text
from edgecatch.policies.redis_limiter import RedisLimiter

POLICY = """
version: 1
limits: {{per_hour: {budget}}}
policies:
  - name: low-confidence
    confidence_below: 0.5
    limits: {{per_minute: {budget}, per_day: {budget}}}
"""
OBSERVATION = Observation(
    model="m", detections=tuple(Detection("box", 0.3 + 0.01 * i, (0.0, 0.0, 10.0, 10.0), 0) for i in range(5)))


def policies(limiter, budget: int) -> PolicySet:
    document = load_policy_text(textwrap.dedent(POLICY.format(budget=budget)), "bench.yaml")
    return PolicySet(document, state=EngineState(limiter=limiter))


def measure(policy_set: PolicySet, n: int, expect: bool) -> list[int]:
    evaluate = policy_set.evaluate
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        start = clock()
        decision = evaluate(OBSERVATION)
        samples[i] = clock() - start
        if decision.selected is not expect:
            raise SystemExit(f"unexpected decision {decision}")
    return samples


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install -y --no-install-recommends redis-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit("redis-server did not start")
        time.sleep(0.02)


def _replica(url: str, fleet: str, n: int, start, results) -> None:
    limiter = RedisLimiter(url, fleet=fleet, timeout_ms=1000)
    policy_set = policies(limiter, 10**9)
    policy_set.evaluate(OBSERVATION)  # connect and load the script before the clock starts
    start.wait()
    begin = time.perf_counter()
    for _ in range(n):
        policy_set.evaluate(OBSERVATION)
    results.put(time.perf_counter() - begin)
    limiter.close()


def fleet_throughput(url: str, processes: int, n: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_replica, args=(url, "bench-fleet", n, start, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # let every replica connect
    begin = time.perf_counter()
    start.set()
    for _ in workers:
        results.get(timeout=600)
    elapsed = time.perf_counter() - begin
    for worker in workers:
        worker.join(timeout=60)
    return processes * n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="decisions per case")
    parser.add_argument("--processes", type=int, default=4, help="replicas for the fleet case (0: skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        server, url = start_redis(directory)
        try:
            redis_version = subprocess.run([shutil.which("redis-server"), "--version"], capture_output=True,
                                           text=True).stdout.split()[2].removeprefix("v=")
            print(f"python {platform.python_version()} on {platform.machine()}, redis-server {redis_version} "
                  f"on loopback, {args.n} decisions per case")
            print(f"{'case':44} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8} {'decisions/s':>12}")
            rows = []
            cases = [
                ("memory, granted", lambda: MemoryLimiter(), 10**9, True),
                ("redis, granted", lambda: RedisLimiter(url, fleet="bench", timeout_ms=1000), 10**9, True),
                ("memory, refused (budget spent)", lambda: MemoryLimiter(), 0, False),
                ("redis, refused (budget spent)", lambda: RedisLimiter(url, fleet="bench-spent", timeout_ms=1000),
                 1, False),
            ]
            for name, make, budget, expect in cases:
                limiter = make()
                policy_set = policies(limiter, budget)
                if budget == 1:  # spend the one unit: from here on the script checks and refuses
                    assert policy_set.evaluate(OBSERVATION).selected
                measure(policy_set, min(2000, args.n), expect)  # warm up (connection, script cache)
                gc.collect()
                samples = measure(policy_set, args.n, expect)
                mean = statistics.fmean(samples) / 1000.0
                rows.append((name, percentile(samples, 0.5), percentile(samples, 0.99), mean))
                print(f"{name:44} {rows[-1][1]:8.1f} {rows[-1][2]:8.1f} {mean:8.1f} {1e6 / mean:12,.0f}")
                if isinstance(limiter, RedisLimiter):
                    limiter.close()
            memory, redis_granted = rows[0], rows[1]
            print(f"added by Redis for a granted decision: p50 +{redis_granted[1] - memory[1]:.1f} µs, "
                  f"p99 +{redis_granted[2] - memory[2]:.1f} µs")
            # An outage: a Redis that accepts connections but never answers (timeout_ms=20). The first
            # decision waits for the timeout; after it the circuit is open and decisions are local.
            with socket.socket() as hanging:
                hanging.bind(("127.0.0.1", 0))
                hanging.listen(8)
                limiter = RedisLimiter(f"redis://127.0.0.1:{hanging.getsockname()[1]}/0", timeout_ms=20,
                                       retry_seconds=3600, expected_replicas=4)
                policy_set = policies(limiter, 10**9)
                start = time.perf_counter_ns()
                policy_set.evaluate(OBSERVATION)
                first = (time.perf_counter_ns() - start) / 1e6
                samples = measure(policy_set, args.n, True)
                mean = statistics.fmean(samples) / 1000.0
                name = "redis hanging, circuit open (fail_open)"
                print(f"{name:44} {percentile(samples, 0.5):8.1f} {percentile(samples, 0.99):8.1f} "
                      f"{mean:8.1f} {1e6 / mean:12,.0f}")
                print(f"first decision against the hanging Redis (timeout_ms=20): {first:.1f} ms")
                limiter.close()
            if args.processes:
                rate = fleet_throughput(url, args.processes, args.n // 2)
                print(f"{args.processes} processes against one redis-server, granted: {rate:,.0f} decisions/s in all")
        finally:
            server.kill()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
