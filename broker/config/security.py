"""Security settings: the broker's TLS, API keys and roles, tenants and their quotas,
and the credentials of the NATS connection.

Secrets never live in the file as such: key material is read from files named here,
and values may come from the environment with ``${VAR}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from laneway.broker.config.providers import ConfigModel
from laneway.broker.core.model import NAME_PATTERN
from laneway.broker.core.nats.credentials import NatsAuth

__all__ = [
    "ROLES",
    "AuthConfig",
    "BrokerTlsConfig",
    "NatsCredentials",
    "NatsTlsConfig",
    "Role",
    "StaticKey",
    "TenantConfig",
]

Role = Literal["submitter", "reader", "admin"]
ROLES: tuple[Role, ...] = ("reader", "submitter", "admin")
"""In order of rights: a reader reads its tenant's jobs, a submitter also submits and
cancels, an admin may do everything, for every tenant."""

TenantName = Annotated[str, Field(pattern=NAME_PATTERN)]


class BrokerTlsConfig(ConfigModel):
    """TLS on the broker's gRPC port (files re-read when they change)."""

    cert_file: str
    """PEM certificate chain the broker presents."""
    key_file: str
    """PEM private key of ``cert_file``."""
    client_ca_file: str = ""
    """PEM CA bundle that signs client certificates: set it for mTLS. Every client must
    then present a certificate it signed; its subject CN can name the caller."""
    require_client_cert: bool | None = None
    """Unset: true exactly when ``client_ca_file`` is set. gRPC's Python server cannot
    verify an optional client certificate, so false with a CA is refused."""

    @model_validator(mode="after")
    def _mtls_needs_a_ca(self) -> BrokerTlsConfig:
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError(
                "require_client_cert needs client_ca_file (the CA that signs client certificates)"
            )
        if self.require_client_cert is False and self.client_ca_file:
            raise ValueError(
                "with client_ca_file every client must present a certificate (gRPC cannot "
                "verify an optional one): drop require_client_cert: false, or client_ca_file"
            )
        return self


class StaticKey(ConfigModel):
    """An API key given in the config (simple setups; ``laneway keys`` keeps keys in
    JetStream KV instead, where a revoke reaches every broker at once)."""

    key_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """SHA-256 (hex) of the key, never the key itself: ``laneway keys hash`` prints it."""
    tenant: TenantName
    """The tenant the key's callers act for."""
    role: Role = "submitter"
    """What the key may do: reader, submitter or admin."""


class AuthConfig(ConfigModel):
    """Who may call the broker. Off by default (loopback only: see ``--insecure``)."""

    enabled: bool = False
    """Require an API key (``authorization: Bearer <key>``) on every RPC except health
    checks. Keys come from ``laneway keys create`` and from ``static_keys``."""
    static_keys: dict[Annotated[str, Field(pattern=NAME_PATTERN)], StaticKey] = {}  # noqa: RUF012
    """Keys by id, for setups without ``laneway keys``."""
    reflection: bool = True
    """Serve gRPC server reflection; with auth on it too requires a key."""


class TenantConfig(ConfigModel):
    """One tenant's quotas (tenants not listed have none), checked at submit before anything
    is written (``laneway.broker.server.quotas``)."""

    submit_rate_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Jobs per second the tenant may submit through each broker (bursts up to one second's
    worth, at least one job); over it: RESOURCE_EXHAUSTED ``QUOTA_EXCEEDED`` with RetryInfo.
    Kept per broker process: behind N brokers a tenant may submit up to N times this."""
    max_queued_jobs: Annotated[int, Field(gt=0)] | None = None
    """Jobs of the tenant that may be waiting or running at once (scheduled ones included),
    counted by the broker that accepted them: behind N brokers up to N times this, and a
    restarted broker forgets the jobs it had accepted."""
    max_payload_bytes: Annotated[int, Field(gt=0)] | None = None
    """Largest serialized job the tenant may submit (at most ``broker.max_payload_bytes``)."""
    routes: list[Annotated[str, Field(pattern=NAME_PATTERN)]] | None = None
    """Routes the tenant may submit to; unset: every route."""


class NatsTlsConfig(ConfigModel):
    """TLS to the NATS server."""

    ca_file: str = ""
    """PEM CA bundle that signs the server's certificate (empty: the system's)."""
    cert_file: str = ""
    """PEM client certificate, when the server requires one."""
    key_file: str = ""
    """PEM private key of ``cert_file``."""

    @model_validator(mode="after")
    def _pairs(self) -> NatsTlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self


class NatsCredentials(ConfigModel):
    """How processes authenticate to NATS: at most one of user and password, token,
    nkey seed file or credentials (JWT) file; TLS alongside any of them."""

    user: str = ""
    """User name; its password from ``password`` or the ``NATS_PASSWORD`` environment variable."""
    password: str = Field(default="", repr=False)
    """With ``user``; best given as ``${VAR}`` (or ``NATS_PASSWORD``), not in the file."""
    token: str = Field(default="", repr=False)
    """A token the server accepts (``authorization { token: ... }``); ``${VAR}`` or ``NATS_TOKEN``."""
    nkey_seed_file: str = ""
    """File holding an nkey seed (``SU...``)."""
    creds_file: str = ""
    """A ``.creds`` file (user JWT and nkey seed) of a decentralised-auth account."""
    tls: NatsTlsConfig | None = None
    """TLS to the server (``tls://`` URLs use it too); unset: TLS only when the server
    asks for it, verified against the system's CAs."""

    @model_validator(mode="after")
    def _one_method(self) -> NatsCredentials:
        given = [
            name
            for name, on in (
                ("user/password", bool(self.user or self.password)),
                ("token", bool(self.token)),
                ("nkey_seed_file", bool(self.nkey_seed_file)),
                ("creds_file", bool(self.creds_file)),
            )
            if on
        ]
        if len(given) > 1:
            raise ValueError(
                f"set at most one of user/password, token, nkey_seed_file, creds_file (got {given})"
            )
        if self.password and not self.user:
            raise ValueError("password needs user")
        return self

    def auth(self) -> NatsAuth:
        """These credentials as ``connect_nats`` takes them."""
        tls = self.tls
        return NatsAuth(
            user=self.user,
            password=self.password,
            token=self.token,
            nkey_seed_file=self.nkey_seed_file,
            creds_file=self.creds_file,
            tls=tls is not None,
            ca_file=tls.ca_file if tls else "",
            cert_file=tls.cert_file if tls else "",
            key_file=tls.key_file if tls else "",
        )
