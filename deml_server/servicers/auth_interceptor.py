"""Checks the bearer token of every call before anything else runs; binds the caller for the servicers."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from deml_server.auth import (
    Authority,
    PermissionDenied,
    Principal,
    Unauthenticated,
    set_current_principal,
)

Context = grpc.aio.ServicerContext[Any, Any]
AUTHORIZATION = "authorization"


def _header(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | bytes | None:
    """The one authorization value; several are refused (which would a proxy have checked?)."""
    values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION]
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    return values[0] if values else None


def _denial(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    # A stream-stream handler answers a call of any shape; it reads nothing and aborts at once.
    async def deny(request_iterator: AsyncIterator[Any], context: Context) -> None:
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(deny)


def _bind_unary(behavior: Callable[..., Awaitable[Any]], principal: Principal) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: Context) -> Any:
        set_current_principal(principal)
        return await behavior(request, context)

    return wrapper


def _bind_stream(behavior: Callable[..., Any], principal: Principal) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # Streaming handlers written with `await context.write(...)` are coroutines.
        return _bind_unary(behavior, principal)

    async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
        set_current_principal(principal)
        async for item in behavior(request, context):
            yield item

    return wrapper


def _bound(handler: grpc.RpcMethodHandler[Any, Any], principal: Principal) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, with the caller bound while its behaviour runs."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attribute, make in kinds:
        behavior = getattr(handler, attribute)
        if behavior is None:
            continue
        wrapped = _bind_unary(behavior, principal) if attribute.endswith("unary") else _bind_stream(behavior, principal)
        return make(wrapped, handler.request_deserializer, handler.response_serializer)
    return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED when its role may not call the method."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Decide, then either refuse or run the handler with the caller bound."""
        try:
            header = _header(handler_call_details.invocation_metadata)
            principal = self.authority.authorize(header, handler_call_details.method)
        except Unauthenticated as exc:
            return _denial(grpc.StatusCode.UNAUTHENTICATED, exc.reason)
        except PermissionDenied as exc:
            return _denial(grpc.StatusCode.PERMISSION_DENIED, exc.reason)
        handler = await continuation(handler_call_details)
        if handler is None or principal is None:
            return handler
        return _bound(handler, principal)
