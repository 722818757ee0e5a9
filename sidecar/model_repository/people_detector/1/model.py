"""Triton Python-backend model running the example detector (detector.py beside this file is a
symlink to bento_service/detector.py: one implementation for BentoML and Triton; copy the model
repository with ``cp -rL`` to deploy it elsewhere).

IMAGE [B, 1] BYTES (encoded images) -> BOXES [B, N, 4] FP32 xyxy pixels, SCORES [B, N] FP32,
CLASSES [B, N] INT32; rows past an image's detection count are padding (class -1, score 0).
Each IMAGE element is the encoded image bytes, or the base64 text of them (so that a pure-JSON
HTTP request, whose BYTES elements must be UTF-8 strings, can carry an image too).
An image that cannot be decoded fails the whole request with INVALID_ARG.
"""

import base64
import binascii
import json

import numpy as np
import triton_python_backend_utils as pb_utils

import cv2
from detector import CLASS_NAMES, Detector, decode_image


def _param(config, key, default):
    p = config.get("parameters", {}).get(key)
    return p["string_value"] if p and p.get("string_value") else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        cv2.setNumThreads(int(_param(config, "opencv_threads", "1")))
        classes = [c.strip() for c in _param(config, "classes", "person,face").split(",") if c.strip()]
        self.detector = Detector(classes, max_side=int(_param(config, "max_side", "512")))
        self.class_names = CLASS_NAMES

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                results = [self.detector(_decode(bytes(b))) for b in images.reshape(len(images), -1)[:, 0]]
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=_pack(results)))
        return responses


def _decode(data: bytes):
    try:
        return decode_image(data)
    except ValueError:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("IMAGE is neither an encoded image nor base64 of one") from None
        return decode_image(raw)


def _pack(results):
    b = len(results)
    n = max((len(r) for r in results), default=0)
    boxes = np.zeros((b, n, 4), dtype=np.float32)
    scores = np.zeros((b, n), dtype=np.float32)
    classes = np.full((b, n), -1, dtype=np.int32)
    for i, dets in enumerate(results):
        for j, d in enumerate(dets):
            boxes[i, j] = d["box"]
            scores[i, j] = d["confidence"]
            classes[i, j] = d["class_id"]
    return [
        pb_utils.Tensor("BOXES", boxes),
        pb_utils.Tensor("SCORES", scores),
        pb_utils.Tensor("CLASSES", classes),
    ]
