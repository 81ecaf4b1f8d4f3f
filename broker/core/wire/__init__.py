"""Protobuf <-> domain objects, pure (no IO, tested without a server). Only these
modules and the gRPC edge import generated ``*_pb2`` code."""
