"""Generate `predictions.jsonl`: one realistic day of a package-detection deployment.

Two models behind one doorstep camera fleet: `package-detector` (boxes, flat packs, envelopes) and
`package-condition` (a classifier: intact / damaged / wet). Traffic follows the day (quiet at night,
busy at delivery hours); the detector is sure of boxes, less of flat packs, finds nothing in most
night frames; a few users press "looks wrong" / "looks right", and unanswered predictions come back
as `silent` events. Deterministic for a given seed, so the committed file can be regenerated:

    .venv/bin/python policies/examples/generate_predictions.py > policies/examples/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from datetime import datetime, timezone

START = datetime(2026, 11, 20, tzinfo=timezone.utc).timestamp()
WIDTH, HEIGHT = 1280, 720
CLASSES = [("box", 0, 0.60, 0.86, 0.08), ("flat_pack", 1, 0.25, 0.55, 0.14), ("envelope", 2, 0.15, 0.72, 0.12)]


def hourly_rate(hour: float) -> float:
    """Predictions per minute: a night floor and a daytime hump peaking in the early afternoon."""
    return 2.0 + 14.0 * max(0.0, math.sin(math.pi * (hour - 6.0) / 15.0)) ** 2


def detections(rng: random.Random, hour: float) -> list[dict]:
    night = hour < 6 or hour > 21
    count = 0 if night and rng.random() < 0.8 else min(int(rng.expovariate(1 / 2.5)), 30)
    if rng.random() < 0.01:
        count = rng.randint(20, 28)  # a pile of parcels at a pick-up point
    found = []
    for _ in range(count):
        name, class_id, share, mean, spread = rng.choices(CLASSES, weights=[c[2] for c in CLASSES])[0]
        confidence = min(0.99, max(0.05, rng.gauss(mean, spread)))
        w, h = rng.uniform(60, 320), rng.uniform(40, 260)
        x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        found.append({"class": name, "class_id": class_id, "confidence": round(confidence, 3),
                      "box": [round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)]})
    return found


def condition(rng: random.Random) -> dict[str, float]:
    weights = [rng.gammavariate(a, 1.0) for a in (6.0, 1.2, 0.8)]
    total = sum(weights)
    return {name: round(w / total, 3) for name, w in zip(("intact", "damaged", "wet"), weights)}


def generate(seed: int, hours: float):
    rng = random.Random(seed)
    t = START
    end = START + hours * 3600
    number = 0
    pending: list[tuple[float, dict]] = []
    while t < end:
        hour = ((t - START) / 3600) % 24
        t += rng.expovariate(hourly_rate(hour) / 60.0)
        number += 1
        base = {"timestamp": round(t, 3), "image": {"width": WIDTH, "height": HEIGHT},
                "inference_id": f"inf-{seed}-{number:06d}"}
        if rng.random() < 0.8:
            record = {**base, "model": "package-detector", "model_version": "3",
                      "detections": detections(rng, hour)}
        else:
            record = {**base, "model": "package-condition", "model_version": "1",
                      "classification": condition(rng)}
        while pending and pending[0][0] <= t:
            yield pending.pop(0)[1]
        yield record
        # Users answer a few predictions within minutes; most leave the recall buffer silent.
        answer = rng.random()
        if answer < 0.01:
            verdict = "incorrect"
        elif answer < 0.03:
            verdict = "correct"
        elif answer < 0.10:
            verdict = "silent"
        else:
            continue
        delay = 600.0 if verdict == "silent" else rng.uniform(5, 240)
        pending.append((t + delay, {**record, "timestamp": round(t + delay, 3), "feedback": verdict}))
        pending.sort(key=lambda item: item[0])
    for _, record in pending:
        yield record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hours", type=float, default=24.0)
    args = parser.parse_args()
    for record in generate(args.seed, args.hours):
        sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
