"""The ``--nats-*`` credential flags of the commands that connect to NATS.

``laneway broker``, ``laneway worker``, ``laneway up`` (and any operator command that
talks to NATS) take the common cases of ``nats.credentials`` as flags: a ``.creds``
file, user and password, a token, and the CA, certificate and key of TLS. Secrets are
better given through the environment (``NATS_PASSWORD``, ``NATS_TOKEN``), where ``ps``
does not show them to every user of the machine; ``laneway up`` hands them to its
children that way, never on a command line.

Precedence: a flag, then the environment, then the config. A flag or ``NATS_TOKEN``
that names a way to authenticate replaces the config's (user and password, token,
nkey seed or creds file); the TLS flags replace single fields of ``nats.credentials.tls``.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from laneway.broker.config.model import LanewayConfig
from laneway.broker.config.security import NatsCredentials, NatsTlsConfig

__all__ = ["PASSWORD_ENV", "TOKEN_ENV", "NatsFlags", "nats_credential_options"]

PASSWORD_ENV = "NATS_PASSWORD"
TOKEN_ENV = "NATS_TOKEN"

_F = TypeVar("_F", bound=Callable[..., Any])
_METHODS = ("user", "password", "token", "nkey_seed_file", "creds_file")


@dataclass(frozen=True)
class NatsFlags:
    """The ``--nats-*`` flags as given (None: not given)."""

    creds: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self, base: NatsCredentials, env: Mapping[str, str] | None = None) -> NatsCredentials:
        """``base`` (the config's) with the flags and the environment applied."""
        env = os.environ if env is None else env
        values: dict[str, Any] = base.model_dump(exclude={"tls"})
        method: dict[str, str] = {}
        if self.creds:
            method["creds_file"] = self.creds
        if self.user:
            method["user"] = self.user
            method["password"] = self.password or env.get(PASSWORD_ENV, "")
        elif self.password:
            raise typer.BadParameter("--nats-password needs --nats-user")
        if self.token:
            method["token"] = self.token
        if not method and env.get(TOKEN_ENV):
            method["token"] = env[TOKEN_ENV]
        if method:
            values.update(dict.fromkeys(_METHODS, ""), **method)
        elif values["user"] and env.get(PASSWORD_ENV):
            values["password"] = env[PASSWORD_ENV]
        tls = base.tls.model_dump() if base.tls else None
        for name, flag in (("ca_file", self.ca), ("cert_file", self.cert), ("key_file", self.key)):
            if flag:
                tls = {**(tls or NatsTlsConfig().model_dump()), name: flag}
        try:
            return NatsCredentials.model_validate({**values, "tls": tls})
        except ValidationError as err:
            # Each problem's message only: pydantic would quote the input (a password).
            problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in err.errors())
            raise typer.BadParameter(f"NATS credentials: {problems}") from None

    def apply(self, config: LanewayConfig) -> LanewayConfig:
        """``config`` with ``nats.credentials`` from ``credentials``."""
        creds = self.credentials(config.nats.credentials)
        return config.model_copy(update={"nats": config.nats.model_copy(update={"credentials": creds})})

    def child_args(self) -> list[str]:
        """The flags without secrets, for the children of ``laneway up``."""
        pairs = (
            ("--nats-creds", self.creds),
            ("--nats-user", self.user),
            ("--nats-ca", self.ca),
            ("--nats-cert", self.cert),
            ("--nats-key", self.key),
        )
        return [arg for name, value in pairs if value for arg in (name, value)]

    def child_env(self) -> dict[str, str]:
        """The secret flags as the environment variables the children read."""
        env = {}
        if self.password:
            env[PASSWORD_ENV] = self.password
        if self.token:
            env[TOKEN_ENV] = self.token
        return env


_OPTIONS: dict[str, Any] = {
    "nats_creds": Annotated[
        str | None, typer.Option("--nats-creds", help="NATS .creds file (JWT and nkey seed).")
    ],
    "nats_user": Annotated[str | None, typer.Option("--nats-user", help="NATS user name.")],
    "nats_password": Annotated[
        str | None,
        typer.Option("--nats-password", help=f"NATS password (better: ${PASSWORD_ENV}, not shown by ps)."),
    ],
    "nats_token": Annotated[
        str | None,
        typer.Option("--nats-token", help=f"NATS token (better: ${TOKEN_ENV}, not shown by ps)."),
    ],
    "nats_ca": Annotated[
        str | None,
        typer.Option("--nats-ca", help="CA bundle (PEM) that signs the NATS server's certificate."),
    ],
    "nats_cert": Annotated[
        str | None, typer.Option("--nats-cert", help="Client certificate (PEM) for NATS TLS.")
    ],
    "nats_key": Annotated[str | None, typer.Option("--nats-key", help="Private key (PEM) of --nats-cert.")],
}


def nats_credential_options(command: _F) -> _F:
    """Give a typer command the ``--nats-*`` flags; it receives them as one
    ``nats_flags: NatsFlags`` keyword argument."""
    signature = inspect.signature(command, eval_str=True)  # typer reads the result as is
    kept = [p for p in signature.parameters.values() if p.name != "nats_flags"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, annotation in _OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = NatsFlags(*(kwargs.pop(name, None) for name in _OPTIONS))
        return command(*args, nats_flags=flags, **kwargs)

    params = [*kept, *added]
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must see the new signature, not the command's
    return wrapper  # type: ignore[return-value]
