"""Reading KServe v2 bodies (built by the official tritonclient) into observations' normal form."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.grpc import service_pb2

from edgecatch.integrations.triton.reading import ModelReading, read_items
from edgecatch.integrations.triton.tensors import TensorError, grpc_tensors, http_tensors


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(out, format="JPEG")
    return out.getvalue()


READING = ModelReading.model_validate({
    "image": {"input": "IMAGE"},
    "detections": {"boxes": "BOXES", "scores": "SCORES", "classes": "CLASSES"},
    "class_names": ["person", "face"],
})


def request_body(images: list[bytes], binary: bool = True) -> tuple[bytes, int | None]:
    tensor = httpclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    data = np.array([[i] for i in images], dtype=object)
    if not binary:
        data = np.array([[base64.b64encode(i)] for i in images], dtype=object)
    tensor.set_data_from_numpy(data, binary_data=binary)
    body, length = httpclient.InferenceServerClient.generate_request_body([tensor])
    return body, length


def response_body(outputs: dict[str, np.ndarray], binary: bool) -> tuple[bytes, int | None]:
    """A response as Triton writes it: JSON, or JSON header + binary tensors."""
    header = {"model_name": "m", "model_version": "1", "outputs": []}
    blobs = []
    types = {np.float32: "FP32", np.float16: "FP16", np.int32: "INT32", np.int64: "INT64"}
    for name, array in outputs.items():
        spec = {"name": name, "datatype": types[array.dtype.type], "shape": list(array.shape)}
        if binary:
            raw = array.tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            spec["data"] = array.reshape(-1).tolist()
        header["outputs"].append(spec)
    text = json.dumps(header).encode()
    return (text + b"".join(blobs), len(text)) if binary else (text, None)


OUTPUTS = {
    "BOXES": np.array([[[10, 20, 110, 220], [0, 0, 0, 0]], [[5, 5, 50, 50], [1, 2, 3, 4]]], dtype=np.float32),
    "SCORES": np.array([[0.9, 0.0], [0.4, 0.3]], dtype=np.float32),
    "CLASSES": np.array([[0, -1], [1, 0]], dtype=np.int32),
}


@pytest.mark.parametrize("binary", [True, False])
def test_http_batched_detection_one_item_per_image(binary):
    images = [jpeg(640, 480), jpeg(320, 240)]
    body, length = request_body(images, binary=binary)
    _, inputs = http_tensors(body, length, "inputs")
    answer, answer_length = response_body(OUTPUTS, binary=binary)
    _, outputs = http_tensors(answer, answer_length, "outputs")
    items = read_items(READING, ["person", "face"], inputs, outputs)
    assert [(i.width, i.height) for i in items] == [(640, 480), (320, 240)]
    assert items[0].image == images[0]  # the encoded bytes, even when sent as base64 text
    first, second = items
    assert [(d.class_name, round(d.confidence, 2), d.box) for d in first.detections] == [
        ("person", 0.9, (10.0, 20.0, 110.0, 220.0))]  # the padding row is gone
    assert [d.class_name for d in second.detections] == ["face", "person"]


@pytest.mark.parametrize("count", [1, 2])
def test_binary_images_are_read_where_they_arrived(count):
    images = [jpeg(64, 48), jpeg(32, 24)][:count]
    body, length = request_body(images)
    _, inputs = http_tensors(body, length, "inputs")
    elements = inputs["IMAGE"].byte_elements
    assert all(isinstance(e, memoryview) and e.obj is body for e in elements)  # no copy per image
    assert inputs["IMAGE"].flat == images  # as bytes where values are wanted
    answer, answer_length = response_body({k: v[:count] for k, v in OUTPUTS.items()}, binary=True)
    items = read_items(READING, ["person", "face"], inputs, http_tensors(answer, answer_length, "outputs")[1])
    assert [bytes(item.image) for item in items] == images


def test_box_formats_and_normalised_coordinates():
    reading = ModelReading.model_validate({
        "image": {"input": "IMAGE"},
        "detections": {"boxes": "B", "scores": "S", "box_format": "cxcywh", "normalized": True},
    })
    body, length = request_body([jpeg(200, 100)])
    _, inputs = http_tensors(body, length, "inputs")
    outputs = {
        "B": np.array([[[0.5, 0.5, 0.2, 0.4]]], dtype=np.float32),
        "S": np.array([[0.8]], dtype=np.float32),
    }
    answer, answer_length = response_body(outputs, binary=True)
    _, out = http_tensors(answer, answer_length, "outputs")
    (item,) = read_items(reading, [], inputs, out)
    (detection,) = item.detections
    assert detection.box == pytest.approx((80.0, 30.0, 120.0, 70.0))
    assert detection.class_name == "0"  # no class names: the id


def test_grpc_raw_contents():
    images = [jpeg(64, 48)]
    request = service_pb2.ModelInferRequest(model_name="people_detector")
    tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
    del tensor
    request.raw_input_contents.append(len(images[0]).to_bytes(4, "little") + images[0])
    response = service_pb2.ModelInferResponse(model_name="people_detector", model_version="1")
    for name, array in {k: v[:1] for k, v in OUTPUTS.items()}.items():
        response.outputs.add(name=name, datatype="FP32" if array.dtype == np.float32 else "INT32",
                             shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    items = read_items(READING, ["person", "face"], grpc_tensors(request, "inputs"), grpc_tensors(response, "outputs"))
    assert len(items) == 1 and items[0].width == 64 and len(items[0].detections) == 1


def test_grpc_typed_contents():
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(jpeg(10, 10))
    response = service_pb2.ModelInferResponse(model_name="m")
    boxes = response.outputs.add(name="BOXES", datatype="FP32", shape=[1, 4])
    boxes.contents.fp32_contents.extend([1, 2, 3, 4])
    scores = response.outputs.add(name="SCORES", datatype="FP32", shape=[1])
    scores.contents.fp32_contents.append(0.5)
    classes = response.outputs.add(name="CLASSES", datatype="INT32", shape=[1])
    classes.contents.int_contents.append(1)
    (item,) = read_items(READING, ["person", "face"], grpc_tensors(request, "inputs"),
                         grpc_tensors(response, "outputs"))
    assert [(d.class_name, d.box) for d in item.detections] == [("face", (1.0, 2.0, 3.0, 4.0))]


def test_raw_pixel_images_chw_float_bgr():
    reading = ModelReading.model_validate({
        "image": {"input": "PIXELS", "format": "raw", "layout": "CHW", "color": "BGR", "scale": 255},
        "classification": {"probabilities": "PROBS"},
        "class_names": ["cat", "dog"],
    })
    pixels = np.zeros((1, 3, 4, 5), dtype=np.float32)
    pixels[0, 2] = 1.0  # BGR: the third channel is red
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 4, 5])
    request.raw_input_contents.append(pixels.tobytes())
    response = service_pb2.ModelInferResponse(model_name="m")
    response.outputs.add(name="PROBS", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(np.array([[0.3, 0.7]], dtype=np.float32).tobytes())
    (item,) = read_items(reading, ["cat", "dog"], grpc_tensors(request, "inputs"), grpc_tensors(response, "outputs"))
    assert (item.width, item.height) == (5, 4)
    assert item.image.shape == (4, 5, 3) and tuple(item.image[0, 0]) == (255, 0, 0)
    assert item.classification.top_class == "dog"


@pytest.mark.parametrize(("body", "length", "reason"), [
    (b"not json", None, "json"),
    (b'{"inputs": [{"name": "IMAGE"}]}', None, "json"),
    (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}]}',
     None, "tensor"),
    (b'{}', 999, "header"),
    (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}', None, "tensor"),
])
def test_unreadable_bodies_raise_with_a_reason(body, length, reason):
    with pytest.raises(TensorError) as caught:
        http_tensors(body, length, "inputs")
    assert caught.value.reason == reason


def test_fp16_outputs_are_read_from_binary_tensors():
    # memoryview cannot cast to half floats: numpy reads them (every request used to fail with a traceback)
    body, length = request_body([jpeg(640, 480), jpeg(320, 240)])
    _, inputs = http_tensors(body, length, "inputs")
    half = {name: array.astype(np.float16) for name, array in OUTPUTS.items()}
    answer, answer_length = response_body(half, binary=True)
    _, outputs = http_tensors(answer, answer_length, "outputs")
    first, second = read_items(READING, ["person", "face"], inputs, outputs)
    assert [(d.class_name, d.box) for d in first.detections] == [("person", (10.0, 20.0, 110.0, 220.0))]
    assert [d.class_name for d in second.detections] == ["face", "person"]


def test_class_ids_or_probabilities_beyond_the_configured_names_are_a_config_error():
    body, length = request_body([jpeg(640, 480), jpeg(320, 240)])
    _, inputs = http_tensors(body, length, "inputs")
    answer, answer_length = response_body(OUTPUTS, binary=True)
    _, outputs = http_tensors(answer, answer_length, "outputs")
    with pytest.raises(TensorError, match="class id 1 has no name") as caught:
        read_items(READING, ["person"], inputs, outputs)  # ids 0 and 1 in the answer, one name
    assert caught.value.reason == "class_names"
    assert len(read_items(READING, [], inputs, outputs)) == 2  # no names configured: ids as names
    classifier = ModelReading.model_validate({"image": {"input": "IMAGE"}, "classification": {"probabilities": "P"}})
    scores, scores_length = response_body({"P": np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)}, True)
    _, probabilities = http_tensors(scores, scores_length, "outputs")
    with pytest.raises(TensorError, match="3 probabilities per item for 2 class names"):
        read_items(classifier, ["cat", "dog"], inputs, probabilities)


def test_missing_tensors_and_bad_images():
    body, length = request_body([b"definitely not an image"])
    _, inputs = http_tensors(body, length, "inputs")
    with pytest.raises(TensorError, match="not an image"):
        read_items(READING, [], inputs, {})
    body, length = request_body([jpeg(10, 10)])
    _, inputs = http_tensors(body, length, "inputs")
    with pytest.raises(TensorError, match="BOXES is not in the response"):
        read_items(READING, [], inputs, {})


def _encoded(fmt: str, size: tuple[int, int], orientation: int | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (200, 30, 30))
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _pillow_size(data: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
        return (height, width, orientation) if orientation in (5, 6, 7, 8) else (width, height, orientation)


@pytest.mark.parametrize("data", [
    _encoded("JPEG", (640, 480)),
    _encoded("JPEG", (640, 480), progressive=True),
    *[_encoded("JPEG", (64, 48), orientation) for orientation in range(1, 9)],
    _encoded("PNG", (33, 17)),
    _encoded("PNG", (33, 17), 6),
    _encoded("GIF", (12, 7)),
    _encoded("WEBP", (20, 10), 8),
], ids=lambda d: d[:4].hex())
def test_image_size_from_the_header_agrees_with_pillow(data):
    from edgecatch.integrations.triton.reading import _encoded_size

    assert _encoded_size(data) == _pillow_size(data)
    assert _encoded_size(memoryview(b"head" + data)[4:]) == _pillow_size(data)  # in place in a message


@pytest.mark.parametrize("data", [b"\xff\xd8\xff\xe0\x00", b"\x89PNG\r\n\x1a\n", b"\xff\xd8" + b"\x00" * 40])
def test_truncated_headers_are_not_images(data):
    from edgecatch.integrations.triton.reading import _encoded_size

    with pytest.raises(TensorError):
        _encoded_size(data)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(400, 300), (240, 240)])
def test_boxes_of_a_model_that_saw_the_upright_image_land_on_it(orientation, size):
    """The model decodes with the EXIF orientation applied (as the example detector does) and
    returns the red rectangle it sees; the prepared image's box must be on that rectangle, also for
    flips, 180° and square images, where the stored and upright sizes are the same."""
    from PIL import ImageOps

    from edgecatch.delivery.prepare import build_record, prepare_image
    from edgecatch.observation import Observation
    from edgecatch.policies.decision import Decision

    from tests.exif_images import marked_exif_jpeg

    data, (x1, y1, x2, y2) = marked_exif_jpeg(size, orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    body, length = request_body([data])
    _, inputs = http_tensors(body, length, "inputs")
    answer, answer_length = response_body({
        "BOXES": np.array([[[x1, y1, x2, y2]]], np.float32), "SCORES": np.array([[0.9]], np.float32),
        "CLASSES": np.array([[0]], np.int32)}, binary=True)
    _, outputs = http_tensors(answer, answer_length, "outputs")
    (item,) = read_items(READING, ["person", "face"], inputs, outputs)
    observation = Observation(model="m", image_width=item.width, image_height=item.height,
                              detections=item.detections)
    prepared, _ = prepare_image(data, max_size=1280, jpeg_quality=95)
    record = build_record("0" * 32, 1.0, observation, Decision(selected=True, policy="p"), prepared)
    bx1, by1, bx2, by2 = record.detections[0].box
    assert (round(bx1), round(by1), round(bx2), round(by2)) == (x1, y1, x2, y2)
    assert (prepared.width, prepared.height) == upright.size


def test_a_labels_file_maps_line_i_to_class_i(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("person\nface\n\ncat_face\n\n\n")  # line 3 blank: class 2 has no name
    reading = ModelReading.model_validate({"image": {"input": "IMAGE"}, "detections": {
        "boxes": "BOXES", "scores": "SCORES", "classes": "CLASSES"}, "class_names_file": "labels.txt"})
    names = reading.names(tmp_path)
    assert names == ["person", "face", "", "cat_face"]
    body, length = request_body([jpeg(64, 48)])
    _, inputs = http_tensors(body, length, "inputs")
    answer, answer_length = response_body({
        "BOXES": np.array([[[1, 2, 3, 4]] * 2], np.float32), "SCORES": np.array([[0.9, 0.8]], np.float32),
        "CLASSES": np.array([[2, 3]], np.int32)}, binary=True)
    _, outputs = http_tensors(answer, answer_length, "outputs")
    (item,) = read_items(reading, names, inputs, outputs)
    assert [d.class_name for d in item.detections] == ["2", "cat_face"]


def test_a_labels_file_that_cannot_be_read_is_one_clear_line(tmp_path):
    from edgecatch.integrations.triton.sidecar import Sidecar, SidecarConfig
    from edgecatch.policies.load import ConfigError

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "policies.yaml").write_text("version: 1\npolicies:\n  - name: all\n    random: 1.0\n")
    for file, problem in (("latin1.txt", "not UTF-8 text"), ("missing.txt", "No such file or directory")):
        config = SidecarConfig.model_validate({
            "policies": str(tmp_path / "policies.yaml"), "delivery": {"spool_dir": str(tmp_path / "spool")},
            "sidecar": {"models": {"m": {"image": {"input": "IMAGE"}, "classification": {"probabilities": "P"},
                                         "class_names_file": file}}}})
        with pytest.raises(ConfigError) as caught:
            Sidecar(config, collector=None, base=tmp_path)
        assert str(caught.value).splitlines() == [
            f"{tmp_path / file}: sidecar.models.m.class_names_file: cannot read: {problem}"]


def test_inflate_bounds_what_a_compressed_body_expands_to():
    import gzip
    import zlib

    from edgecatch.integrations.triton.tensors import inflate

    data = b"tensor bytes " * 100
    assert inflate(gzip.compress(data), 31, len(data)) == data
    assert inflate(zlib.compress(data), 15, len(data)) == data
    assert inflate(gzip.compress(data), 47, len(data)) == data  # 47: gzip or zlib, as gRPC sends either
    bomb = gzip.compress(bytes(50 * 1024 * 1024))  # 50 MB of zeros in ~50 KB
    assert len(bomb) < 100_000
    for corrupt, problem in ((bomb, "more than 1048576 bytes"), (gzip.compress(data)[:-20], "truncated"),
                             (gzip.compress(data) + b"x", "data after"), (b"not gzip", "does not decompress")):
        with pytest.raises(ValueError, match=problem):
            inflate(corrupt, 31, 1024 * 1024)


class _CountingCollector:
    """What the sidecar's observation needs of a collector, recording what it counts."""

    def __init__(self) -> None:
        self.unparsed: list[str] = []
        self.observed: list = []

    def count_unparsed(self, reason: str, detail: str | None = None, *, model: str | None = None) -> None:
        self.unparsed.append(reason)

    def evaluate_silent_events(self) -> None: ...

    def serve_models(self, names) -> None: ...

    def new_inference_id(self) -> str:
        return "w1-0"

    def observe(self, observation, image) -> None:
        self.observed.append(observation)


def test_a_compressed_http_body_is_read_only_up_to_max_request_bytes(tmp_path):
    """A gzip bomb through the sidecar is relayed (Triton decides what to do with it) but edgecatch
    inflates it only up to `max_request_bytes`: counted as unreadable, not taken into memory."""
    import gzip

    from edgecatch.integrations.triton.http_proxy import Exchange
    from edgecatch.integrations.triton.sidecar import Sidecar, SidecarConfig

    (tmp_path / "policies.yaml").write_text("version: 1\npolicies:\n  - name: all\n    random: 1.0\n")
    config = SidecarConfig.model_validate({
        "policies": str(tmp_path / "policies.yaml"), "delivery": {"spool_dir": str(tmp_path / "spool")},
        "sidecar": {"max_request_bytes": 4 * 1024 * 1024, "models": {"m": {
            "image": {"input": "IMAGE"}, "classification": {"probabilities": "P"}, "class_names": ["a", "b"]}}}})
    collector = _CountingCollector()
    sidecar = Sidecar(config, collector=collector, base=tmp_path)
    body, length = request_body([jpeg(8, 6)])
    answer, answer_length = response_body({"P": np.array([[0.2, 0.8]], dtype=np.float32)}, binary=True)

    def exchange(request: bytes) -> Exchange:
        headers = [(b"content-encoding", b"gzip"), (b"inference-header-content-length", str(length).encode())]
        return Exchange("m", "", "w1-0", headers, request, 200,
                        [(b"inference-header-content-length", str(answer_length).encode())], answer)

    sidecar.observe_http(exchange(gzip.compress(body)))
    assert collector.unparsed == [] and collector.observed[0].classification.top_class == "b"
    padded = body + bytes(64 * 1024 * 1024)  # a binary tensor body padded with 64 MB of zeros
    sidecar.observe_http(exchange(gzip.compress(padded, compresslevel=1)))
    assert collector.unparsed == ["http_encoding"] and len(collector.observed) == 1


def _grpc_request(inputs) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest as the official tritonclient builds it."""
    from tritonclient.grpc._utils import _get_inference_request

    return _get_inference_request(model_name="m", inputs=inputs, model_version="", request_id="", outputs=None,
                                  sequence_id=0, sequence_start=False, sequence_end=False, priority=0,
                                  timeout=None, parameters=None)


def _grpc_response(outputs: dict[str, np.ndarray], in_shared_memory: tuple[str, ...] = ()):
    """A ModelInferResponse as Triton sends it: an output written to shared memory keeps its place in
    raw_output_contents with an empty entry."""
    response = service_pb2.ModelInferResponse(model_name="m", model_version="1")
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype="FP32" if array.dtype == np.float32 else "INT32",
                             shape=list(array.shape))
        response.raw_output_contents.append(b"" if name in in_shared_memory else array.tobytes())
    return response


@pytest.mark.parametrize("aux_first", [True, False])
def test_grpc_input_in_shared_memory_leaves_the_other_inputs_in_place(aux_first):
    """tritonclient leaves a shared-memory input out of raw_input_contents: the image must still be
    the image, whichever place the other input has."""
    import tritonclient.grpc as grpcclient

    image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[jpeg(64, 48)]], dtype=object))
    aux = grpcclient.InferInput("AUX", [1, 3], "FP32").set_shared_memory("region", 12)
    request = _grpc_request([aux, image] if aux_first else [image, aux])
    assert len(request.raw_input_contents) == 1
    inputs = grpc_tensors(request, "inputs")
    assert set(inputs) == {"IMAGE"}
    (item,) = read_items(READING, ["person", "face"], inputs,
                         grpc_tensors(_grpc_response({k: v[:1] for k, v in OUTPUTS.items()}), "outputs"))
    assert (item.width, item.height) == (64, 48) and len(item.detections) == 1


def test_grpc_output_in_shared_memory_that_is_not_read_is_no_obstacle():
    import tritonclient.grpc as grpcclient

    image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[jpeg(64, 48)]], dtype=object))
    outputs = {"EXTRA": np.zeros((1, 3), dtype=np.float32), **{k: v[:1] for k, v in OUTPUTS.items()}}
    response = _grpc_response(outputs, in_shared_memory=("EXTRA",))
    (item,) = read_items(READING, ["person", "face"], grpc_tensors(_grpc_request([image]), "inputs"),
                         grpc_tensors(response, "outputs"))
    assert len(item.detections) == 1
    # One that is read: counted as a missing output, never read from another tensor's bytes.
    response = _grpc_response({k: v[:1] for k, v in OUTPUTS.items()}, in_shared_memory=("SCORES",))
    with pytest.raises(TensorError) as caught:
        read_items(READING, ["person", "face"], grpc_tensors(_grpc_request([image]), "inputs"),
                   grpc_tensors(response, "outputs"))
    assert caught.value.reason == "output" and "SCORES" in str(caught.value)


def test_grpc_raw_contents_that_match_no_tensors_are_refused():
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="A", datatype="FP32", shape=[1])
    request.inputs.add(name="B", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.zeros(1, dtype=np.float32).tobytes())
    with pytest.raises(TensorError, match="1 raw contents for 2 tensors"):
        grpc_tensors(request, "inputs")


def test_classification_extension_outputs_are_not_read_as_numbers():
    """`InferRequestedOutput("SCORES", class_count=2)` makes Triton answer "score:index:label" strings."""
    body, length = request_body([jpeg(64, 48)])
    _, inputs = http_tensors(body, length, "inputs")
    header = {"model_name": "m", "model_version": "1", "outputs": [
        {"name": "BOXES", "datatype": "FP32", "shape": [1, 2, 4], "data": [1, 2, 3, 4, 5, 6, 7, 8]},
        {"name": "SCORES", "datatype": "BYTES", "shape": [1, 2], "data": ["0.910000:0:person", "0.550000:1:face"]},
        {"name": "CLASSES", "datatype": "INT32", "shape": [1, 2], "data": [0, 1]}]}
    _, outputs = http_tensors(json.dumps(header).encode(), None, "outputs")
    with pytest.raises(TensorError) as caught:
        read_items(READING, ["person", "face"], inputs, outputs)
    assert caught.value.reason == "output" and "class_count" in str(caught.value)
