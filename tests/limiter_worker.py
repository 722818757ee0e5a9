"""One replica for the fleet-limit tests: its own interpreter, its own PolicySet, one shared Redis.

    python tests/limiter_worker.py --url redis://127.0.0.1:PORT/0 --policies p.yaml --n 300

Prints `ready`, waits for a line on stdin (so that every replica starts together), evaluates `--n`
matching predictions as fast as it can with the real clock, and prints one JSON line: how many
predictions each policy selected, and how many were limited. Then it takes commands, one a line:
`run N` (the same, N predictions), `wait` (until the limiter reaches Redis again, then `ok`), `quit`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgecatch.observation import Detection, Observation  # noqa: E402
from edgecatch.policies import EngineState, PolicySet, load_policy_file  # noqa: E402
from edgecatch.policies.redis_limiter import RedisLimiter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--fleet", default="default")
    parser.add_argument("--policies", required=True)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--on-unavailable", default="fail_open")
    parser.add_argument("--expected-replicas", type=int, default=1)
    args = parser.parse_args()
    events: Counter[str] = Counter()
    limiter = RedisLimiter(args.url, fleet=args.fleet, timeout_ms=2000, retry_seconds=0.1,
                           on_unavailable=args.on_unavailable, expected_replicas=args.expected_replicas,
                           on_event=lambda e: events.update([e]))
    policies = PolicySet(load_policy_file(args.policies), state=EngineState(limiter=limiter))
    observation = Observation(model="m", detections=(Detection("box", 0.3, (0.0, 0.0, 1.0, 1.0), 0),))
    print("ready", flush=True)
    sys.stdin.readline()
    run(policies, observation, args.n, events)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            run(policies, observation, int(command[1]), events)
        elif command[0] == "wait":
            deadline = time.monotonic() + 30  # a liveness bound for the test, not a timing claim
            while not limiter.available and time.monotonic() < deadline:
                time.sleep(0.01)
            print("ok" if limiter.available else "still unavailable", flush=True)
        else:
            break
    limiter.close()


def run(policies: PolicySet, observation: Observation, n: int, events: Counter[str]) -> None:
    events.clear()
    selected: Counter[str] = Counter()
    limited = 0
    for _ in range(n):
        decision = policies.evaluate(observation)
        if decision.selected:
            selected[decision.policy] += 1
        elif decision.limited:
            limited += 1
    print(json.dumps({"selected": dict(selected), "limited": limited, "events": dict(events)}), flush=True)


if __name__ == "__main__":
    main()
