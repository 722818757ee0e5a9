"""Where a BentoML worker's CPU goes, per thread, for several variants of the trivial service.

bench_bentoml.py says how much edgecatch costs; this says where. Each variant is the trivial
service (`bento_service.trivial_service`, 1 worker) with its own edgecatch config, optionally its
own policy file, optionally the code of another git revision (checked out in a temporary worktree).
The variants are loaded with `wrk` in alternating rounds; for each the table gives requests/s and
the worker's CPU per request, split by thread from /proc/<pid>/task: the event loop ("loop": HTTP,
multipart, BentoML), the API's thread ("api": the API and edgecatch's request path) and the rest
(edgecatch's background threads). The median round is shown, and every round's total.

    .venv/bin/python benchmarks/bentoml_threads.py off='enabled: false' on='enabled: true' \\
        norecall='enabled: true;recall: {max_items: 1}' before='enabled: true' --revision before=HEAD~3

A variant is NAME=YAML (the config's lines, `;` between lines; `policies:` and `delivery:` are
added: the default policy unless --policy NAME=PATH, and a directory sink in a temporary folder).

--gc adds the worker's garbage collections per generation: collections per second and the CPU they
took per request (recorded by a `sitecustomize` put on the worker's PYTHONPATH: gc.callbacks and
thread CPU time; its writer thread adds a few µs to "rest").
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_bentoml import LUA, jpeg_640x480, multipart  # noqa: E402
from tests.bento_plugin import harness  # noqa: E402


def process_tree(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        with open(f"/proc/{current}/task/{current}/children") as children:
            pending.extend(int(child) for child in children.read().split())
    return pids


def thread_ticks(pid: int) -> dict[int, int]:
    """utime + stime (clock ticks) of each thread of a process."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks[int(tid)] = int(fields[11]) + int(fields[12])
        except FileNotFoundError:  # the thread ended
            pass
    return ticks


GC_RECORDER = """
import gc, os, threading, time

_totals = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_started = [0.0]


def _record(phase, info):
    if phase == "start":
        _started[0] = time.thread_time()
    else:
        total = _totals[info["generation"]]
        total[0] += 1
        total[1] += time.thread_time() - _started[0]


def _write():
    while True:
        time.sleep(0.2)
        path = os.path.join(DIRECTORY, f"gc-{os.getpid()}.txt")
        with open(path + ".tmp", "w") as out:
            out.write(repr({g: tuple(t) for g, t in _totals.items()}))
        os.replace(path + ".tmp", path)  # read whole or not at all


gc.callbacks.append(_record)
threading.Thread(target=_write, daemon=True).start()
"""


def gc_totals(directory: Path, pid: int) -> dict[int, tuple[int, float]]:
    """The worker's (collections, seconds) per generation so far, as its recorder last wrote them."""
    time.sleep(0.5)  # a fresh write
    return ast.literal_eval((directory / f"gc-{pid}.txt").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="NAME=YAML (config lines separated by ';')")
    parser.add_argument("--policy", action="append", default=[], help="NAME=PATH: the variant's policy file")
    parser.add_argument("--revision", action="append", default=[],
                        help="NAME=REV: run the variant with the code of a git revision")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gc", action="store_true", help="also the worker's garbage collections per request")
    args = parser.parse_args()

    policies = dict(item.split("=", 1) for item in args.policy)
    revisions = dict(item.split("=", 1) for item in args.revision)
    work = Path(tempfile.mkdtemp(prefix="edgecatch-threads-"))
    body = work / "body.bin"
    body.write_bytes(multipart(jpeg_640x480()))
    script = work / "post.lua"
    script.write_text(LUA.format(body=body))
    servers, worktrees = {}, []
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    gc_site = work / "gc-site"
    if args.gc:
        gc_site.mkdir()
        (gc_site / "sitecustomize.py").write_text(GC_RECORDER.replace("DIRECTORY", repr(str(gc_site))))
    try:
        for variant in args.variants:
            name, yaml_lines = variant.split("=", 1)
            directory = work / name
            directory.mkdir()
            policy = Path(policies.get(name, REPO / "policies" / "default.yaml")).resolve()
            config = directory / "edgecatch.yaml"
            config.write_text(yaml_lines.replace(";", "\n") + f"\npolicies: {policy}\n"
                              f"delivery: {{spool_dir: {directory / 'spool'}, "
                              f"sink: {{type: directory, path: {directory / 'dataset'}}}}}\n")
            code, env = REPO, {}
            if name in revisions:
                code = work / f"code-{name}"
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(code),
                                revisions[name]], check=True)
                worktrees.append(code)
                env = {"PYTHONPATH": str(code)}
            if args.gc:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gc_site), env.get("PYTHONPATH")]))
            harness.REPO = code  # start_bento serves from this directory
            servers[name] = harness.start_bento("bento_service.trivial_service:TrivialDetectionService",
                                                directory, config, policy, env=env, workers=1)
        harness.REPO = REPO
        results: dict[str, list[tuple[float, ...]]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, server in servers.items():
                worker = process_tree(server.process.pid)[-1]
                url = f"{server.url}/detect"
                wrk = ["wrk", "-t1", f"-c{args.concurrency}", "-s", str(script), url]
                subprocess.run(wrk[:3] + ["-d1s"] + wrk[3:], capture_output=True, check=True)  # warm-up
                gc_before = gc_totals(gc_site, worker) if args.gc else None
                before = thread_ticks(worker)
                out = subprocess.run(wrk[:3] + [f"-d{args.seconds}s"] + wrk[3:], capture_output=True, text=True,
                                     check=True).stdout
                after = thread_ticks(worker)
                requests = int(re.search(r"(\d+) requests in", out).group(1))
                per_request = {tid: (after[tid] - before.get(tid, 0)) / ticks_per_second / requests * 1e6
                               for tid in after}
                loop = per_request.pop(worker, 0.0)
                others = sorted(per_request.values(), reverse=True)
                api = others[0] if others else 0.0
                rest = sum(others[1:])
                row = (requests / args.seconds, loop, api, rest)
                if gc_before is not None:
                    gc_after = gc_totals(gc_site, worker)
                    for generation in (0, 1, 2):
                        collections = gc_after[generation][0] - gc_before[generation][0]
                        seconds = gc_after[generation][1] - gc_before[generation][1]
                        row += (collections / args.seconds, seconds / requests * 1e6)
                results[name].append(row)
        print(f"{args.rounds} alternating rounds of {args.seconds} s, wrk concurrency {args.concurrency}; "
              "worker CPU µs per request")
        gc_header = "".join(f"  gc{g}/s    µs" for g in (0, 1, 2)) if args.gc else ""
        print(f"{'variant':12} {'req/s':>7} {'loop':>7} {'api':>6} {'rest':>5} {'total':>7}{gc_header}   "
              "totals per round")
        for name, rounds in results.items():
            rps, loop, api, rest, *gc = (statistics.median(r[i] for r in rounds) for i in range(len(rounds[0])))
            totals = [round(r[1] + r[2] + r[3]) for r in rounds]
            gc_columns = "".join(f" {gc[2 * g]:6.2f} {gc[2 * g + 1]:5.0f}" for g in (0, 1, 2)) if gc else ""
            print(f"{name:12} {rps:7.0f} {loop:7.0f} {api:6.0f} {rest:5.0f} {statistics.median(totals):7.0f}{gc_columns}   "
                  f"{totals}")
    finally:
        harness.REPO = REPO
        for server in servers.values():
            harness.stop_bento(server)
        for tree in worktrees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()
