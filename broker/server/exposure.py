"""Secure by default: a broker reachable from other hosts must have TLS or API keys.

A plaintext broker without authentication lets anyone who reaches its port read,
stream and cancel every job. On loopback only this machine's users can; beyond it,
the broker refuses to start unless told ``--insecure`` (a trusted network, or a proxy
in front that does the securing), and the error says why and what to do.
"""

from __future__ import annotations

import ipaddress

from laneway.broker.core.errors import ConfigError

__all__ = ["check_exposure", "is_loopback"]


def is_loopback(grpc_addr: str) -> bool:
    """Whether ``HOST:PORT`` listens on loopback only: 127.0.0.0/8, ``[::1]`` or
    ``localhost``. An empty host, ``0.0.0.0``, ``[::]`` or any other name is not."""
    host = grpc_addr.rpartition(":")[0].strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_exposure(grpc_addr: str, *, tls: bool, auth: bool, insecure: bool) -> None:
    """Raise ConfigError when ``grpc_addr`` is reachable from other hosts and neither
    TLS nor authentication is on, unless ``insecure``."""
    if tls or auth or insecure or is_loopback(grpc_addr):
        return
    raise ConfigError(
        f"refusing to serve {grpc_addr} in plaintext without authentication: anyone who can "
        "reach this port could read, stream and cancel every job. Set broker.tls (cert_file, "
        "key_file) and/or auth.enabled in the config, listen on loopback (127.0.0.1), or pass "
        "--insecure if the network is trusted"
    )
