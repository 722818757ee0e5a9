"""Limits under a real `bentoml serve` with 2 workers: each worker has its own budget with the memory
backend, and the two share one budget through a real redis-server with the Redis backend."""

from __future__ import annotations

import collections
import io
from concurrent.futures import ThreadPoolExecutor

import redis  # noqa: F401  (the test extra installs it; a missing client is a failure, not a skip)
from PIL import Image

from tests.redis_server import RedisServer

from .harness import start_bento, stop_bento, wait_for, write_config


BUDGET = 6
POLICY = f"""
version: 1
policies:
  - name: low-confidence
    confidence_below: 0.2          # the trivial service's third detection (0.12): every request
    limits: {{per_hour: {BUDGET}}}
"""
REQUESTS = 60


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 150)).save(out, format="JPEG")
    return out.getvalue()


def serve_and_send(tmp_path, limits: dict) -> tuple[object, collections.Counter]:
    """Start the trivial service (2 workers), send REQUESTS concurrently; requests served per worker."""
    config_path, policy_path = write_config(
        tmp_path, POLICY, delivery={"sink": {"type": "directory", "path": str(tmp_path / "dataset")}},
        limits=limits)
    server = start_bento("bento_service.trivial_service:TrivialDetectionService", tmp_path, config_path,
                         policy_path, env={}, workers=2)
    body = jpeg()

    def one(_: int) -> str:
        with server.client() as client:
            response = client.post("/detect", files={"image": ("x.jpg", body, "image/jpeg")})
            response.raise_for_status()
            return response.headers["x-edgecatch-inference-id"].split("-")[0]  # "w<pid base 36>"

    try:
        with ThreadPoolExecutor(8) as pool:
            per_worker = collections.Counter(pool.map(one, range(REQUESTS)))
    except BaseException:
        stop_bento(server)
        raise
    return server, per_worker


def test_memory_backend_gives_each_worker_its_own_budget(tmp_path):
    server, per_worker = serve_and_send(tmp_path, {"backend": "memory"})
    try:
        assert len(per_worker) == 2, per_worker  # both workers served (else this proves nothing)
        expected = sum(min(BUDGET, n) for n in per_worker.values())
        # The request path tallies; each worker's background loop writes the tally every 0.25 s.
        assert wait_for(lambda: server.metric("edgecatch_samples_total", {"policy": "low-confidence"}) == expected)
        samples = server.metric("edgecatch_samples_total", {"policy": "low-confidence"})
        assert samples > BUDGET  # what the README warns about: the limit multiplies by the workers
    finally:
        stop_bento(server)


def test_redis_backend_makes_the_workers_share_one_budget(tmp_path):
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    try:
        server, per_worker = serve_and_send(
            tmp_path, {"backend": redis_server.url, "fleet": "bento-test", "timeout_ms": 1000})
        try:
            assert len(per_worker) == 2, per_worker
            # Per-worker budgets would have selected this many (more than BUDGET with both serving):
            assert sum(min(BUDGET, n) for n in per_worker.values()) > BUDGET
            assert wait_for(lambda: server.metric("edgecatch_limited_total", {"policy": "low-confidence"})
                            == REQUESTS - BUDGET)
            assert server.metric("edgecatch_samples_total", {"policy": "low-confidence"}) == BUDGET
            assert server.metric("edgecatch_limiter_available") == 1
            assert redis_server.client().zcard("edgecatch:{bento-test}:p:low-confidence:3600") == BUDGET
        finally:
            stop_bento(server)
    finally:
        redis_server.kill()
