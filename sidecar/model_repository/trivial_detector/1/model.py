"""Triton Python-backend model with people_detector's signature that returns fixed detections
(person 0.91, face 0.55, person 0.12) for every image, without looking at it."""

import numpy as np
import triton_python_backend_utils as pb_utils

BOXES = np.array([[10, 20, 110, 260], [40, 30, 90, 80], [200, 100, 260, 228]], dtype=np.float32)
SCORES = np.array([0.91, 0.55, 0.12], dtype=np.float32)
CLASSES = np.array([0, 1, 0], dtype=np.int32)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            b = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("BOXES", np.broadcast_to(BOXES, (b, 3, 4)).copy()),
                pb_utils.Tensor("SCORES", np.broadcast_to(SCORES, (b, 3)).copy()),
                pb_utils.Tensor("CLASSES", np.broadcast_to(CLASSES, (b, 3)).copy()),
            ]))
        return responses
