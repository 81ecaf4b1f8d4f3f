"""``laneway keys`` end to end against a real nats-server (a key is printed once, stored
only as its hash, never listed; create and revoke are audited), ``keys hash``, and the
client commands' ``--api-key`` against a broker with auth on."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
import typer

from laneway.broker.cli.keys import parse_expires
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.api_keys import hash_key
from laneway.broker.core.key_store import create_key
from laneway.broker.server.process import BrokerServer
from tests.cli_process import run_laneway
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
KEY = re.compile(r"^key:\s+(lw_[a-z0-9]{10}_\S+)$", re.MULTILINE)


async def laneway(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    code, out, err, _ = await run_laneway(*args, env=env, stdin=stdin, drop=("LANEWAY_API_KEY", "NATS_URL"))
    return code, out, err


def _audit_lines(stderr: str) -> list[dict[str, object]]:
    lines = []
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "audit":
            lines.append(entry)
    return lines


async def test_create_list_revoke(nats_server: EmbeddedNats) -> None:
    url = ("--nats-url", nats_server.url)
    code, out, err = await laneway(
        "keys", "create", "--tenant", "acme", "--role", "reader", "--expires", "30d", *url
    )
    assert code == 0, err
    found = KEY.search(out)
    assert found, out
    key = found[1]
    key_id = re.search(r"^key_id: (\w+)$", out, re.MULTILINE)
    assert key_id and key.startswith(f"lw_{key_id[1]}_")
    key_id_ = key_id[1]
    assert "not shown again" in err and key not in err
    [created] = _audit_lines(err)
    assert created["action"] == "key_created" and created["target"] == key_id_
    assert created["key_tenant"] == "acme" and created["role"] == "reader"

    # The bucket keeps the hash, never the key.
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(t.KEYS_BUCKET)
        stored = (await kv.get(key_id_)).value or b""
    finally:
        await nc.close()
    assert key.encode() not in stored
    assert json.loads(stored)["sha256"] == hash_key(key)

    code, out, err = await laneway("keys", "list", *url)
    assert code == 0, err
    assert key_id_ in out and "acme" in out and "reader" in out
    assert key not in out + err and hash_key(key) not in out + err
    code, out, err = await laneway("keys", "list", "--json", *url)
    [listed] = [json.loads(line) for line in out.splitlines()]
    assert set(listed) == {"key_id", "tenant", "role", "created", "expires", "revoked"}
    assert listed["key_id"] == key_id_ and listed["revoked"] is False
    expires = datetime.fromisoformat(str(listed["expires"]).replace("Z", "+00:00"))
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)

    code, out, err = await laneway("keys", "revoke", key_id_, *url)
    assert code == 0, err
    assert key_id_ in out
    [revoked] = _audit_lines(err)
    assert revoked["action"] == "key_revoked" and revoked["target"] == key_id_
    code, out, _ = await laneway("keys", "list", "--json", *url)
    assert json.loads(out)["revoked"] is True

    code, _, err = await laneway("keys", "revoke", "nosuchkey0", *url)
    assert code == 2 and "no API key 'nosuchkey0'" in err


async def test_create_refuses_bad_arguments(nats_server: EmbeddedNats) -> None:
    url = ("--nats-url", nats_server.url)
    code, _, err = await laneway("keys", "create", "--tenant", "acme", "--role", "root", *url)
    assert code == 2 and "reader, submitter, admin" in err
    code, _, err = await laneway(
        "keys", "create", "--tenant", "acme", "--role", "admin", "--expires", "2001-01-01", *url
    )
    assert code == 2 and "not in the future" in err


async def test_list_before_any_key(nats_server: EmbeddedNats) -> None:
    code, out, err = await laneway("keys", "list", "--json", "--nats-url", nats_server.url)
    assert code == 0, err
    assert out == ""


async def test_hash_reads_the_key_from_stdin() -> None:
    code, out, _ = await laneway("keys", "hash", stdin=b"my-static-key\n")
    assert code == 0
    assert out.strip() == hash_key("my-static-key")
    code, _, err = await laneway("keys", "hash", stdin=b"")
    assert code == 2 and "no key" in err


def test_expires_forms() -> None:
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    assert parse_expires("30d", now) == now + timedelta(days=30)
    assert parse_expires("12h", now) == now + timedelta(hours=12)
    assert parse_expires("2w", now) == now + timedelta(weeks=2)
    assert parse_expires("2026-12-31", now) == datetime(2027, 1, 1, tzinfo=UTC)  # through that day
    assert parse_expires("2026-07-01T10:00:00+02:00", now) == datetime(2026, 7, 1, 8, tzinfo=UTC)
    for bad in ("soon", "2026-05-01", "0d"):
        with pytest.raises(typer.BadParameter):
            parse_expires(bad, now)


@pytest.fixture
def config() -> LanewayConfig:
    return make_config("auth: {enabled: true}")


@pytest.fixture
async def reader_key(nats_server: EmbeddedNats, broker: BrokerServer) -> str:
    nc = await nats.connect(nats_server.url)
    try:
        _, key = await create_key(nc.jetstream(), tenant="acme", role="reader")
    finally:
        await nc.close()
    return key


async def test_client_commands_send_the_api_key(broker: BrokerServer, reader_key: str) -> None:
    addr = ("--addr", broker.address)
    # Let in: the job is not found (not UNAUTHENTICATED).
    code, _, err = await laneway("get", "nosuchjob", *addr, "--api-key", reader_key)
    assert code == 2 and "NOT_FOUND" in err, err
    code, _, err = await laneway("get", "nosuchjob", *addr, env={"LANEWAY_API_KEY": reader_key})
    assert code == 2 and "NOT_FOUND" in err, err
    # Without a key: one clear line.
    code, out, err = await laneway("get", "nosuchjob", *addr)
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("error: UNAUTHENTICATED: no API key") and "--api-key" in err
    # A reader may not read the stats (admin).
    code, _, err = await laneway("stats", *addr, "--api-key", reader_key)
    assert code == 2 and "PERMISSION_DENIED" in err and reader_key not in err
