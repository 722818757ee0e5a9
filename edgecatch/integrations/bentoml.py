"""edgecatch for BentoML services: one decorator on the API, one line to mount the feedback route.

```python
import bentoml
from edgecatch.integrations import bentoml as edgecatch

@bentoml.asgi_app(edgecatch.app, path="/edgecatch")     # POST /edgecatch/feedback; starts/stops delivery
@bentoml.service
class PeopleDetector:
    @bentoml.api
    @edgecatch.observe(image="image", result="detections", model="people-detector")
    def detect(self, image: PIL.Image.Image) -> list[Detection]:
        ...
```

The decorator uses `functools.wraps`, so BentoML sees the API's own signature, IO schema and route;
it returns the API's result unchanged, and nothing edgecatch does can fail the request: a result it
cannot read is counted (`edgecatch_unparsed_total{reason="result"}`) and served as is. Every response
carries `X-Edgecatch-Inference-Id`, set through BentoML's request context.

Batchable APIs (`@bentoml.api(batchable=True)`) give one observation per item. BentoML merges items
of several requests into one call, so there is no single response to carry their ids: the ids are
logged at debug level and a verdict on such a prediction is sent with its image (see feedback).

The image argument may be a PIL image (the encoded upload is kept, not the pixels), bytes, a path,
or a numpy HWC RGB array (uint8; other integer types are clipped to 0-255, floats in [0, 1] scaled).

Streaming APIs (generators) have no prediction to read and cannot be decorated: a clear TypeError
says so when the service is defined, as it does for `@edgecatch.observe` above `@bentoml.api` or
without its parentheses.
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from edgecatch.collector import Collector, get_collector
from edgecatch.integrations.results import ResultAdapter, resolve_adapter
from edgecatch.observation import Classification, Detection, Observation
from edgecatch.orientation import ROTATED, stored_box

__all__ = ["INFERENCE_ID_HEADER", "app", "observe"]

log = logging.getLogger("edgecatch.bentoml")

INFERENCE_ID_HEADER = "X-Edgecatch-Inference-Id"


def observe(
    image: str = "image",
    result: Literal["detections", "scores"] | ResultAdapter = "detections",
    *,
    model: str | None = None,
    model_version: str = "",
    batch: bool | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Observe every call of a BentoML API method.

    image: the name of the parameter that holds the image.
    result: how to read the return value: "detections", "scores", or a callable returning
        `tuple[Detection, ...]` or `Classification` (see `edgecatch.integrations.results`).
    model: the model name policies and metrics see (default: the method's qualified name).
    batch: the image parameter and the result are lists, one item per element (default: detected
        from the value: a list, or a 4-D array).
    """
    if not isinstance(image, str):
        raise TypeError("use @edgecatch.observe(...) with its parentheses (and image= naming the image "
                        "parameter), below @bentoml.api")
    adapter = resolve_adapter(result)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        import bentoml

        if not inspect.isfunction(func):
            raise TypeError(f"@edgecatch.observe(...) decorates the API's function: put it below @bentoml.api "
                            f"(it got {type(func).__name__})")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(f"{func.__qualname__} streams its output: edgecatch reads a prediction from an "
                            f"API's return value, and a stream has none. Leave this API undecorated.")
        signature = inspect.signature(func)
        names = list(signature.parameters)
        if image not in names:
            raise TypeError(f"{func.__qualname__} has no parameter named {image!r} (it has {', '.join(names)})")
        position = names.index(image)
        model_name = model or func.__qualname__.replace(".", "-").lower()
        _served_models.add(model_name)
        watcher = _Watcher(adapter, model_name, model_version, batch)
        # BentoML applies response headers only for APIs that take a context. When the API does
        # not, the wrapper's signature gains a keyword-only `ctx: bentoml.Context`: BentoML passes
        # it, leaves it out of the API's input schema, and the wrapper does not pass it on.
        own_ctx = _context_parameter(func, signature)
        add_ctx = own_ctx is None and "ctx" not in names
        if own_ctx is None and not add_ctx:
            log.warning("%s has a parameter named ctx that is not a bentoml.Context: BentoML then passes the "
                        "API no context, so its responses cannot carry %s", func.__qualname__, INFERENCE_ID_HEADER)

        def context_of(kwargs: dict[str, Any]) -> Any:
            if own_ctx is not None:
                return kwargs.get(own_ctx)
            return kwargs.pop("ctx", None) if add_ctx else None

        def image_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if image in kwargs:
                return kwargs[image]
            return args[position] if position < len(args) else None

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                ctx = context_of(kwargs)
                collector = get_collector()
                if collector is None:  # disabled: the one check it costs
                    return await func(*args, **kwargs)
                if not _started:
                    _start(collector, mounted=False)
                captured = watcher.capture(collector, image_of(args, kwargs))
                try:
                    output = await func(*args, **kwargs)
                except Exception:
                    collector.count_unparsed("api_error")
                    raise
                watcher.watch(collector, captured, output, ctx)
                return output

            wrapper = async_wrapper
        else:
            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                ctx = context_of(kwargs)
                collector = get_collector()
                if collector is None:  # disabled: the one check it costs
                    return func(*args, **kwargs)
                if not _started:
                    _start(collector, mounted=False)
                captured = watcher.capture(collector, image_of(args, kwargs))
                try:
                    output = func(*args, **kwargs)
                except Exception:
                    collector.count_unparsed("api_error")
                    raise
                watcher.watch(collector, captured, output, ctx)
                return output

            wrapper = sync_wrapper
        if add_ctx:
            parameters = list(signature.parameters.values())
            ctx_parameter = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=bentoml.Context)
            if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
                parameters.insert(len(parameters) - 1, ctx_parameter)
            else:
                parameters.append(ctx_parameter)
            wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return wrapper

    return decorate


_started = False
_start_lock = threading.Lock()
#: The model names of every decorated API: verdicts sent with their own prediction must name one.
_served_models: set[str] = set()


def _start(collector: Collector, *, mounted: bool) -> None:
    """Start the collector (delivery, reloads, metrics) once per process: with the service, by
    `app`'s lifespan; or, on a service without `app` mounted (an inner service behind
    `bentoml.depends`), on a thread of its own at the first request (which does not wait for it:
    opening a spool with a backlog takes seconds; samples wait in the hand-off queue meanwhile),
    stopped when the process exits."""
    global _started
    with _start_lock:
        if _started:
            return
        _started = True
        collector.serve_models(_served_models)
        own_logger = logging.getLogger("edgecatch")
        if own_logger.level == logging.NOTSET:
            # BentoML sets the root logger to WARNING: edgecatch's INFO lines (policy reloads, delivery
            # starting and stopping) would vanish. They follow BentoML's own logger's verbosity
            # (--verbose, quiet mode) unless the service configures edgecatch's logger itself.
            own_logger.setLevel(logging.getLogger("bentoml").getEffectiveLevel())
        if mounted:
            collector.start()
            return
        log.warning("edgecatch.app is not mounted on this service: delivery starts with its first request "
                    "and there is no feedback route here (mount it with @bentoml.asgi_app(edgecatch.app, "
                    "path=\"/edgecatch\"))")
        import atexit

        atexit.register(collector.stop)
        threading.Thread(target=_start_in_background, args=(collector,), name="edgecatch-start", daemon=True).start()


def _start_in_background(collector: Collector) -> None:
    try:
        collector.start()
    except Exception:
        log.exception("edgecatch could not start; predictions are served, samples are not delivered")


def _context_parameter(func: Callable[..., Any], signature: inspect.Signature) -> str | None:
    """The parameter BentoML passes its request context to, by BentoML's own rule: `ctx` if the API
    has one, else `context`, either unannotated or annotated `bentoml.Context`."""
    import bentoml

    parameters = signature.parameters
    name = "ctx" if "ctx" in parameters else "context" if "context" in parameters else None
    if name is None:
        return None
    annotation = parameters[name].annotation
    if annotation is inspect.Parameter.empty or annotation is bentoml.Context:
        return name
    if isinstance(annotation, str):  # postponed annotations: resolved in the API's module
        try:
            module = inspect.getmodule(func)
            resolved = eval(annotation, vars(module) if module else {})  # as typing.get_type_hints does
        except Exception:
            return None
        return name if resolved is bentoml.Context else None
    return None


class _Watcher:
    """Turns one call's image and result into observations; never raises into the API."""

    __slots__ = ("adapter", "model", "model_version", "batch")

    def __init__(self, adapter: ResultAdapter, model: str, model_version: str, batch: bool | None) -> None:
        self.adapter = adapter
        self.model = model
        self.model_version = model_version
        self.batch = batch

    def capture(self, collector: Collector, image: Any) -> Any:
        """Before the API runs: the encoded upload behind a lazily opened PIL image is still readable."""
        try:
            if isinstance(image, (list, tuple)):
                return [_captured(item) for item in image]
            return _captured(image)
        except Exception:
            return image

    def watch(self, collector: Collector, image: Any, output: Any, ctx: Any) -> None:
        try:
            batched = self.batch if self.batch is not None else _looks_batched(image)
            if batched:
                self._watch_batch(collector, image, output)
            else:
                inference_id = collector.new_inference_id()
                if ctx is not None:
                    ctx.response.headers[INFERENCE_ID_HEADER] = inference_id
                self._watch_one(collector, inference_id, image, output)
        except Exception as exc:  # edgecatch must never fail a prediction
            collector.count_internal_error(exc, f"observing a call of model {self.model}")

    def _watch_batch(self, collector: Collector, images: Any, outputs: Any) -> None:
        images, outputs = list(images), list(outputs)
        if len(images) != len(outputs):
            collector.count_unparsed("result")
            return
        for item_image, item_output in zip(images, outputs):
            inference_id = collector.new_inference_id()
            log.debug("batched prediction of %s observed as %s", self.model, inference_id)
            self._watch_one(collector, inference_id, item_image, item_output)

    def _watch_one(self, collector: Collector, inference_id: str, image: Any, output: Any) -> None:
        try:
            prediction = self.adapter(output)
        except Exception as exc:  # ResultFormatError from ours; anything from a custom adapter
            collector.count_unparsed("result", detail=f"{type(exc).__name__}: {exc}")
            return
        detections: tuple[Detection, ...] = ()
        if isinstance(prediction, Classification):
            pass
        elif isinstance(prediction, (tuple, list)) and all(isinstance(d, Detection) for d in prediction):
            detections = tuple(prediction)
        else:
            collector.count_unparsed("result", detail=f"the result adapter returned {type(prediction).__name__}, "
                                     "not Detection items or a Classification")
            return
        kept, width, height = _keepable_image(image)
        if kept is None:
            collector.count_unparsed("image")
        orientation = image.orientation if isinstance(image, _Captured) else 1
        if orientation != 1:
            # The model saw the upright image (width x height): pre-labels go in the stored pixels,
            # with the stored size, and delivery orients both (the sizes alone cannot tell for a
            # flip, a 180° turn or a square image).
            detections = tuple(Detection(d.class_name, d.confidence, stored_box(d.box, orientation, width, height),
                                         d.class_id) for d in detections)
            if orientation in ROTATED:
                width, height = height, width
        observation = Observation(
            model=self.model,
            model_version=self.model_version,
            image_width=width,
            image_height=height,
            detections=detections,
            classification=prediction if isinstance(prediction, Classification) else None,
            inference_id=inference_id,
            timestamp=time.time(),
        )
        collector.observe(observation, kept)


def _looks_batched(image: Any) -> bool:
    if isinstance(image, (list, tuple)):
        return True
    ndim = getattr(image, "ndim", None)
    return ndim == 4


def _keepable_image(image: Any) -> tuple[Any, int, int]:
    """What to keep of the image (encoded bytes where they exist) and its size as the model saw it."""
    if image is None:
        return None, 0, 0
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), 0, 0  # size read in the background when the sample is prepared
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes(), 0, 0
        except OSError:
            return None, 0, 0
    if isinstance(image, _Captured):  # a PIL image and, when it was still readable, its upload
        width, height = image.size
        return (image.encoded if image.encoded is not None else image.image), width, height
    size = getattr(image, "size", None)
    if hasattr(image, "getbands") and isinstance(size, tuple):  # PIL, already decoded
        return image, size[0], size[1]
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) in (2, 3):  # numpy HWC
        return image, int(shape[1]), int(shape[0])
    return None, 0, 0


class _Captured:
    """A PIL image with the encoded bytes it was opened from (read before the API decodes it)."""

    __slots__ = ("image", "encoded", "size", "orientation")

    def __init__(self, image: Any, encoded: bytes | None) -> None:
        self.image = image
        self.encoded = encoded
        width, height = image.size
        self.orientation = 1
        try:
            # Models decode with the EXIF orientation applied (and so does delivery): the size the
            # model saw is the upright one, and a 90°-rotated upload swaps width and height.
            orientation = image.getexif().get(0x0112, 1)
            self.orientation = orientation if orientation in range(1, 9) else 1
        except Exception:
            pass
        if self.orientation in ROTATED:
            width, height = height, width
        self.size = (width, height)


def _captured(image: Any) -> Any:
    if hasattr(image, "getbands") and getattr(image, "fp", None) is not None:
        return _Captured(image, _upload_bytes(image))
    return image


def _upload_bytes(image: Any) -> bytes | None:
    """The encoded upload behind a PIL image BentoML opened from the request, if still readable."""
    fp = getattr(image, "fp", None)
    if fp is None or getattr(image, "format", None) is None:
        return None
    # Starlette keeps uploads under 1 MB in a SpooledTemporaryFile backed by a BytesIO, whose
    # getvalue() hands out its own buffer without copying: no 60 KB memcpy per request.
    memory = fp if isinstance(fp, io.BytesIO) else getattr(fp, "_file", None)
    if isinstance(memory, io.BytesIO):
        try:
            return memory.getvalue() or None
        except ValueError:  # closed
            return None
    try:
        position = fp.tell()
        fp.seek(0)
        data = fp.read()
        fp.seek(position)
        return data or None
    except (OSError, ValueError, AttributeError):
        return None


def _make_app() -> Any:
    """The Starlette app mounted at /edgecatch: the feedback route, and delivery's lifespan."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from edgecatch.feedback import answer_before_reading, feedback_body_limit, handle_feedback_body

    def respond(answer: Any) -> JSONResponse:
        return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

    async def feedback(request: Request) -> JSONResponse:
        collector = get_collector()
        if collector is None:
            return JSONResponse({"error": "edgecatch is disabled"}, status_code=503)
        content_type = request.headers.get("content-type", "")
        multipart = content_type.startswith("multipart/form-data")
        authorization = request.headers.get("authorization")
        early = answer_before_reading(collector, authorization, request.headers.get("content-length"), multipart)
        if early is not None:
            return respond(early)
        limit = feedback_body_limit(collector, multipart)
        chunks = bytearray()
        async for chunk in request.stream():  # a body without Content-Length is capped as it comes
            chunks += chunk
            if len(chunks) > limit:
                return JSONResponse({"error": f"body larger than {limit} bytes"}, status_code=413)
        # Parsed (multipart included) off the event loop, in the collector's background thread.
        answer = await collector.run_in_background(
            handle_feedback_body, collector, bytes(chunks), content_type, authorization)
        return respond(answer)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        collector = get_collector()
        if collector is not None:
            _start(collector, mounted=True)
        try:
            yield
        finally:
            if collector is not None:
                await collector.run_in_background(collector.stop)

    return Starlette(routes=[Route("/feedback", feedback, methods=["POST"])], lifespan=lifespan)


app = _make_app()
