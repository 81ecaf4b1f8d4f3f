"""Request bodies at the gRPC edge: decoding that never fails before the handler.

grpcio deserializes a request before the handler runs; a body that is not valid
protobuf (truncated, corrupt, a string field holding bad UTF-8) raises there and
the caller gets UNKNOWN with the exception's class name. Here the deserializer
hands such a body on as ``Undecodable``, naming the field at fault (found by
walking the wire format against the message descriptor), and the status
wrappers (``laneway.broker.server.status``) answer INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from laneway.v1 import broker_service_pb2

__all__ = ["Undecodable", "add_broker_service", "locate_fault"]

_SERVICE = broker_service_pb2.DESCRIPTOR.services_by_name["BrokerService"]
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request body that is not a valid message: ``field`` at fault ("" when the
    fault is in the body itself, not in a field) and what is wrong."""

    message_type: str
    field: str
    why: str


class _Fault(Exception):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(why)
        self.field = field
        self.why = why


def locate_fault(data: bytes, descriptor: Descriptor) -> tuple[str, str]:
    """(field path, what is wrong) of the first fault of ``data`` read as ``descriptor``;
    ("", ...) when no field is to blame (a bad tag at the top, nesting too deep)."""
    try:
        _walk(data, descriptor, "")
    except _Fault as fault:
        return fault.field, fault.why
    # protobuf refused it for a reason the walk does not check (e.g. nesting depth).
    return "", "not a valid message"


def _varint(data: bytes, pos: int, field: str) -> tuple[int, int]:
    value = shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if pos >= len(data):
            raise _Fault(field, "truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Fault(field, "malformed varint")


def _walk(data: bytes, descriptor: Descriptor, path: str) -> None:
    pos, seen = 0, dict[int, int]()
    while pos < len(data):
        tag, pos = _varint(data, pos, path)
        number, wire = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        name = path
        if field is not None:
            name = f"{path}.{field.name}" if path else field.name
            if field.is_repeated and not _is_map(field):
                name = f"{name}[{seen.get(number, 0)}]"
                seen[number] = seen.get(number, 0) + 1
        if number == 0:
            raise _Fault(path, "field number 0")
        if wire == 0:
            _, pos = _varint(data, pos, name)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise _Fault(name, "truncated")
        elif wire == 2:
            length, pos = _varint(data, pos, name)
            if pos + length > len(data):
                raise _Fault(name, "truncated")
            chunk, pos = data[pos : pos + length], pos + length
            if field is not None and field.message_type is not None:
                _walk(chunk, field.message_type, name)
            elif field is not None and field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Fault(name, "not valid UTF-8") from None
        else:
            raise _Fault(name, f"wire type {wire} is not used by this API")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _lenient(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    descriptor: Descriptor = cls.DESCRIPTOR  # type: ignore[assignment]  # upb's is the same type

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError:
            field, why = locate_fault(data, descriptor)
            return Undecodable(descriptor.full_name, field, why)

    return deserialize


def add_broker_service(servicer: object, server: grpc.aio.Server) -> None:
    """``add_BrokerServiceServicer_to_server``, but every request is decoded leniently.

    Built from the service descriptor, so a new RPC needs nothing here."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in _SERVICE.methods:
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        factory: Callable[..., grpc.RpcMethodHandler[Any, Any]] = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        behaviour: Any = getattr(servicer, method.name)
        handlers[method.name] = factory(
            behaviour,
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)  # type: ignore[attr-defined]
