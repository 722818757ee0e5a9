"""The local dataset sink: a folder a trainer can use as is.

    <path>/
      data.yaml              YOLO dataset file: path, train/val = images, names: {index: class}
                             (the model's class id where free; unused indices below the
                             highest are named `edgecatch-unused-<index>`: trainers need 0..n-1)
      images/<id>.jpg        detection samples
      labels/<id>.txt        one line per box: `index cx cy w h`, normalised to [0, 1]
      classes/<class>/<id>.jpg   classification samples, one folder per (top) class
      manifest.jsonl         one line per sample: ids, files, model, policy, tags, the pre-labels

File names come from sample ids only; class folder names are the model's class names made safe
(anything outside `A-Za-z0-9._-` becomes `_`). Files are written to a temporary name and renamed;
the manifest line is appended last, under an `flock` (several processes may share the folder), and
skipped when the sample's line is already there (a retry after a crash just before the spool entry
was removed).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import yaml

from edgecatch.delivery.config import DirectorySinkConfig
from edgecatch.delivery.errors import RejectedError, TransientError
from edgecatch.delivery.sample import SampleRecord

from . import OnImageStored, Outcome

__all__ = ["DirectorySink", "safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: A model's class ids above this are not used as dataset indices (every index below is named).
_MAX_MODEL_INDEX = 65535
MANIFEST_TAIL_BYTES = 1024 * 1024


def safe_name(name: str) -> str:
    """A folder name for a class name: the name itself when it is safe, else its safe characters
    and a short hash of the whole, so that two classes never share a folder ("cat/dog", "cat_dog")."""
    cleaned = _UNSAFE.sub("_", name)[:100].strip(".") or "_"
    if cleaned == name:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class DirectorySink:
    name = "directory"

    def __init__(self, config: DirectorySinkConfig) -> None:
        self.root = Path(config.path)
        self._lock = threading.Lock()
        self._classes: dict[str, int] = {}

    async def aclose(self) -> None:
        return None

    async def deliver(self, record: SampleRecord, image: bytes, image_id: str | None,
                      on_image_stored: OnImageStored) -> Outcome:
        try:
            return await asyncio.to_thread(self.write, record, image)
        except OSError as exc:  # disk full, permissions: may heal, keep the sample spooled
            raise TransientError(f"directory sink: {type(exc).__name__}: {exc.strerror or exc}",
                                 step="write") from None
        except ValueError as exc:
            raise RejectedError(f"directory sink: {exc}", step="write") from None

    def write(self, record: SampleRecord, image: bytes) -> Outcome:
        with self._lock, self._locked():
            entry: dict = {"sample_id": record.sample_id, "task": record.task,
                           "width": record.width, "height": record.height}
            if record.task == "classification":
                folder = self.root / "classes" / safe_name(record.top_class or "_unknown")
                self._put(folder / record.image_name, image)
                entry["image"] = str((folder / record.image_name).relative_to(self.root))
                entry["classification"] = [list(pair) for pair in record.classification]
            else:
                indices = self._class_indices(record)
                lines = []
                for d in record.detections:
                    x1, y1, x2, y2 = d.box
                    w, h = float(record.width), float(record.height)
                    lines.append(f"{indices[d.class_name]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                                 f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
                label = self.root / "labels" / f"{record.sample_id}.txt"
                self._put(label, ("\n".join(lines) + ("\n" if lines else "")).encode())
                self._put(self.root / "images" / record.image_name, image)
                entry["image"] = f"images/{record.image_name}"
                entry["label"] = f"labels/{record.sample_id}.txt"
                entry["detections"] = [
                    {"class": d.class_name, "class_id": indices[d.class_name], "confidence": d.confidence,
                     "box": list(d.box)} for d in record.detections]
            entry.update({k: v for k, v in record.metadata().items() if k != "sample_id"})
            entry["batch"] = record.batch
            return self._append_manifest(record.sample_id, entry)

    # -- pieces ----------------------------------------------------------------------------------

    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".edgecatch.lock"

        class _Lock:
            def __enter__(inner):
                inner.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(inner.fd, fcntl.LOCK_EX)
                return inner

            def __exit__(inner, *exc):
                fcntl.flock(inner.fd, fcntl.LOCK_UN)
                os.close(inner.fd)

        return _Lock()

    def _put(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _class_indices(self, record: SampleRecord) -> dict[str, int]:
        """The dataset's index for each class in the record; new classes are added to data.yaml."""
        wanted = {d.class_name: d.class_id for d in record.detections}
        if all(name in self._classes for name in wanted):
            return self._classes
        data_yaml = self.root / "data.yaml"
        names: dict[int, str] = {}
        if data_yaml.exists():  # another process may have added classes
            loaded = yaml.safe_load(data_yaml.read_text()) or {}
            names = {int(k): str(v) for k, v in (loaded.get("names") or {}).items()}
        self._classes = {name: index for index, name in names.items() if name != _unused(index)}
        changed = False
        for name, model_id in wanted.items():
            if name in self._classes:
                continue
            # The model's own id where it is free (a placeholder is), so labels read like the model's.
            free = 0 <= model_id <= _MAX_MODEL_INDEX and names.get(model_id, _unused(model_id)) == _unused(model_id)
            index = model_id if free else max(names, default=-1) + 1
            names[index] = name
            self._classes[name] = index
            changed = True
        if changed or not data_yaml.exists() or len(names) <= max(names, default=-1):
            # Trainers (YOLO's among them) need the indices 0..n-1 all named: gaps get placeholders
            # (a dataset written by an earlier version may have them too).
            for index in range(max(names, default=-1) + 1):
                names.setdefault(index, _unused(index))
            document = {"path": str(self.root.resolve()), "train": "images", "val": "images",
                        "names": dict(sorted(names.items()))}
            self._put(data_yaml, yaml.safe_dump(document, sort_keys=False, allow_unicode=True).encode())
        return self._classes

    def _append_manifest(self, sample_id: str, entry: dict) -> Outcome:
        manifest = self.root / "manifest.jsonl"
        marker = f'"sample_id":"{sample_id}"'.encode()
        fd = os.open(manifest, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - MANIFEST_TAIL_BYTES)
            if marker in os.pread(fd, size - start, start):
                return "duplicate"
            os.write(fd, json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return "delivered"


def _unused(index: int) -> str:
    """The name data.yaml gives an index no class of the samples has (yet)."""
    return f"edgecatch-unused-{index}"
