"""The clients' API keys against a broker with auth on: the Python client sends
``api_key`` as ``authorization: Bearer`` (in plaintext only to loopback), and so does
the TypeScript client's ``apiKey`` (run with node when it is installed)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import nats
import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.key_store import create_key
from laneway.broker.server.process import BrokerServer
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
TS_DIST = ROOT / "clients" / "typescript" / "dist" / "src" / "index.js"


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


async def test_python_client_sends_its_api_key_on_loopback(broker: BrokerServer, reader_key: str) -> None:
    async with laneway.AsyncClient(broker.address, api_key=reader_key) as client:
        info = await client.get_server_info()
        assert "chat" in info.routes
        with pytest.raises(laneway.PermissionDenied) as denied:
            await client.get_stats()
        assert denied.value.metadata == {"role": "reader", "required": "admin"}
    async with laneway.AsyncClient(broker.address) as anonymous:
        with pytest.raises(laneway.Unauthenticated) as refused:
            await anonymous.get_server_info()
        assert refused.value.reason == "UNAUTHENTICATED"
    port = broker.address.rsplit(":", 1)[1]
    async with laneway.AsyncClient(f"localhost:{port}", api_key=reader_key) as by_name:
        await by_name.get_server_info()


def test_python_client_refuses_a_key_in_clear_over_a_network() -> None:
    with pytest.raises(ValueError, match="loopback") as refused:
        laneway.AsyncClient("10.1.2.3:50051", api_key="lw_abcdefghij_not-a-real-secret")
    assert "not-a-real-secret" not in str(refused.value)


async def test_typescript_client_sends_its_api_key(broker: BrokerServer, reader_key: str) -> None:
    node = shutil.which("node")
    if node is None or not TS_DIST.exists():
        pytest.skip("node and the built TypeScript client (npm run build) are needed")
    script = f"""
import {{ LanewayClient }} from {json.dumps(TS_DIST.as_uri())};
const out = {{}};
const keyed = new LanewayClient({json.dumps(broker.address)}, {{ apiKey: process.env.KEY }});
out.routes = (await keyed.getServerInfo()).routes;
try {{ await keyed.getStats(); out.stats = "ok"; }} catch (e) {{ out.stats = e.constructor.name; }}
const anonymous = new LanewayClient({json.dumps(broker.address)});
try {{ await anonymous.getServerInfo(); out.anonymous = "ok"; }}
catch (e) {{ out.anonymous = e.constructor.name + " " + e.reason; }}
try {{ new LanewayClient("broker.example:50051", {{ apiKey: process.env.KEY }}); out.network = "ok"; }}
catch (e) {{ out.network = e.message; }}
keyed.close(); anonymous.close();
console.log(JSON.stringify(out));
"""
    proc = await asyncio.create_subprocess_exec(
        node, "--input-type=module", "-e", script,
        env={"KEY": reader_key, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert "chat" in result["routes"]
    assert result["stats"] == "PermissionDenied"
    assert result["anonymous"] == "Unauthenticated UNAUTHENTICATED"
    assert "loopback" in result["network"] and reader_key not in result["network"]


async def test_blocking_client_sends_its_api_key_too(broker: BrokerServer, reader_key: str) -> None:
    def call(key: str | None) -> list[str]:
        with laneway.Client(broker.address, api_key=key) as client:
            return list(client.get_server_info().routes)

    assert "chat" in await asyncio.to_thread(call, reader_key)
    with pytest.raises(laneway.Unauthenticated):
        await asyncio.to_thread(call, None)
