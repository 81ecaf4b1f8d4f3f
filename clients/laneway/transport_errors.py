"""Plain words for TLS mismatches between a client and the broker.

gRPC reports a failed connection as UNAVAILABLE with the transport's last error, such
as ``Socket closed`` (what a plaintext client sees from a TLS broker) or an OpenSSL
code. ``explain`` adds what most likely went wrong and what to pass instead, so
``Unavailable`` says ``TLS`` where the cause is TLS. Only failures to connect get a
hint; everything else is left as gRPC said it.
"""

from __future__ import annotations

__all__ = ["explain"]

_CONNECT = "failed to connect to all addresses"

_PLAINTEXT_TO_TLS = (
    "the broker closed the connection at once: it may require TLS, and this client "
    "connects in plaintext (pass tls=True, or root_certificates= with the broker's CA; "
    "CLI: --tls-ca or LANEWAY_TLS_CA)"
)
_CLIENT_CERT = (
    "the broker closed the connection during the TLS handshake: it may require a client "
    "certificate that its CA signed (mTLS: certificate_chain= and private_key=; "
    "CLI: --tls-cert and --tls-key)"
)
_UNTRUSTED = (
    "TLS handshake failed: the broker's certificate is not signed by a CA this client "
    "trusts (pass the CA as root_certificates=; CLI: --tls-ca or LANEWAY_TLS_CA)"
)
_WRONG_NAME = (
    "TLS handshake failed: the broker's certificate does not name the address connected "
    "to (connect by a name or IP address in its subjectAltName)"
)
_NOT_TLS = (
    "TLS handshake failed: the broker does not speak TLS on this port (plaintext broker? "
    "connect without tls= and certificates)"
)


def explain(message: str, *, tls: bool | None) -> str:
    """``message`` with a hint appended when it is a connection failure whose cause is
    most likely TLS. ``tls``: whether the client's channel uses TLS (None: unknown)."""
    if _CONNECT not in message:
        return message
    hint = ""
    if "CERTIFICATE_VERIFY_FAILED" in message:
        hint = _UNTRUSTED
    elif "WRONG_VERSION_NUMBER" in message:
        hint = _NOT_TLS
    elif "Peer name" in message or "not in peer certificate" in message:
        hint = _WRONG_NAME
    elif "Socket closed" in message or "Connection reset" in message:
        hint = _PLAINTEXT_TO_TLS if tls is False else _CLIENT_CERT if tls else ""
    elif "handshake" in message.lower():
        hint = "TLS handshake failed"
    return f"{message} ({hint})" if hint else message
