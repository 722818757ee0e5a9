"""The feedback route's multipart bodies: parsed in memory, the same way in both integrations."""

from __future__ import annotations

import httpx
import pytest

from edgecatch.feedback import MAX_MULTIPART_PARTS, parse_multipart


def encoded(files: dict, data: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://127.0.0.1/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_fields_and_files_as_a_client_sends_them():
    body, content_type = encoded({"image": ("a.jpg", b"\xff\xd8 jpeg \r\n--bytes", "image/jpeg")},
                                 {"feedback": '{"verdict": "incorrect"}', "prediction": "{}"})
    fields = parse_multipart(body, content_type)
    assert fields == {"feedback": '{"verdict": "incorrect"}', "prediction": "{}",
                      "image": b"\xff\xd8 jpeg \r\n--bytes"}


@pytest.mark.parametrize(("body", "content_type", "problem"), [
    (b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue", "multipart/form-data; boundary=x",
     "closing boundary"),
    (b"--x--\r\n", "multipart/form-data", "boundary"),
    (b"", "application/json", "multipart/form-data"),
    (b"not multipart at all", "multipart/form-data; boundary=x", None),
])
def test_malformed_bodies_raise_value_error(body, content_type, problem):
    with pytest.raises(ValueError, match=problem):
        parse_multipart(body, content_type)


def test_too_many_parts_are_refused():
    body, content_type = encoded({"image": ("a.jpg", b"jpeg", "image/jpeg")},
                                 {f"field{n}": "x" for n in range(MAX_MULTIPART_PARTS)})
    with pytest.raises(ValueError, match="parts"):
        parse_multipart(body, content_type)


@pytest.mark.parametrize("name", [b'name="same"', b'filename="x"'])
def test_parts_count_whatever_their_names(name):
    """Repeating one name, or giving none, must not get around the limit (half a million tiny parts
    fit in the route's 21 MB and cost seconds of parsing)."""
    part = b"--x\r\nContent-Disposition: form-data; " + name + b"\r\n\r\nv\r\n"
    with pytest.raises(ValueError, match="parts"):
        parse_multipart(part * (MAX_MULTIPART_PARTS + 1) + b"--x--\r\n", "multipart/form-data; boundary=x")
