"""`edgecatch spool status|retry-dead-letters|purge`, run as a real command."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import fill_spool, open_spool


def edgecatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecatch", *args], capture_output=True, text=True, timeout=60)


def test_status_retry_and_purge(tmp_path, roboflow_config, metrics):
    config = roboflow_config()
    spool = open_spool(config, metrics)
    ids = fill_spool(spool, 5)
    claim = spool.claim()
    claim.dead_letter("rejected", {"status": 422, "answer": "{}"})
    (config.spool_dir / "quarantine" / "x.ecs").write_bytes(b"bad")
    (config.spool_dir / "quarantine" / "x.state").write_bytes(b"{}")  # its state: not another entry
    where = ["--spool-dir", str(config.spool_dir)]

    status = edgecatch("spool", "status", "--json", *where)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert (data["ready_items"], data["dead_items"], data["quarantined_items"]) == (4, 1, 1)
    text = edgecatch("spool", "status", *where).stdout
    assert "waiting:     4 samples" in text and "dead letters: 1" in text

    retried = edgecatch("spool", "retry-dead-letters", *where)
    assert retried.returncode == 0 and retried.stdout.startswith("1 dead letter moved back")
    again = open_spool(config, metrics)
    claim = again.claim()
    assert len(again) == 5 and claim.sample_id == ids[0]
    claim.release()

    refused = edgecatch("spool", "purge", "ready", *where)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = edgecatch("spool", "purge", "ready", "--yes", *where)
    assert purged.returncode == 0 and purged.stdout.startswith("5 entries deleted")
    assert edgecatch("spool", "purge", "quarantine", "--yes", *where).stdout.startswith("1 entry deleted")

    missing = edgecatch("spool", "status", "--spool-dir", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no spool at" in missing.stderr
    # a folder that is not a spool is refused, and left as it was
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    project.chmod(0o755)
    other = edgecatch("spool", "status", "--spool-dir", str(project))
    assert other.returncode == 1 and "is not an edgecatch spool" in other.stderr
    assert list(project.iterdir()) == [] and project.stat().st_mode & 0o777 == 0o755
