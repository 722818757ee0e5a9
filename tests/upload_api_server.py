"""A real HTTP server on 127.0.0.1 implementing the Upload API contract (`shared/upload-api.md`).

Used by the delivery tests, the delivery benchmark and the demo. It is strict about the contract
(api_key, multipart fields, annotation format) and records what it stored so tests can assert that
every sample arrived exactly once. Switches make it misbehave the ways real destinations do:

    server.down() / server.up()        connection refused (the port is closed), then back on the same port
    server.fault("slow", delay=2)      answer after a delay (then behave normally)
    server.fault("500") / ("502")      a JSON 500 / an HTML 502 page from a proxy
    server.fault("429", retry_after=1) rate limited, with Retry-After
    server.fault("400")                reject the sample (the error text echoes the URL, key included)
    server.fault("401")                refuse the key
    server.fault("duplicate")          answer `{"duplicate": true, "id": ...}` for new images too
    server.fault("hang")               hold the request until `clear()`/`down()`, then 503, storing nothing
Each `fault` applies to `step` ("upload", "annotate" or "any") for `times` requests (None: until
`clear()`). Run it alone: `python tests/upload_api_server.py --port 9100 --api-key KEY`; then
`GET /_test/stats` tells what it stored (images, annotations, requests).
"""

from __future__ import annotations

import argparse
import email.message
import hashlib
import json
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["UploadApiServer", "StoredImage", "Fault"]


@dataclass
class StoredImage:
    image_id: str
    name: str
    data: bytes
    sha256: str
    params: dict[str, list[str]]
    metadata: dict
    annotation: dict | None = None  # {"name", "text", "params"}


@dataclass
class Fault:
    kind: str
    step: str = "any"
    times: int | None = None
    delay: float = 0.0
    retry_after: str | None = None
    sample: str | None = None  # only requests that carry this sample id (in the body or the URL)


@dataclass
class _Store:
    images: dict[str, StoredImage] = field(default_factory=dict)
    by_sha: dict[str, str] = field(default_factory=dict)
    #: How many times an image with this name was stored as new (must be 1 per sample).
    stored_names: Counter = field(default_factory=Counter)
    upload_requests: Counter = field(default_factory=Counter)
    annotate_requests: Counter = field(default_factory=Counter)
    #: Every request's status, step and raw target (with the query string, key included).
    log: list[tuple[str, int, str]] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away (killed, timed out): normal here
        super().handle_error(request, client_address)


class UploadApiServer:
    def __init__(self, *, api_key: str | None = None, dataset: str = "test-dataset", host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.api_key = api_key or f"rf-{secrets.token_hex(12)}"
        self.dataset = dataset
        self.host = host
        self.port = port
        self.store = _Store()
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self.in_flight: Counter = Counter()
        self._release = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._next_id = 0

    # -- running -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def up(self) -> UploadApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = _Server((self.host, self.port), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="upload-api-server", daemon=True)
        self._thread.start()
        return self

    start = up

    def down(self) -> None:
        """Close the port and every open connection: clients get connection refused/reset."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        self._release.set()
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self._release.clear()

    stop = down

    def __enter__(self) -> UploadApiServer:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- switches ----------------------------------------------------------------------------------

    def fault(self, kind: str, *, step: str = "any", times: int | None = None, delay: float = 0.0,
              retry_after: str | None = None, sample: str | None = None) -> None:
        assert kind in ("slow", "hang", "500", "502", "429", "400", "401", "duplicate"), kind
        assert step in ("upload", "annotate", "any"), step
        with self.lock:
            self.faults.append(Fault(kind, step, times, delay, retry_after, sample))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
        self._release.set()  # wake anything sleeping in "slow" or "hang"
        time.sleep(0.1)
        self._release.clear()

    def _take_fault(self, step: str, request: bytes = b"") -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.step in (step, "any") and (fault.sample is None or fault.sample.encode() in request):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self.faults.remove(fault)
                    return fault
        return None

    # -- what was stored ---------------------------------------------------------------------------

    def images_by_name(self) -> dict[str, StoredImage]:
        with self.lock:
            return {image.name: image for image in self.store.images.values()}

    def annotated(self) -> dict[str, StoredImage]:
        with self.lock:
            return {image.name: image for image in self.store.images.values() if image.annotation is not None}

    def _new_id(self) -> str:
        self._next_id += 1
        return f"img{self._next_id:07d}{secrets.token_hex(3)}"


def _json(handler: BaseHTTPRequestHandler, status: int, body: object, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(raw)


def _boundary(content_type: str) -> str | None:
    message = email.message.Message()
    message["content-type"] = content_type
    return message.get_param("boundary")


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (data, content type) of a multipart/form-data body (RFC 7578), parsed on bytes:
    the email package's parser is several times slower on 100 KB images."""
    boundary = _boundary(content_type)
    if not boundary:
        raise ValueError("no boundary")
    delimiter = b"--" + boundary.encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("no closing delimiter")
    fields: dict[str, tuple[bytes, str]] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise ValueError("malformed part")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without headers")
        headers = {}
        for line in head.decode("utf-8").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = email.message.Message()
        disposition["content-disposition"] = headers.get("content-disposition", "")
        name = disposition.get_param("name", header="content-disposition")
        if name is None:
            raise ValueError("part without a name")
        fields[name] = (data, headers.get("content-type", "text/plain").split(";")[0].strip())
    return fields


class _Handler(BaseHTTPRequestHandler):
    api: UploadApiServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are written separately: no 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.api.lock:
            self.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.api.lock:
            self.api._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:  # noqa: N802
        """`GET /_test/stats`: what was stored, for checks from another process (not part of the API)."""
        if self.path != "/_test/stats":
            _json(self, 404, {"error": "no such route"})
            return
        store = self.api.store
        with self.api.lock:
            stats = {
                "images": len(store.images),
                "annotated": sum(1 for image in store.images.values() if image.annotation is not None),
                "max_stored_per_name": max(store.stored_names.values(), default=0),
                "upload_requests": sum(store.upload_requests.values()),
                "annotate_requests": sum(store.annotate_requests.values()),
                "models": sorted({str(image.metadata.get("model")) for image in store.images.values()}),
                "batches": sorted({p for image in store.images.values() for p in image.params.get("batch", [])}),
            }
        _json(self, 200, stats)

    def do_POST(self) -> None:  # noqa: N802
        api = self.api
        body = self._body()
        target = self.path
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True)
        segments = parts.path.strip("/").split("/")
        if len(segments) >= 3 and segments[0] == "dataset" and segments[2] == "upload" and len(segments) == 3:
            step = "upload"
        elif len(segments) == 4 and segments[0] == "dataset" and segments[2] == "annotate":
            step = "annotate"
        else:
            self._answer(step="?", target=target, status=404, body={"error": "no such route"})
            return
        if segments[1] != api.dataset:
            self._answer(step, target, 404, {"error": f"dataset {segments[1]} not found"})
            return
        if query.get("api_key") != [api.api_key]:
            self._answer(step, target, 401, {"error": "invalid api_key"})
            return
        with api.lock:
            api.in_flight[step] += 1
        try:
            fault = api._take_fault(step, self.path.encode() + body)
            if fault is not None and fault.kind == "slow":
                api._release.wait(fault.delay)
                fault = None
            elif fault is not None and fault.kind == "hang":
                while not api._release.wait(0.05):
                    pass
                self._answer(step, target, 503, {"error": "gave up"})
                return
            if fault is not None and fault.kind != "duplicate":
                self._fault(step, target, fault)
                return
            if step == "upload":
                self._upload(target, query, body, force_duplicate=fault is not None)
            else:
                self._annotate(target, segments[3], query, body)
        finally:
            with api.lock:
                api.in_flight[step] -= 1

    def _answer(self, step: str, target: str, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        with self.api.lock:
            self.api.store.log.append((step, status, target))
        _json(self, status, body, headers)

    def _fault(self, step: str, target: str, fault: Fault) -> None:
        if fault.kind == "502":
            page = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
            with self.api.lock:
                self.api.store.log.append((step, 502, target))
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif fault.kind == "500":
            self._answer(step, target, 500, {"error": "internal error"})
        elif fault.kind == "429":
            self._answer(step, target, 429, {"error": "rate limited"},
                         {"Retry-After": fault.retry_after} if fault.retry_after is not None else None)
        elif fault.kind == "400":
            # Like many real APIs, the error text quotes the request: the key must be redacted by the client.
            self._answer(step, target, 400, {"error": f"bad request: POST {target}"})
        elif fault.kind == "401":
            self._answer(step, target, 401, {"error": "unauthorized"})

    def _upload(self, target: str, query: dict[str, list[str]], body: bytes, force_duplicate: bool) -> None:
        api = self.api
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            self._answer("upload", target, 400, {"error": "expected multipart/form-data"})
            return
        try:
            fields = _multipart(content_type, body)
        except ValueError as exc:
            self._answer("upload", target, 400, {"error": f"bad multipart body: {exc}"})
            return
        if "file" not in fields or "name" not in fields:
            self._answer("upload", target, 400, {"error": "fields 'file' and 'name' are required"})
            return
        data, mime = fields["file"]
        if mime not in ("image/jpeg", "image/png") or not data:
            self._answer("upload", target, 400, {"error": f"unsupported file type {mime}"})
            return
        name = fields["name"][0].decode()
        try:
            metadata = json.loads(fields["metadata"][0]) if "metadata" in fields else {}
        except ValueError:
            self._answer("upload", target, 400, {"error": "metadata is not JSON"})
            return
        sha = hashlib.sha256(data).hexdigest()
        with api.lock:
            api.store.upload_requests[name] += 1
            existing = api.store.by_sha.get(sha)
            if existing is None:
                image_id = api._new_id()
                api.store.images[image_id] = StoredImage(image_id, name, data, sha, query, metadata)
                api.store.by_sha[sha] = image_id
                api.store.stored_names[name] += 1
                answer = {"duplicate": True, "id": image_id} if force_duplicate else {"success": True, "id": image_id}
            else:
                answer = {"duplicate": True, "id": existing}
        self._answer("upload", target, 200, answer)

    def _annotate(self, target: str, image_id: str, query: dict[str, list[str]], body: bytes) -> None:
        api = self.api
        name = (query.get("name") or [""])[0]
        if not self.headers.get("Content-Type", "").startswith("text/plain"):
            self._answer("annotate", target, 400, {"error": "annotation must be text/plain"})
            return
        if query.get("prediction") != ["true"] or not name:
            self._answer("annotate", target, 400, {"error": "name and prediction=true are required"})
            return
        text = body.decode()
        if name.endswith(".json"):
            try:
                document = json.loads(text)
                assert set(document) == {"image", "predictions"}
                for p in document["predictions"]:
                    assert {"x", "y", "width", "height", "confidence", "class"} <= set(p)
            except (ValueError, AssertionError, TypeError):
                self._answer("annotate", target, 400, {"error": "malformed annotation"})
                return
        with api.lock:
            api.store.annotate_requests[image_id] += 1
            image = api.store.images.get(image_id)
            if image is None:
                status, answer = 404, {"error": "image not found"}
            elif image.annotation is not None:
                status, answer = 409, {"error": "image already annotated"}
            else:
                image.annotation = {"name": name, "text": text, "params": query}
                status, answer = 200, {"success": True}
        self._answer("annotate", target, status, answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--dataset", default="test-dataset")
    args = parser.parse_args()
    server = UploadApiServer(api_key=args.api_key, dataset=args.dataset, port=args.port).up()
    print(f"Upload API on {server.url} dataset={server.dataset} (key in --api-key)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.down()


if __name__ == "__main__":
    main()
