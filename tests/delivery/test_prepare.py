"""Image preparation: decode, EXIF orientation, resize keeping the aspect ratio, boxes that still fit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgecatch.delivery.prepare import ImageError, build_record, prepare_image
from edgecatch.delivery.spool import decode_entry, encode_entry
from edgecatch.observation import Classification, Detection, Observation
from edgecatch.policies.decision import Decision

DECISION = Decision(selected=True, policy="low", tags=("low",), batch="b-1", reasons={"low": "conf < 0.5"})


def marked_image(width: int, height: int, box: tuple[int, int, int, int], orientation: int = 1,
                 fmt: str = "JPEG") -> bytes:
    """A grey image with a red rectangle at `box` (in stored pixels), EXIF orientation set."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste((255, 0, 0), box)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def redness(image: Image.Image, x: float, y: float) -> bool:
    r, g, b = image.convert("RGB").getpixel((int(x), int(y)))
    return r > 180 and g < 90 and b < 90


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_exif_orientation_and_resize(orientation):
    box = (40, 20, 120, 60)  # in the stored 400x200 pixels, as PIL/numpy give them to a model
    data = marked_image(400, 200, box, orientation)
    observation = Observation(model="m", image_width=400, image_height=200,
                              detections=(Detection("thing", 0.3, box, 2),))
    prepared, _ = prepare_image(data, max_size=100, jpeg_quality=90)
    swapped = orientation in (5, 6, 7, 8)
    assert (prepared.width, prepared.height) == ((50, 100) if swapped else (100, 50))
    record = build_record("0" * 32, 1.0, observation, DECISION, prepared)
    (x1, y1, x2, y2) = record.detections[0].box
    assert 0 <= x1 < x2 <= prepared.width and 0 <= y1 < y2 <= prepared.height
    result = Image.open(io.BytesIO(prepared.data))
    assert result.size == (prepared.width, prepared.height)
    assert redness(result, (x1 + x2) / 2, (y1 + y2) / 2)  # the box is on the marker...
    assert abs((x2 - x1) * (y2 - y1) - 20 * 10) < 1e-6   # ...and as large as it (80x40 / 4)
    # Just outside the box it is grey, on every side.
    for x, y in (((x1 + x2) / 2, y1 - 3), ((x1 + x2) / 2, y2 + 2), (x1 - 3, (y1 + y2) / 2), (x2 + 2, (y1 + y2) / 2)):
        if 0 <= x < prepared.width and 0 <= y < prepared.height:
            assert not redness(result, x, y), (x, y)


def test_boxes_already_oriented_by_the_model_decoder():
    # OpenCV's imdecode applies EXIF rotation: the model saw 200x400 and its box is in those pixels.
    data = marked_image(400, 200, (40, 20, 120, 60), orientation=6)
    oriented_box = (200 - 60, 40, 200 - 20, 120)
    observation = Observation(model="m", image_width=200, image_height=400,
                              detections=(Detection("thing", 0.3, oriented_box),))
    prepared, _ = prepare_image(data, max_size=100, jpeg_quality=90)
    record = build_record("0" * 32, 1.0, observation, DECISION, prepared)
    assert record.detections[0].box == (35.0, 10.0, 45.0, 30.0)


def test_resize_scales_x_and_y_separately_and_boxes_fit():
    array = np.zeros((333, 1000, 3), dtype=np.uint8)  # numpy HWC RGB, as many services hold images
    observation = Observation(model="m", image_width=1000, image_height=333, detections=(
        Detection("edge", 0.2, (0, 0, 1000, 333)), Detection("out", 0.2, (-5, 300, 1010, 340))))
    prepared, _ = prepare_image(array, max_size=100, jpeg_quality=80)
    assert (prepared.width, prepared.height) == (100, 33)
    record = build_record("0" * 32, 1.0, observation, DECISION, prepared)
    assert record.detections[0].box == (0.0, 0.0, 100.0, 33.0)  # sy = 33/333, not 0.1
    x1, y1, x2, y2 = record.detections[1].box
    assert (x1, x2, y2) == (0.0, 100.0, 33.0) and 0 < y1 < 33


def test_small_images_are_not_enlarged_and_png_rgba_becomes_jpeg():
    image = Image.new("RGBA", (64, 48), (0, 255, 0, 128))
    out = io.BytesIO()
    image.save(out, "PNG")
    prepared, _ = prepare_image(out.getvalue(), max_size=1280, jpeg_quality=90)
    assert (prepared.width, prepared.height) == (64, 48)
    assert prepared.data[:2] == b"\xff\xd8"
    pil_prepared, _ = prepare_image(Image.new("L", (10, 20)), max_size=1280, jpeg_quality=90)
    assert (pil_prepared.width, pil_prepared.height) == (10, 20)


@pytest.mark.parametrize("pixels, expected", [
    (np.full((4, 6, 3), 200, dtype=np.int64), 200),       # JSON numbers arrive as int64
    (np.full((4, 6, 3), 300, dtype=np.int32), 255),       # clipped
    (np.full((4, 6, 3), 0.5, dtype=np.float32), 128),     # a normalised image, [0, 1]
    (np.full((4, 6, 3), 100.0, dtype=np.float64), 100),   # floats already in [0, 255]
    (np.full((4, 6), True), 255),                         # a mask
])
def test_arrays_of_other_types_become_8_bit_images(pixels, expected):
    prepared, _ = prepare_image(pixels, max_size=100, jpeg_quality=100)
    assert (prepared.width, prepared.height) == (6, 4)
    value = Image.open(io.BytesIO(prepared.data)).convert("L").getpixel((3, 2))
    assert abs(value - expected) <= 3, value


@pytest.mark.parametrize("make, mode", [
    (lambda: Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))), "I;16"),
    (lambda: Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.int32), (8, 1))), "I"),
    (lambda: Image.fromarray(np.tile(np.linspace(0, 1, 64).astype(np.float32), (8, 1))), "F"),
])
def test_wide_grey_images_are_scaled_to_8_bits_not_clipped(make, mode):
    image = make()
    assert image.mode == mode
    out = io.BytesIO()
    image.save(out, "PNG" if mode == "I;16" else "TIFF")
    prepared, _ = prepare_image(out.getvalue(), max_size=100, jpeg_quality=100)
    row = [Image.open(io.BytesIO(prepared.data)).convert("L").getpixel((x, 4)) for x in (0, 32, 63)]
    assert row[0] <= 3 and 120 <= row[1] <= 135 and row[2] >= 252, row  # a gradient, dark to light


@pytest.mark.parametrize("bad", [b"not an image", b"", object()])
def test_undecodable_images_raise_image_error(bad):
    with pytest.raises(ImageError):
        prepare_image(bad, max_size=100, jpeg_quality=90)


def test_classification_record_round_trips_through_the_spool_format():
    observation = Observation(model="cls", model_version="7", image_width=64, image_height=48,
                              classification=Classification.from_scores({"cat": 0.3, "dog": 0.7}),
                              inference_id="w1-00", extra={"camera": "7"})
    prepared, _ = prepare_image(Image.new("RGB", (64, 48)), max_size=100, jpeg_quality=90)
    record = build_record("0" * 32, 5.0, observation, DECISION, prepared)
    assert record.task == "classification" and record.top_class == "dog"
    assert record.tags == ("low",) and record.batch == "b-1" and record.extra == {"camera": "7"}
    decoded, image = decode_entry(encode_entry(record.to_json(), prepared.data))
    assert decoded == record and image == prepared.data
