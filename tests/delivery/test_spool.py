"""The spool on its own: durability format, corruption, bounds, permissions, several processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgecatch.delivery.spool import HEADER_SIZE, CorruptEntry, Spool, decode_entry, encode_entry

from .conftest import fill_spool, jpeg, make_record


def new_spool(path: Path, metrics, **kw) -> Spool:
    kw.setdefault("max_bytes", 10**9)
    kw.setdefault("max_items", 10**6)
    return Spool(path, metrics=metrics, **kw).open()


def drain(spool: Spool) -> list[str]:
    out = []
    while (claim := spool.claim()) is not None:
        out.append(claim.sample_id)
        claim.done()
    return out


def test_entry_round_trip_and_every_kind_of_damage_is_detected():
    record = make_record()
    data = encode_entry(record.to_json(), b"\xff\xd8image")
    assert decode_entry(data) == (record, b"\xff\xd8image")
    damaged = {
        "torn": data[:-3],
        "flipped body bit": data[:HEADER_SIZE + 5] + bytes([data[HEADER_SIZE + 5] ^ 1]) + data[HEADER_SIZE + 6:],
        "flipped header bit": data[:9] + bytes([data[9] ^ 1]) + data[10:],
        "wrong magic": b"XXSPOOL1" + data[8:],
        "empty": b"",
    }
    for what, bad in damaged.items():
        with pytest.raises(CorruptEntry):
            decode_entry(bad)
            pytest.fail(what)


def test_survives_reopen_and_delivers_oldest_first(tmp_path, metrics, registry):
    spool = new_spool(tmp_path, metrics)
    ids = fill_spool(spool, 20)
    assert registry.get_sample_value("edgecatch_spool_items") == 20
    assert registry.get_sample_value("edgecatch_spool_bytes") == spool.bytes > 0
    reopened = new_spool(tmp_path, metrics)  # a new process, after a restart
    assert len(reopened) == 20
    assert drain(reopened) == ids
    assert registry.get_sample_value("edgecatch_spool_items") == 0
    assert list((tmp_path / "ready").iterdir()) == []


def test_files_are_owner_only(tmp_path, metrics):
    os.umask(0o022)
    spool = new_spool(tmp_path / "spool", metrics)
    fill_spool(spool, 2)
    claim = spool.claim()
    claim.record_image_id("img1")
    claim.release()
    for folder in ("", "ready", "tmp", "quarantine", "dead"):
        assert stat.S_IMODE((tmp_path / "spool" / folder).stat().st_mode) == 0o700, folder
    files = [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    assert len(files) == 4  # FORMAT, two entries, one state
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert "ECSPOOL1" in (tmp_path / "spool" / "FORMAT").read_text()


def test_image_id_state_survives_and_is_removed_with_the_entry(tmp_path, metrics):
    spool = new_spool(tmp_path, metrics)
    (sample_id,) = fill_spool(spool, 1)
    claim = spool.claim()
    assert claim.image_id is None
    claim.record_image_id("abc123")
    claim.release()
    claim = new_spool(tmp_path, metrics).claim()
    assert (claim.sample_id, claim.image_id) == (sample_id, "abc123")
    claim.done()
    assert list((tmp_path / "ready").iterdir()) == []


def test_corrupt_entries_are_quarantined_and_the_rest_delivered(tmp_path, metrics, registry):
    spool = new_spool(tmp_path, metrics)
    ids = fill_spool(spool, 6)
    ready = tmp_path / "ready"
    torn = ready / f"{ids[1]}.ecs"
    torn.write_bytes(torn.read_bytes()[:-100])  # torn: shorter than its header says
    flipped = ready / f"{ids[3]}.ecs"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the image: only the checksum can tell
    flipped.write_bytes(bytes(data))
    (ready / f"{ids[4]}.state").write_bytes(b"garbage")  # a damaged state file
    (ready / "0000notanentry.ecs").write_bytes(b"hello")

    reopened = new_spool(tmp_path, metrics)  # start: header checks catch the torn and bogus ones
    assert registry.get_sample_value("edgecatch_spool_quarantined_total") == 2
    assert drain(reopened) == [ids[0], ids[2], ids[5]]  # claim: checksums catch the others
    assert registry.get_sample_value("edgecatch_spool_quarantined_total") == 4
    quarantined = sorted(p.name for p in (tmp_path / "quarantine").iterdir())
    assert f"{ids[1]}.ecs" in quarantined and f"{ids[3]}.ecs" in quarantined
    assert f"{ids[4]}.state" in quarantined and f"{ids[4]}.ecs" in quarantined
    reason = (tmp_path / "quarantine" / f"{ids[3]}.ecs.reason.txt").read_text()
    assert "checksum" in reason
    assert new_spool(tmp_path, metrics).status().quarantined_items == 4  # entries; a state file is not one


def test_entries_that_cannot_be_used_are_skipped_and_the_rest_delivered(tmp_path, metrics, caplog, monkeypatch):
    spool = new_spool(tmp_path, metrics)
    ids = fill_spool(spool, 4)
    ready = tmp_path / "ready"
    (ready / "0000folder.ecs").mkdir()  # a folder and a FIFO named like entries: opening the spool
    os.mkfifo(ready / "0001fifo.ecs")  # used to raise, or to wait forever on the FIFO
    reopened = new_spool(tmp_path, metrics)
    assert "0000folder.ecs is skipped: not a regular file" in caplog.text
    assert "0001fifo.ecs is skipped: not a regular file" in caplog.text
    # An entry that cannot be opened any more (permissions changed under a running service):
    # skipped, not retried in front of every other sample.
    real_open = os.open
    unreadable = str(ready / f"{ids[0]}.ecs")

    def refusing_open(path, flags, *args):
        if str(path) == unreadable:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    assert drain(reopened) == ids[1:]
    assert f"{ids[0]}.ecs is skipped: cannot open it: Permission denied" in caplog.text
    monkeypatch.undo()
    assert (ready / f"{ids[0]}.ecs").exists()  # left for ops to look at, not moved or deleted


def test_leftovers_of_a_crashed_writer_are_cleaned(tmp_path, metrics):
    spool = new_spool(tmp_path, metrics)
    dead_pid = 2**22 + 12345  # above pid_max on this machine: no such process
    (tmp_path / "tmp" / f"x.ecs.{dead_pid}.1.tmp").write_bytes(b"half")
    (tmp_path / "ready" / f"{'0' * 32}.state").write_bytes(b"orphan")
    fill_spool(spool, 1)
    new_spool(tmp_path, metrics)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(list((tmp_path / "ready").iterdir())) == 1


def test_overflow_drop_oldest_by_items(tmp_path, metrics, registry, caplog):
    spool = new_spool(tmp_path, metrics, max_items=5, overflow="drop_oldest")
    ids = fill_spool(spool, 8)
    assert len(spool) == 5
    assert registry.get_sample_value("edgecatch_dropped_total", {"reason": "spool_full"}) == 3
    assert len([r for r in caplog.records if "spool full" in r.getMessage()]) == 1  # not one per drop
    assert drain(spool) == ids[3:]


def test_overflow_drop_newest_by_bytes(tmp_path, metrics, registry):
    record = make_record()
    size = len(encode_entry(record.to_json(), b"x" * 1000))
    spool = new_spool(tmp_path, metrics, max_bytes=3 * size + 10, overflow="drop_newest")
    records = [make_record() for _ in range(5)]
    assert spool.put_many([(r, b"x" * 1000) for r in records]) == [True, True, True, False, False]
    assert registry.get_sample_value("edgecatch_dropped_total", {"reason": "spool_full"}) == 2
    assert drain(spool) == [r.sample_id for r in records[:3]]


def test_drop_oldest_spares_entries_being_delivered(tmp_path, metrics):
    spool = new_spool(tmp_path, metrics, max_items=3)
    ids = fill_spool(spool, 3)
    claim = spool.claim()
    assert claim.sample_id == ids[0]
    fill_spool(spool, 1)
    assert (tmp_path / "ready" / f"{ids[0]}.ecs").exists()
    assert not (tmp_path / "ready" / f"{ids[1]}.ecs").exists()
    claim.done()


def test_dead_letters_retry_and_purge(tmp_path, metrics):
    spool = new_spool(tmp_path, metrics)
    ids = fill_spool(spool, 3)
    claim = spool.claim()
    claim.record_image_id("img9")
    claim.dead_letter("rejected", {"status": 422, "answer": "no"})
    status = spool.status()
    assert (status.ready_items, status.dead_items) == (2, 1)
    assert spool.retry_dead_letters() == 1
    claim = spool.claim()
    assert (claim.sample_id, claim.image_id) == (ids[0], "img9")  # back, image id kept, still oldest
    claim.release()
    assert spool.purge("ready") == 3
    assert spool.status().ready_items == 0


def test_sample_ids_are_required_in_file_names(tmp_path, metrics):
    spool = new_spool(tmp_path, metrics)
    with pytest.raises(ValueError):
        spool.put(make_record(sample_id="../../etc/passwd"), jpeg())


CLAIMER = textwrap.dedent("""
    import sys, time
    from prometheus_client import CollectorRegistry
    from edgecatch.delivery.spool import Spool
    from edgecatch.metrics import Metrics
    spool = Spool(sys.argv[1], max_bytes=10**9, max_items=10**6, metrics=Metrics(CollectorRegistry())).open()
    got = []
    idle = 0
    while idle < 20:
        claim = spool.claim()
        if claim is None:
            spool.scan(); idle += 1; time.sleep(0.01); continue
        idle = 0
        got.append(claim.sample_id)
        time.sleep(0.001)  # "delivering"
        claim.done()
    print("\\n".join(got))
""")


def test_processes_sharing_a_spool_never_take_the_same_entry(tmp_path, metrics):
    spool = new_spool(tmp_path, metrics)
    ids = fill_spool(spool, 400)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    taken = [sample_id for out in outputs for sample_id in out]
    assert sorted(taken) == sorted(ids)  # every entry once, none twice
    assert sum(1 for out in outputs if out) >= 2  # and they really shared the work


def test_one_periodic_rescan_at_a_time(tmp_path, metrics):
    """Busy delivery workers of one process find a rescan due together: one does it, the others go
    on (the folder may hold a large backlog)."""
    import threading
    import time as clock

    spool = Spool(tmp_path / "spool", max_bytes=10**9, max_items=10**6, metrics=metrics).open()
    scans = []
    real_scan = spool.scan

    def slow_scan(check_headers: bool = False) -> None:
        scans.append(threading.get_ident())
        clock.sleep(0.2)
        real_scan(check_headers)

    spool.scan = slow_scan
    spool._last_scan = 0.0
    threads = [threading.Thread(target=spool.maybe_rescan, args=(5.0,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(scans) == 1 and not spool.scan_due(5.0)
