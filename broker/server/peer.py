"""What the transport says about the caller: the subject CN of its verified client
certificate (mTLS), which can name the caller.

gRPC puts the CN in the call's auth context (``x509_common_name``) only when the TLS
handshake verified the client's certificate against ``broker.tls.client_ca_file``;
on plaintext or one-way TLS there is none, so a name found here is trustworthy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["client_common_name", "transport_security"]


def _first(context: Any, key: str) -> str:
    try:
        values = context.auth_context().get(key) or []
    except (AttributeError, ValueError):  # a context without auth data (in-process tests)
        return ""
    return values[0].decode(errors="replace") if values else ""


def client_common_name(context: Any) -> str:
    """The subject CN of the caller's verified client certificate, or "" without one.

    ``context``: the handler's ``grpc.aio.ServicerContext`` (or a sync one)."""
    return _first(context, "x509_common_name")


def transport_security(context: Any) -> str:
    """``ssl`` for a TLS connection, ``insecure`` for plaintext, "" when unknown."""
    return _first(context, "transport_security_type")
