"""Turning what the model saw into the image and pre-labels a labeler gets (background only).

Decode (if encoded), apply the EXIF orientation, scale down to `max_size` on the longest side keeping
the aspect ratio, encode JPEG at `jpeg_quality`, and carry the boxes through the same steps: the
orientation's flip/rotation, then the scale (x and y separately, since rounding makes them differ).

Box coordinates are taken to be in the pixels the model saw, and the model is taken to have seen the
pixels as stored (what PIL and numpy give; EXIF is not applied). One exception, detected from the
observation's image size: when it matches the *oriented* size and not the stored one (a decoder such
as OpenCV's `imdecode` that applies EXIF rotation), the boxes are already oriented.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from edgecatch.observation import Observation
from edgecatch.orientation import orient_box
from edgecatch.policies.decision import Decision

from .sample import SampleDetection, SampleRecord

__all__ = ["PreparedImage", "prepare_image", "build_record", "ImageError"]

_EXIF_ORIENTATION = 0x0112
Box = tuple[float, float, float, float]


class ImageError(ValueError):
    """The image could not be decoded or is empty."""


@dataclass(frozen=True, slots=True)
class PreparedImage:
    data: bytes
    width: int
    height: int
    #: Size of the stored pixels before orientation and resizing.
    source_width: int
    source_height: int
    orientation: int


def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            opened = Image.open(io.BytesIO(bytes(image)))
            opened.load()
        except Exception as exc:  # PIL raises several types for bad data
            raise ImageError(f"cannot decode image: {type(exc).__name__}") from None
        return opened
    if hasattr(image, "__array_interface__"):  # numpy HWC RGB (or HW grayscale)
        try:
            return Image.fromarray(_as_uint8(image))
        except Exception as exc:
            raise ImageError(f"cannot read array image: {exc}") from None
    raise ImageError(f"unsupported image type {type(image).__name__}")


def _as_uint8(array: Any) -> Any:
    """8-bit pixels from the arrays APIs receive: floats in [0, 1] (a normalised image) or [0, 255],
    integers of any width (JSON numbers arrive as int64), booleans (a mask); values outside the
    range are clipped."""
    import numpy as np

    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        if array.size and float(np.nanmax(array)) <= 1.0:
            array = array * 255.0
        return np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)
    if array.dtype.kind == "b":  # a mask
        return array.astype(np.uint8) * 255
    if array.dtype.kind in "iu":
        return np.clip(array, 0, 255).astype(np.uint8)
    raise ValueError(f"pixels of type {array.dtype} are not an image")


def _wide_to_8_bit(image: Image.Image) -> Image.Image:
    """A grey image with 16- or 32-bit integer or float pixels, scaled to 8 bits: 16-bit by its
    range (0-65535), wider integers by their maximum, floats as `_as_uint8` reads them."""
    import numpy as np

    pixels = np.asarray(image)
    if pixels.dtype.kind == "f":
        return Image.fromarray(_as_uint8(pixels))
    top = 65535 if image.mode.startswith("I;16") or (pixels.size and int(pixels.max()) <= 65535) \
        else max(1, int(pixels.max()))
    return Image.fromarray((np.clip(pixels, 0, top) * (255.0 / top)).round().astype(np.uint8))


def _passthrough(image: Any, max_size: int) -> tuple[PreparedImage, Image.Image] | None:
    """An upright JPEG that already fits is kept as it came: no decode, no second generation loss,
    and no CPU taken from the model server (re-encoding costs ~10 ms per 640x480 image)."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        return None
    data = bytes(image)
    try:
        header = Image.open(io.BytesIO(data))  # reads the header only
        if header.format != "JPEG" or header.mode not in ("RGB", "L") or max(header.size) > max_size:
            return None
        if int(header.getexif().get(_EXIF_ORIENTATION, 1) or 1) != 1:
            return None
    except Exception:
        return None  # the full path below reports what is wrong with it
    width, height = header.size
    return PreparedImage(data, width, height, width, height, 1), header


def prepare_image(image: Any, max_size: int, jpeg_quality: int) -> tuple[PreparedImage, Image.Image]:
    """Decode, orient, resize and encode; returns the JPEG and the oriented PIL image before resizing."""
    kept = _passthrough(image, max_size)
    if kept is not None:
        return kept
    opened = _open(image)
    source_width, source_height = opened.size
    if source_width <= 0 or source_height <= 0:
        raise ImageError("empty image")
    try:
        orientation = int(opened.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:
        orientation = 1
    swapped = orientation in (5, 6, 7, 8)
    width, height = (source_height, source_width) if swapped else (source_width, source_height)
    scale = min(1.0, max_size / max(width, height))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 0.5 and opened.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target): a 12 MP photo then
        # costs a fraction of a full decode. Box scaling does not depend on it (it uses `target`).
        opened.draft("RGB", (target[1], target[0]) if swapped else target)
    try:
        oriented = ImageOps.exif_transpose(opened) if orientation != 1 else opened
        resized = oriented if oriented.size == target else oriented.resize(target, Image.Resampling.LANCZOS)
    except OSError as exc:  # truncated data surfaces when the pixels are read
        raise ImageError(f"cannot decode image: {exc}") from None
    if resized.mode.startswith(("I", "F")):  # 16/32-bit or float pixels: convert() would clip, not scale
        resized = _wide_to_8_bit(resized)
    if resized.mode not in ("RGB", "L"):
        resized = resized.convert("RGB")
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=jpeg_quality, optimize=False)
    return PreparedImage(out.getvalue(), resized.size[0], resized.size[1], source_width, source_height,
                         orientation), oriented


def transform_box(box: Box, prepared: PreparedImage, reference: tuple[int, int]) -> Box:
    """A box from the model's pixel space into the prepared image's, clipped to it."""
    ref_w, ref_h = reference
    sw, sh = prepared.source_width, prepared.source_height
    orientation = prepared.orientation
    swapped = orientation in (5, 6, 7, 8)
    oriented_size = (sh, sw) if swapped else (sw, sh)
    if orientation != 1 and not ((ref_w, ref_h) == oriented_size and (ref_w, ref_h) != (sw, sh)):
        # Boxes are in stored pixels (scaled to them if the model saw another size): orient them.
        if (ref_w, ref_h) != (sw, sh) and ref_w > 0 and ref_h > 0:
            box = (box[0] * sw / ref_w, box[1] * sh / ref_h, box[2] * sw / ref_w, box[3] * sh / ref_h)
        box = orient_box(box, orientation, sw, sh)
        ref_w, ref_h = oriented_size
    if ref_w <= 0 or ref_h <= 0:
        ref_w, ref_h = oriented_size
    sx = prepared.width / ref_w
    sy = prepared.height / ref_h
    x1, y1, x2, y2 = box
    x1, x2 = sorted((x1 * sx, x2 * sx))
    y1, y2 = sorted((y1 * sy, y2 * sy))
    clip_x = lambda v: min(max(v, 0.0), float(prepared.width))  # noqa: E731
    clip_y = lambda v: min(max(v, 0.0), float(prepared.height))  # noqa: E731
    return (clip_x(x1), clip_y(y1), clip_x(x2), clip_y(y2))


def build_record(sample_id: str, created: float, observation: Observation, decision: Decision,
                 prepared: PreparedImage) -> SampleRecord:
    """The spool record: the observation's pre-labels moved into the prepared image's pixels."""
    reference = (observation.image_width, observation.image_height)
    detections = tuple(
        SampleDetection(d.class_name, d.class_id, float(d.confidence), transform_box(d.box, prepared, reference))
        for d in observation.detections)
    classification = observation.classification
    corrected = observation.corrected
    corrected_detections = ()
    corrected_classification: tuple[tuple[str, float], ...] = ()
    if isinstance(corrected, tuple):
        corrected_detections = tuple(
            SampleDetection(d.class_name, d.class_id, float(d.confidence), transform_box(d.box, prepared, reference))
            for d in corrected)
    elif corrected is not None:
        corrected_classification = tuple(corrected.ranked)
    return SampleRecord(
        sample_id=sample_id,
        created=created,
        model=observation.model,
        model_version=observation.model_version,
        width=prepared.width,
        height=prepared.height,
        task="classification" if classification is not None else "detection",
        inference_id=observation.inference_id,
        policy=decision.policy or "",
        tags=tuple(decision.tags),
        batch=decision.batch,
        reasons=dict(decision.reasons),
        detections=detections,
        classification=tuple(classification.ranked) if classification is not None else (),
        feedback=observation.feedback.value if observation.feedback is not None else "",
        feedback_note=observation.feedback_note,
        corrected=corrected_detections,
        corrected_classification=corrected_classification,
        extra={str(k): str(v) for k, v in observation.extra.items()},
    )
