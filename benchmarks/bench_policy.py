"""Policy evaluation cost on the request path.

The issue's example document (policies/examples/packages.yaml) against a prediction with 20
detections, timed one evaluation at a time with perf_counter_ns. Three observations are measured in
one run: a crowded one (20 detections, several policies hold, budgets charged until spent), a quiet
one (19 confident detections, nothing holds: the common case in production), and a classification.

    .venv/bin/python benchmarks/bench_policy.py [--n 200000]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import time
from pathlib import Path

from edgecatch.observation import Classification, Detection, Observation
from edgecatch.policies import EngineState, PolicySet, load_policy_file

REPO = Path(__file__).resolve().parent.parent


def make_detections(confidences: list[float]) -> tuple[Detection, ...]:
    names = ["box", "flat_pack", "envelope"]
    return tuple(
        Detection(names[i % 3], c, (10.0 * i, 5.0 * i, 10.0 * i + 80, 5.0 * i + 60), i % 3)
        for i, c in enumerate(confidences)
    )


def measure(policies: PolicySet, observation: Observation, n: int) -> list[int]:
    evaluate = policies.evaluate
    clock = time.perf_counter_ns
    now = 1_795_132_800.0
    samples = [0] * n
    for i in range(n):
        t = now + i * 0.01  # 100 predictions per second of simulated time: limits do engage
        start = clock()
        evaluate(observation, t)
        samples[i] = clock() - start
    return samples


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--policy", type=Path, default=REPO / "policies" / "examples" / "packages.yaml")
    args = parser.parse_args()

    document = load_policy_file(args.policy)
    rng = random.Random(0)
    cases = {
        "20 detections, several hold": Observation(
            model="package-detector",
            detections=make_detections([0.25 + 0.03 * i for i in range(20)]), image_width=1280, image_height=720),
        # 19, not 20: `crowded` (detections: {min: 20}) holds for any 20 detections.
        "19 confident detections, none holds": Observation(
            model="package-detector",
            detections=make_detections([0.7 + 0.01 * i for i in range(19)]), image_width=1280,
            image_height=720),
        "classification, 3 classes": Observation(
            model="package-condition", classification=Classification.from_scores(
                {"intact": 0.6, "damaged": 0.3, "wet": 0.1})),
    }
    print(f"python {platform.python_version()} on {platform.machine()}, {args.n} evaluations per case, "
          f"policy {args.policy.relative_to(REPO)}")
    print(f"{'case':44} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8}")
    for name, observation in cases.items():
        policies = PolicySet(document, state=EngineState(rng=random.Random(rng.random())))
        held = policies.evaluate(observation, 1_795_132_800.0).matched
        name = f"{name} ({len(held)} hold)"
        measure(policies, observation, 2000)  # warm up
        gc.collect()
        samples = measure(policies, observation, args.n)
        print(f"{name:44} {percentile(samples, 0.50):8.1f} {percentile(samples, 0.99):8.1f} "
              f"{statistics.fmean(samples) / 1000:8.1f}")


if __name__ == "__main__":
    main()
