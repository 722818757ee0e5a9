"""Delivery benchmarks: hand-off cost, spool append rate, delivery rate, memory over 100,000 samples.

    python benchmarks/bench_delivery.py handoff  [--n 200000]
    python benchmarks/bench_delivery.py spool    [--n 2000]   (100 KB JPEGs, fsync on)
    python benchmarks/bench_delivery.py deliver  [--n 3000] [--concurrency 8]
    python benchmarks/bench_delivery.py memory   [--n 100000] [--max-backlog 2000]

The Upload API server (tests/upload_api_server.py) runs in its own process on 127.0.0.1, as a
destination would. Spools live in a temporary folder on the same disk as /tmp.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecatch.delivery import Delivery  # noqa: E402
from edgecatch.delivery.config import DeliveryConfig  # noqa: E402
from edgecatch.delivery.sample import SampleDetection, SampleRecord, new_sample_id  # noqa: E402
from edgecatch.delivery.spool import Spool  # noqa: E402
from edgecatch.metrics import Metrics  # noqa: E402
from edgecatch.observation import Detection, Observation  # noqa: E402
from edgecatch.policies.decision import Decision  # noqa: E402

DECISION = Decision(selected=True, policy="low-confidence", tags=("low-confidence",), batch="bench")
OBSERVATION = Observation(model="people", model_version="1", image_width=640, image_height=480,
                          detections=tuple(Detection("person", 0.4, (10 + i, 20, 100 + i, 200), 0) for i in range(5)),
                          inference_id="w1-0123456789abcdef")


def jpeg_of_size(target: int, seed: int = 0) -> bytes:
    """A JPEG of about `target` bytes (noise compresses badly, so the size is easy to steer)."""
    side = 64
    while True:
        data = io.BytesIO()
        Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(data, "JPEG", quality=85)
        if data.tell() >= target:
            return data.getvalue()
        side += 16


def record(width: int = 640, height: int = 480) -> SampleRecord:
    return SampleRecord(sample_id=new_sample_id(), created=time.time(), model="people", width=width, height=height,
                        task="detection", policy="low-confidence", tags=("low-confidence",), batch="bench",
                        detections=tuple(SampleDetection("person", 0, 0.4, (10, 20, 100, 200)) for _ in range(5)))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- hand-off -------------------------------------------------------------------------------------

def bench_handoff(n: int) -> None:
    image = jpeg_of_size(50_000)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. The put alone: a delivery that is not started, with room for every sample.
        config = DeliveryConfig.model_validate({"spool_dir": f"{tmp}/a", "queue_size": n + 1})
        delivery = Delivery(config, metrics=Metrics(CollectorRegistry()))
        timings = []
        submit = delivery.submit
        clock = time.perf_counter_ns
        for _ in range(n):
            start = clock()
            submit(OBSERVATION, image, DECISION)
            timings.append((clock() - start) / 1000)
        report("hand-off, queue accepting", timings)
        # 2. A full queue: the drop path (counted, never a wait).
        timings = []
        for _ in range(n // 4):
            start = clock()
            submit(OBSERVATION, image, DECISION)
            timings.append((clock() - start) / 1000)
        report("hand-off, queue full (drop + count)", timings)
        # 3. While the background prepares, spools and delivers (directory sink): 500 samples/s offered.
        config = DeliveryConfig.model_validate({"spool_dir": f"{tmp}/b", "queue_size": 1000,
                                                "sink": {"type": "directory", "path": f"{tmp}/ds"}})
        delivery = Delivery(config, metrics=Metrics(CollectorRegistry()))
        delivery.start()
        timings = []
        submit = delivery.submit
        count = min(n, 5000)
        next_at = time.perf_counter()
        for _ in range(count):
            next_at += 0.002
            while time.perf_counter() < next_at:
                pass
            start = clock()
            submit(OBSERVATION, image, DECISION)
            timings.append((clock() - start) / 1000)
        delivery.stop(timeout=30)
        report(f"hand-off at 500/s while the background works ({count} samples)", timings)


def report(name: str, timings_us: list[float]) -> None:
    print(f"{name}: n={len(timings_us)} p50={percentile(timings_us, 0.5):.2f} µs "
          f"p99={percentile(timings_us, 0.99):.2f} µs p99.9={percentile(timings_us, 0.999):.2f} µs "
          f"mean={statistics.fmean(timings_us):.2f} µs", flush=True)


# -- spool ----------------------------------------------------------------------------------------

def bench_spool(n: int) -> None:
    images = [jpeg_of_size(100_000) for _ in range(8)]
    size = statistics.fmean(len(i) for i in images)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for batch in (1, 32):
            spool = Spool(f"{tmp}/{batch}", max_bytes=10**12, max_items=10**7,
                          metrics=Metrics(CollectorRegistry())).open()
            items = [(record(), images[i % len(images)]) for i in range(n)]
            start = time.perf_counter()
            for i in range(0, n, batch):
                assert all(spool.put_many(items[i:i + batch]))
            elapsed = time.perf_counter() - start
            print(f"spool append, {size / 1000:.0f} KB JPEGs, fsync file + directory, batch {batch}: "
                  f"{n / elapsed:.0f} samples/s ({n * size / elapsed / 1e6:.1f} MB/s), n={n}", flush=True)


# -- delivery -------------------------------------------------------------------------------------

def start_server(port: int, key: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "upload_api_server.py"), "--port", str(port),
                             "--api-key", key], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("Upload API on")
    return proc


def roboflow_config(tmp: str, port: int, concurrency: int, **extra) -> DeliveryConfig:
    os.environ["BENCH_ROBOFLOW_KEY"] = "bench-key"
    return DeliveryConfig.model_validate({
        "spool_dir": f"{tmp}/spool", "concurrency": concurrency, "poll_seconds": 0.05, **extra,
        "sink": {"type": "roboflow", "base_url": f"http://127.0.0.1:{port}", "dataset": "test-dataset",
                 "api_key_env": "BENCH_ROBOFLOW_KEY"}})


def bench_deliver(n: int, concurrency: int, port: int, image_kb: int) -> None:
    server = start_server(port, "bench-key")
    try:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            config = roboflow_config(tmp, port, concurrency)
            spool = Spool(config.spool_dir, max_bytes=10**12, max_items=10**7,
                          metrics=Metrics(CollectorRegistry())).open()
            base = [jpeg_of_size(image_kb * 1000) for _ in range(16)]
            # Distinct bytes per sample (the server de-duplicates by content, like the real one).
            items = [(record(), base[i % 16] + i.to_bytes(4, "big")) for i in range(n)]
            for i in range(0, n, 64):
                spool.put_many(items[i:i + 64])
            delivery = Delivery(config, metrics=Metrics(CollectorRegistry()))
            cpu0 = time.process_time()
            start = time.perf_counter()
            delivery.start()
            assert delivery.spool is not None
            while len(delivery.spool):
                time.sleep(0.005)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            delivery.stop()
            print(f"delivery to the local Upload API, {image_kb} KB images, concurrency {concurrency}: "
                  f"{n / elapsed:.0f} samples/s ({2 * n / elapsed:.0f} HTTP requests/s), "
                  f"client CPU {cpu / n * 1000:.2f} ms/sample, n={n}", flush=True)
    finally:
        server.kill()


# -- memory ---------------------------------------------------------------------------------------

def bench_memory(n: int, port: int, sink: str, max_backlog: int | None) -> None:
    server = start_server(port, "bench-key") if sink == "roboflow" else None
    image = jpeg_of_size(20_000)
    try:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            if sink == "roboflow":
                config = roboflow_config(tmp, port, 8, queue_size=1000)
            else:
                config = DeliveryConfig.model_validate({"spool_dir": f"{tmp}/spool", "queue_size": 1000,
                                                        "sink": {"type": "directory", "path": f"{tmp}/ds"}})
            delivery = Delivery(config, metrics=Metrics(CollectorRegistry()))
            delivery.start()
            assert delivery.uploader is not None
            samples: list[tuple[int, float]] = [(0, rss_mb())]
            start = time.perf_counter()
            submitted = 0
            assert delivery.spool is not None
            while submitted < n:
                # Offer as fast as delivery takes them (a full queue would drop: wait instead, here).
                # With --max-backlog, also keep the spool's backlog bounded (steady state).
                if max_backlog is not None and len(delivery.spool) > max_backlog:
                    time.sleep(0.01)
                    continue
                if delivery.submit(Observation(model="people", image_width=320, image_height=240,
                                               detections=OBSERVATION.detections,
                                               inference_id=f"w1-{submitted:016x}"),
                                   image + submitted.to_bytes(4, "big"), DECISION):
                    submitted += 1
                    if submitted % 10_000 == 0:
                        samples.append((delivery.uploader.delivered, rss_mb()))
                        print(f"  submitted {submitted}, delivered {delivery.uploader.delivered}, "
                              f"spooled {len(delivery.spool)}, RSS {samples[-1][1]:.1f} MB", flush=True)
                else:
                    time.sleep(0.001)
            delivery.wait_idle(600)
            elapsed = time.perf_counter() - start
            samples.append((delivery.uploader.delivered, rss_mb()))
            delivery.stop()
            after_warmup = [rss for count, rss in samples[2:]]
            print(f"memory, {n} samples through submit → prepare → spool → {sink} in {elapsed:.0f} s: RSS "
                  f"start {samples[0][1]:.1f} MB, after 10k {samples[1][1]:.1f} MB, min/max after that "
                  f"{min(after_warmup):.1f}/{max(after_warmup):.1f} MB, end {samples[-1][1]:.1f} MB; "
                  f"delivered {samples[-1][0]}", flush=True)
    finally:
        if server is not None:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["handoff", "spool", "deliver", "memory"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--image-kb", type=int, default=20)
    parser.add_argument("--sink", choices=["roboflow", "directory"], default="roboflow")
    parser.add_argument("--port", type=int, default=9187)
    parser.add_argument("--max-backlog", type=int, default=None,
                        help="memory: pause submitting while more than this many samples are spooled")
    args = parser.parse_args()
    if args.what == "handoff":
        bench_handoff(args.n or 200_000)
    elif args.what == "spool":
        bench_spool(args.n or 2000)
    elif args.what == "deliver":
        bench_deliver(args.n or 3000, args.concurrency, args.port, args.image_kb)
    else:
        bench_memory(args.n or 100_000, args.port, args.sink, args.max_backlog)


if __name__ == "__main__":
    main()
