"""``laneway up --tls dev``: a throwaway local CA and the certificates it signs.

For trying TLS and mTLS on one machine without a PKI: a CA, a server certificate for
``localhost``, ``127.0.0.1``, ``::1`` (and this host's name), and a client certificate
(subject CN ``laneway-dev-client``), written under the data directory with the keys
readable by their owner only. They are reused while present, consistent and valid for
at least another week; otherwise all are made anew. Never use them in production:
the CA's key lies beside the certificates it signs.

The building blocks (``new_ca``, ``issue``) also make the test suite's certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEV_CLIENT_CN", "DevCerts", "Issued", "ensure_dev_certs", "issue", "new_ca", "write_pair"]

DEV_CLIENT_CN = "laneway-dev-client"
_VALID_FOR = dt.timedelta(days=365)
_RENEW_BEFORE = dt.timedelta(days=7)
_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Laneway dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def new_ca(cn: str = "Laneway dev CA", valid_for: dt.timedelta = _VALID_FOR) -> Issued:
    """A self-signed CA certificate and key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return Issued(cert, key)


def issue(
    ca: Issued,
    cn: str,
    *,
    server_names: tuple[str, ...] = (),
    client: bool = False,
    valid_for: dt.timedelta = _VALID_FOR,
) -> Issued:
    """A certificate ``ca`` signs: for a server (``server_names``: DNS names and IP
    addresses it answers to), a client (``client``), or both."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + valid_for, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(n) for n in server_names]), critical=False
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_pair(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Write the certificate and its key (the key readable by its owner only), each
    replaced atomically so a reader never sees half a file."""
    _write(cert_path, issued.cert_pem, 0o644)
    _write(key_path, issued.key_pem, 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass(frozen=True)
class DevCerts:
    """Where ``ensure_dev_certs`` put the files."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"


def _server_names() -> tuple[str, ...]:
    host = socket.gethostname()
    return _SERVER_NAMES + ((host,) if host and host not in _SERVER_NAMES else ())


def ensure_dev_certs(directory: Path) -> tuple[DevCerts, bool]:
    """The dev CA and certificates under ``directory``: reused when usable, else made
    anew. Returns them and whether they were made now."""
    certs = DevCerts(directory)
    if _usable(certs):
        return certs, False
    ca = new_ca()
    write_pair(issue(ca, "localhost", server_names=_server_names()), certs.server_cert, certs.server_key)
    write_pair(issue(ca, DEV_CLIENT_CN, client=True), certs.client_cert, certs.client_key)
    write_pair(ca, certs.ca, certs.ca_key)  # last: its presence marks a complete set
    return certs, True


def _usable(certs: DevCerts) -> bool:
    """Every file present and parsable, each certificate signed by the CA, matching its
    key, valid now and for at least ``_RENEW_BEFORE``; the server's names all covered."""
    try:
        ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
        pairs = [
            (
                x509.load_pem_x509_certificate(c.read_bytes()),
                serialization.load_pem_private_key(k.read_bytes(), None),
            )
            for c, k in ((certs.server_cert, certs.server_key), (certs.client_cert, certs.client_key))
        ]
    except (OSError, ValueError, TypeError):
        return False
    now = _now()
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    for cert, key in pairs:
        if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
            return False
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
    for cert in (ca, *(c for c, _ in pairs)):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc - _RENEW_BEFORE:
            return False
    try:
        names = pairs[0][0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(n) for n in names.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in names.get_values_for_type(x509.IPAddress)
    }
    return set(_SERVER_NAMES) <= have
