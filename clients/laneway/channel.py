"""How a client reaches the broker: the channel (plaintext or TLS, or the caller's
own), the credentials and metadata sent with every call, and per-call timeouts.

Both clients take the same connection arguments (``AsyncClient`` builds a
``grpc.aio`` channel, ``Client`` a blocking ``grpc`` one):

- ``tls=True`` for TLS with the system's root certificates; ``root_certificates``
  (PEM bytes) to trust another CA; ``certificate_chain`` and ``private_key`` (PEM)
  for mutual TLS; or ``tls=`` a ready ``grpc.ChannelCredentials``. Certificates
  imply TLS.
- ``api_key``: sent as ``authorization: Bearer <key>`` on every call, only over
  TLS (gRPC refuses to send call credentials in plaintext). On a trusted plaintext
  network, put the header in ``call_metadata`` yourself.
- ``call_credentials``: any ``grpc.CallCredentials`` (e.g. a
  ``grpc.metadata_call_credentials`` plugin), also TLS only.
- ``call_metadata``: gRPC metadata sent with every call; a method's own
  ``call_metadata`` is added to it (its values win for the same key).
- ``channel``: a channel the caller made and owns; the client then uses it as is
  (no TLS arguments) and never closes it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["CHANNEL_OPTIONS", "DEFAULT_TARGET", "Connection", "Deadline", "connection"]

DEFAULT_TARGET = "127.0.0.1:50051"

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect soon after a broker restart: the default backoff (1 s, growing) refuses
    # new calls for a second or more after the broker is already serving again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
"""The options of a channel the client makes; ``channel_options`` are added after them."""

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Connection:
    """A client's connection settings, resolved and checked."""

    #: None for a plaintext channel.
    credentials: grpc.ChannelCredentials | None
    call_credentials: grpc.CallCredentials | None
    metadata: Mapping[str, str]
    options: tuple[tuple[str, Any], ...]
    #: Seconds for a unary call when the method is given none.
    timeout: float

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(target, options=self.options)
        return grpc.aio.secure_channel(target, self.credentials, options=self.options)

    def sync_channel(self, target: str) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(target, options=self.options)
        return grpc.secure_channel(target, self.credentials, options=self.options)

    def call_metadata(self, extra: Mapping[str, str] | None) -> Metadata:
        """The client's metadata with a call's own over it."""
        merged = {**self.metadata, **extra} if extra else self.metadata
        return tuple(merged.items())

    def unary_timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


def connection(
    *,
    tls: bool | grpc.ChannelCredentials,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    call_credentials: grpc.CallCredentials | None,
    api_key: str | None,
    call_metadata: Mapping[str, str] | None,
    channel_options: Sequence[tuple[str, Any]],
    timeout: float,
    callers_channel: bool,
) -> Connection:
    """Check the client's connection arguments and resolve them (``callers_channel``: the
    caller passed a channel, so nothing about making one may be given)."""
    if timeout <= 0:
        raise ValueError(f"timeout must be more than 0 seconds, got {timeout}")
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS)")
    certificates = root_certificates is not None or certificate_chain is not None
    if isinstance(tls, grpc.ChannelCredentials) and certificates:
        raise ValueError("give either tls=<grpc.ChannelCredentials> or certificates, not both")
    if callers_channel and (tls is not False or certificates or channel_options):
        raise ValueError(
            "channel= is used as is: give the TLS settings and options to the channel you make, "
            "not to the client"
        )
    credentials: grpc.ChannelCredentials | None
    if isinstance(tls, grpc.ChannelCredentials):
        credentials = tls
    elif tls or certificates:
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    else:
        credentials = None
    if (api_key or call_credentials) and credentials is None and not callers_channel:
        raise ValueError(
            "api_key and call_credentials are sent only over TLS (tls=True or root_certificates=...); "
            "on a trusted plaintext network pass call_metadata={'authorization': 'Bearer ...'}"
        )
    creds = [c for c in (call_credentials,) if c is not None]
    if api_key:
        creds.append(grpc.access_token_call_credentials(api_key))
    combined = creds[0] if len(creds) == 1 else grpc.composite_call_credentials(*creds) if creds else None
    return Connection(
        credentials=credentials,
        call_credentials=combined,
        metadata=dict(call_metadata or {}),
        options=(*CHANNEL_OPTIONS, *channel_options),
        timeout=timeout,
    )


class Deadline:
    """A streaming call's overall deadline, spread over its resumed tries."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left for the next try (None: no deadline)."""
        return None if self._at is None else max(0.0, self._at - time.monotonic())
