"""gRPC server reflection, ``grpc.reflection.v1`` as well as ``v1alpha``.

grpcio-reflection (1.85) serves only ``grpc.reflection.v1alpha.ServerReflection``,
while current tools ask for ``grpc.reflection.v1`` (``buf curl`` by default,
grpcurl, Postman and grpcui first). The v1 messages are wire-identical to
v1alpha's (same fields and numbers; only the proto package differs), so the v1
service is the v1alpha servicer behind a generic handler that reads and writes
the v1alpha message classes. Both list ``grpc.reflection.v1.ServerReflection``,
and its file (``grpc/reflection/v1/reflection.proto``, v1alpha's with the package
renamed) is added to the descriptor pool, so a client can describe it as well.

Once grpcio-reflection ships ``grpc_reflection.v1``, use it instead: importing it
after this module has run would find its file in the pool already.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["SERVICE_NAME_V1", "enable_reflection"]

SERVICE_NAME_V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PREFIX = f".{reflection_pb2.DESCRIPTOR.package}."
_V1_PREFIX = ".grpc.reflection.v1."


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) on ``server``, listing ``service_names`` and both
    reflection services."""
    pool = descriptor_pool.Default()
    _add_v1_file(pool)
    names = (*service_names, reflection.SERVICE_NAME, SERVICE_NAME_V1)
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME_V1, {"ServerReflectionInfo": v1}),)
    )


def _add_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return  # added before (another server in this process), or by a v1 module
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = _V1_PREFIX.strip(".")
    proto.ClearField("options")
    for message in proto.message_type:
        _rename_fields(message)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())


def _rename_fields(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.type_name:
            field.type_name = _renamed(field.type_name)
    for nested in message.nested_type:
        _rename_fields(nested)


def _renamed(type_name: str) -> str:
    if type_name.startswith(_V1ALPHA_PREFIX):
        return _V1_PREFIX + type_name.removeprefix(_V1ALPHA_PREFIX)
    return type_name
