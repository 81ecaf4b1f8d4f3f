"""How ``laneway up`` starts the HTTP gateway: its port, and its flags to reach the
broker the stack runs (TLS with the dev CA and certificate under ``up --tls dev``)."""

from __future__ import annotations

import shlex
import socket

import structlog

from laneway.broker.cli.server_tls import UpTls
from laneway.broker.config.model import LanewayConfig
from laneway.broker.gateway.serve import check_gateway_exposure, split_listen

__all__ = ["GatewayPlan", "plan_gateway"]

log = structlog.get_logger("laneway.up")


class GatewayPlan:
    """The gateway child's arguments and the URL it will serve."""

    def __init__(self, args: list[str], url: str) -> None:
        self.args, self.url = args, url


def _free_from(host: str, port: int) -> int:
    """``port`` when free on ``host``, else the next free one (0: any free port)."""
    for candidate in [port, *range(port + 1, min(port + 100, 65536))] if port else [0]:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port for the gateway from {port} on {host}")


def _broker_target(grpc_addr: str) -> str:
    host, _, port = grpc_addr.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]") else grpc_addr


def plan_gateway(
    config: LanewayConfig, grpc_addr: str, tls: UpTls | None, *, insecure: bool
) -> GatewayPlan | None:
    """The gateway to start, or None (off in the config, or the broker's TLS comes from
    the config and ``up`` knows no CA to trust it with: run ``laneway gateway`` then)."""
    if not config.gateway.enabled:
        return None
    if grpc_addr.endswith(":0"):
        log.warning("gateway not started: the broker's port is chosen at start-up (:0)")
        return None
    args = ["gateway", "--addr", _broker_target(grpc_addr)]
    https = False
    if tls is not None:
        if not tls.broker_args:
            log.warning(
                "gateway not started: the broker's TLS comes from broker.tls; run "
                "`laneway gateway --tls-ca CA.pem` with the CA that signed it"
            )
            return None
        client = shlex.split(tls.client_args)
        renamed = {"--tls-cert": "--broker-cert", "--tls-key": "--broker-key"}
        args += [renamed.get(a, a) for a in client]
        # The dev server certificate names localhost and 127.0.0.1: HTTPS with it too.
        server = dict(zip(tls.broker_args[::2], tls.broker_args[1::2], strict=False))
        args += ["--tls-cert", server["--tls-cert"], "--tls-key", server["--tls-key"]]
        https = True
    host, port = split_listen(config.gateway.listen)
    check_gateway_exposure(config.gateway.listen, tls=https, insecure=insecure)
    listen = f"[{host}]:{_free_from(host, port)}" if ":" in host else f"{host}:{_free_from(host, port)}"
    args += ["--listen", listen, *(["--insecure"] if insecure else [])]
    return GatewayPlan(args, f"{'https' if https else 'http'}://{listen}")
