"""TLS on the broker's gRPC port, with certificates reloaded when their files change.

Certificates are rotated on disk (cert-manager, a cron job, ``laneway up --tls dev``)
while the broker keeps serving: gRPC asks ``ReloadingTls.fetch`` for the certificate
configuration at every new TLS handshake, and it answers from the files, re-read only
when one of them changed (size, mtime or inode: an atomic rename or a Kubernetes secret's
symlink swap counts). A half-written rotation (a certificate that does not match its
key, a file missing or unparsable) keeps the previous configuration and logs why, once
per change; existing connections keep the certificate they were opened with.

mTLS: with ``client_ca_file``, every client must present a certificate that CA
signed. gRPC's Python server can require and verify a client certificate or not ask for
one at all, never verify one that is optional, so ``require_client_cert: false`` with a
CA is refused by the config (``BrokerTlsConfig``). The subject CN of the verified client
certificate is what ``laneway.broker.server.peer.client_common_name`` reads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from laneway.broker.config.security import BrokerTlsConfig
from laneway.broker.core.errors import ConfigError

__all__ = ["ReloadingTls", "TlsMaterial", "load_material"]

log = structlog.get_logger("laneway.broker.tls")

_Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one consistent set of files."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


def _files(tls: BrokerTlsConfig) -> list[tuple[str, str]]:
    named = [("broker.tls.cert_file", tls.cert_file), ("broker.tls.key_file", tls.key_file)]
    if tls.client_ca_file:
        named.append(("broker.tls.client_ca_file", tls.client_ca_file))
    return named


def _signature(tls: BrokerTlsConfig) -> _Signature:
    """What identifies the files' current contents without reading them (raises OSError)."""
    out = []
    for _key, path in _files(tls):
        st = os.stat(path)
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def load_material(tls: BrokerTlsConfig) -> TlsMaterial:
    """Read and check the files: each parses, and the certificate matches the key. The
    error names the config key and the file, never the key material."""
    data: dict[str, bytes] = {}
    for key, path in _files(tls):
        try:
            data[key] = Path(path).read_bytes()
        except OSError as err:
            raise ConfigError(f"{key}: cannot read {path}: {err.strerror or err}") from None
    cert_pem, key_pem = data["broker.tls.cert_file"], data["broker.tls.key_file"]
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(
            f"broker.tls.cert_file: {tls.cert_file} holds no PEM certificate (BEGIN CERTIFICATE)"
        ) from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"broker.tls.key_file: {tls.key_file} holds no unencrypted PEM private key"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if chain[0].public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise ConfigError(
            f"broker.tls.key_file: {tls.key_file} is not the private key of the certificate "
            f"in {tls.cert_file}"
        )
    client_ca = data.get("broker.tls.client_ca_file")
    if client_ca is not None:
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError:
            raise ConfigError(
                f"broker.tls.client_ca_file: {tls.client_ca_file} holds no PEM certificate"
            ) from None
    return TlsMaterial(cert_pem, key_pem, client_ca)


class ReloadingTls:
    """Server credentials from ``broker.tls`` that follow the files as they change.

    ``credentials()`` is what ``server.add_secure_port`` takes; the files are read (and
    checked) once here, so a broker with unusable TLS files does not start."""

    def __init__(self, tls: BrokerTlsConfig) -> None:
        self._tls = tls
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self._signature = _signature_or_error(tls)
        self._material = load_material(tls)
        self._failed: _Signature | None = None
        self.reloads = 0
        """How many times changed files were taken up (for tests and logs)."""

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (mTLS)."""
        return bool(self._tls.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._material.configuration(),
            # The stubs say it must return one; gRPC takes None as "keep the current one".
            cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch),
            require_client_authentication=self.mutual,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, at each handshake: a new configuration when the files changed
        (and make a consistent set), else None (keep the current one). Never raises."""
        try:
            with self._lock:
                return self._reload_if_changed()
        except Exception as err:  # a fetcher that raises fails the handshake
            log.warning("broker TLS files could not be checked", error=str(err))
            return None

    def _reload_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            signature = _signature(self._tls)
        except OSError as err:
            if self._failed != ():
                self._failed = ()
                log.warning(
                    "broker TLS files missing; serving the previous certificate",
                    error=f"{err.filename}: {err.strerror}",
                )
            return None
        if signature == self._signature or signature == self._failed:
            return None
        try:
            material = load_material(self._tls)
        except ConfigError as err:
            self._failed = signature
            log.warning(
                "broker TLS files changed but are unusable; serving the previous certificate", error=str(err)
            )
            return None
        self._signature, self._material, self._failed = signature, material, None
        self.reloads += 1
        log.info("broker TLS certificate reloaded", cert_file=self._tls.cert_file)
        return material.configuration()


def _signature_or_error(tls: BrokerTlsConfig) -> _Signature:
    try:
        return _signature(tls)
    except OSError:
        load_material(tls)  # raises the ConfigError naming the key and file
        raise
