"""NATS credentials as nats-py's connect options, and what a refused connection means.

Every process connects through ``connect_nats``; this module turns the configured
credentials (``nats.credentials``, overridden by the ``--nats-*`` flags) into the
keyword arguments nats-py takes, and start-up errors into one sentence a person can
act on. Secrets stay out of ``repr`` and out of every message: messages name the
config field or file, never its content.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from laneway.broker.core.errors import TopologyError

__all__ = ["NatsAuth", "has_userinfo", "refusal_reason", "untrusted_reason"]

# What nats-server answers (as -ERR) when it rejects a CONNECT for its credentials.
_REFUSALS = (
    "authorization violation",
    "authentication timeout",
    "authentication expired",
    "authentication revoked",
)
_FIELD = "nats.credentials"


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How a process authenticates to NATS: at most one of user and password, token,
    nkey seed file or ``.creds`` file, and TLS alongside any of them."""

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    nkey_seed_file: str = ""
    creds_file: str = ""
    tls: bool = False
    """TLS asked for (a ``tls`` block, even an empty one: the system's CAs)."""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def given(self) -> bool:
        """Whether any credential is set (TLS client certificates count)."""
        return bool(self.user or self.token or self.nkey_seed_file or self.creds_file or self.cert_file)

    def connect_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for nats-py's ``connect``. A URL with credentials
        (``nats://user:password@host``, ``nats://token@host``) keeps working and wins
        over ``user``/``password``/``token`` here: it was handed to this process."""
        options: dict[str, Any] = {}
        in_url = has_userinfo(url)
        if self.user and not in_url:
            if not self.password:
                raise TopologyError(
                    f"{_FIELD}.user is {self.user!r} but no password is set: set "
                    f"{_FIELD}.password (as ${{VAR}}) or the NATS_PASSWORD environment variable"
                )
            options["user"], options["password"] = self.user, self.password
        if self.token and not in_url:
            options["token"] = self.token
        if self.nkey_seed_file:
            options["nkeys_seed"] = _readable(self.nkey_seed_file, "nkey_seed_file")
        if self.creds_file:
            options["user_credentials"] = _readable(self.creds_file, "creds_file")
        if self.tls or self.ca_file or self.cert_file or _wants_tls(url):
            options["tls"] = self.ssl_context()
        return options

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the server against ``ca_file`` (else the
        system's CAs) and presents ``cert_file`` when set."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as err:
            raise _file_error("tls.ca_file", self.ca_file, err) from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file or None)
            except (OSError, ssl.SSLError) as err:
                raise _file_error("tls.cert_file/key_file", self.cert_file, err) from None
        return context


def has_userinfo(url: str) -> bool:
    """Whether any of the (comma-separated) URLs carries a user, password or token."""
    return any("@" in urlsplit(u.strip()).netloc for u in url.split(","))


def _wants_tls(url: str) -> bool:
    return any(urlsplit(u.strip()).scheme == "tls" for u in url.split(",") if u.strip())


def _readable(path: str, name: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise _file_error(name, path, err) from None
    return os.fspath(path)


def _file_error(name: str, path: str, err: Exception) -> TopologyError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
    return TopologyError(f"{_FIELD}.{name}: cannot use {path}: {reason}")


def refusal_reason(
    errors: Iterable[BaseException], *, credentials_given: bool, in_url: bool = False
) -> str | None:
    """The sentence for a start-up that the server refused for its credentials, or
    None when no error says so. Never quotes a credential."""
    for err in errors:
        text = str(err).lower()
        found = next((r for r in _REFUSALS if r in text), None)
        if found is None and type(err).__name__ == "AuthorizationError":
            found = "authorization violation"
        if found is None:
            continue
        if not credentials_given:
            return (
                f"it requires credentials and none were given ({found}): set {_FIELD} or the --nats-* flags"
            )
        where = "the credentials in the NATS URL" if in_url else f"{_FIELD} and the --nats-* flags"
        return f"it refused the credentials ({found}): check {where}"
    return None


def untrusted_reason(errors: Iterable[BaseException]) -> str | None:
    """The sentence for a server whose TLS certificate this process does not trust, or
    None. Retrying cannot help either, so start-up ends at once."""
    for err in errors:
        if isinstance(err, ssl.SSLCertVerificationError):
            why = err.verify_message or err.reason or "verification failed"
            return (
                f"its TLS certificate is not trusted ({why}): set {_FIELD}.tls.ca_file "
                "or --nats-ca to the CA that signs it"
            )
    return None
