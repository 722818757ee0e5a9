"""The uploader on its own: it spends the byte budget, and it survives failing disk calls."""

from __future__ import annotations

import asyncio

from edgecatch.delivery.config import DeliveryConfig
from edgecatch.delivery.schedule import ByteRateLimiter
from edgecatch.delivery.sinks.directory import DirectorySink
from edgecatch.delivery.uploader import Uploader

from .conftest import fill_spool, open_spool


class RecordingLimiter(ByteRateLimiter):
    """The real limiter on a fake clock that only moves when a sender waits (no real sleeping)."""

    def __init__(self, rate: int) -> None:
        self.now = 0.0
        super().__init__(rate, monotonic=lambda: self.now)
        self.sizes: list[int] = []
        self.waits: list[float] = []

    async def acquire(self, size: int) -> None:
        self.sizes.append(size)
        delay = self.reserve(size)
        self.waits.append(delay)
        self.now += delay


def test_uploader_charges_each_sample_to_the_byte_rate(tmp_path, metrics):
    config = DeliveryConfig.model_validate({
        "spool_dir": str(tmp_path / "spool"), "concurrency": 1, "max_bytes_per_second": 10_000,
        "sink": {"type": "directory", "path": str(tmp_path / "ds")}})
    spool = open_spool(config, metrics)
    fill_spool(spool, 20)
    sizes_on_disk = sorted(p.stat().st_size for p in (tmp_path / "spool" / "ready").glob("*.ecs"))

    async def run() -> RecordingLimiter:
        uploader = Uploader(spool, DirectorySink(config.sink), config, metrics)
        limiter = uploader.rate = RecordingLimiter(10_000)
        uploader.start()
        while len(spool):
            await asyncio.sleep(0.01)
        await uploader.drain(5)
        return limiter

    limiter = asyncio.run(run())
    assert sorted(limiter.sizes) == sizes_on_disk
    # One second of burst, then the rest at 10,000 bytes/s: the waits add up to exactly that.
    expected = (sum(sizes_on_disk) - 10_000) / 10_000
    assert abs(sum(limiter.waits) - expected) < 1e-6


def test_a_failing_disk_call_does_not_kill_the_workers(tmp_path, metrics, caplog):
    from edgecatch.delivery.spool import Spool

    class FlakySpool(Spool):
        """The real spool, whose first two claims fail like a process out of file descriptors."""

        failures = 2

        def claim(self):
            if self.failures:
                self.failures -= 1
                raise OSError(24, "Too many open files")
            return super().claim()

    config = DeliveryConfig.model_validate({
        "spool_dir": str(tmp_path / "spool"), "concurrency": 2, "poll_seconds": 0.01,
        "sink": {"type": "directory", "path": str(tmp_path / "ds")}})
    spool = FlakySpool(config.spool_dir, max_bytes=10**9, max_items=10**6, metrics=metrics).open()
    ids = fill_spool(spool, 5)

    async def run() -> None:
        uploader = Uploader(spool, DirectorySink(config.sink), config, metrics)
        uploader.start()
        while len(spool):
            await asyncio.sleep(0.01)
        assert await uploader.drain(5)

    asyncio.run(run())
    manifest = (tmp_path / "ds" / "manifest.jsonl").read_text()
    assert all(sample_id in manifest for sample_id in ids)
    assert len([r for r in caplog.records if "Too many open files" in (r.exc_text or "")]) == 2


def test_one_outage_seen_by_every_worker_escalates_the_backoff_once(tmp_path, metrics):
    from edgecatch.delivery.errors import TransientError

    config = DeliveryConfig.model_validate({
        "spool_dir": str(tmp_path / "spool"), "concurrency": 4,
        "retry": {"initial_seconds": 1, "max_seconds": 300, "jitter": 0},
        "sink": {"type": "directory", "path": str(tmp_path / "ds")}})
    spool = open_spool(config, metrics)
    fill_spool(spool, 8)
    now = [1000.0]
    uploader = Uploader(spool, DirectorySink(config.sink), config, metrics, monotonic=lambda: now[0])
    refused = TransientError("upload: ClientConnectorError")
    # Four workers started their attempts before anything failed: one failure, a 1 s backoff.
    for claim in [spool.claim() for _ in range(4)]:
        uploader._transient(claim, refused, epoch=0)
    assert uploader._failures == 1 and uploader._not_before == 1001.0
    # After the backoff, the next round fails again: now it escalates (2 s), once.
    now[0] = 1001.0
    epoch = uploader._backoff_epoch
    for claim in [spool.claim() for _ in range(4)]:
        uploader._transient(claim, refused, epoch=epoch)
    assert uploader._failures == 2 and uploader._not_before == 1003.0
