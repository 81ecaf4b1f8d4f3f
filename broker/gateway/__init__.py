"""The HTTP gateway: Laneway's API as JSON over HTTP, Server-Sent Events and a
WebSocket, for callers (browsers above all) that do not speak gRPC.

The gateway is a gRPC client of the broker, nothing more: it forwards each caller's
``Authorization`` header, so keys, roles and tenant isolation are exactly the broker's,
and it keeps no state of its own (a stream resumes by the events' ``seq``).
"""

from laneway.broker.gateway.app import GatewaySettings, create_app

__all__ = ["GatewaySettings", "create_app"]
