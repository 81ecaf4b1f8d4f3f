"""Authentication and roles at the gRPC edge: the interceptor and the role each RPC needs.

With ``auth.enabled`` every RPC except health checks needs ``authorization: Bearer
<key>`` metadata naming a key the ``KeyRing`` knows: without one the caller gets
UNAUTHENTICATED; a key whose role is short of the RPC's (``REQUIRED_ROLE``)
PERMISSION_DENIED, metadata ``role`` and ``required``. Both are raised as
``laneway.errors`` exceptions and answered through ``status.status_for``, so they
carry ErrorInfo like every other error.

The principal is set inside the handler's own invocation (the wrapped behaviour),
not in ``intercept_service``: grpc runs the handler in a task of its own, which a
context variable set in the interceptor never reaches.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from laneway.broker.config.security import Role
from laneway.broker.server.keyring import KeyRing
from laneway.broker.server.principal import Principal, current_principal, reset_principal, set_principal
from laneway.broker.server.status import status_for
from laneway.errors import ApiError, PermissionDenied, Unauthenticated
from laneway.v1 import broker_service_pb2

__all__ = [
    "OPEN_SERVICES",
    "REFLECTION_ROLE",
    "REQUIRED_ROLE",
    "AuthInterceptor",
    "bearer_key",
    "require_role",
]

_SERVICE = broker_service_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name

#: The role each BrokerService RPC needs (``ROLES`` order: reader < submitter < admin).
#: A method missing here needs admin: a new RPC is closed until it is listed.
REQUIRED_ROLE: dict[str, Role] = {
    "Submit": "submitter",
    "SubmitBatch": "submitter",
    "Run": "submitter",
    "CancelJob": "submitter",
    "RedriveDeadLetters": "submitter",  # with ``all``: admin (checked in the handler)
    "GetJob": "reader",
    "StreamResults": "reader",
    "ListDeadLetters": "reader",
    "GetServerInfo": "reader",
    "ListWebhookDeadLetters": "reader",  # as ListDeadLetters
    "GetWebhookDeadLetter": "reader",
    "RedeliverWebhookDeadLetters": "submitter",  # as RedriveDeadLetters (with ``all``: admin)
    "StartPipeline": "submitter",  # as Submit
    "CancelPipelineRun": "submitter",  # as CancelJob
    "ResumePipelineRun": "submitter",  # as RedriveDeadLetters
    "GetPipelineRun": "reader",  # as GetJob
    "StreamPipelineRun": "reader",  # as StreamResults
    "ListPipelineRuns": "reader",  # as ListDeadLetters
    "GetStats": "admin",
    "GetProviderHealth": "admin",
}
#: Services callable without a key: health checks (load balancers and orchestrators
#: probe them without credentials).
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
#: Reflection describes the API, so it needs a key; any role will do.
REFLECTION_ROLE: Role = "reader"
_REFLECTION_SERVICES = frozenset(
    {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
)
_BEARER = "bearer "


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The key of ``authorization: Bearer <key>`` ("" when there is none);
    ``Unauthenticated`` when the header is there in another form."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if text[: len(_BEARER)].lower() != _BEARER or not text[len(_BEARER) :].strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <key>'")
        return text[len(_BEARER) :].strip()
    return ""


def require_role(required: Role, action: str, principal: Principal | None = None) -> None:
    """``PermissionDenied`` unless the caller's role is ``required`` or stronger."""
    who = principal or current_principal()
    if not who.may(required):
        named = f"API key {who.key_id}" if who.key_id else "the caller"
        raise PermissionDenied(
            f"{named} has role {who.role}; {action} needs {required}",
            metadata={"role": who.role, "required": required},
        )


def _required(method: str) -> Role | None:
    """The role ``method`` (``/package.Service/Method``) needs; None when it is open."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service in OPEN_SERVICES:
        return None
    if service == _SERVICE:
        return REQUIRED_ROLE.get(name, "admin")
    if service in _REFLECTION_SERVICES:
        return REFLECTION_ROLE
    return "admin"


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in the stubs only
    """Authenticates every call but health checks and runs its handler as the key's principal."""

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(handler_call_details)
        method: str = handler_call_details.method
        required = _required(method)
        if handler is None or required is None:
            return handler  # type: ignore[no-any-return]
        metadata = handler_call_details.invocation_metadata
        action = method.rsplit("/", 1)[-1]

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            try:
                principal = await self._keys.authenticate(bearer_key(metadata))
                require_role(required, action, principal)
            except ApiError as err:
                await context.abort_with_status(status_for(err))  # type: ignore[attr-defined]
                raise  # abort_with_status raises; this keeps type checkers honest
            return principal

        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_unary(handler.unary_unary, admit))  # type: ignore[no-any-return]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_streaming(handler.unary_stream, admit))  # type: ignore[no-any-return]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_unary(handler.stream_unary, admit))  # type: ignore[no-any-return]
        return handler._replace(stream_stream=_streaming(handler.stream_stream, admit))  # type: ignore[no-any-return]


Admit = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal]]


def _unary(behaviour: Callable[..., Any], admit: Admit) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = set_principal(await admit(context))
        try:
            return await behaviour(request, context)
        finally:
            reset_principal(token)

    return call


def _streaming(behaviour: Callable[..., Any], admit: Admit) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        token = set_principal(await admit(context))
        result = None
        try:
            result = behaviour(request, context)
            if inspect.isawaitable(result):  # a handler that writes with context.write
                await result
                return
            async for item in result:
                yield item
        finally:
            # Closed at once, as grpc would close the handler's own generator (its finally
            # blocks, e.g. Run's on_disconnect, must not wait for the garbage collector).
            aclose = getattr(result, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                with contextlib.suppress(ValueError):  # closed from another context: nothing to restore
                    reset_principal(token)

    return call
