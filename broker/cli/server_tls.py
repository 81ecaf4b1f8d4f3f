"""The broker's TLS from the command line: ``laneway broker --tls-cert/--tls-key
[--tls-client-ca]`` over the config's ``broker.tls``, ``--insecure``, and
``laneway up --tls dev|dev-mtls`` (certificates from ``devtls``, handed to the broker
process as those flags, and the words that tell clients how to connect).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from laneway.broker.cli.devtls import ensure_dev_certs
from laneway.broker.config.model import LanewayConfig
from laneway.broker.config.security import BrokerTlsConfig

__all__ = [
    "DevTls",
    "InsecureOpt",
    "ServerCaOpt",
    "ServerCertOpt",
    "ServerKeyOpt",
    "UpTls",
    "UpTlsOpt",
    "prepare_up_tls",
    "with_broker_tls",
]

InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Serve plaintext without authentication beyond loopback (a trusted network only).",
    ),
]
ServerCertOpt = Annotated[
    Path | None, typer.Option("--tls-cert", help="PEM certificate chain to serve TLS with (over broker.tls).")
]
ServerKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")]
ServerCaOpt = Annotated[
    Path | None,
    typer.Option("--tls-client-ca", help="PEM CA of client certificates: require them (mTLS)."),
]


class DevTls(StrEnum):
    dev = "dev"
    dev_mtls = "dev-mtls"


UpTlsOpt = Annotated[
    DevTls | None,
    typer.Option(
        "--tls",
        help="dev: TLS with a throwaway local CA made under --data-dir; dev-mtls: also require "
        "its client certificate.",
    ),
]


def with_broker_tls(
    config: LanewayConfig, cert: Path | None, key: Path | None, client_ca: Path | None
) -> LanewayConfig:
    """``config`` with ``broker.tls`` from the flags, when given."""
    if cert is None and key is None and client_ca is None:
        return config
    if cert is None or key is None:
        raise typer.BadParameter("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
    tls = BrokerTlsConfig(
        cert_file=str(cert), key_file=str(key), client_ca_file=str(client_ca) if client_ca else ""
    )
    return config.model_copy(update={"broker": config.broker.model_copy(update={"tls": tls})})


@dataclass(frozen=True)
class UpTls:
    """What ``laneway up`` adds for TLS: the broker's flags and the client's."""

    broker_args: list[str]
    client_args: str
    """Flags a client command needs (``--tls-ca ...``), for the banner."""
    note: str
    """A banner line on where the CA is."""


def prepare_up_tls(
    mode: DevTls | None, data_dir: Path, configured: BrokerTlsConfig | None = None
) -> UpTls | None:
    """Dev certificates under ``data_dir/tls`` (made or reused) for ``--tls``; without
    it, the words for the config's own ``broker.tls`` (None: plaintext)."""
    if mode is None:
        if configured is None:
            return None
        mutual = " --tls-cert CLIENT.pem --tls-key CLIENT.key" if configured.client_ca_file else ""
        return UpTls(
            [],
            f"--tls-ca CA.pem{mutual}",
            f"TLS from broker.tls ({configured.cert_file}): clients pass --tls-ca with the CA "
            f"that signed it{' and a client certificate (mTLS)' if mutual else ''}.\n",
        )
    certs, made = ensure_dev_certs(data_dir / "tls")
    ca = certs.ca.resolve()
    broker_args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    client_args = f"--tls-ca {ca}"
    if mode is DevTls.dev_mtls:
        broker_args += ["--tls-client-ca", str(certs.ca)]
        client_args += f" --tls-cert {certs.client_cert.resolve()} --tls-key {certs.client_key.resolve()}"
    note = (
        f"TLS{' with client certificates (mTLS)' if mode is DevTls.dev_mtls else ''}: "
        f"a throwaway dev CA ({'made now' if made else 'reused'}) at {ca}; clients pass "
        f"{client_args} (or LANEWAY_TLS_CA) and connect to localhost or 127.0.0.1.\n"
    )
    return UpTls(broker_args, client_args, note)
