"""Test certificates: a CA, a server certificate for localhost/127.0.0.1/::1 and a
client certificate, written as PEM files (made with ``cryptography`` through the same
building blocks as ``laneway up --tls dev``).

    python -m tests.certs DIR   # prints the paths as one JSON object (TypeScript tests)
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from laneway.broker.cli.devtls import issue, new_ca, write_pair

__all__ = ["CertSet", "make_certs"]


@dataclass(frozen=True)
class CertSet:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def read(self, name: str) -> bytes:
        path: Path = getattr(self, name)
        return path.read_bytes()


def make_certs(directory: Path, *, ca_cn: str = "Laneway test CA", client_cn: str = "test-client") -> CertSet:
    """A fresh CA and the certificates it signs, under ``directory``."""
    ca = new_ca(ca_cn)
    certs = CertSet(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    write_pair(ca, certs.ca, directory / "ca.key")
    write_pair(
        issue(ca, "localhost", server_names=("localhost", "127.0.0.1", "::1")),
        certs.server_cert,
        certs.server_key,
    )
    write_pair(issue(ca, client_cn, client=True), certs.client_cert, certs.client_key)
    return certs


if __name__ == "__main__":
    made = make_certs(Path(sys.argv[1]))
    print(json.dumps({k: str(v) for k, v in asdict(made).items()}))
