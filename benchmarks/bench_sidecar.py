"""The Triton sidecar's cost: direct to Triton vs. through the sidecar, side by side in one run.

Starts `tritonserver` (sidecar/start_triton.sh) and the sidecar (`python -m edgecatch sidecar`, the
default policy, a directory sink in a temporary folder) on free ports, then for each model
(`trivial_detector`: fixed detections, the worst case for a proxy; `people_detector`: the real
OpenCV detector), protocol (HTTP with binary tensors, gRPC with raw contents) and concurrency (1, 16)
measures direct and sidecar in alternating slices (ABAB..., --repeat of each, pooled): requests/s,
p50/p99 latency, the sidecar's CPU time per request (utime+stime from /proc/<pid>/stat), and on each
side Triton's CPU time per request and how many of the machine's cores were busy (/proc/stat): a
sidecar also costs what Triton does differently behind it.

Before measuring, trivial_detector traffic goes through the sidecar until the default policy's
hourly budget (300 samples) is spent, and delivery has stored those samples (--no-spend-budget
skips this): the figures are the steady state of a busy hour, every prediction read, evaluated,
counted and remembered for feedback, none prepared for upload. Without it, each selected sample
costs the sidecar a JPEG decode, resize and encode (milliseconds) in the background.

The load generator is built not to be the bottleneck: requests are serialised once, up front; each
of --workers processes (spawned, so no grpc state crosses a fork) runs its share of the concurrency
as threads that each hold one connection: a raw keep-alive socket for HTTP (send the prepared bytes,
read the answer by Content-Length), a grpc channel with identity serialisers for gRPC. The report
includes how much CPU the load generator, Triton and the sidecar used, and what everything else on
the machine used during the run (the cores are shared).

    .venv/bin/python benchmarks/bench_sidecar.py [--seconds 2] [--people-seconds 8] [--repeat 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


# -- the load generator (runs in worker processes) ------------------------------------------------

def _http_loop(port: int, message: bytes, stop_at: float, start_at: float, out: list) -> None:
    clock = time.perf_counter
    errors = 0
    latencies = []
    sock = None
    buffer = b""
    while True:
        begin = clock()
        if begin >= stop_at:
            break
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer = b""
            sock.sendall(message)
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(262144)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                chunk = sock.recv(262144)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buffer += chunk
            buffer = buffer[length:]
            ok = head.startswith(b"HTTP/1.1 200")
        except OSError:
            if sock is not None:
                sock.close()
            sock, ok = None, False
            time.sleep(0.01)
        end = clock()
        if not ok:
            errors += 1
        if begin >= start_at:
            latencies.append(end - begin)
    if sock is not None:
        sock.close()
    out.append((latencies, errors))


def _grpc_loop(port: int, message: bytes, stop_at: float, start_at: float, out: list) -> None:
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1),
                                                                  ("grpc.max_send_message_length", -1)])
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    clock = time.perf_counter
    errors = 0
    latencies = []
    while True:
        begin = clock()
        if begin >= stop_at:
            break
        try:
            call(message, timeout=60)
        except grpc.RpcError:
            errors += 1
        end = clock()
        if begin >= start_at:
            latencies.append(end - begin)
    channel.close()
    out.append((latencies, errors))


def _worker(conn) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        protocol, port, message, threads, warmup, seconds, go_at = job
        while time.time() < go_at:  # all workers start together
            time.sleep(0.001)
        now = time.perf_counter()
        start_at, stop_at = now + warmup, now + warmup + seconds
        loop = _http_loop if protocol == "http" else _grpc_loop
        out: list = []
        pool = [threading.Thread(target=loop, args=(port, message, stop_at, start_at, out)) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        conn.send(([x for lat, _ in out for x in lat], sum(e for _, e in out)))


class LoadGenerator:
    def __init__(self, workers: int) -> None:
        context = mp.get_context("spawn")
        self.pipes = []
        self.processes = []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child,), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def run(self, protocol: str, port: int, message: bytes, concurrency: int, warmup: float,
            seconds: float) -> tuple[list[float], int]:
        used = self.pipes[:concurrency]  # concurrency 1: one worker, one thread
        go_at = time.time() + 0.05
        for index, pipe in enumerate(used):
            threads = concurrency // len(used) + (1 if index < concurrency % len(used) else 0)
            pipe.send((protocol, port, message, threads, warmup, seconds, go_at))
        latencies: list[float] = []
        errors = 0
        for pipe in used:
            lat, err = pipe.recv()
            latencies += lat
            errors += err
        return latencies, errors

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for process in self.processes:
            process.join(5)


# -- CPU accounting ----------------------------------------------------------------------------------

def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the file)
    return total / TICKS


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # pgrp
                pids.append(int(entry))
    return pids


def machine_busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


# -- requests ---------------------------------------------------------------------------------------

def jpeg_640x480() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((640, 480)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def http_message(model: str, image: bytes) -> bytes:
    import numpy as np
    import tritonclient.http as http

    tensor = http.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object), binary_data=True)
    outputs = [http.InferRequestedOutput(n, binary_data=True) for n in ("BOXES", "SCORES", "CLASSES")]
    body, json_size = http.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {json_size}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def grpc_message(model: str, image: bytes) -> bytes:
    from tritonclient.grpc import service_pb2

    message = service_pb2.ModelInferRequest(model_name=model)
    message.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
    message.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return message.SerializeToString()


# -- the run ------------------------------------------------------------------------------------------

def spend_budget(load: LoadGenerator, sidecar, image: bytes, budget: int) -> None:
    """Warm the sidecar up and spend the policy's hourly sample budget, then wait until delivery has
    stored those samples: what follows is the steady state of a busy hour, where every prediction is
    still read, evaluated, counted and remembered for feedback, and the budget selects no more."""
    import json
    import urllib.error
    import urllib.request

    def get(path: str) -> bytes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.admin_port}{path}") as answer:
                return answer.read()
        except urllib.error.HTTPError as error:  # 503 from healthz: the report says why
            return error.read()

    def samples() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in get("/metrics").decode().splitlines()
                   if line.startswith("edgecatch_samples_total{"))

    message = http_message("trivial_detector", image)
    began = time.monotonic()
    while samples() < budget and time.monotonic() - began < 120:
        load.run("http", sidecar.http_port, message, 16, 0.0, 3.0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = json.loads(get("/edgecatch/healthz"))
        if not health.get("queue_items") and not health.get("spool_items"):
            break
        time.sleep(0.5)
    print(f"# warm-up {time.monotonic() - began:.0f} s: {samples():.0f} samples selected (budget {budget}), "
          f"{health.get('delivered')} delivered, spool empty", flush=True)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per slice (trivial model)")
    parser.add_argument("--people-seconds", type=float, default=8.0, help="measured seconds per slice (people model)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each slice")
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument("--repeat", type=int, default=3,
                        help="direct/sidecar slices per cell, alternating (ABAB...) and pooled")
    parser.add_argument("--models", default="trivial_detector,people_detector")
    parser.add_argument("--protocols", default="http,grpc")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--no-observe", dest="observe", action="store_false",
                        help="configure no models: the proxies alone, nothing read along (the ceiling)")
    parser.add_argument("--no-spend-budget", dest="spend_budget", action="store_false",
                        help="measure from a fresh sidecar (its first 300 samples are prepared during the runs)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from tests.sidecar.processes import SidecarProcess, TritonProcess, triton_available

    reason = triton_available()
    if reason:
        print(f"cannot run Triton here: {reason}", file=sys.stderr)
        return 1
    image = jpeg_640x480()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    triton = TritonProcess(workdir / "triton.log")
    sidecar = None
    load = LoadGenerator(args.workers)
    rows = []
    try:
        triton.start()
        sidecar = SidecarProcess(workdir, triton, policies=REPO / "policies" / "default.yaml",
                                 sink={"type": "directory", "path": str(workdir / "dataset")},
                                 models=None if args.observe else {})
        sidecar.start()
        triton_pids = group_pids(triton.pid)
        if args.spend_budget and args.observe:
            import yaml

            policy = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())
            spend_budget(load, sidecar, image, int(policy["limits"]["per_hour"]))
        ours = [sidecar.pid, *triton_pids, *load.pids()]
        # The sidecar's background threads (delivery, recall sweep, policy reload) use a little CPU
        # even when idle; it is measured here and taken out of the per-request figures.
        idle0, idle_wall0 = cpu_seconds([sidecar.pid]), time.monotonic()
        time.sleep(3)
        idle_rate = (cpu_seconds([sidecar.pid]) - idle0) / (time.monotonic() - idle_wall0)
        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus={os.cpu_count()}  loadavg={os.getloadavg()}  "
              f"image={len(image)} B  workers={args.workers}  sidecar idle CPU {idle_rate * 1e3:.1f} ms/s",
              flush=True)
        for model in args.models.split(","):
            seconds = args.people_seconds if model == "people_detector" else args.seconds
            for protocol in args.protocols.split(","):
                message = http_message(model, image) if protocol == "http" else grpc_message(model, image)
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    # Direct and sidecar alternate in slices (--repeat of them each), and each side's
                    # slices are pooled: both see the same background load on these shared cores.
                    pooled = {t: {"latencies": [], "errors": 0, "seconds": 0.0, "cpu": 0.0, "requests": 0,
                                  "load": 0.0, "other": 0.0, "wall": 0.0, "triton": 0.0, "busy": 0.0}
                              for t in ("direct", "sidecar")}
                    for _ in range(args.repeat):
                        for target in ("direct", "sidecar"):
                            if protocol == "http":
                                port = triton.http_port if target == "direct" else sidecar.http_port
                            else:
                                port = triton.grpc_port if target == "direct" else sidecar.grpc_port
                            busy0, ours0, side0 = machine_busy_seconds(), cpu_seconds(ours), cpu_seconds([sidecar.pid])
                            load0, triton0 = cpu_seconds(load.pids()), cpu_seconds(triton_pids)
                            wall0 = time.monotonic()
                            latencies, errors = load.run(protocol, port, message, concurrency, args.warmup, seconds)
                            wall = time.monotonic() - wall0
                            p = pooled[target]
                            p["latencies"] += latencies
                            p["errors"] += errors
                            p["seconds"] += seconds
                            # requests over warm-up + measurement, for the sidecar's CPU in that time
                            p["requests"] += len(latencies) * (seconds + args.warmup) / seconds
                            p["cpu"] += cpu_seconds([sidecar.pid]) - side0 - idle_rate * wall
                            p["load"] += cpu_seconds(load.pids()) - load0
                            p["triton"] += cpu_seconds(triton_pids) - triton0
                            busy = machine_busy_seconds() - busy0
                            p["busy"] += busy
                            p["other"] += busy - (cpu_seconds(ours) - ours0)
                            p["wall"] += wall
                    d, s = ({"rps": len(p["latencies"]) / p["seconds"], "p50": percentile(p["latencies"], 0.5) * 1e3,
                             "p99": percentile(p["latencies"], 0.99) * 1e3} for p in (pooled["direct"], pooled["sidecar"]))
                    cpu = max(0.0, pooled["sidecar"]["cpu"]) / max(1.0, pooled["sidecar"]["requests"]) * 1e6
                    # Triton's CPU per request and how busy the machine was, on each side: what the
                    # sidecar costs beyond its own CPU (Triton idles while requests wait in the sidecar).
                    triton_cpu = tuple(p["triton"] / max(1.0, p["requests"]) * 1e6 for p in pooled.values())
                    busy_cores = tuple(p["busy"] / max(1e-9, p["wall"]) for p in pooled.values())
                    errors = pooled["direct"]["errors"] + pooled["sidecar"]["errors"]
                    wall = pooled["direct"]["wall"] + pooled["sidecar"]["wall"]
                    load_cores = (pooled["direct"]["load"] + pooled["sidecar"]["load"]) / wall
                    other_cores = max(0.0, (pooled["direct"]["other"] + pooled["sidecar"]["other"]) / wall)
                    row = (model, protocol, concurrency, d, s, cpu, triton_cpu, busy_cores, errors, load_cores,
                           other_cores)
                    rows.append(row)
                    print(format_row(row), flush=True)
    finally:
        load.close()
        if sidecar is not None:
            sidecar.stop()
        triton.stop()
    print()
    print(table(rows))
    return 0


HEADER = ("| model | protocol | conc. | direct req/s | sidecar req/s | ratio | direct p50 / p99 ms | "
          "sidecar p50 / p99 ms | added p50 ms | sidecar CPU µs/req | Triton CPU µs/req direct / sidecar | "
          "busy cores direct / sidecar | errors | load gen cores | other cores |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(row) -> str:
    model, protocol, concurrency, d, s, cpu, triton_cpu, busy_cores, errors, load_cores, other = row
    return (f"| {model} | {protocol} | {concurrency} | {d['rps']:.0f} | {s['rps']:.0f} | "
            f"{s['rps'] / d['rps'] * 100:.0f}% | {d['p50']:.2f} / {d['p99']:.2f} | {s['p50']:.2f} / {s['p99']:.2f} | "
            f"{s['p50'] - d['p50']:+.2f} | {cpu:.0f} | {triton_cpu[0]:.0f} / {triton_cpu[1]:.0f} | "
            f"{busy_cores[0]:.2f} / {busy_cores[1]:.2f} | {errors} | {load_cores:.2f} | {other:.2f} |")


def table(rows) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


if __name__ == "__main__":
    sys.exit(main())
