"""Send a folder of realistic images to the example service and report what edgecatch collected.

    .venv/bin/python bento_service/send_traffic.py                      # the images shipped in packages
    .venv/bin/python bento_service/send_traffic.py --folder photos/ --repeat 3 --feedback 0.2

Each image is posted to /detect (multipart, as curl -F would); the inference id from the
`X-Edgecatch-Inference-Id` header is kept, a fraction of the predictions get a verdict through
/edgecatch/feedback, and at the end the dataset's manifest says which predictions were collected and
which policy chose each, with its reason. When the service requires a feedback token
(`EDGECATCH_FEEDBACK_TOKEN` set for it, as bento_service/edgecatch.yaml reads it), set the same
variable for this script: it is sent as the bearer token (an environment variable, not a flag, so
that it does not show in the process list).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def load_images(folder: Path | None) -> dict[str, bytes]:
    if folder is not None:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            sys.exit(f"send_traffic: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        return {p.name: p.read_bytes() for p in files}
    sys.path.insert(0, str(REPO))
    from bento_service.sample_images import sample_jpegs

    return {f"{name}.jpg": data for name, data in sample_jpegs().items()}


def read_manifest(dataset: Path) -> dict[str, dict]:
    manifest = dataset / "manifest.jsonl"
    if not manifest.exists():
        return {}
    entries = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        entries[entry.get("inference_id", "")] = entry
    return entries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--folder", type=Path, help="images to send (default: the shipped test images)")
    parser.add_argument("--repeat", type=int, default=1, help="send every image this many times")
    parser.add_argument("--feedback", type=float, default=0.1,
                        help="fraction of predictions that get a verdict (half incorrect, half correct)")
    parser.add_argument("--dataset", type=Path, default=REPO / "var" / "dataset",
                        help="the directory sink's folder, to report what was collected")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for delivery to finish")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    images = load_images(args.folder)
    sent: list[tuple[str, str, int]] = []  # (image, inference id, detections)
    verdicts: dict[str, str] = {}
    failures = 0
    token = os.environ.get("EDGECATCH_FEEDBACK_TOKEN")
    feedback_headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=args.url, timeout=60) as client:
        jobs = [name for _ in range(args.repeat) for name in images]
        for name in tqdm(jobs, desc="sending", unit="img"):
            response = client.post("/detect", files={"image": (name, images[name], "image/jpeg")})
            if response.status_code != 200:
                failures += 1
                tqdm.write(f"{name}: HTTP {response.status_code} {response.text[:120]}")
                continue
            inference_id = response.headers.get("x-edgecatch-inference-id", "")
            sent.append((name, inference_id, len(response.json())))
            if inference_id and rng.random() < args.feedback:
                verdict = rng.choice(["incorrect", "correct"])
                answer = client.post("/edgecatch/feedback", json={"inference_id": inference_id, "verdict": verdict},
                                     headers=feedback_headers)
                if answer.status_code == 202:
                    verdicts[inference_id] = verdict
                else:
                    tqdm.write(f"feedback for {name}: HTTP {answer.status_code} {answer.text[:120]}")

    print(f"\nsent {len(sent)} images ({failures} failed), {len(verdicts)} verdicts")
    deadline = time.monotonic() + args.wait
    wanted = {inference_id for _, inference_id, _ in sent}
    collected = read_manifest(args.dataset)
    while time.monotonic() < deadline and not wanted & set(collected):
        time.sleep(0.5)
        collected = read_manifest(args.dataset)
    time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))  # let the last uploads land
    collected = read_manifest(args.dataset)

    by_policy: dict[str, int] = {}
    print(f"\n{'image':28} {'inference id':28} {'dets':>4}  collected by (reason)")
    for name, inference_id, count in sent:
        entry = collected.get(inference_id)
        if entry is None:
            what = "-"
        else:
            policy = entry.get("policy", "?")
            by_policy[policy] = by_policy.get(policy, 0) + 1
            reason = entry.get("reason", "")
            what = f"{policy} ({reason})"
        feedback = f" [verdict: {verdicts[inference_id]}]" if inference_id in verdicts else ""
        print(f"{name[:28]:28} {inference_id[:28]:28} {count:>4}  {what}{feedback}")
    print("\ncollected per policy: " + (", ".join(f"{k}: {v}" for k, v in sorted(by_policy.items())) or "none"))
    print(f"dataset: {args.dataset} (manifest.jsonl lists every sample; verdict samples may arrive later)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
