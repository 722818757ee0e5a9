"""`edgecatch sidecar`: the HTTP and gRPC proxies, the admin port, and what they observe.

```yaml
# sidecar/edgecatch.yaml: the edgecatch config file plus a `sidecar:` section
policies: ../policies/default.yaml
delivery: {...}
sidecar:
  triton: {http: "127.0.0.1:8000", grpc: "127.0.0.1:8001"}
  listen: {http: "0.0.0.0:8010", grpc: "0.0.0.0:8011", admin: "127.0.0.1:8012"}
  models:
    people_detector: {...}            # see edgecatch.integrations.triton.reading
```
The admin port serves `/metrics`, `/edgecatch/healthz` and `/edgecatch/feedback` (the HTTP port
serves the last two as well, so clients that can only reach it can still send verdicts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgecatch.config import EdgecatchConfig, config_folder
from edgecatch.integrations.triton.grpc_proxy import GrpcExchange, GrpcProxy
from edgecatch.integrations.triton.http_proxy import Exchange, HttpProxy, LocalResponse
from edgecatch.integrations.triton.reading import ModelReading, ReadItem, read_items
from edgecatch.integrations.triton.tensors import TensorError, grpc_tensors, http_tensors, inflate
from edgecatch.observation import Observation
from edgecatch.policies.load import ConfigError, ConfigProblem, load_model

__all__ = ["Sidecar", "SidecarConfig", "load_sidecar_config"]

log = logging.getLogger("edgecatch.sidecar")

#: How often Triton's config of each configured model is read again (it can be reloaded as another).
_MODEL_CHECK_SECONDS = 5.0
_NO_ANSWER = object()  # Triton did not answer a question about a model
_REFUSED = object()  # Triton's model-config API is restricted (--http-restricted-api / --grpc-restricted-protocol)


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


def split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TritonAddresses(_Strict):
    http: str = "127.0.0.1:8000"
    grpc: str = "127.0.0.1:8001"

    _check = field_validator("http", "grpc")(_address)


class ListenAddresses(_Strict):
    http: str = "0.0.0.0:8010"
    grpc: str = "0.0.0.0:8011"
    admin: str = Field("127.0.0.1:8012", description="/metrics, /edgecatch/healthz, /edgecatch/feedback")

    _check = field_validator("http", "grpc", "admin")(_address)


class SidecarSettings(_Strict):
    triton: TritonAddresses = Field(default_factory=TritonAddresses)
    listen: ListenAddresses = Field(default_factory=ListenAddresses)
    models: dict[str, ModelReading] = Field(default_factory=dict)
    max_request_bytes: int = Field(
        256 * 1024 * 1024, ge=1024,
        description="larger HTTP requests get 413; a compressed body or gRPC message is read along only up to "
                    "this size once inflated")
    upstream_timeout_seconds: float = Field(600.0, gt=0)
    stop_grace_seconds: float = Field(
        20.0, ge=0, description="on SIGTERM: how long calls in progress may take to finish (no new ones start)")


class SidecarConfig(EdgecatchConfig):
    sidecar: SidecarSettings = Field(default_factory=SidecarSettings)


def load_sidecar_config(path: str | Path) -> tuple[SidecarConfig, Path]:
    path = Path(path)
    config = load_model(SidecarConfig, path)
    base = config_folder(path)
    return config.resolve_paths(base), base  # type: ignore[return-value]


class _Observer:
    """Observation work, queued by the proxies and done in batches a moment later.

    A proxy hands over each observed exchange as soon as its answer is written. Reading tensors and
    evaluating policies is then done in batches `delay` seconds later, in slices of at most
    `slice_seconds` between which the loop serves sockets again: a request that arrives right after
    an answer (a client with one request in flight) is forwarded first, and a batch keeps the
    observation code hot in the CPU caches. The queue is bounded; what does not fit is served, not
    observed, and counted in `edgecatch_unparsed_total{reason="observation_backlog"}`.

    `after_batch` runs when a batch is done: the collector's silent events of the predictions that
    left the recall buffer meanwhile, a few at a time on this loop rather than in one long hold of
    the GIL by the collector's background thread every 250 ms (p99 at concurrency 16: 12 → 8 ms).
    """

    def __init__(self, on_drop: Callable[[], None], *, after_batch: Callable[[], None] = lambda: None,
                 on_error: Callable[[BaseException], None] = lambda exc: None,
                 delay: float = 0.002, slice_seconds: float = 0.005, max_pending: int = 2000) -> None:
        self._pending: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._on_drop = on_drop
        self._after_batch = after_batch
        self._on_error = on_error
        self._delay = delay
        self._slice = slice_seconds
        self._max = max_pending
        self._scheduled = False

    def handler(self, observe: Callable[[Any], None]) -> Callable[[Any], None]:
        def put(exchange: Any) -> None:
            if len(self._pending) >= self._max:
                self._on_drop()
                return
            self._pending.append((observe, exchange))
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_later(self._delay, self._drain)

        return put

    def _drain(self) -> None:
        pending = self._pending
        clock = time.perf_counter
        end = clock() + self._slice
        while pending:
            observe, exchange = pending.popleft()
            try:
                observe(exchange)
            except Exception as exc:
                self._on_error(exc)  # a bug in reading along
            if pending and clock() > end:
                asyncio.get_running_loop().call_soon(self._drain)  # let sockets in, then go on
                return
        self._scheduled = False
        self._after_batch()

    def drain_now(self) -> None:
        while self._pending:
            observe, exchange = self._pending.popleft()
            try:
                observe(exchange)
            except Exception as exc:
                self._on_error(exc)  # a bug in reading along


class Sidecar:
    """Runs the proxies and turns observed exchanges into observations for the collector."""

    def __init__(self, config: SidecarConfig, collector: Any, base: Path) -> None:
        self.config = config
        self.settings = config.sidecar
        self.collector = collector
        self._names: dict[str, list[str]] = {}
        for name, reading in self.settings.models.items():
            try:
                self._names[name] = reading.names(base)
            except (OSError, UnicodeDecodeError) as exc:
                why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
                where = str(base / reading.class_names_file) if reading.class_names_file else "class_names_file"
                raise ConfigError([ConfigProblem(where, None, f"sidecar.models.{name}.class_names_file",
                                                 f"cannot read: {why}")]) from None
        if collector is not None:
            collector.serve_models(reading.model or name for name, reading in self.settings.models.items())
        self.observer = _Observer(lambda: collector.count_unparsed("observation_backlog"),
                                  after_batch=collector.evaluate_silent_events,
                                  on_error=lambda exc: collector.count_internal_error(exc, "observing an exchange"))
        upstream_host, upstream_port = split_address(self.settings.triton.http)
        self.http = HttpProxy(
            upstream_host, upstream_port,
            observed_models=self._observed,
            new_inference_id=collector.new_inference_id,
            on_exchange=self.observer.handler(self.observe_http),
            on_unparsed=collector.count_unparsed,
            on_repository_change=self._forget_model_configs,
            local_handler=self._local,
            local_precheck=self._local_precheck,
            max_request_bytes=self.settings.max_request_bytes,
            upstream_timeout=self.settings.upstream_timeout_seconds,
        )
        self.grpc = GrpcProxy(
            self.settings.triton.grpc,
            observed_models=self._observed,
            new_inference_id=collector.new_inference_id,
            on_exchange=self.observer.handler(self.observe_grpc),
            on_unparsed=collector.count_unparsed,
            on_repository_change=self._forget_model_configs,
            max_message_bytes=self.settings.max_request_bytes,
        )
        self._admin_runner = None
        self.ports: dict[str, int] = {}
        # Whether each configured model is decoupled, as Triton's model config says (see _observed).
        self._decoupled: dict[str, bool] = {}
        self._model_watch: asyncio.Task | None = None
        self._model_check: asyncio.Task | None = None
        self._last_model_check = float("-inf")
        self._configs_forgotten = 0
        self._refused_logged: set[str] = set()

    def _observed(self, model: str) -> bool:
        """Whether the calls of `model` are read along: configured, and known not to be decoupled.

        A decoupled model may answer the requests of a stream in any order, or several times, and
        with empty request ids nothing in its answers says which request they belong to: read along,
        a prediction would be stored with another request's image. Triton's model config says which
        models are (read at start, every few seconds, and at once for a model not known yet)."""
        if model not in self.settings.models:
            self.collector.count_unparsed("unconfigured_model")
            return False
        decoupled = self._decoupled.get(model)
        if decoupled is False:
            return True
        if decoupled:
            self.collector.count_unparsed("decoupled_model")
        else:
            self.collector.count_unparsed("model_config_unknown")
            self._check_models_soon()
        return False

    def _forget_model_configs(self) -> None:
        """A model load or unload call is on its way to Triton: any model may come back with another
        config (decoupled, say), so none is read along until its config has been read again (asked
        for by the next call of each; Triton answers a load only once the model is loaded)."""
        self._decoupled.clear()
        self._configs_forgotten += 1  # a check in flight now would bring back what was true before

    def _check_models_soon(self) -> None:
        now = time.monotonic()
        if now - self._last_model_check >= 1.0 and (self._model_check is None or self._model_check.done()):
            self._last_model_check = now
            self._model_check = asyncio.get_running_loop().create_task(self._check_models())

    async def _check_models(self) -> None:
        """Read each configured model's transaction policy from Triton's model config. Never raises:
        a model whose config could not be read stays as it was known (or unknown: not observed)."""
        try:
            await self._read_model_configs()
        except Exception:
            log.exception("reading Triton's model configs failed")

    async def _read_model_configs(self) -> None:
        forgotten = self._configs_forgotten
        for name in self.settings.models:
            config = await self._model_config(name)
            if self._configs_forgotten != forgotten:
                return  # a model load or unload went by meanwhile: this answer may be stale
            if config is _NO_ANSWER:
                return  # Triton does not answer: what is known stays known
            decoupled = None
            if config is _REFUSED:
                # Nothing to go by: read along as before this check existed, and say so once.
                if name not in self._refused_logged:
                    self._refused_logged.add(name)
                    log.warning("Triton does not give its config of model %s to the sidecar (a restricted API): "
                                "whether it is decoupled cannot be checked, and it is observed as if it is not. A "
                                "decoupled model must not be configured for observation.", name)
                decoupled = False
            elif isinstance(config, dict):
                policy = config.get("model_transaction_policy")
                decoupled = bool(policy.get("decoupled", False)) if isinstance(policy, dict) else False
            if decoupled is None:  # not loaded (or an answer not understood): not read along until it is
                self._decoupled.pop(name, None)
                continue
            if decoupled and not self._decoupled.get(name):
                log.warning("model %s is decoupled: its answers cannot be paired with its requests, so its calls "
                            "are relayed, not observed (edgecatch_unparsed_total{reason=\"decoupled_model\"})", name)
            self._decoupled[name] = decoupled

    async def _model_config(self, name: str) -> Any:
        """Triton's config of `name` as JSON; None when Triton has no such model loaded; _NO_ANSWER;
        _REFUSED when Triton does not give it."""
        answer = await self._triton_get(f"/v2/models/{quote(name, safe='')}/config")
        if answer is not None and answer[0] not in (401, 403):
            status, body = answer
            try:
                return json.loads(body) if status == 200 else None
            except ValueError:
                return None
        # Triton's HTTP endpoint does not answer (it may be off: --allow-http=false) or keeps the
        # config to itself: over gRPC.
        config = await self.collector.run_in_background(self._grpc_model_config, name)
        return _REFUSED if config is _NO_ANSWER and answer is not None else config

    def _grpc_model_config(self, name: str) -> Any:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        try:
            client = grpcclient.InferenceServerClient(self.settings.triton.grpc)
            try:
                return client.get_model_config(name, as_json=True, client_timeout=2.0).get("config")
            finally:
                client.close()
        except InferenceServerException as exc:
            if exc.status() in ("StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"):
                return _REFUSED
            return _NO_ANSWER if exc.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED") else None

    def _grpc_ready(self) -> str:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        try:
            client = grpcclient.InferenceServerClient(self.settings.triton.grpc)
            try:
                return "ready" if client.is_server_ready(client_timeout=2.0) else "not_ready"
            finally:
                client.close()
        except InferenceServerException:
            return "unreachable"

    async def _watch_models(self) -> None:
        while True:
            await asyncio.sleep(_MODEL_CHECK_SECONDS)
            await self._check_models()

    async def _triton_get(self, path: str) -> tuple[int, bytes] | None:
        """(status, body) of `GET path` on Triton's HTTP endpoint; None when it does not answer.
        HTTP/1.0: the answer ends with the connection, never chunked."""
        host, port = split_address(self.settings.triton.http)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: triton\r\n\r\n".encode())
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(-1), 2.0)
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError):
            return None
        head, _, body = answer.partition(b"\r\n\r\n")
        try:
            return int(head.split(b"\r\n", 1)[0].split(b" ", 2)[1]), body
        except (IndexError, ValueError):
            return None

    # -- observation ---------------------------------------------------------------------------

    def observe_http(self, exchange: Exchange) -> None:
        if exchange.status != 200:
            return  # Triton refused the request: there is no prediction to observe
        try:
            limit = self.settings.max_request_bytes
            request_body = _decoded(exchange.request_body, _header(exchange.request_headers, b"content-encoding"),
                                    limit)
            response_body = _decoded(exchange.response_body, _header(exchange.response_headers, b"content-encoding"),
                                     limit)
            _, inputs = http_tensors(
                request_body, _int_header(exchange.request_headers, b"inference-header-content-length"), "inputs")
            header, outputs = http_tensors(
                response_body, _int_header(exchange.response_headers, b"inference-header-content-length"), "outputs")
        except TensorError as exc:
            self.collector.count_unparsed(f"http_{exc.reason}", detail=str(exc), model=exchange.model)
            return
        version = exchange.version or str(header.get("model_version") or "")
        self._observe_items(exchange.model, version, exchange.inference_id, inputs, outputs)

    def observe_grpc(self, exchange: GrpcExchange) -> None:
        from tritonclient.grpc import service_pb2

        try:
            request = service_pb2.ModelInferRequest.FromString(exchange.request)
            if exchange.streamed:
                message = service_pb2.ModelStreamInferResponse.FromString(exchange.response)
                if message.error_message:
                    return  # Triton refused this request of the stream: nothing to observe
                response = message.infer_response
            else:
                response = service_pb2.ModelInferResponse.FromString(exchange.response)
        except Exception:
            self.collector.count_unparsed("grpc_message")
            return
        try:
            inputs = grpc_tensors(request, "inputs")
            outputs = grpc_tensors(response, "outputs")
        except TensorError as exc:
            self.collector.count_unparsed(f"grpc_{exc.reason}", detail=str(exc), model=request.model_name)
            return
        version = request.model_version or response.model_version
        self._observe_items(request.model_name, version, exchange.inference_id, inputs, outputs)

    def _observe_items(self, model: str, version: str, inference_id: str, inputs, outputs) -> None:
        reading = self.settings.models[model]
        try:
            items: list[ReadItem] = read_items(reading, self._names[model], inputs, outputs)
        except TensorError as exc:
            self.collector.count_unparsed(exc.reason, detail=str(exc), model=model)
            return
        name = reading.model or model
        now = time.time()
        for index, item in enumerate(items):
            item_id = inference_id if len(items) == 1 else f"{inference_id}.{index}"
            observation = Observation(
                model=name, model_version=version, image_width=item.width, image_height=item.height,
                detections=item.detections, classification=item.classification,
                inference_id=item_id, timestamp=now)
            self.collector.observe(observation, item.image)

    # -- edgecatch's own routes ------------------------------------------------------------------

    def _local_precheck(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> LocalResponse | int:
        """What can be answered from an edgecatch route's headers, before its body is read; else the
        most body bytes it takes."""
        path = url.split(b"?", 1)[0]
        if path == b"/edgecatch/feedback" and method == b"POST":
            from edgecatch.feedback import answer_before_reading, feedback_body_limit

            multipart = (_header(headers, b"content-type") or b"").startswith(b"multipart/form-data")
            authorization = (_header(headers, b"authorization") or b"").decode("latin-1") or None
            length = _header(headers, b"content-length")
            early = answer_before_reading(self.collector, authorization,
                                          length.decode("latin-1") if length is not None else None, multipart)
            if early is not None:
                return _local_answer(early)
            return feedback_body_limit(self.collector, multipart)
        return 0  # the other routes take no body

    async def _local(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> LocalResponse:
        path = url.split(b"?", 1)[0]
        if path == b"/edgecatch/healthz" and method in (b"GET", b"HEAD"):
            status, report = await self.health()
            return LocalResponse(status, json.dumps(report).encode())
        if path == b"/edgecatch/feedback" and method == b"POST":
            self.observer.drain_now()  # a verdict right after its answer must find its prediction
            content_type = (_header(headers, b"content-type") or b"").decode("latin-1")
            authorization = (_header(headers, b"authorization") or b"").decode("latin-1") or None
            # Off the event loop, multipart parsing included: the proxies' clients must not wait for it.
            from edgecatch.feedback import handle_feedback_body

            answer = await self.collector.run_in_background(
                handle_feedback_body, self.collector, body, content_type, authorization)
            return _local_answer(answer)
        return LocalResponse(404, b'{"error":"no such edgecatch route"}')

    async def health(self) -> tuple[int, dict[str, Any]]:
        answer = await self._triton_get("/v2/health/ready")
        if answer is None:  # Triton may serve gRPC only (--allow-http=false)
            upstream = await self.collector.run_in_background(self._grpc_ready)
        else:
            upstream = "ready" if answer[0] == 200 else "not_ready"
        # Per configured model, whether its calls are read along (see _observed): why nothing is observed.
        models = {name: {None: "config_unknown", True: "decoupled", False: "observed"}[self._decoupled.get(name)]
                  for name in self.settings.models}
        report = {"upstream": upstream, "models": models, **self.collector.health()}
        return (200 if upstream == "ready" else 503), report

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> dict[str, int]:
        from aiohttp import web

        self.collector.start()
        try:  # before the first call: which models are decoupled (a Triton that hangs does not hold the start)
            await asyncio.wait_for(self._check_models(), 5.0)
        except asyncio.TimeoutError:
            pass
        self._model_watch = asyncio.get_running_loop().create_task(self._watch_models())
        host, port = split_address(self.settings.listen.http)
        self.ports["http"] = await self.http.start(host, port)
        self.ports["grpc"] = await self.grpc.start(self.settings.listen.grpc)
        app = web.Application(client_max_size=self.settings.max_request_bytes)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/edgecatch/{tail:.*}", self._admin_local)
        self._admin_runner = web.AppRunner(app, access_log=None)
        await self._admin_runner.setup()
        host, port = split_address(self.settings.listen.admin)
        site = web.TCPSite(self._admin_runner, host, port)
        await site.start()
        self.ports["admin"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("edgecatch sidecar: http %s grpc %s admin %s -> triton http %s grpc %s",
                 self.ports["http"], self.ports["grpc"], self.ports["admin"],
                 self.settings.triton.http, self.settings.triton.grpc)
        return self.ports

    async def _metrics(self, request):
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _admin_local(self, request):
        from aiohttp import web

        body = b""
        if request.method == "POST" and request.path == "/edgecatch/feedback":
            from edgecatch.feedback import answer_before_reading, feedback_body_limit

            multipart = request.content_type == "multipart/form-data"
            early = answer_before_reading(
                self.collector, request.headers.get("Authorization"), request.headers.get("Content-Length"), multipart)
            if early is not None:  # before reading the body
                return web.json_response(early.body, status=early.status, headers=early.headers)
            limit = feedback_body_limit(self.collector, multipart)
            chunks = bytearray()
            async for chunk in request.content.iter_chunked(65536):  # a chunked body is capped as it comes
                chunks += chunk
                if len(chunks) > limit:
                    return web.json_response({"error": f"body larger than {limit} bytes"}, status=413)
            body = bytes(chunks)
        headers = list(request.raw_headers)  # (bytes, bytes) pairs as received
        answer = await self._local(request.method.encode(), request.raw_path.encode(), headers, body)
        response = web.Response(status=answer.status, body=answer.body,
                                content_type=answer.content_type.decode())
        for name, value in answer.headers:
            response.headers[name.decode()] = value.decode()
        return response

    async def stop(self) -> None:
        grace = self.settings.stop_grace_seconds
        await asyncio.gather(self.http.close(grace), self.grpc.close(grace))
        for task in (self._model_watch, self._model_check):
            if task is not None:
                task.cancel()
        self.observer.drain_now()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self.collector.run_in_background(self.collector.stop)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _int_header(headers: list[tuple[bytes, bytes]], name: bytes) -> int | None:
    value = _header(headers, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise TensorError("header", f"{name.decode()} is not a number") from None


#: wbits for zlib: gzip's wrapper, and HTTP's "deflate" (which is the zlib format, as Triton sends it).
_CONTENT_ENCODINGS = {b"gzip": 31, b"deflate": 15}


def _decoded(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    if not encoding or encoding.lower() == b"identity":
        return body
    wbits = _CONTENT_ENCODINGS.get(encoding.lower())
    if wbits is None:
        raise TensorError("encoding", f"content encoding {encoding.decode()} is not read by edgecatch")
    try:
        return inflate(body, wbits, limit)
    except ValueError as exc:
        raise TensorError("encoding", f"body in {encoding.decode()} {exc}") from None


def _local_answer(answer: Any) -> LocalResponse:
    extra = tuple((k.encode(), v.encode()) for k, v in (answer.headers or {}).items())
    return LocalResponse(answer.status, answer.json_bytes(), headers=extra)


async def serve(config_path: str | Path) -> None:
    """Run the sidecar until SIGINT/SIGTERM, then drain and stop."""
    from edgecatch.collector import Collector

    config, base = load_sidecar_config(config_path)
    collector = Collector.from_config(config)
    sidecar = Sidecar(config, collector, base)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the start, which may wait for Triton
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    await stop.wait()
    log.info("edgecatch sidecar: stopping")
    await sidecar.stop()
