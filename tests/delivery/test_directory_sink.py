"""The directory sink: a dataset a trainer can use as is (YOLO layout, class folders, manifest)."""

from __future__ import annotations

import asyncio
import json

import yaml

from edgecatch.delivery.config import DirectorySinkConfig
from edgecatch.delivery.sample import SampleDetection
from edgecatch.delivery.sinks.directory import DirectorySink

from .conftest import jpeg, make_record


async def _nothing(image_id: str) -> None:
    raise AssertionError("a one-step sink has no image id to record")


def deliver(sink, record, image):
    return asyncio.run(sink.deliver(record, image, None, _nothing))


def test_detection_yolo_layout(tmp_path):
    sink = DirectorySink(DirectorySinkConfig(path=tmp_path / "ds"))
    first = make_record(width=200, height=100, detections=(
        SampleDetection("person", 0, 0.4, (50, 25, 150, 75)), SampleDetection("dog", 16, 0.3, (0, 0, 200, 100))))
    second = make_record(width=200, height=100, detections=(
        SampleDetection("cat", 0, 0.2, (10, 10, 30, 20)),))  # another model's id 0: gets a free index
    empty = make_record(detections=())
    for record in (first, second, empty):
        assert deliver(sink, record, jpeg()) == "delivered"
    root = tmp_path / "ds"
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data["names"] == {0: "person", **{i: f"edgecatch-unused-{i}" for i in range(1, 16)}, 16: "dog", 17: "cat"}
    assert (root / data["train"]).is_dir() and data["path"] == str(root.resolve())
    assert (root / "labels" / f"{first.sample_id}.txt").read_text().splitlines() == [
        "0 0.500000 0.500000 0.500000 0.500000", "16 0.500000 0.500000 1.000000 1.000000"]
    assert (root / "labels" / f"{second.sample_id}.txt").read_text() == "17 0.100000 0.150000 0.100000 0.100000\n"
    assert (root / "labels" / f"{empty.sample_id}.txt").read_text() == ""  # a background image
    assert (root / "images" / first.image_name).read_bytes()[:2] == b"\xff\xd8"
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert [line["sample_id"] for line in lines] == [first.sample_id, second.sample_id, empty.sample_id]
    assert lines[0]["image"] == f"images/{first.image_name}" and lines[0]["policy"] == "low-confidence"
    assert lines[0]["detections"][1] == {"class": "dog", "class_id": 16, "confidence": 0.3, "box": [0, 0, 200, 100]}


def test_data_yaml_names_every_index_a_trainer_counts(tmp_path):
    """YOLO trainers take the class count from `names` and refuse an index at or above it: a model
    whose first sampled class has id 1 must not give `names: {1: face}`."""
    sink = DirectorySink(DirectorySinkConfig(path=tmp_path / "ds"))
    root = tmp_path / "ds"
    records = []

    def names_after(*detections):
        records.append(make_record(width=200, height=100, detections=detections))
        assert deliver(sink, records[-1], jpeg()) == "delivered"
        names = yaml.safe_load((root / "data.yaml").read_text())["names"]
        assert sorted(names) == list(range(len(names)))  # 0..n-1, each named
        return names

    assert names_after(SampleDetection("face", 1, 0.5, (0, 0, 10, 10))) == {0: "edgecatch-unused-0", 1: "face"}
    # The class the placeholder stood for takes its own id, in this process and in another one.
    other = DirectorySink(DirectorySinkConfig(path=root))
    records.append(make_record(detections=(SampleDetection("person", 0, 0.5, (0, 0, 10, 10)),)))
    assert deliver(other, records[-1], jpeg()) == "delivered"
    assert names_after(SampleDetection("face", 1, 0.4, (0, 0, 10, 10))) == {0: "person", 1: "face"}
    # A dataset an earlier version left with gaps is completed by the first sample delivered into it.
    (root / "data.yaml").write_text("path: x\ntrain: images\nval: images\nnames: {0: person, 1: face, 3: dog}\n")
    sink = DirectorySink(DirectorySinkConfig(path=root))
    assert names_after(SampleDetection("face", 1, 0.4, (0, 0, 10, 10))) == {
        0: "person", 1: "face", 2: "edgecatch-unused-2", 3: "dog"}
    # An id far out of range does not make a data.yaml of millions of placeholders.
    assert names_after(SampleDetection("rare", 10**9, 0.5, (0, 0, 10, 10))) == {
        0: "person", 1: "face", 2: "edgecatch-unused-2", 3: "dog", 4: "rare"}
    assert [(root / "labels" / f"{r.sample_id}.txt").read_text().split()[0] for r in records] == [
        "1", "0", "1", "1", "4"]


def test_classification_folders_and_unsafe_class_names(tmp_path):
    sink = DirectorySink(DirectorySinkConfig(path=tmp_path / "ds"))
    cat = make_record("classification")
    odd = make_record("classification", classification=(("../../etc passwd", 0.9),))
    deliver(sink, cat, jpeg())
    deliver(sink, odd, jpeg())
    assert (tmp_path / "ds" / "classes" / "cat" / cat.image_name).exists()
    (folder,) = [p for p in (tmp_path / "ds" / "classes").iterdir() if p.name != "cat"]
    assert folder.name.startswith("_.._etc_passwd-") and (folder / odd.image_name).exists()
    assert not (tmp_path / "etc").exists()


def test_class_names_never_share_a_folder(tmp_path):
    sink = DirectorySink(DirectorySinkConfig(path=tmp_path / "ds"))
    names = ["cat/dog", "cat_dog", "猫", "狗", "..", "."]
    for name in names:
        deliver(sink, make_record("classification", classification=((name, 0.9),)), jpeg())
    folders = [p for p in (tmp_path / "ds" / "classes").iterdir()]
    assert len(folders) == len(names) and all(len(list(f.iterdir())) == 1 for f in folders)
    assert (tmp_path / "ds" / "classes" / "cat_dog").is_dir()  # a safe name is kept as it is


def test_redelivery_after_a_crash_does_not_duplicate_the_manifest(tmp_path):
    sink = DirectorySink(DirectorySinkConfig(path=tmp_path / "ds"))
    record = make_record()
    image = jpeg()
    assert deliver(sink, record, image) == "delivered"
    # A crash before the spool entry was removed: the same sample comes again (maybe in another process).
    assert deliver(DirectorySink(DirectorySinkConfig(path=tmp_path / "ds")), record, image) == "duplicate"
    assert len((tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()) == 1
