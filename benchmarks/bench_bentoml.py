"""edgecatch's cost inside a BentoML service: the same service with edgecatch enabled vs disabled.

Two services — the example detector, and a trivial one that returns fixed detections (where
edgecatch's own cost is all that shows) — each started with `bentoml serve` as edgecatch
`enabled: true` with the default policy and as `enabled: false`, --processes times each (2: two
processes of the same service differ by a few percent, as much as the effect measured), loaded with
`wrk` (C, its own threads: the load generator is not the bottleneck) posting a 640×480 JPEG as
multipart, at concurrency 1 and 8. All processes take turns in several short rounds so that machine
noise hits both sides alike; a round's figure for a side is the mean of its processes, and the
table reports the median round. The service's CPU time per request (all its
processes, from /proc) is reported too: unlike throughput, it hardly moves when other work shares
the machine.

Before the trivial service is measured, traffic spends the default policy's hourly sample budget
(300) and the run waits until delivery has stored those samples (--no-spend-budget skips this), as
the sidecar's benchmark does; the disabled twin gets the same traffic meanwhile: the figures are the steady state of a busy hour, every prediction
observed, evaluated, counted and remembered for feedback. At 400 requests/s the budget is spent within
two minutes of each hour; during those minutes each selected sample also costs its preparation,
fsynced spool entry and delivery (measure that phase with --no-spend-budget). The example detector
(10 requests/s) is measured from a fresh start, i.e. while its policy still selects.

    apt-get install -y wrk
    .venv/bin/python benchmarks/bench_bentoml.py [--seconds 8] [--rounds 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from tests.bento_plugin.harness import start_bento, stop_bento  # noqa: E402

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=edgecatchbench"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def jpeg_640x480() -> bytes:
    from PIL import Image

    from bento_service.sample_images import sample_images

    image = Image.fromarray(sample_images(include_sklearn=False)["motorcycle"]).resize((640, 480))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def multipart(image: bytes) -> bytes:
    return (b"--edgecatchbench\r\nContent-Disposition: form-data; name=\"image\"; filename=\"b.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--edgecatchbench--\r\n")


def parse_wrk(text: str) -> dict[str, float]:
    def ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    p50 = ms(re.search(r"\s50%\s+(\S+)", text).group(1))
    p99 = ms(re.search(r"\s99%\s+(\S+)", text).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": rps, "p50": p50, "p99": p99, "errors": int(errors.group(1)) if errors else 0}


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_wrk(url: str, script: Path, concurrency: int, seconds: float, pid: int | None = None) -> dict[str, float]:
    threads = min(concurrency, 2)
    cpu_before = process_tree_cpu(pid) if pid else 0.0
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", "--timeout", "60s", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script),
                          f"{url}/detect"], capture_output=True, text=True, check=True).stdout
    result = parse_wrk(out)
    if pid:
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        result["cpu_ms"] = 1000 * (process_tree_cpu(pid) - cpu_before) / max(requests, 1)
    return result


def spend_budget(enabled: list, disabled: list, script: Path, budget: int) -> None:
    """Send traffic until the default policy's hourly sample budget is spent in every enabled process
    and delivery has stored those samples: what follows is the steady state of a busy hour (every
    prediction still observed, evaluated, counted and remembered for feedback; the budget selects no
    more). The disabled processes get the same traffic in between, so that all have the same history."""
    began = time.monotonic()
    while (any(server.metric("edgecatch_samples_total") < budget for server in enabled)
           and time.monotonic() - began < 900):
        for server in enabled + disabled:
            run_wrk(server.url, script, 8, 3)
    deadline = time.monotonic() + 120
    spools = [server.workdir / "spool" / "ready" for server in enabled]
    while any(any(spool.glob("*")) for spool in spools) and time.monotonic() < deadline:
        time.sleep(0.5)
    selected = ", ".join(f"{server.metric('edgecatch_samples_total'):.0f}" for server in enabled)
    print(f"# warm-up {time.monotonic() - began:.0f} s: samples selected per enabled process {selected} "
          f"(hourly budget {budget}), spools empty: {not any(any(spool.glob('*')) for spool in spools)}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2,
                        help="services started per side: two processes of the same service differ by a "
                             "few percent, as much as the effect measured; each round's figure is their mean")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--services", nargs="+", default=["detector", "trivial"], choices=["detector", "trivial"])
    parser.add_argument("--no-spend-budget", dest="spend_budget", action="store_false",
                        help="trivial service: measure from a fresh start, while the policy still selects "
                             "(its first 300 samples of the hour are prepared and stored during the runs)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench_bentoml: needs wrk (apt-get install -y wrk)")

    work = Path(tempfile.mkdtemp(prefix="edgecatch-bench-"))
    body = work / "body.bin"
    body.write_bytes(multipart(jpeg_640x480()))
    script = work / "post.lua"
    script.write_text(LUA.format(body=body))
    services = {
        "example detector": "bento_service.service:DetectionService",
        "trivial service": "bento_service.trivial_service:TrivialDetectionService",
    }
    services = {label: target for label, target in services.items() if label.split()[1] in args.services
                or label.split()[0] in args.services}
    print(f"{os.cpu_count()} cores; {args.rounds} alternating rounds of {args.seconds:g}s per cell; wrk load")
    print(f"{'service':18} {'conc':>4} {'edgecatch':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10}")
    for label, target in services.items():
        servers: dict[bool, list] = {True: [], False: []}
        try:
            for number in range(args.processes):
                for enabled in (True, False):
                    directory = work / f"{target.split(':')[1]}-{'on' if enabled else 'off'}-{number}"
                    directory.mkdir()
                    config = directory / "edgecatch.yaml"
                    config.write_text(
                        f"enabled: {'true' if enabled else 'false'}\n"
                        f"policies: {REPO / 'policies' / 'default.yaml'}\n"
                        f"delivery: {{spool_dir: {directory / 'spool'}, "
                        f"sink: {{type: directory, path: {directory / 'ds'}}}}}\n")
                    servers[enabled].append(start_bento(target, directory, config, REPO / "policies" / "default.yaml",
                                                        env={}, workers=1))
            if args.spend_budget and label == "trivial service":
                budget = int(yaml.safe_load((REPO / "policies" / "default.yaml").read_text())["limits"]["per_hour"])
                spend_budget(servers[True], servers[False], script, budget)
            for concurrency in args.concurrency:
                results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
                for _ in range(args.rounds):
                    measured: dict[bool, list[dict[str, float]]] = {True: [], False: []}
                    for number in range(args.processes):
                        for enabled in (True, False):
                            server = servers[enabled][number]
                            run_wrk(server.url, script, concurrency, 1)  # warm-up
                            measured[enabled].append(run_wrk(server.url, script, concurrency, args.seconds,
                                                             server.process.pid))
                    for enabled, per_process in measured.items():  # the round's figure: the processes' mean
                        results[enabled].append({key: (sum if key == "errors" else statistics.fmean)(
                            r[key] for r in per_process) for key in per_process[0]})
                rows = {}
                for enabled in (True, False):
                    rounds = results[enabled]
                    rows[enabled] = {key: statistics.median(r[key] for r in rounds)
                                     for key in ("rps", "p50", "p99", "cpu_ms")}
                    errors = sum(r["errors"] for r in rounds)
                    row = rows[enabled]
                    print(f"{label:18} {concurrency:>4} {'on' if enabled else 'off':>9} {row['rps']:8.1f} "
                          f"{row['p50']:8.2f} {row['p99']:8.2f} {row['cpu_ms']:10.3f}"
                          + (f"  ({errors} errors)" if errors else ""))
                on, off = rows[True], rows[False]
                print(f"{'':18} {'':>4} {'on/off':>9} {100 * on['rps'] / off['rps']:7.1f}% "
                      f"{on['p50'] - off['p50']:+8.2f} {on['p99'] - off['p99']:+8.2f} "
                      f"{on['cpu_ms'] - off['cpu_ms']:+10.3f}")
        finally:
            for server in servers[True] + servers[False]:
                stop_bento(server)
    time.sleep(0.1)


if __name__ == "__main__":
    main()
