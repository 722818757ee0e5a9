"""The recall buffer's bounds (items, bytes, age) and its verdict rules."""

from __future__ import annotations

import threading

from edgecatch.observation import Observation
from edgecatch.recall import ENTRY_OVERHEAD_BYTES, RecallBuffer, image_nbytes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def obs(n: int) -> Observation:
    return Observation(model="m", inference_id=f"id-{n}")


def test_bounded_in_items_oldest_leave_first():
    buffer = RecallBuffer(max_items=3, clock=Clock())
    evicted = []
    for n in range(5):
        evicted += buffer.put(f"id-{n}", obs(n), b"x")
    assert [e.observation.inference_id for e in evicted] == ["id-0", "id-1"]
    assert len(buffer) == 3


def test_bounded_in_bytes_counting_images_and_overhead():
    buffer = RecallBuffer(max_bytes=3 * (1000 + ENTRY_OVERHEAD_BYTES), clock=Clock())
    for n in range(3):
        assert buffer.put(f"id-{n}", obs(n), b"x" * 1000) == []
    assert buffer.nbytes == 3 * (1000 + ENTRY_OVERHEAD_BYTES)
    evicted = buffer.put("big", obs(9), b"x" * 2500)
    assert [e.observation.inference_id for e in evicted] == ["id-0", "id-1"]
    assert len(buffer) == 2 and buffer.nbytes <= buffer.max_bytes
    too_big = buffer.put("huge", obs(10), b"x" * 10_000)
    assert [e.observation.inference_id for e in too_big] == ["id-10"]  # never stored
    assert len(buffer) == 2


def test_bounded_in_age():
    clock = Clock()
    buffer = RecallBuffer(max_age_seconds=10, clock=clock)
    buffer.put("a", obs(1), b"")
    clock.now = 5
    buffer.put("b", obs(2), b"")
    clock.now = 10
    assert [e.observation.inference_id for e in buffer.expire()] == ["id-1"]
    assert buffer.give_verdict("a", "incorrect") == (None, False)
    clock.now = 14.9
    entry, first = buffer.give_verdict("b", "incorrect")
    assert first and entry.observation.inference_id == "id-2"
    clock.now = 20
    # A put also pushes out what has aged, so a quiet service without a sweep still forgets.
    assert [e.observation.inference_id for e in buffer.put("c", obs(3), b"")] == ["id-2"]


def test_one_verdict_per_prediction_and_it_is_remembered():
    buffer = RecallBuffer(clock=Clock())
    buffer.put("a", obs(1), b"")
    entry, first = buffer.give_verdict("a", "incorrect")
    assert first and entry.verdict == "incorrect"
    again, first = buffer.give_verdict("a", "correct")
    assert again.observation == entry.observation and not first and again.verdict == "incorrect"
    assert buffer.give_verdict("nope", "correct") == (None, False)


def test_image_cost_prefers_encoded_length():
    from PIL import Image

    assert image_nbytes(b"abc") == 3
    assert image_nbytes(Image.new("RGB", (10, 20))) == 600
    assert image_nbytes(None) == 0


def test_concurrent_puts_keep_the_accounting_exact():
    buffer = RecallBuffer(max_items=500, clock=Clock())

    def worker(offset: int) -> None:
        for n in range(2000):
            buffer.put(f"{offset}-{n}", obs(n), b"x" * 10)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(buffer) == 500
    assert buffer.nbytes == 500 * (10 + ENTRY_OVERHEAD_BYTES)


def test_entries_come_back_equal_and_are_left_alone_by_the_cyclic_gc():
    """Remembered predictions are plain tuples: Python's GC stops tracking them, so its full
    collections do not walk thousands of recent predictions again and again."""
    import gc

    from edgecatch.observation import Classification, Detection

    detected = Observation(model="m", model_version="3", image_width=640, image_height=480,
                           detections=(Detection("person", 0.9, (1.0, 2.0, 3.0, 4.0), 0),
                                       Detection("face", 0.4, (5.0, 6.0, 7.0, 8.0))),
                           inference_id="id-d", timestamp=1.5, extra={"route": "/v2/x"})
    classified = Observation(model="c", classification=Classification.from_scores({"cat": 0.7, "dog": 0.3}),
                             inference_id="id-c")
    buffer = RecallBuffer(max_items=10, clock=Clock())
    buffer.put("id-d", detected, b"jpeg")
    buffer.put("id-c", classified, b"jpeg")
    gc.collect(0)  # one young collection is enough: entries never reach the old generations tracked
    assert not any(gc.is_tracked(entry) for entry in buffer._entries.values())
    entry, first = buffer.give_verdict("id-d", "correct")
    assert first and entry.observation == detected and entry.observation.extra == {"route": "/v2/x"}
    assert entry.image == b"jpeg"
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in buffer._entries.values())
    assert [e.observation for e in buffer.expire()] == []
    Clock.now = 0.0
    evicted = RecallBuffer(max_items=1, clock=Clock())
    evicted.put("id-c", classified, b"jpeg")
    (gone,) = evicted.put("id-d", detected, b"jpeg")
    assert gone.observation == classified and gone.verdict is None


def test_images_live_in_a_reused_ring_and_stay_intact_while_remembered():
    """Encoded images are copied into a ring of max_bytes plus a margin: every remembered entry's
    image comes back intact across many wraps; an evicted one keeps it only for the margin."""
    import os

    size = 1000
    buffer = RecallBuffer(max_bytes=5 * (size + ENTRY_OVERHEAD_BYTES), clock=Clock())
    images = {}
    evicted = []
    for n in range(200):  # ~40 times around the ring, with images of varying length
        image = os.urandom(size - n % 7)
        images[f"id-{n}"] = image
        evicted += buffer.put(f"id-{n}", obs(n), image)
        for key in list(buffer._entries):  # every remembered image is intact
            entry, _ = buffer.give_verdict(key, "correct")
            assert entry.image == images[key], (n, key)
    assert 4 <= len(buffer) <= 5 and len(evicted) == 200 - len(buffer)
    # The last evicted entry still has its image (the margin); one evicted long ago does not.
    assert evicted[-1].image == images[evicted[-1].observation.inference_id]
    assert evicted[0].image is None
    assert buffer._ring.capacity <= 2 * buffer.max_bytes  # memory: max_bytes and a margin (1/8, >= 1 MB)


def test_a_forked_process_does_not_write_into_the_parents_images():
    """The ring is private memory: a child forked after images were remembered (a server forking
    its workers, a user's subprocess) fills its own copy, and the parent's images stay intact."""
    import os

    size = 1000
    buffer = RecallBuffer(max_bytes=5 * (size + ENTRY_OVERHEAD_BYTES), clock=Clock())
    image = os.urandom(size)
    buffer.put("parent", obs(1), image)
    pid = os.fork()
    if pid == 0:  # the child: go around the ring several times, then leave without cleanup
        try:
            for n in range(50):
                buffer.put(f"child-{n}", obs(n), bytes([n % 256]) * size)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    entry, _ = buffer.give_verdict("parent", "correct")
    assert entry.image == image


def test_images_that_are_not_bytes_are_kept_as_they_are():
    buffer = RecallBuffer(max_items=2, clock=Clock())
    pixels = bytearray(b"raw")  # bytes-like: copied into the ring
    buffer.put("a", obs(1), pixels)
    pixels[:] = b"new"  # the caller's buffer changing later does not change what was remembered
    assert buffer.give_verdict("id-1", "correct")[0] is None  # (keyed by the id given to put)
    entry, _ = buffer.give_verdict("a", "correct")
    assert entry.image == b"raw"

    class Pixels:  # e.g. a decoded image: neither copied nor converted
        nbytes = 12

    picture = Pixels()
    buffer.put("b", obs(2), picture)
    assert buffer.give_verdict("b", "correct")[0].image is picture


def test_a_memoryview_that_is_not_flat_bytes_is_kept_as_it_is():
    import array

    buffer = RecallBuffer(clock=Clock())
    pixels = memoryview(array.array("H", [1, 2, 3]))  # 2-byte items: not copied into the ring
    buffer.put("a", obs(1), pixels)
    assert buffer.give_verdict("a", "correct")[0].image is pixels
    flat = memoryview(b"0123456789")[2:6]
    buffer.put("b", obs(2), flat)
    assert buffer.give_verdict("b", "correct")[0].image == b"2345"
