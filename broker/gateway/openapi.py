"""The OpenAPI 3.1 document, generated from the route table and the proto descriptors
(bodies are the proto JSON mapping, so the schemas come from the messages themselves)."""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

import laneway
from laneway.broker.gateway.routes import ROUTES, Route
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import job_pb2, ops_pb2

__all__ = ["openapi_document"]

_ROOTS: dict[str, Descriptor] = {
    "JobSpec": job_pb2.JobSpec.DESCRIPTOR,
    "Job": job_pb2.Job.DESCRIPTOR,
    "JobEvent": job_pb2.JobEvent.DESCRIPTOR,
    "SubmitResponse": pb.SubmitResponse.DESCRIPTOR,
    "SubmitBatchRequest": pb.SubmitBatchRequest.DESCRIPTOR,
    "SubmitBatchResponse": pb.SubmitBatchResponse.DESCRIPTOR,
    "CancelJobRequest": pb.CancelJobRequest.DESCRIPTOR,
    "CancelJobResponse": pb.CancelJobResponse.DESCRIPTOR,
    "GetServerInfoResponse": ops_pb2.GetServerInfoResponse.DESCRIPTOR,
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer"},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer"},
}
_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details, with the broker's ErrorInfo reason and metadata.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "reason": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "field": {"type": "string"},
    },
}


def _name(full_name: str) -> str:
    return re.sub(r"^laneway\.v1\.", "", full_name).replace(".", "_")


class _Schemas:
    def __init__(self) -> None:
        self.out: dict[str, Any] = {"Problem": _PROBLEM}

    def ref(self, name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def message(self, d: Descriptor) -> dict[str, Any]:
        if d.full_name in _WELL_KNOWN:
            return _WELL_KNOWN[d.full_name]
        name = _name(d.full_name)
        if name not in self.out:
            self.out[name] = {}  # placeholder: recursive messages refer to it
            props = {f.json_name: self.field(f) for f in d.fields}
            self.out[name] = {"type": "object", "properties": props}
        return self.ref(name)

    def enum(self, e: EnumDescriptor) -> dict[str, Any]:
        name = _name(e.full_name)
        self.out.setdefault(name, {"type": "string", "enum": [v.name for v in e.values]})
        return self.ref(name)

    def field(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        one = self.single(f)
        return {"type": "array", "items": one} if f.is_repeated else one

    def single(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None:
            return self.message(f.message_type)
        if f.enum_type is not None:
            return self.enum(f.enum_type)
        # 64-bit integers are strings in the proto JSON mapping (a parser accepts numbers too).
        return _SCALARS.get(f.type, {"type": ["string", "integer"]})


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if route.response is not None:
        ok["content"] = {route.content: {"schema": schemas.message(_ROOTS[route.response])}}
    elif route.content == "text/event-stream":
        schemas.message(_ROOTS["JobEvent"])
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    problem = {"application/problem+json": {"schema": schemas.ref("Problem")}}
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": {
            "200": ok,
            **{code: {"description": text} for code, text in route.extra_responses},
            "default": {"description": "An error (problem details).", "content": problem},
        },
    }
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
              for n in re.findall(r"\{(\w+)\}", route.path)]  # fmt: skip
    params += [{"name": p.name, "in": p.where, "description": p.description, "schema": p.schema}
               for p in route.params]  # fmt: skip
    if params:
        op["parameters"] = params
    if route.request is not None:
        body = {"application/json": {"schema": schemas.message(_ROOTS[route.request])}}
        op["requestBody"] = {"required": route.request != "CancelJobRequest", "content": body}
    return op


def openapi_document(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (every route the gateway serves)."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "security": [{}],
            "responses": {"200": {"description": "OK", "content": {"application/json": {}}}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Laneway HTTP gateway", "version": laneway.__version__},
        "components": {
            "schemas": schemas.out,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }
