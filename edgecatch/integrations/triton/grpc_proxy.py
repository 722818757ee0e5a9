"""The sidecar's gRPC side: every KServe v2 / Triton RPC forwarded as opaque bytes.

A generic handler with identity serialisers: request and response messages travel as the bytes the
client and Triton produced, never re-serialised. Only `ModelInfer` requests are parsed (to know the
model), and only after the answer is on its way is the pair read as tensors.

Transparency rules, each one a lesson from proxies that got them wrong:
- Triton's errors reach the client with Triton's status code, details and trailing metadata (an
  exception escaping a handler would arrive as UNKNOWN).
- Initial and trailing metadata are relayed; edgecatch only adds `x-edgecatch-inference-id` to the
  trailing metadata of observed `ModelInfer` calls (and to the initial metadata of a
  `ModelStreamInfer` stream, whose n-th response is observed as `<id>.<n>`).
- Deadlines propagate; Triton down gives UNAVAILABLE, as an unreachable Triton would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

__all__ = ["GrpcExchange", "GrpcProxy", "INFERENCE_ID_KEY"]

log = logging.getLogger("edgecatch.sidecar.grpc")

INFERENCE_ID_KEY = "x-edgecatch-inference-id"
SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
_STREAMING = {MODEL_STREAM_INFER: "stream_stream", "/grpc.health.v1.Health/Watch": "unary_stream"}
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(slots=True)
class GrpcExchange:
    """One observed ModelInfer (or one request/response of a stream), handed over after the answer."""

    inference_id: str
    request: object  # service_pb2.ModelInferRequest
    response: bytes  # a serialised ModelInferResponse


def _identity(data: bytes) -> bytes:
    return data


def _forwardable(metadata: tuple[tuple[str, str | bytes], ...] | None) -> list[tuple[str, str | bytes]]:
    # grpc-* keys are reserved for the library; it refuses them in outgoing metadata.
    return [(k, v) for k, v in (metadata or ()) if not k.startswith("grpc-") and k != "user-agent"]


class GrpcProxy:
    def __init__(
        self,
        upstream: str,
        *,
        observed_models: Callable[[str], bool],
        new_inference_id: Callable[[], str],
        on_exchange: Callable[[GrpcExchange], None],
        on_unparsed: Callable[[str], None],
    ) -> None:
        self.upstream = upstream
        self.observed_models = observed_models
        self.new_inference_id = new_inference_id
        self.on_exchange = on_exchange
        self.on_unparsed = on_unparsed
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        from tritonclient.grpc import service_pb2

        self._request_type = service_pb2.ModelInferRequest

    async def start(self, address: str) -> int:
        self._channel = grpc.aio.insecure_channel(self.upstream, options=_UNLIMITED)
        self._server = grpc.aio.server(options=_UNLIMITED + [("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((_Handler(self),))
        port = self._server.add_insecure_port(address)
        await self._server.start()
        return port

    async def close(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._channel is not None:
            await self._channel.close()

    def _callable(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        call = self._unary.get(method)
        if call is None:
            call = self._unary[method] = self._channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity)
        return call

    # -- unary -------------------------------------------------------------------------------

    async def unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        inference_id = None
        parsed = None
        if method == MODEL_INFER:
            try:
                parsed = self._request_type.FromString(request)
                if self.observed_models(parsed.model_name):
                    inference_id = self.new_inference_id()
            except Exception:  # a request Triton will reject as well; still forwarded
                self.on_unparsed("grpc_request")
        call = self._callable(method)(
            request, metadata=_forwardable(context.invocation_metadata()), timeout=context.time_remaining())
        try:
            response = await call
            initial = await call.initial_metadata()
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "", error.trailing_metadata() or ())
        if initial:
            await context.send_initial_metadata(_forwardable(initial))
        trailing = _forwardable(trailing)
        if inference_id is not None:
            trailing.append((INFERENCE_ID_KEY, inference_id))
            asyncio.get_running_loop().call_soon(self.on_exchange, GrpcExchange(inference_id, parsed, response))
        if trailing:
            context.set_trailing_metadata(trailing)
        return response

    # -- streaming ---------------------------------------------------------------------------

    async def stream_stream(self, method: str, requests: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        stream = self._channel.stream_stream(method, request_serializer=_identity, response_deserializer=_identity)
        call = stream(metadata=_forwardable(context.invocation_metadata()), timeout=context.time_remaining())
        observe = method == MODEL_STREAM_INFER
        stream_id = self.new_inference_id() if observe else None
        pending: asyncio.Queue[object | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for request in requests:
                    if observe:
                        pending.put_nowait(self._parse_observed(request))
                    await call.write(request)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the call ended; its status reaches the client below

        writer = asyncio.get_running_loop().create_task(pump())
        try:
            initial = await call.initial_metadata()
            extra = [(INFERENCE_ID_KEY, stream_id)] if stream_id else []
            await context.send_initial_metadata(_forwardable(initial) + extra)
            count = 0
            async for response in call:
                yield response
                if observe:
                    parsed = pending.get_nowait() if not pending.empty() else None
                    if parsed is not None:
                        from tritonclient.grpc import service_pb2

                        try:
                            message = service_pb2.ModelStreamInferResponse.FromString(response)
                        except Exception:
                            self.on_unparsed("grpc_response")
                            continue
                        if not message.error_message:
                            exchange = GrpcExchange(f"{stream_id}.{count}", parsed,
                                                    message.infer_response.SerializeToString())
                            asyncio.get_running_loop().call_soon(self.on_exchange, exchange)
                    count += 1
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(_forwardable(trailing))
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "", error.trailing_metadata() or ())
        finally:
            writer.cancel()

    def _parse_observed(self, request: bytes) -> object | None:
        try:
            parsed = self._request_type.FromString(request)
        except Exception:
            self.on_unparsed("grpc_request")
            return None
        return parsed if self.observed_models(parsed.model_name) else None

    async def unary_stream(self, method: str, request: bytes,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        stream = self._channel.unary_stream(method, request_serializer=_identity, response_deserializer=_identity)
        call = stream(request, metadata=_forwardable(context.invocation_metadata()), timeout=context.time_remaining())
        try:
            await context.send_initial_metadata(_forwardable(await call.initial_metadata()))
            async for response in call:
                yield response
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(_forwardable(trailing))
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "", error.trailing_metadata() or ())


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = self._make(method)
            if len(self._handlers) < 256:  # method names come from clients: never grow without bound
                self._handlers[method] = handler
        return handler

    def _make(self, method: str) -> grpc.RpcMethodHandler:
        proxy = self.proxy
        kind = _STREAMING.get(method, "unary_unary")
        if kind == "stream_stream":
            # grpc.aio serves a streaming handler only if it *is* an async generator function.
            async def stream_stream(requests, context):
                async for response in proxy.stream_stream(method, requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, _identity, _identity)
        if kind == "unary_stream":
            async def unary_stream(request, context):
                async for response in proxy.unary_stream(method, request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, _identity, _identity)

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await proxy.unary(method, request, context)

        return grpc.unary_unary_rpc_method_handler(unary, _identity, _identity)
