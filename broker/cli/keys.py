"""``laneway keys``: create, list and revoke API keys; hash one for ``auth.static_keys``.

Operator commands: they talk to NATS directly (the ``laneway_keys`` bucket every
broker watches), with the connection options of ``laneway broker`` (``--config``,
``--nats-url``, the ``--nats-*`` credential flags), not to a broker. A key is
printed once, by ``create``; the bucket keeps its SHA-256 only, and ``list`` shows
neither. Each create and revoke is written to the audit trail.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from nats.js import JetStreamContext

from laneway.broker.cli.nats_flags import NatsFlags, nats_credential_options
from laneway.broker.config.model import LanewayConfig, default_config, load_config
from laneway.broker.config.security import ROLES
from laneway.broker.core import topology as t
from laneway.broker.core.api_keys import ApiKeyRecord, hash_key
from laneway.broker.core.key_store import UnknownKey, create_key, list_keys, revoke_key
from laneway.broker.core.model import NAME_PATTERN, utcnow
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.observability.audit import audit
from laneway.broker.observability.logs import configure_logging
from laneway.errors import LanewayError

__all__ = ["keys_app", "parse_expires"]

keys_app = typer.Typer(
    no_args_is_help=True,
    help="Manage API keys (stored in NATS: every broker sees a change at once).",
)

_DEFAULT_CONFIG = "laneway.example.yaml"  # as the server commands (laneway.broker.cli.app)
_RELATIVE = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": 3600, "d": 86_400, "w": 7 * 86_400}
_TENANT = re.compile(NAME_PATTERN)
_VIA = "cli"

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"YAML config file (default: ./{_DEFAULT_CONFIG} if present)."),
]
NatsOpt = Annotated[
    str | None, typer.Option("--nats-url", help="NATS server URL (default: $NATS_URL, then nats.url).")
]
R = TypeVar("R")


def parse_expires(value: str, now: datetime | None = None) -> datetime:
    """``30d``, ``12h``, ``2w`` from now; a date (``2026-12-31``: valid through that day,
    UTC); or an ISO time (UTC unless it names a zone). Must be in the future."""
    now = now or utcnow()
    relative = _RELATIVE.match(value.strip())
    if relative:
        at = now + timedelta(seconds=int(relative[1]) * _UNITS[relative[2]])
    else:
        try:
            if len(value.strip()) == 10:
                day = datetime.strptime(value.strip(), "%Y-%m-%d").date()
                at = datetime.combine(day + timedelta(days=1), time(), tzinfo=UTC)
            else:
                at = datetime.fromisoformat(value.strip())
                at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        except ValueError:
            raise typer.BadParameter(
                f"{value!r}: give a duration (30d, 12h, 2w), a date (2026-12-31) or an ISO time",
                param_hint="--expires",
            ) from None
    if at <= now:
        raise typer.BadParameter(f"{value!r} is not in the future", param_hint="--expires")
    return at


def _with_js(
    config: Path | None,
    nats_url: str | None,
    flags: NatsFlags,
    act: Callable[[JetStreamContext, LanewayConfig], Awaitable[R]],
) -> R:
    configure_logging()
    try:
        path = config if config is not None or not Path(_DEFAULT_CONFIG).exists() else Path(_DEFAULT_CONFIG)
        cfg = flags.apply(load_config(path) if path else default_config())
        url = nats_url or os.environ.get("NATS_URL") or cfg.nats.url
        if not url:
            raise typer.BadParameter("no NATS server: pass --nats-url, set NATS_URL or nats.url")

        async def run() -> R:
            nc = await connect_nats(
                url,
                name="laneway-keys",
                connect_timeout=cfg.nats.connect_timeout_s,
                auth=cfg.nats.credentials.auth(),
            )
            try:
                return await act(nc.jetstream(), cfg)
            finally:
                await nc.close()

        return asyncio.run(run())
    except LanewayError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z") if at is not None else ""


def _public(record: ApiKeyRecord) -> dict[str, object]:
    """What ``list`` shows: never the hash."""
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "role": record.role,
        "created": _when(record.created),
        "expires": _when(record.expires) or None,
        "revoked": record.revoked,
    }


@keys_app.command("create")
@nats_credential_options
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant the key's callers act for.")],
    role: Annotated[str, typer.Option("--role", help="reader, submitter or admin.")],
    expires: Annotated[
        str | None,
        typer.Option(help="When the key stops working: 30d, 12h, 2w, a date (2026-12-31) or an ISO time."),
    ] = None,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """Create a key and print it: it is shown this once (the broker keeps only its hash)."""
    if role not in ROLES:
        raise typer.BadParameter(f"{role!r}: one of {', '.join(ROLES)}", param_hint="--role")
    if not _TENANT.match(tenant):
        raise typer.BadParameter(f"{tenant!r}: letters, digits, '_' and '-'", param_hint="--tenant")
    until = parse_expires(expires) if expires else None

    async def act(js: JetStreamContext, cfg: LanewayConfig) -> tuple[ApiKeyRecord, str]:
        await t.ensure_keys_bucket(js, cfg.nats.replicas)
        return await create_key(js, tenant=tenant, role=role, expires=until)

    record, key = _with_js(config, nats_url, nats_flags or NatsFlags(), act)
    audit(
        "key_created",
        key_id="",
        tenant="",
        target=record.key_id,
        key_tenant=record.tenant,
        role=record.role,
        expires=_when(record.expires) or None,
        via=_VIA,
    )
    typer.echo(f"key_id: {record.key_id}")
    typer.echo(f"key:    {key}")
    typer.echo("Store the key now: it is not shown again.", err=True)


@keys_app.command("list")
@nats_credential_options
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """List keys: id, tenant, role, created, expires, revoked (never a key or its hash)."""

    async def act(js: JetStreamContext, cfg: LanewayConfig) -> list[ApiKeyRecord]:
        return await list_keys(js)

    records = _with_js(config, nats_url, nats_flags or NatsFlags(), act)
    if as_json:
        for record in records:
            typer.echo(json.dumps(_public(record), separators=(",", ":")))
        return
    if not records:
        typer.echo("no keys", err=True)
        return
    rows = [["KEY_ID", "TENANT", "ROLE", "CREATED", "EXPIRES", "REVOKED"]]
    for r in records:
        rows.append(
            [
                r.key_id,
                r.tenant,
                r.role,
                _when(r.created),
                _when(r.expires) or "-",
                "yes" if r.revoked else "no",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@keys_app.command("revoke")
@nats_credential_options
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (as `keys list` shows it).")],
    config: ConfigOpt = None,
    nats_url: NatsOpt = None,
    nats_flags: NatsFlags | None = None,
) -> None:
    """Revoke a key: every broker refuses it from now on."""

    async def act(js: JetStreamContext, cfg: LanewayConfig) -> ApiKeyRecord | None:
        try:
            return await revoke_key(js, key_id)
        except UnknownKey:
            return None

    record = _with_js(config, nats_url, nats_flags or NatsFlags(), act)
    if record is None:
        typer.echo(f"error: no API key {key_id!r}", err=True)
        raise typer.Exit(2)
    audit("key_revoked", key_id="", tenant="", target=record.key_id, key_tenant=record.tenant, via=_VIA)
    typer.echo(f"revoked {record.key_id} (tenant {record.tenant}, role {record.role})")


@keys_app.command("hash")
def keys_hash() -> None:
    """Read a key from stdin and print its SHA-256, for ``auth.static_keys.<id>.key_sha256``."""
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.read()
    key = key.strip()
    if not key:
        typer.echo("error: no key on stdin", err=True)
        raise typer.Exit(2)
    typer.echo(hash_key(key))
