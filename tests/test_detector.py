"""The example detector (bento_service/detector.py) on realistic images shipped in packages."""

import io

import numpy as np
import pytest

import cv2
import skimage.data as skdata
from PIL import Image

from bento_service.detector import (
    CLASS_NAMES,
    Detector,
    cascade_confidence,
    decode_image,
    nms,
    person_confidence,
)


@pytest.fixture(scope="module")
def detector():
    return Detector()


def _check(dets, shape):
    h, w = shape[:2]
    for d in dets:
        assert set(d) == {"class", "class_id", "confidence", "box"}
        assert d["class"] == CLASS_NAMES[d["class_id"]]
        assert 0.0 <= d["confidence"] <= 1.0
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    confs = [d["confidence"] for d in dets]
    assert confs == sorted(confs, reverse=True)


def test_astronaut_face_found_with_high_confidence(detector):
    img = skdata.astronaut()
    dets = detector(img)
    _check(dets, img.shape)
    faces = [d for d in dets if d["class"] == "face"]
    assert faces, dets
    best = faces[0]
    assert best["confidence"] > 0.8
    x1, y1, x2, y2 = best["box"]  # her face is around (177, 67)-(270, 160)
    assert 150 < (x1 + x2) / 2 < 300 and 50 < (y1 + y2) / 2 < 180


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket", "camera", "coins"])
def test_realistic_images_give_well_formed_output(detector, name):
    img = getattr(skdata, name)()
    dets = detector(img)  # grey images are accepted too
    _check(dets, img.shape)


def test_sklearn_sample_images(detector):
    import sklearn.datasets as sklearn_datasets
    for img in sklearn_datasets.load_sample_images().images:
        _check(detector(img), img.shape)


def test_boxes_are_in_input_pixels_when_downscaled():
    img = skdata.astronaut()
    big = cv2.resize(img, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    det = Detector(classes=("face",), max_side=512)
    small_face = det(img)[0]["box"]
    big_face = det(big)[0]["box"]
    np.testing.assert_allclose(np.array(big_face) / 2, small_face, atol=8)


def test_confidence_mappings_are_monotonic_and_bounded():
    xs = np.linspace(-10, 20, 301)
    for f in (person_confidence, cascade_confidence):
        ys = np.array([f(x) for x in xs])
        assert np.all((ys >= 0) & (ys <= 1))
        assert np.all(np.diff(ys) >= 0)
        assert f(1e6) == 1.0 and f(-1e6) == 0.0  # no overflow at the extremes
    assert person_confidence(0.75) == pytest.approx(0.5)
    assert cascade_confidence(4.0) == pytest.approx(0.5)


def test_nms_suppresses_overlaps_per_call():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=float)
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.45) == [0, 2]
    assert nms(boxes, np.array([0.1, 0.8, 0.7]), 0.45) == [1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5) == []


def test_decode_image_applies_exif_orientation():
    img = skdata.astronaut()[:100, :200]  # 100 high, 200 wide
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", exif=exif)
    out = decode_image(buf.getvalue())
    assert out.dtype == np.uint8 and out.shape == (200, 100, 3)

    buf = io.BytesIO()
    Image.fromarray(img).convert("L").save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (100, 200, 3)

    with pytest.raises(ValueError):
        decode_image(b"not an image")


def test_unknown_class_rejected():
    with pytest.raises(ValueError):
        Detector(classes=("dog",))
