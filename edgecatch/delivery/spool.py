"""The spool: a durable, bounded, multi-process on-disk queue of prepared samples.

Layout (created mode 0700; every file mode 0600):

    <spool_dir>/
      FORMAT            this description, for whoever finds the folder
      ready/            <sample_id>.ecs entries waiting for delivery, oldest first by name
                        <sample_id>.state, when the image is already stored at the destination
      tmp/              entries being written (<sample_id>.<pid>.tmp); never read
      quarantine/       torn or corrupt entries, with <name>.reason.txt beside them
      dead/             rejected samples (<sample_id>.ecs), the destination's answer beside them
                        (<sample_id>.answer.json); `edgecatch spool retry-dead-letters` moves them back
      run/              not the spool's own: the collector's feedback-<pid>.sock (verdicts passed
                        between workers) and last-good-policies.yaml (see policies/store.py)

Entry format (`.ecs`), little-endian, self-describing and checked like prometheus_client's mmap files:

    0   8 bytes  magic b"ECSPOOL1" (the last byte is the format version)
    8   u32      R, length of the record (UTF-8 JSON, `SampleRecord.to_json()`)
    12  u32      I, length of the image bytes
    16  u32      CRC-32 of the R + I bytes that follow the header
    20  u32      CRC-32 of header bytes 0..19
    24  R bytes  record, then I bytes image; the file is exactly 24 + R + I bytes long

State file (`.state`): b"ECSTATE1", u32 length, u32 CRC-32, then JSON `{"image_id": "..."}`.

Durability: an entry is written under tmp/, fsynced, renamed into ready/ and the directory fsynced
before `put` returns; a state file the same way. A crash leaves either the old or the new file, never
half of one; what a crash can leave in tmp/ is removed at the next start.

Several processes (BentoML workers) may share one spool directory. An entry is claimed by taking an
exclusive `flock` on its open file (non-blocking); the kernel drops the lock when the process dies,
even by `kill -9`, so an entry is never stuck with a dead owner. After locking, the claimer checks
that the path still names the inode it locked (another process may have delivered and unlinked it
in between). Every change to an entry (state, dead letter, quarantine, removal) is made while
holding its lock. Bounds are enforced from this process's view of the folder, refreshed by rescans,
so with several writers they are approximate by at most what the others wrote since the last scan.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgecatch.metrics import Metrics

from .sample import SampleRecord, is_sample_id

__all__ = ["Claim", "CorruptEntry", "Spool", "SpoolStatus", "encode_entry", "decode_entry"]

log = logging.getLogger("edgecatch.delivery.spool")

MAGIC = b"ECSPOOL1"
STATE_MAGIC = b"ECSTATE1"
_HEADER = struct.Struct("<8sIIII")
_STATE_HEADER = struct.Struct("<8sII")
HEADER_SIZE = _HEADER.size  # 24
ENTRY_SUFFIX = ".ecs"
STATE_SUFFIX = ".state"
MAX_RECORD_BYTES = 16 * 1024 * 1024

Overflow = Literal["drop_oldest", "drop_newest"]


class CorruptEntry(ValueError):
    """An entry whose header, length or checksum does not hold."""


def encode_entry(record: bytes, image: bytes) -> bytes:
    body_crc = zlib.crc32(image, zlib.crc32(record))
    head = struct.pack("<8sIII", MAGIC, len(record), len(image), body_crc)
    return head + struct.pack("<I", zlib.crc32(head)) + record + image


def check_header(head: bytes, file_size: int | None = None) -> tuple[int, int, int]:
    """(record length, image length, body CRC) from a header; raises CorruptEntry."""
    if len(head) < HEADER_SIZE:
        raise CorruptEntry(f"truncated header ({len(head)} bytes)")
    magic, rlen, ilen, body_crc, head_crc = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise CorruptEntry("bad magic (not an edgecatch spool entry, or another format version)")
    if zlib.crc32(head[:20]) != head_crc:
        raise CorruptEntry("header checksum mismatch")
    if file_size is not None and file_size != HEADER_SIZE + rlen + ilen:
        raise CorruptEntry(f"size {file_size} != {HEADER_SIZE + rlen + ilen} announced (torn write?)")
    if rlen > MAX_RECORD_BYTES:
        raise CorruptEntry("record length out of range")
    return rlen, ilen, body_crc


def decode_entry(data: bytes) -> tuple[SampleRecord, bytes]:
    rlen, ilen, body_crc = check_header(data[:HEADER_SIZE], len(data))
    body = memoryview(data)[HEADER_SIZE:]
    if zlib.crc32(body) != body_crc:
        raise CorruptEntry("body checksum mismatch")
    try:
        record = SampleRecord.from_json(bytes(body[:rlen]))
    except Exception as exc:
        raise CorruptEntry(f"unreadable record: {type(exc).__name__}: {exc}") from None
    return record, bytes(body[rlen:])


def _encode_state(state: dict) -> bytes:
    raw = json.dumps(state, separators=(",", ":")).encode()
    return _STATE_HEADER.pack(STATE_MAGIC, len(raw), zlib.crc32(raw)) + raw


def _decode_state(data: bytes) -> dict:
    if len(data) < _STATE_HEADER.size:
        raise CorruptEntry("truncated state file")
    magic, length, crc = _STATE_HEADER.unpack_from(data)
    raw = data[_STATE_HEADER.size:]
    if magic != STATE_MAGIC or len(raw) != length or zlib.crc32(raw) != crc:
        raise CorruptEntry("state file checksum mismatch")
    state = json.loads(raw)
    if not isinstance(state, dict):
        raise CorruptEntry("state is not an object")
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(tmp_dir: Path, target: Path, data: bytes) -> None:
    """Write beside, fsync, rename over `target`, fsync the target's folder."""
    tmp = tmp_dir / f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        _write_file(tmp, data)
        os.replace(tmp, target)
    except OSError:
        _unlink_quiet(tmp)  # a full disk must not also leave half-written files behind
        raise
    _fsync_dir(target.parent)


def _read_fd(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    ready_items: int
    ready_bytes: int
    with_image_stored: int
    dead_items: int
    quarantined_items: int
    oldest_created: float | None

    def as_dict(self) -> dict:
        return {
            "ready_items": self.ready_items, "ready_bytes": self.ready_bytes,
            "with_image_stored": self.with_image_stored, "dead_items": self.dead_items,
            "quarantined_items": self.quarantined_items, "oldest_created": self.oldest_created,
        }


class Claim:
    """An entry locked by this process for delivery. Exactly one of done/release/dead_letter ends it."""

    __slots__ = ("_spool", "_fd", "name", "size", "record", "image", "image_id", "_closed")

    def __init__(self, spool: Spool, fd: int, name: str, size: int, record: SampleRecord, image: bytes,
                 image_id: str | None) -> None:
        self._spool = spool
        self._fd = fd
        self.name = name
        self.size = size
        self.record = record
        self.image = image
        self.image_id = image_id
        self._closed = False

    @property
    def sample_id(self) -> str:
        return self.record.sample_id

    def record_image_id(self, image_id: str) -> None:
        """Remember (durably) that the image is stored at the destination under `image_id`."""
        self._spool._write_state(self.name, {"image_id": image_id})
        self.image_id = image_id

    def done(self) -> None:
        """Delivered: remove the entry (then its state), then unlock."""
        self._spool._finish(self, remove=True)

    def release(self, behind_others_for: float = 0.0) -> None:
        """Not delivered now: unlock; the entry stays for a later attempt. `behind_others_for`
        (seconds): meanwhile the others are claimed first, so a sample the destination keeps
        failing does not hold back those behind it."""
        self._spool._finish(self, remove=False)
        if behind_others_for > 0:
            with self._spool._lock:
                self._spool._busy_elsewhere[self.name] = time.monotonic() + behind_others_for

    def dead_letter(self, reason: str, answer: dict) -> None:
        """Rejected for good: move to dead/ with the destination's answer (already redacted) beside it."""
        self._spool._dead_letter(self, reason, answer)


class Spool:
    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int, max_items: int,
                 overflow: Overflow = "drop_oldest", metrics: Metrics, clock=time.time) -> None:
        self.directory = Path(directory)
        self.ready_dir = self.directory / "ready"
        self.tmp_dir = self.directory / "tmp"
        self.quarantine_dir = self.directory / "quarantine"
        self.dead_dir = self.directory / "dead"
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.overflow = overflow
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one periodic rescan at a time (maybe_rescan)
        self._index: OrderedDict[str, int] = OrderedDict()  # entry file name -> size, oldest first
        self._bytes = 0
        self._claimed: set[str] = set()
        self._busy_elsewhere: dict[str, float] = {}
        self._unusable_logged: set[str] = set()
        self._last_scan = 0.0
        self._overflow_logged = -1e9
        self._overflow_count = 0
        self._dropped_full = metrics.dropped.labels("spool_full")
        self._dropped_error = metrics.dropped.labels("spool_error")
        self._opened = False

    # -- opening and scanning ------------------------------------------------------------------

    def open(self) -> Spool:
        for folder in (self.directory, self.ready_dir, self.tmp_dir, self.quarantine_dir, self.dead_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_uid == os.getuid():
                os.chmod(folder, 0o700)
        fmt = self.directory / "FORMAT"
        if not fmt.exists():
            _atomic_write(self.tmp_dir, fmt, (__doc__ or "").encode())
        self._clean_tmp()
        self.scan(check_headers=True)
        self._opened = True
        return self

    def _clean_tmp(self) -> None:
        """Remove what dead writers left in tmp/ (a live process's temp files are kept)."""
        for entry in os.scandir(self.tmp_dir):
            parts = entry.name.split(".")
            pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass

    def scan(self, check_headers: bool = False) -> None:
        """Rebuild the index from ready/ (picks up other processes' entries and removals)."""
        found: list[tuple[str, int]] = []
        states: set[str] = set()
        for entry in os.scandir(self.ready_dir):
            name = entry.name
            if name.endswith(STATE_SUFFIX):
                states.add(name[: -len(STATE_SUFFIX)])
                continue
            if not name.endswith(ENTRY_SUFFIX):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    self._unusable(name, "not a regular file")  # a folder or a FIFO named like an entry
                    continue
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            if check_headers and not self._header_ok(entry.path, size):
                continue
            found.append((name, size))
        found.sort()
        names = {name[: -len(ENTRY_SUFFIX)] for name, _ in found}
        if check_headers:
            for stem in states - names:  # left by a crash between the two unlinks of `done`
                _unlink_quiet(self.ready_dir / f"{stem}{STATE_SUFFIX}")
        with self._lock:
            # Entries this process spooled while the folder was being listed are not in `found`:
            # keep those that still exist, or they would wait for the next scan.
            merged = dict(found)
            for name, size in self._index.items():
                if name not in merged and os.path.exists(self.ready_dir / name):
                    merged[name] = size
            self._index = OrderedDict(sorted(merged.items()))
            self._bytes = sum(self._index.values())
            self._last_scan = time.monotonic()
            now = time.monotonic()
            self._busy_elsewhere = {k: v for k, v in self._busy_elsewhere.items() if v > now}
        self._update_gauges()

    def _unusable(self, name: str, why: str) -> None:
        """An entry that cannot be used is left where it is (it may be another user's, or ops' to
        inspect) and skipped, with an error once per name, instead of stopping delivery."""
        if name not in self._unusable_logged and len(self._unusable_logged) < 10_000:
            self._unusable_logged.add(name)
            log.error("spool entry %s is skipped: %s", self.ready_dir / name, why)

    def _header_ok(self, path: str, size: int) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never wait on a FIFO
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._unusable(os.path.basename(path), f"cannot open it: {exc.strerror}")
            return False
        try:
            check_header(os.pread(fd, HEADER_SIZE, 0), size)
            return True
        except CorruptEntry as exc:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # someone is on it; whoever claims it checks it fully
            self._quarantine_path(Path(path), str(exc))
            return False
        finally:
            os.close(fd)

    def maybe_rescan(self, max_age: float) -> None:
        """Rescan if the last scan is older than max_age; a rescan already under way (another
        delivery worker's) is enough, not waited for, and not repeated."""
        if self.scan_due(max_age) and self._scan_lock.acquire(blocking=False):
            try:
                if self.scan_due(max_age):
                    self.scan()
            finally:
                self._scan_lock.release()

    def scan_due(self, max_age: float) -> bool:
        return time.monotonic() - self._last_scan >= max_age

    # -- writing -------------------------------------------------------------------------------

    def put(self, record: SampleRecord, image: bytes) -> bool:
        return self.put_many([(record, image)])[0]

    def put_many(self, items: list[tuple[SampleRecord, bytes]]) -> list[bool]:
        """Spool several samples with one directory fsync (group commit). False = dropped (counted).

        Each entry is written and fsynced under tmp/ and renamed into ready/ at once (so the bounds
        see it); the one directory fsync at the end makes all the renames durable before returning.
        """
        accepted: list[bool] = []
        renamed = False
        try:
            for record, image in items:
                if not is_sample_id(record.sample_id):
                    raise ValueError("sample ids are generated by edgecatch")
                data = encode_entry(record.to_json(), image)
                name = f"{record.sample_id}{ENTRY_SUFFIX}"
                if not self._make_room(len(data)):
                    self._dropped_full.inc()
                    self._log_overflow("a new sample")
                    accepted.append(False)
                    continue
                tmp = self.tmp_dir / f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
                try:
                    _write_file(tmp, data)
                    os.rename(tmp, self.ready_dir / name)
                except OSError as exc:  # disk full, quota: this one is lost, say so
                    _unlink_quiet(tmp)
                    self._dropped_error.inc()
                    log.error("could not write sample %s to the spool: %s", record.sample_id, exc)
                    accepted.append(False)
                    continue
                renamed = True
                with self._lock:
                    self._index[name] = len(data)
                    self._bytes += len(data)
                accepted.append(True)
        finally:
            if renamed:
                _fsync_dir(self.ready_dir)
            self._update_gauges()
        return accepted

    def _make_room(self, size: int) -> bool:
        """Apply the overflow rule so one more entry of `size` bytes fits. False = drop the new one."""
        if size > self.max_bytes:
            return False
        victims: list[str] = []
        with self._lock:
            items = len(self._index) + 1
            total = self._bytes + size

            def fits() -> bool:
                return items <= self.max_items and total <= self.max_bytes

            if fits():
                return True
            if self.overflow == "drop_newest":
                return False
            for name, victim_size in self._index.items():
                if fits():
                    break
                if name in self._claimed:
                    continue
                victims.append(name)
                items -= 1
                total -= victim_size
            if not fits():
                return False
        for name in victims:
            self._drop_oldest(name)
        return True

    def _drop_oldest(self, name: str) -> None:
        path = self.ready_dir / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(name)
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # being delivered elsewhere: it leaves anyway
            if not _same_file(fd, path):
                return
            _unlink_quiet(path)
            _unlink_quiet(self.ready_dir / f"{name[: -len(ENTRY_SUFFIX)]}{STATE_SUFFIX}")
            self._dropped_full.inc()
            self._log_overflow("the oldest sample")
        finally:
            os.close(fd)
            self._forget(name)

    def _log_overflow(self, which: str) -> None:
        """One warning a minute at most: a full spool drops on every put, the log must not flood."""
        self._overflow_count += 1
        now = time.monotonic()
        if now - self._overflow_logged >= 60.0:
            log.warning("spool full (%d items, %d bytes; bounds %d items, %d bytes): dropped %s; "
                        "%d dropped since the last warning (edgecatch_dropped_total{reason=\"spool_full\"})",
                        len(self._index), self._bytes, self.max_items, self.max_bytes, which,
                        self._overflow_count)
            self._overflow_logged = now
            self._overflow_count = 0

    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self._bytes -= size
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.spool_items.set(len(self._index))
        self.metrics.spool_bytes.set(self._bytes)
        try:
            oldest = next(iter(self._index), None)
        except RuntimeError:  # changed by another thread just now: its own update follows
            return
        self.metrics.spool_oldest.set((_created(oldest) or 0.0) if oldest else 0.0)

    # -- claiming ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    @property
    def bytes(self) -> int:
        return self._bytes

    def pending(self) -> int:
        """Entries in this process's view that nobody here is delivering."""
        with self._lock:
            return len(self._index) - len(self._claimed)

    def claim(self) -> Claim | None:
        """Lock, read and verify the oldest entry nobody else holds; None when there is none.

        The scan stops at the first candidate, so a claim costs O(entries being delivered), not
        O(entries waiting): the backlog can be large.
        """
        now = time.monotonic()
        skipped: set[str] = set()
        claimed, busy = self._claimed, self._busy_elsewhere
        while True:
            with self._lock:
                name = next((n for n in self._index
                             if n not in claimed and n not in skipped and busy.get(n, 0.0) <= now), None)
                if name is None:
                    return None
                claimed.add(name)
            claim = None
            try:
                claim = self._try_claim(name)
            finally:
                if claim is None:
                    with self._lock:
                        claimed.discard(name)
            if claim is not None:
                return claim
            skipped.add(name)

    def _try_claim(self, name: str) -> Claim | None:
        path = self.ready_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            self._forget(name)
            return None
        except OSError as exc:  # unreadable now (permissions changed): skip it, do not block the rest
            self._unusable(name, f"cannot open it: {exc.strerror}")
            self._forget(name)
            return None
        keep = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with self._lock:
                    self._busy_elsewhere[name] = time.monotonic() + 5.0
                return None
            if not _same_file(fd, path):
                self._forget(name)
                return None
            size = os.fstat(fd).st_size
            try:
                try:
                    data = _read_fd(fd, size)
                except OSError as exc:
                    self._unusable(name, f"cannot read it: {exc.strerror}")
                    self._forget(name)
                    return None
                record, image = decode_entry(data)
                if f"{record.sample_id}{ENTRY_SUFFIX}" != name:
                    raise CorruptEntry("record's sample id does not match the file name")
                image_id = None
                state_path = self.ready_dir / f"{record.sample_id}{STATE_SUFFIX}"
                try:
                    state = _decode_state(state_path.read_bytes())
                    image_id = str(state["image_id"]) if state.get("image_id") else None
                except FileNotFoundError:
                    pass
                except (CorruptEntry, KeyError, ValueError) as exc:
                    raise CorruptEntry(f"state file: {exc}") from None
            except CorruptEntry as exc:
                self._quarantine_path(path, str(exc))
                self._forget(name)
                return None
            keep = True
            return Claim(self, fd, name, size, record, image, image_id)
        finally:
            if not keep:
                os.close(fd)

    def _write_state(self, name: str, state: dict) -> None:
        stem = name[: -len(ENTRY_SUFFIX)]
        _atomic_write(self.tmp_dir, self.ready_dir / f"{stem}{STATE_SUFFIX}", _encode_state(state))

    def _finish(self, claim: Claim, remove: bool) -> None:
        if claim._closed:
            return
        claim._closed = True
        try:
            if remove:
                stem = claim.name[: -len(ENTRY_SUFFIX)]
                _unlink_quiet(self.ready_dir / claim.name)
                # The entry's removal must be durable before its state goes: otherwise a power loss
                # could bring back the entry without the image id, and the image would be sent twice.
                if claim.image_id is not None:
                    _fsync_dir(self.ready_dir)
                    _unlink_quiet(self.ready_dir / f"{stem}{STATE_SUFFIX}")
        finally:
            os.close(claim._fd)
            with self._lock:
                self._claimed.discard(claim.name)
            if remove:
                self._forget(claim.name)

    def _dead_letter(self, claim: Claim, reason: str, answer: dict) -> None:
        if claim._closed:
            return
        stem = claim.name[: -len(ENTRY_SUFFIX)]
        try:
            answer = {"reason": reason, "sample_id": stem, "time": self._clock(), **answer}
            _atomic_write(self.tmp_dir, self.dead_dir / f"{stem}.answer.json",
                          json.dumps(answer, indent=2, ensure_ascii=False).encode())
            state = self.ready_dir / f"{stem}{STATE_SUFFIX}"
            if state.exists():
                os.replace(state, self.dead_dir / state.name)
            os.replace(self.ready_dir / claim.name, self.dead_dir / claim.name)
            _fsync_dir(self.dead_dir)
            _fsync_dir(self.ready_dir)
        finally:
            claim._closed = True
            os.close(claim._fd)
            with self._lock:
                self._claimed.discard(claim.name)
            self._forget(claim.name)

    def _quarantine_path(self, path: Path, reason: str) -> None:
        """Move a bad entry (held locked by the caller) aside, with the reason; count it."""
        target = self.quarantine_dir / path.name
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        stem = path.name[: -len(ENTRY_SUFFIX)] if path.name.endswith(ENTRY_SUFFIX) else path.name
        state = path.parent / f"{stem}{STATE_SUFFIX}"
        if state.exists():
            os.replace(state, self.quarantine_dir / state.name)
        _atomic_write(self.tmp_dir, self.quarantine_dir / f"{path.name}.reason.txt", f"{reason}\n".encode())
        self.metrics.spool_quarantined.inc()
        log.error("spool entry %s is corrupt (%s): moved to %s", path.name, reason, self.quarantine_dir)

    # -- operations (the `edgecatch spool` command) --------------------------------------------

    def status(self) -> SpoolStatus:
        self.scan()
        with self._lock:
            names = list(self._index)
            total = self._bytes
        oldest = _created(names[0]) if names else None
        states = sum(1 for e in os.scandir(self.ready_dir) if e.name.endswith(STATE_SUFFIX))
        dead = sum(1 for e in os.scandir(self.dead_dir) if e.name.endswith(ENTRY_SUFFIX))
        quarantined = sum(1 for e in os.scandir(self.quarantine_dir)  # entries, not their state or reason
                          if not e.name.endswith((".reason.txt", STATE_SUFFIX)))
        return SpoolStatus(len(names), total, states, dead, quarantined, oldest)

    def retry_dead_letters(self) -> int:
        """Move every dead letter back into ready/ (keeping any stored image id). Returns how many."""
        moved = 0
        for entry in sorted(os.scandir(self.dead_dir), key=lambda e: e.name):
            if not entry.name.endswith(ENTRY_SUFFIX):
                continue
            stem = entry.name[: -len(ENTRY_SUFFIX)]
            state = self.dead_dir / f"{stem}{STATE_SUFFIX}"
            if state.exists():
                os.replace(state, self.ready_dir / state.name)
            os.replace(entry.path, self.ready_dir / entry.name)
            _unlink_quiet(self.dead_dir / f"{stem}.answer.json")
            moved += 1
        if moved:
            _fsync_dir(self.ready_dir)
        self.scan()
        return moved

    def purge(self, what: Literal["ready", "dead", "quarantine"]) -> int:
        """Delete every entry of one folder (ready entries being delivered right now are skipped)."""
        removed = 0
        if what == "ready":
            self.scan()
            for name in list(self._index):
                path = self.ready_dir / name
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    if _same_file(fd, path):
                        _unlink_quiet(path)
                        _unlink_quiet(self.ready_dir / f"{name[: -len(ENTRY_SUFFIX)]}{STATE_SUFFIX}")
                        removed += 1
                finally:
                    os.close(fd)
            self.scan()
            return removed
        folder = self.dead_dir if what == "dead" else self.quarantine_dir
        for entry in os.scandir(folder):
            # Count entries, not the files beside them (answers, reasons, states).
            if not entry.name.endswith((".answer.json", ".reason.txt", STATE_SUFFIX)):
                removed += 1
            _unlink_quiet(Path(entry.path))
        return removed


def _created(name: str) -> float | None:
    """An entry's creation time from its name (sample ids start with milliseconds in hex)."""
    try:
        return int(name[:12], 16) / 1000.0
    except ValueError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev) and mine.st_nlink > 0


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
