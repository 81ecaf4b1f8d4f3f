"""Credentials for test nats-servers, made offline: nkeys, an operator-signed account
with a user ``.creds`` file (JWTs written by hand: ``nsc`` is not needed), and a
private CA with server and client certificates.

The JWTs follow the NATS v2 claim format: header ``{"typ":"JWT","alg":"ed25519-nkey"}``,
claims signed (Ed25519, base64url without padding) by the issuer's nkey: the operator
signs itself and the accounts, an account signs its users.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from laneway.broker.cli.devtls import issue, new_ca, write_pair

__all__ = ["TlsFiles", "creds_file", "new_nkey", "operator_config", "tls_files"]

_PREFIX = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}


def new_nkey(kind: str) -> tuple[bytes, str]:
    """A fresh nkey of ``kind`` (operator, account, user): its seed and public key."""
    seed = nkeys.encode_seed(os.urandom(32), _PREFIX[kind])
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer_seed: bytes, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {
        "iat": int(time.time()) - 60,
        "iss": nkeys.from_seed(bytearray(issuer_seed)).public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    )
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(bytearray(issuer_seed)).sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


_UNLIMITED_ACCOUNT = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
    "wildcards": True, "conn": -1, "leaf": -1,
}  # fmt: skip
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def operator_config(directory: Path) -> tuple[str, tuple[str, bytes]]:
    """nats-server config lines for operator mode (an operator, a system account and an
    APP account with JetStream, preloaded), and APP's user as (JWT, seed)."""
    directory.mkdir(parents=True, exist_ok=True)
    op_seed, op_pub = new_nkey("operator")
    sys_seed, sys_pub = new_nkey("account")
    app_seed, app_pub = new_nkey("account")
    user_seed, user_pub = new_nkey("user")
    operator = _jwt(op_seed, op_pub, "test-operator", {"type": "operator", "system_account": sys_pub})
    system = _jwt(op_seed, sys_pub, "SYS", {"type": "account", "limits": _UNLIMITED_ACCOUNT})
    app = _jwt(op_seed, app_pub, "APP", {"type": "account", "limits": {**_UNLIMITED_ACCOUNT, **_JETSTREAM}})
    user = _jwt(
        app_seed,
        user_pub,
        "app-user",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    del sys_seed
    (directory / "operator.jwt").write_text(operator)
    body = (
        f'operator: "{directory / "operator.jwt"}"\n'
        f"system_account: {sys_pub}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {sys_pub}: {system}\n  {app_pub}: {app}\n}}\n"
    )
    return body, (user, user_seed)


def creds_file(path: Path, user: tuple[str, bytes]) -> Path:
    """A ``.creds`` file as ``nsc`` writes it: the user JWT and its nkey seed."""
    jwt, seed = user
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def tls_files(directory: Path) -> TlsFiles:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca = new_ca("nats test CA")
    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    write_pair(ca, files.ca, directory / "ca-key.pem")
    write_pair(
        issue(ca, "nats-server", server_names=("127.0.0.1", "localhost")), files.server_cert, files.server_key
    )
    write_pair(issue(ca, "laneway-test-client", client=True), files.client_cert, files.client_key)
    return files
