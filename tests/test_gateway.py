"""The HTTP gateway end to end: a real nats-server, broker and worker, and the gateway
serving on loopback in front of them (JSON, problem documents, Server-Sent Events,
the WebSocket, the OpenAPI document, and the broker's keys and tenants through it)."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from httpx_sse import aconnect_sse

import laneway
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.core.api_keys import hash_key
from laneway.broker.gateway.routes import ROUTES
from laneway.broker.gateway.serve import running_gateway
from laneway.broker.gateway.state import GatewaySettings
from laneway.broker.server.process import BrokerServer
from tests.cli_process import run_laneway
from tests.conftest import make_config
from tests.test_startup import _banner, _run_up, _stop
from tests.test_startup import _config as _startup_config

TEXT = "the quick brown fox jumps over the lazy dog"
SETTINGS = GatewaySettings(heartbeat_s=0.2)


def _spec(route: str = "chat", text: str = TEXT, *, stream: bool = False) -> dict[str, Any]:
    return MessageToDict(laneway.job(route, laneway.chat(text, stream=stream)))


@pytest.fixture
async def gateway(broker: BrokerServer) -> AsyncIterator[str]:
    async with running_gateway(broker.address, "127.0.0.1:0", settings=SETTINGS) as url:
        yield url


@pytest.fixture
async def http(gateway: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=gateway) as session:
        yield session


async def _submit(http: aiohttp.ClientSession, spec: dict[str, Any], query: str = "") -> dict[str, Any]:
    async with http.post(f"/v1/jobs{query}", json=spec) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def _problem(response: aiohttp.ClientResponse, status: int, reason: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json()
    assert body["status"] == status and body["reason"] == reason and body["title"] and body["detail"]
    return body


# --- JSON -------------------------------------------------------------------------------


async def test_submit_then_get(worker, http) -> None:
    submitted = await _submit(http, _spec())
    assert submitted["duplicate"] is False and submitted["jobId"]
    async with http.get(f"/v1/jobs/{submitted['jobId']}") as r:
        assert r.status == 200
        job = await r.json()
    assert job["jobId"] == submitted["jobId"] and job["route"] == "chat"


async def test_submit_and_wait_returns_the_final_job(worker, http) -> None:
    job = await _submit(http, _spec(), "?wait=10")
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["result"]["chat"]["text"] == TEXT


async def test_wait_that_runs_out_answers_202_with_the_id(broker, http) -> None:
    async with http.post("/v1/jobs?wait=0.2", json=_spec()) as r:  # no worker: never final
        assert r.status == 202
        body = await r.json()
    assert body["jobId"] and body["duplicate"] is False
    async with http.post("/v1/jobs?wait=31", json=_spec()) as r:
        await _problem(r, 400, "MALFORMED_REQUEST")


async def test_cancel(broker, http) -> None:
    job_id = (await _submit(http, _spec()))["jobId"]
    async with http.post(f"/v1/jobs/{job_id}:cancel", json={"reason": "changed my mind"}) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["cancelled"] is True and body["state"] == "JOB_STATE_CANCELLED"
    async with http.get(f"/v1/jobs/{job_id}") as r:
        assert (await r.json())["state"] == "JOB_STATE_CANCELLED"


async def test_batch_with_one_bad_item(worker, http) -> None:
    bad = _spec("no-such-route")
    async with http.post("/v1/jobs:batch", json={"jobs": [_spec(), bad]}) as r:
        assert r.status == 200, await r.text()
        outcomes = (await r.json())["outcomes"]
    assert len(outcomes) == 2
    assert outcomes[0]["jobId"] and "error" not in outcomes[0]
    assert "UNKNOWN_ROUTE" in json.dumps(outcomes[1]["error"])


async def test_server_info(broker, http) -> None:
    async with http.get("/v1/server-info") as r:
        assert r.status == 200
        info = await r.json()
    assert "chat" in json.dumps(info)


# --- problems ---------------------------------------------------------------------------


async def test_errors_are_problem_documents(broker, http) -> None:
    async with http.post("/v1/jobs", json=_spec("no-such-route")) as r:
        body = await _problem(r, 400, "UNKNOWN_ROUTE")
    assert body["type"].endswith("/UNKNOWN_ROUTE") and body["metadata"]
    async with http.get("/v1/jobs/01JZZZZZZZZZZZZZZZZZZZZZZZ") as r:
        await _problem(r, 404, "UNKNOWN_JOB")
    async with http.post("/v1/jobs", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        await _problem(r, 400, "MALFORMED_REQUEST")
    async with http.post("/v1/jobs", json={"route": "chat", "noSuchField": 1}) as r:
        await _problem(r, 400, "MALFORMED_REQUEST")
    async with http.get("/v1/no-such-path") as r:
        await _problem(r, 404, "")
    async with http.delete("/v1/jobs") as r:
        await _problem(r, 405, "")


# --- Server-Sent Events -----------------------------------------------------------------


async def _sse(
    gateway: str, path: str, headers: dict[str, str] | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    async with (
        httpx.AsyncClient(base_url=gateway, timeout=20) as c,
        aconnect_sse(c, "GET", path, headers=dict(headers or {})) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(s.id, s.event, json.loads(s.data)) async for s in source.aiter_sse()]


async def test_sse_streams_every_event_in_order_with_seq_ids(broker, worker, http, gateway) -> None:
    job_id = (await _submit(http, _spec(stream=True)))["jobId"]
    events = await _sse(gateway, f"/v1/jobs/{job_id}/events")
    assert [e for _, e, _ in events] == ["job"] * len(events)
    assert [int(i) for i, _, _ in events] == list(range(1, len(events) + 1))
    assert [int(d["seq"]) for _, _, d in events] == list(range(1, len(events) + 1))
    assert events[-1][2]["state"] == "JOB_STATE_SUCCEEDED"
    text = "".join(d["delta"]["text"] for _, _, d in events if "delta" in d)
    assert text == TEXT and sum("delta" in d for _, _, d in events) >= 1
    # The same events the gRPC stream gives.
    async with laneway.AsyncClient(broker.address, timeout=10) as client:
        grpc_events = [e async for e in client.stream_results(job_id)]
    assert [MessageToDict(e, always_print_fields_with_no_presence=True) for e in grpc_events] == [
        d for _, _, d in events
    ]


async def test_sse_resumes_after_last_event_id_and_final_only(worker, http, gateway) -> None:
    job_id = (await _submit(http, _spec(stream=True), "?wait=10"))["jobId"]
    everything = await _sse(gateway, f"/v1/jobs/{job_id}/events")
    assert len(everything) >= 4
    cut = len(everything) // 2
    resumed = await _sse(gateway, f"/v1/jobs/{job_id}/events", {"Last-Event-ID": everything[cut - 1][0]})
    assert resumed == everything[cut:]
    assert await _sse(gateway, f"/v1/jobs/{job_id}/events?after={cut}") == everything[cut:]
    final = await _sse(gateway, f"/v1/jobs/{job_id}/events?final_only=true")
    assert final == everything[-1:]
    # After the final event: 204, so a browser's EventSource stops reconnecting.
    async with http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": everything[-1][0]}) as r:
        assert r.status == 204


async def test_sse_sends_heartbeats_while_idle(broker, http, gateway) -> None:
    job_id = (await _submit(http, _spec()))["jobId"]  # no worker: stays queued
    async with http.get(f"/v1/jobs/{job_id}/events") as r:
        assert r.status == 200
        lines = [await r.content.readline() for _ in range(5)]
    assert b": ping\n" in lines
    assert lines[:2] == [b"id: 1\n", b"event: job\n"]  # the QUEUED event, then heartbeats


async def test_sse_errors_before_the_stream_are_problems(broker, http) -> None:
    async with http.get("/v1/jobs/01JZZZZZZZZZZZZZZZZZZZZZZZ/events") as r:
        await _problem(r, 404, "UNKNOWN_JOB")
    async with http.get("/v1/jobs/x/events", headers={"Last-Event-ID": "abc"}) as r:
        await _problem(r, 400, "MALFORMED_REQUEST")


# --- WebSocket --------------------------------------------------------------------------


def _is_final(msg: dict[str, Any]) -> bool:
    return msg["op"] == "event" and msg["event"]["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED")


async def _until_final(
    ws: aiohttp.ClientWebSocketResponse, jobs: set[str], seen: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Messages until every job in ``jobs`` had its final event (``seen``: messages
    already received, which count and are returned first)."""
    seen = list(seen or [])
    open_jobs = set(jobs) - {m["event"]["jobId"] for m in seen if _is_final(m)}
    while open_jobs:
        msg = await ws.receive_json(timeout=20)
        seen.append(msg)
        if _is_final(msg):
            open_jobs.discard(msg["event"]["jobId"])
        assert msg["op"] != "error", msg
    return seen


async def test_websocket_subscribes_submits_and_resumes(worker, http) -> None:
    a = (await _submit(http, _spec(stream=True)))["jobId"]
    b = (await _submit(http, _spec(text="second job here", stream=True)))["jobId"]
    async with http.ws_connect("/v1/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobIds": [a, b]})
        # An event of a or b before the submit's answer, every run: it must count too.
        early = [await ws.receive_json(timeout=20)]
        assert early[0]["op"] == "event" and early[0]["event"]["jobId"] in (a, b)
        await ws.send_json({"op": "submit", "job": _spec(text="over the socket", stream=True), "ref": "r1"})
        submitted = await ws.receive_json(timeout=20)
        while submitted["op"] != "submitted":
            assert submitted["op"] == "event", submitted
            early.append(submitted)
            submitted = await ws.receive_json(timeout=20)
        assert submitted["ref"] == "r1" and submitted["duplicate"] is False
        c = submitted["jobId"]
        messages = await _until_final(ws, {a, b, c}, early)
    by_job: dict[str, list[int]] = {}
    for m in messages:
        if m["op"] == "event":
            by_job.setdefault(m["event"]["jobId"], []).append(int(m["event"]["seq"]))
    assert set(by_job) == {a, b, c}
    for seqs in by_job.values():
        assert seqs == list(range(1, len(seqs) + 1))  # every event, in order, none twice
    # Reconnect and resume job b after its second event: the rest, nothing twice.
    async with http.ws_connect("/v1/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobIds": [b], "after": {b: 2}})
        resumed = await _until_final(ws, {b})
    assert [int(m["event"]["seq"]) for m in resumed] == list(range(3, max(by_job[b]) + 1))


async def test_websocket_errors_name_the_ref(broker, http) -> None:
    async with http.ws_connect("/v1/ws") as ws:
        await ws.send_json({"op": "submit", "job": _spec("no-such-route"), "ref": "bad"})
        error = await ws.receive_json(timeout=10)
        assert error["op"] == "error" and error["reason"] == "UNKNOWN_ROUTE" and error["ref"] == "bad"
        await ws.send_str("not json")
        assert (await ws.receive_json(timeout=10))["reason"] == "MALFORMED_REQUEST"
        await ws.send_json({"op": "subscribe", "jobIds": ["01JZZZZZZZZZZZZZZZZZZZZZZZ"]})
        error = await ws.receive_json(timeout=10)
        assert error["reason"] == "UNKNOWN_JOB" and error["jobId"] == "01JZZZZZZZZZZZZZZZZZZZZZZZ"


# --- OpenAPI ----------------------------------------------------------------------------


async def test_openapi_lists_every_route(broker, http) -> None:
    async with http.get("/openapi.json") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.method, r.path) for r in ROUTES} | {("GET", "/openapi.json")}
    assert "JobSpec" in doc["components"]["schemas"] and "JobEvent" in doc["components"]["schemas"]
    spec = doc["components"]["schemas"]["JobSpec"]["properties"]
    assert "route" in spec and "idempotencyKey" in spec


# --- keys and tenants -------------------------------------------------------------------

KEYS = {"acme": "acme-submitter-key-for-gw-tests", "globex": "globex-submitter-key-for-gw-tests"}


@pytest.fixture
async def auth_gateway(nats_server: EmbeddedNats) -> AsyncIterator[str]:
    config = make_config(
        f"""
auth:
  enabled: true
  static_keys:
    acme-ci: {{key_sha256: {hash_key(KEYS["acme"])}, tenant: acme, role: submitter}}
    globex-ci: {{key_sha256: {hash_key(KEYS["globex"])}, tenant: globex, role: submitter}}
"""
    )
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        running_gateway(b.address, "127.0.0.1:0", settings=SETTINGS) as url,
    ):
        yield url


def _bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def test_keys_and_tenants_are_the_brokers(auth_gateway: str) -> None:
    async with aiohttp.ClientSession(base_url=auth_gateway) as http:
        async with http.post("/v1/jobs", json=_spec()) as r:
            assert r.status == 401 and r.content_type == "application/problem+json"
            assert (await r.json())["status"] == 401
        async with http.post("/v1/jobs", json=_spec(), headers=_bearer("acme")) as r:
            assert r.status == 200, await r.text()
            job_id = (await r.json())["jobId"]
        async with http.get(f"/v1/jobs/{job_id}", headers=_bearer("acme")) as r:
            assert r.status == 200
        async with http.get(f"/v1/jobs/{job_id}", headers=_bearer("globex")) as r:
            await _problem(r, 404, "UNKNOWN_JOB")
        async with http.get(f"/v1/jobs/{job_id}/events", headers=_bearer("globex")) as r:
            await _problem(r, 404, "UNKNOWN_JOB")
        async with http.get(f"/v1/jobs/{job_id}/events") as r:
            assert r.status == 401
        # Browsers: the key as ?access_token= on the event stream and the WebSocket.
        async with http.get(f"/v1/jobs/{job_id}/events?access_token={KEYS['acme']}") as r:
            assert r.status == 200
        async with http.ws_connect(f"/v1/ws?access_token={KEYS['globex']}") as ws:
            await ws.send_json({"op": "subscribe", "jobIds": [job_id]})
            assert (await ws.receive_json(timeout=10))["reason"] == "UNKNOWN_JOB"


# --- the processes ----------------------------------------------------------------------


async def test_up_starts_the_gateway_on_its_own_port(tmp_path: Path) -> None:
    port = free_port()
    config = _startup_config(tmp_path)
    config.write_text(config.read_text() + f'gateway:\n  listen: "127.0.0.1:{port}"\n')
    proc = await _run_up(tmp_path, config=config)
    try:
        banner = await _banner(proc)
        assert f"HTTP gateway: http://127.0.0.1:{port}" in banner
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
            job = await _submit(http, _spec(), "?wait=20")
            assert job["state"] == "JOB_STATE_SUCCEEDED"
            async with http.get("/") as r:
                assert r.status == 200 and "text/html" in r.content_type
    finally:
        code, _, err = await _stop(proc)
    assert code == 0, err


async def test_up_with_dev_tls_serves_the_gateway_over_https_to_a_tls_broker(tmp_path: Path) -> None:
    port = free_port()
    config = _startup_config(tmp_path)
    config.write_text(config.read_text() + f'gateway:\n  listen: "127.0.0.1:{port}"\n')
    proc = await _run_up(tmp_path, "--tls", "dev", config=config)
    try:
        banner = await _banner(proc)
        assert f"HTTP gateway: https://127.0.0.1:{port}" in banner
        trust = ssl.create_default_context(cafile=str(tmp_path / "data" / "tls" / "ca.pem"))
        connector = aiohttp.TCPConnector(ssl=trust)
        async with aiohttp.ClientSession(base_url=f"https://127.0.0.1:{port}", connector=connector) as http:
            job = await _submit(http, _spec(), "?wait=20")
            assert job["state"] == "JOB_STATE_SUCCEEDED"
    finally:
        code, _, err = await _stop(proc)
    assert code == 0, err


async def test_gateway_refuses_plain_http_beyond_loopback() -> None:
    code, _, err, _ = await run_laneway("gateway", "--listen", f"0.0.0.0:{free_port()}")
    assert code == 2
    assert "refusing to serve the gateway" in err and "--insecure" in err, err
