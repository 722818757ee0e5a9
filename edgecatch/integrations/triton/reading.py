"""How to read one Triton model's tensors as predictions: the per-model section of the sidecar config.

```yaml
models:
  people_detector:                      # the Triton model name
    image: {input: IMAGE}               # encoded JPEG/PNG bytes in a BYTES tensor
    detections:
      boxes: BOXES                      # [n, 4] or [batch, n, 4]
      scores: SCORES                    # [n] or [batch, n]
      classes: CLASSES                  # [n] or [batch, n] (class ids); optional: all class 0
      box_format: xyxy                  # xyxy | xywh | cxcywh
      normalized: false                 # true: coordinates in [0, 1] of the image size
    class_names: [person, face]         # or class_names_file: labels.txt (one name a line)
  resnet:
    image: {input: INPUT__0, format: raw, layout: CHW, color: RGB, scale: 255}
    classification: {probabilities: OUTPUT__0}
    class_names_file: imagenet.txt
```
A model whose first dimension is the batch (`batched: true`, the default when the tensors have one
more dimension than one item needs) yields one observation per item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgecatch.integrations.triton.tensors import Tensor, TensorError
from edgecatch.observation import Classification, Detection
from edgecatch.orientation import ROTATED, stored_box

__all__ = ["ImageInput", "ModelReading", "ReadItem", "read_items"]

TensorName = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageInput(_Strict):
    input: TensorName = Field(description="The input tensor that holds the image.")
    format: Literal["encoded", "raw"] = Field(
        "encoded", description="encoded: JPEG/PNG bytes in a BYTES tensor; raw: pixels.")
    layout: Literal["HWC", "CHW"] = "HWC"
    color: Literal["RGB", "BGR"] = "RGB"
    scale: float = Field(
        255.0, gt=0, description="raw float pixels are multiplied by this to get 0-255 (1.0 if already 0-255).")


class DetectionOutputs(_Strict):
    boxes: TensorName
    scores: TensorName
    classes: TensorName | None = None
    count: TensorName | None = Field(None, description="Optional: number of valid detections per item.")
    box_format: Literal["xyxy", "xywh", "cxcywh"] = "xyxy"
    normalized: bool = False
    min_score: float = Field(
        0.0, ge=0.0, le=1.0, description="Ignore detections scored below this; rows with a negative class id "
                                         "are padding and always ignored.")


class ClassificationOutputs(_Strict):
    probabilities: TensorName


class ModelReading(_Strict):
    model: str | None = Field(None, description="Name in edgecatch (policies, metrics); default: the Triton name.")
    image: ImageInput
    detections: DetectionOutputs | None = None
    classification: ClassificationOutputs | None = None
    class_names: list[str] | None = None
    class_names_file: Path | None = None
    batched: bool | None = Field(None, description="First dimension is the batch (default: inferred).")

    @model_validator(mode="after")
    def _one_kind(self) -> ModelReading:
        if (self.detections is None) == (self.classification is None):
            raise ValueError("give exactly one of 'detections' and 'classification'")
        if self.class_names is not None and self.class_names_file is not None:
            raise ValueError("give class_names or class_names_file, not both")
        return self

    def names(self, base: Path | None = None) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        if self.class_names_file is not None:
            path = self.class_names_file if base is None else base / self.class_names_file
            # Line i names class i, as in Triton's label files: a blank line keeps its place (that
            # class is then named by its id); blank lines at the end are not classes.
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            while names and not names[-1]:
                names.pop()
            return names
        return []


class ReadItem:
    """One item of a request: the prediction in normal form and the image as the integration has it."""

    __slots__ = ("detections", "classification", "image", "width", "height")

    def __init__(self, detections, classification, image, width, height) -> None:
        self.detections: tuple[Detection, ...] = detections
        self.classification: Classification | None = classification
        self.image: Any = image  # encoded bytes (or a view of them), or an HWC RGB uint8 array
        self.width = width
        self.height = height


def _images(tensor: Tensor, spec: ImageInput) -> list[Any]:
    """The images of a request, one per item: encoded bytes, or HWC RGB uint8 arrays."""
    if spec.format == "encoded":
        if tensor.datatype != "BYTES":
            raise TensorError("image", f"input {spec.input} is {tensor.datatype}, expected BYTES for encoded images")
        # [n] or [batch, 1]: one encoded image per element either way.
        return [_image_bytes(v) for v in tensor.byte_elements]
    array = tensor.array
    if array.ndim == 3:
        items = [array]
    elif array.ndim == 4:
        items = list(array)
    else:
        raise TensorError("image", f"raw image input {spec.input} has shape {list(array.shape)}")
    out = []
    for item in items:
        if spec.layout == "CHW":
            item = np.transpose(item, (1, 2, 0))
        if item.dtype != np.uint8:
            item = np.clip(item.astype(np.float32) * spec.scale, 0, 255).astype(np.uint8)
        if spec.color == "BGR":
            item = item[..., ::-1]
        if item.shape[2] == 1:
            item = np.repeat(item, 3, axis=2)
        out.append(np.ascontiguousarray(item))
    return out


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def _image_bytes(value: Any) -> bytes | memoryview:
    """Encoded image bytes (a view of the message where it was binary); a pure-JSON request carries
    them as base64 text, which is decoded here."""
    if isinstance(value, memoryview) and bytes(value[:4]).startswith(_MAGIC):
        return value
    data = value if isinstance(value, bytes) else bytes(value)
    if data.startswith(_MAGIC):
        return data
    import base64
    import binascii

    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data  # not base64 either: _encoded_size reports it
    return decoded if decoded.startswith(_MAGIC) else data


def _encoded_size(data: bytes | memoryview) -> tuple[int, int, int]:
    """Width and height as the model saw the image (after EXIF rotation), and the EXIF orientation,
    from the header only.

    JPEG and PNG headers are read here (a few microseconds: this runs for every observed item);
    anything else, or a header this reader does not follow, goes to Pillow (tens of microseconds).
    """
    if data[:2] != b"\xff\xd8":
        data = bytes(data)  # a PNG's chunks are searched; rare enough to copy
    size = _jpeg_size(data) if data[:2] == b"\xff\xd8" else _png_size(data) if data[:4] == b"\x89PNG" else None
    if size is not None:
        return size
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
            if orientation not in _INVERSE_KNOWN:
                orientation = 1
            if orientation in ROTATED:  # rotated by 90 or 270 degrees
                width, height = height, width
            return width, height, orientation
    except Exception:
        raise TensorError("image", "the image bytes are not an image Pillow can read") from None


_INVERSE_KNOWN = frozenset(range(1, 9))  # valid EXIF orientations; anything else is taken as 1
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """(width, height, orientation) from a JPEG's frame header and EXIF, the size swapped when EXIF
    says 90/270 degrees; None: unsure."""
    offset, end = 2, len(data)
    orientation = 1
    while offset + 4 <= end:
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            offset += 2
            continue
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        if marker in _SOF:
            if offset + 9 > end:
                return None
            height = int.from_bytes(data[offset + 5:offset + 7], "big")
            width = int.from_bytes(data[offset + 7:offset + 9], "big")
            if not width or not height:
                return None
            return (height, width, orientation) if orientation in ROTATED else (width, height, orientation)
        if marker == 0xE1 and data[offset + 4:offset + 10] == b"Exif\x00\x00":
            found = _exif_orientation(data[offset + 10:offset + 2 + length])
            if found is None:
                return None
            orientation = found if found in _INVERSE_KNOWN else 1
        if marker == 0xDA:  # start of scan before any frame header
            return None
        offset += 2 + length
    return None


def _exif_orientation(tiff: bytes | memoryview) -> int | None:
    """The Orientation tag of IFD0 (1 when absent); None when the TIFF structure is not as expected."""
    mark = bytes(tiff[:2])
    if len(tiff) < 8 or mark not in (b"II", b"MM"):
        return None
    order = "little" if mark == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for index in range(count):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8:entry + 10], order)
    return 1


def _png_size(data: bytes) -> tuple[int, int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    idat = data.find(b"IDAT")
    if b"eXIf" in data[:idat if idat > 0 else len(data)]:
        return None  # an EXIF orientation in a PNG: Pillow reads it
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height, 1) if width and height else None


def read_items(
    reading: ModelReading, names: list[str], inputs: dict[str, Tensor], outputs: dict[str, Tensor]
) -> list[ReadItem]:
    """One ReadItem per item of the batch; TensorError when a named tensor is missing or malformed."""
    image_tensor = inputs.get(reading.image.input)
    if image_tensor is None:
        raise TensorError("image", f"input {reading.image.input} is not in the request")
    images = _images(image_tensor, reading.image)
    sizes = [(_encoded_size(i) if isinstance(i, (bytes, memoryview)) else (i.shape[1], i.shape[0], 1)) for i in images]
    count = len(images)

    def need(name: str) -> Tensor:
        tensor = outputs.get(name)
        if tensor is None:
            raise TensorError("output", f"output {name} is not in the response")
        if tensor.datatype == "BYTES":  # e.g. Triton's classification extension ("score:index:label" strings)
            raise TensorError("output", f"output {name} holds BYTES, not numbers (requested with class_count?)")
        return tensor

    def per_item(tensor: Tensor, what: str) -> int:
        """How many values of `tensor` belong to each of the `count` items."""
        size = len(tensor.flat)
        if count == 0 or size % count:
            raise TensorError("output", f"{size} values of {what} for {count} images")
        return size // count

    items: list[ReadItem] = []
    if reading.detections is not None:
        spec = reading.detections
        boxes_tensor = need(spec.boxes)
        batched = reading.batched if reading.batched is not None else len(boxes_tensor.shape) == 3
        rows = boxes_tensor.shape[0] if batched and boxes_tensor.shape else 1
        if rows != count:
            raise TensorError("output", f"{rows} items of boxes for {count} images")
        # Flat Python lists, not numpy: these tensors are tiny and this runs for every observed call.
        boxes, scores = boxes_tensor.flat, need(spec.scores).flat
        box_step, score_step = per_item(boxes_tensor, "boxes"), per_item(need(spec.scores), "scores")
        classes = need(spec.classes).flat if spec.classes else None
        class_step = per_item(need(spec.classes), "classes") if spec.classes else 0
        valid = need(spec.count).flat if spec.count else None
        if box_step % 4 or (valid is not None and len(valid) != count):
            raise TensorError("output", "boxes do not come in fours, or the count tensor does not match the items")
        fmt, normalized, min_score = spec.box_format, spec.normalized, spec.min_score
        known = len(names)
        for i in range(count):
            width, height, orientation = sizes[i]
            available = min(box_step // 4, score_step, class_step if classes is not None else score_step)
            n = int(valid[i]) if valid is not None else score_step
            if n > available:
                raise TensorError("output", "boxes, scores and classes differ in length")
            b0, s0, c0 = i * box_step, i * score_step, i * class_step
            detections = []
            for k in range(n):
                score = float(scores[s0 + k])
                class_id = int(classes[c0 + k]) if classes is not None else 0
                if score < min_score or class_id < 0:  # padding rows of a batched output
                    continue
                j = b0 + 4 * k
                a, b, c, d = boxes[j], boxes[j + 1], boxes[j + 2], boxes[j + 3]
                if fmt == "xywh":
                    c, d = a + c, b + d
                elif fmt == "cxcywh":
                    a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
                if normalized:
                    a, b, c, d = a * width, b * height, c * width, d * height
                if class_id < known:
                    name = names[class_id] or str(class_id)
                elif known:  # a config that does not match the model: wrong labels in the dataset
                    raise TensorError("class_names", f"class id {class_id} has no name ({known} names configured)")
                else:
                    name = str(class_id)
                box = (float(a), float(b), float(c), float(d))
                if orientation != 1:  # the model saw the upright image: back to the stored pixels
                    box = stored_box(box, orientation, width, height)
                detections.append(Detection(name, min(max(score, 0.0), 1.0), box, class_id))
            if orientation in ROTATED:
                width, height = height, width
            # The size as stored: delivery orients boxes and image together from there.
            items.append(ReadItem(tuple(detections), None, images[i], width, height))
    else:
        probabilities = need(reading.classification.probabilities)
        step = per_item(probabilities, "probabilities")
        if names and step != len(names):
            raise TensorError("class_names", f"{step} probabilities per item for {len(names)} class names")
        values = probabilities.flat
        for i in range(count):
            row = values[i * step:(i + 1) * step]
            scores = {(names[k] if k < len(names) and names[k] else str(k)): float(row[k]) for k in range(step)}
            width, height, orientation = sizes[i]
            if orientation in ROTATED:
                width, height = height, width
            items.append(ReadItem((), Classification.from_scores(scores), images[i], width, height))
    return items
