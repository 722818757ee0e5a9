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
    class_names: [person, face]         # or labels_file: labels.txt (one name a line)
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
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return []


class ReadItem:
    """One item of a request: the prediction in normal form and the image as the integration has it."""

    __slots__ = ("detections", "classification", "image", "width", "height")

    def __init__(self, detections, classification, image, width, height) -> None:
        self.detections: tuple[Detection, ...] = detections
        self.classification: Classification | None = classification
        self.image: Any = image  # encoded bytes, or an HWC RGB uint8 array
        self.width = width
        self.height = height


def _images(tensor: Tensor, spec: ImageInput) -> list[Any]:
    """The images of a request, one per item: encoded bytes, or HWC RGB uint8 arrays."""
    array = tensor.array
    if spec.format == "encoded":
        if tensor.datatype != "BYTES":
            raise TensorError("image", f"input {spec.input} is {tensor.datatype}, expected BYTES for encoded images")
        # [n] or [batch, 1]: one encoded image per element either way.
        return [_image_bytes(v) for v in array.reshape(-1)]
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


def _image_bytes(value: Any) -> bytes:
    """Encoded image bytes; a pure-JSON request carries them as base64 text, which is decoded here."""
    data = bytes(value) if not isinstance(value, bytes) else value
    if data.startswith(_MAGIC):
        return data
    import base64
    import binascii

    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data  # not base64 either: _encoded_size reports it
    return decoded if decoded.startswith(_MAGIC) else data


def _encoded_size(data: bytes) -> tuple[int, int]:
    """Width and height as the model saw the image (after EXIF rotation), from the header only."""
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                width, height = height, width
            return width, height
    except Exception:
        raise TensorError("image", "the image bytes are not an image Pillow can read") from None


def _to_xyxy(boxes: np.ndarray, fmt: str, normalized: bool, width: int, height: int) -> np.ndarray:
    boxes = boxes.astype(np.float64, copy=True)
    if fmt == "xywh":
        boxes[:, 2] += boxes[:, 0]
        boxes[:, 3] += boxes[:, 1]
    elif fmt == "cxcywh":
        cx, cy, w, h = boxes[:, 0].copy(), boxes[:, 1].copy(), boxes[:, 2].copy(), boxes[:, 3].copy()
        boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if normalized:
        boxes[:, (0, 2)] *= width
        boxes[:, (1, 3)] *= height
    return boxes


def read_items(
    reading: ModelReading, names: list[str], inputs: dict[str, Tensor], outputs: dict[str, Tensor]
) -> list[ReadItem]:
    """One ReadItem per item of the batch; TensorError when a named tensor is missing or malformed."""
    image_tensor = inputs.get(reading.image.input)
    if image_tensor is None:
        raise TensorError("image", f"input {reading.image.input} is not in the request")
    images = _images(image_tensor, reading.image)
    sizes = [(_encoded_size(i) if isinstance(i, bytes) else (i.shape[1], i.shape[0])) for i in images]
    count = len(images)

    def need(name: str) -> np.ndarray:
        tensor = outputs.get(name)
        if tensor is None:
            raise TensorError("output", f"output {name} is not in the response")
        return tensor.array

    items: list[ReadItem] = []
    if reading.detections is not None:
        spec = reading.detections
        boxes, scores = need(spec.boxes), need(spec.scores)
        classes = need(spec.classes) if spec.classes else None
        valid = need(spec.count) if spec.count else None
        batched = reading.batched if reading.batched is not None else boxes.ndim == 3
        if not batched:
            boxes, scores = boxes[None], scores[None]
            classes = classes[None] if classes is not None else None
            valid = valid.reshape(1) if valid is not None else None
        if boxes.shape[0] != count:
            raise TensorError("output", f"{boxes.shape[0]} items of boxes for {count} images")
        for i in range(count):
            width, height = sizes[i]
            item_boxes = boxes[i].reshape(-1, 4)
            item_scores = scores[i].reshape(-1)
            item_classes = classes[i].reshape(-1) if classes is not None else np.zeros(len(item_scores), dtype=int)
            n = int(valid[i]) if valid is not None else len(item_scores)
            if not (len(item_boxes) >= n and len(item_scores) >= n and len(item_classes) >= n):
                raise TensorError("output", "boxes, scores and classes differ in length")
            xyxy = _to_xyxy(item_boxes[:n], spec.box_format, spec.normalized, width, height)
            detections = []
            for k in range(n):
                score = float(item_scores[k])
                class_id = int(item_classes[k])
                if score < spec.min_score or class_id < 0:  # padding rows of a batched output
                    continue
                name = names[class_id] if 0 <= class_id < len(names) else str(class_id)
                x1, y1, x2, y2 = (float(v) for v in xyxy[k])
                detections.append(Detection(name, min(max(score, 0.0), 1.0), (x1, y1, x2, y2), class_id))
            items.append(ReadItem(tuple(detections), None, images[i], width, height))
    else:
        probabilities = need(reading.classification.probabilities)
        rows = probabilities.reshape(count, -1) if probabilities.size % max(count, 1) == 0 else None
        if rows is None or rows.shape[0] != count:
            raise TensorError("output", f"{rows.shape[0]} rows of probabilities for {count} images")
        for i in range(count):
            row = rows[i]
            scores = {(names[k] if k < len(names) else str(k)): float(row[k]) for k in range(len(row))}
            width, height = sizes[i]
            items.append(ReadItem((), Classification.from_scores(scores), images[i], width, height))
    return items
