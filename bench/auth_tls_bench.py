"""What authentication and TLS cost: two identical stacks measured in one run, one
plain (no TLS, no auth) and one with both on (a static API key sent as
``authorization: Bearer <key>`` on every call, and TLS on the broker's gRPC port with
a self-signed certificate made for the run in its temp dir).

Per side: unary Submit throughput (then a final-only stream per job), SubmitBatch
x100 throughput, and unary latency (submit to final event) paced at 100 jobs/s. Both
stacks run side by side and the rounds alternate off/on, on/off, ... so drift of a
noisy machine weighs on both alike; throughput figures are the medians of the rounds,
latency percentiles are over every round's samples. Printed as on against off.

Run alone with ``python -m bench --only auth_tls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import math
import os
import secrets
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import laneway
from bench.laneway_bench import CONFIG, Jobs
from bench.measure import Count, Failures, Latency, Throughput, closed_loop, paced
from bench.report import Row, progress
from bench.settings import ROUTE, Settings
from bench.stack import BenchError, Child, Workspace, wait_pull_waiting, wait_stream_empty
from laneway.broker.cli.natsd import free_port
from laneway.broker.config.model import load_config
from laneway.broker.core import topology as topo

__all__ = ["auth_tls_rows", "run_auth_tls"]

Results = dict[str, Throughput | Latency | Count]

SIDES = ("off", "on")


def self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    """A self-signed server certificate for 127.0.0.1 and localhost: (cert file, key file, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "laneway-bench")])
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "broker.crt", directory / "broker.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, cert_pem


class _Stack:
    def __init__(self, client: laneway.AsyncClient, nc: Any, pids: dict[str, int | None]) -> None:
        self.client = client
        self.nc = nc
        self.pids = pids


async def _wait_health(addr: str, child: Child, root: bytes | None, timeout: float = 30.0) -> None:
    """Poll the gRPC health service (open without a key) until SERVING, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    channel = (
        grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=root))
        if root is not None
        else grpc.aio.insecure_channel(addr)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline:
            child.check_alive()
            with contextlib.suppress(grpc.RpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)  # poll interval under a deadline
    raise BenchError(f"{child.name} did not report SERVING on {addr} within {timeout:.0f}s")


async def _start(ws: Workspace, side: str, exit: contextlib.AsyncExitStack) -> _Stack:
    """nats, broker and worker; with ``side`` "on" the broker requires a key and serves TLS."""
    server = await ws.start_nats()
    addr = f"127.0.0.1:{free_port()}"
    broker_block = f'broker:\n  grpc_addr: "{addr}"\n'
    key = root = None
    if side == "on":
        cert_file, key_file, root = self_signed(ws.dir)
        key = "lw_bench_" + secrets.token_urlsafe(24)
        broker_block += f'  tls: {{cert_file: "{cert_file}", key_file: "{key_file}"}}\n'
        digest = hashlib.sha256(key.encode()).hexdigest()
        broker_block += (
            "auth:\n  enabled: true\n  static_keys:\n"
            f"    bench: {{key_sha256: {digest}, tenant: bench, role: submitter}}\n"
        )
    config = ws.dir / "laneway.yaml"
    config.write_text(broker_block + CONFIG.format(route=ROUTE))
    load_config(config)  # fail here, with the config error, rather than in a child
    cli = [sys.executable, "-m", "laneway.broker.cli"]
    common = ["--config", str(config), "--nats-url", server.url]
    broker = await ws.spawn("broker", [*cli, "broker", *common, "--grpc-addr", addr])
    await _wait_health(addr, broker, root)
    worker = await ws.spawn("worker", [*cli, "worker", *common])
    nc = await nats.connect(server.url, name=f"bench-auth-tls-{side}")
    exit.push_async_callback(nc.close)
    await wait_pull_waiting(nc.jetstream(), topo.JOBS_STREAM, topo.consumer_name(ROUTE, "normal"), worker)
    client = await exit.enter_async_context(
        laneway.AsyncClient(addr, timeout=30.0, tls=root is not None, root_certificates=root, api_key=key)
    )
    if root is not None:
        await _check_secured(addr, root)
    pids = {"bench": os.getpid(), "broker": broker.pid, "worker": worker.pid}
    return _Stack(client, nc, pids)


async def _check_secured(addr: str, root: bytes) -> None:
    """The "on" side really is on: without a key the broker refuses, over plaintext it cannot be reached."""
    async with laneway.AsyncClient(addr, timeout=5.0, tls=True, root_certificates=root) as anonymous:
        try:
            await anonymous.get_server_info()
        except laneway.errors.Unauthenticated:
            pass
        else:
            raise BenchError("the auth+TLS broker answered a call without an API key")
    async with laneway.AsyncClient(addr, timeout=5.0) as plaintext:
        try:
            await plaintext.get_server_info()
        except laneway.errors.ApiError:
            pass
        else:
            raise BenchError("the auth+TLS broker answered a plaintext call")


def _order(rounds: int) -> Iterator[tuple[int, str]]:
    """off, on, then on, off, ...: each side goes first in alternate rounds."""
    for r in range(rounds):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            yield r + 1, side


async def run_auth_tls(s: Settings) -> Results:
    results: Results = {}
    rounds = 2 if s.quick else 5
    b, inflight, c = s.batch_size, s.batches_in_flight, s.unary_concurrency
    unary_ops = max(1, s.jobs // rounds)
    batch_ops = math.ceil(2 * s.jobs / b / rounds)
    paced_jobs = max(2, s.paced_jobs // rounds)
    t = s.follow_timeout_s + 10.0
    async with (
        Workspace("auth-tls-off") as ws_off,
        Workspace("auth-tls-on") as ws_on,
        contextlib.AsyncExitStack() as exit,
    ):
        stacks = {side: await _start(ws, side, exit) for side, ws in (("off", ws_off), ("on", ws_on))}
        jobs = {side: Jobs(st.client, b, s.follow_timeout_s) for side, st in stacks.items()}
        for side in SIDES:
            progress(f"Auth+TLS: warm-up, {side}")
            await closed_loop(jobs[side].unary, ops=s.warmup_jobs, concurrency=c, timeout=t)
            await closed_loop(jobs[side].batch, ops=inflight, concurrency=inflight, jobs_per_op=b, timeout=t)
        for r, side in _order(rounds):
            pids, key = stacks[side].pids, f"auth_tls.{side}.r{r}"
            progress(f"Auth+TLS: round {r}/{rounds}, {side}: {unary_ops} unary jobs, {c} in flight")
            results[f"{key}.unary"] = await closed_loop(
                jobs[side].unary, ops=unary_ops, concurrency=c, timeout=t, pids=pids
            )
            progress(f"Auth+TLS: round {r}/{rounds}, {side}: {batch_ops * b} jobs, SubmitBatch of {b}")
            results[f"{key}.batch"] = await closed_loop(
                jobs[side].batch, ops=batch_ops, concurrency=inflight, jobs_per_op=b, timeout=t, pids=pids
            )
            progress(
                f"Auth+TLS: round {r}/{rounds}, {side}: {paced_jobs} unary jobs paced {s.paced_rate:.0f}/s"
            )
            results[f"{key}.latency"] = await paced(
                jobs[side].unary, rate=s.paced_rate, count=paced_jobs, timeout=t, pids=pids
            )
        for side, ws in (("off", ws_off), ("on", ws_on)):
            for child in ws.children:
                child.check_alive()
            left = await wait_stream_empty(stacks[side].nc.jetstream(), topo.JOBS_STREAM)
            if left:
                results[f"auth_tls.{side}.r1.batch"].failures.add(f"left unacked on {topo.JOBS_STREAM}", left)
        for side in SIDES:
            results[f"auth_tls.{side}.latency"] = _merged(results, side)
        on, off = _median_rate(results, "on", "unary"), _median_rate(results, "off", "unary")
        if on is not None and off:
            progress(f"Auth+TLS: on/off unary throughput ratio {on / off:.3f}")
        p50_on, p50_off = _pct(results, "on", 50), _pct(results, "off", 50)
        if p50_on is not None and p50_off:
            progress(f"Auth+TLS: on/off latency p50 ratio {p50_on / p50_off:.3f}")
        for ws in (ws_off, ws_on):
            ws.failed = ws.failed or any(v.failures.count for v in results.values())
    return results


def _rounds(results: Results, side: str, phase: str) -> list[Throughput | Latency | Count]:
    prefix = f"auth_tls.{side}.r"
    return [v for k, v in results.items() if k.startswith(prefix) and k.endswith(f".{phase}")]


def _merged(results: Results, side: str) -> Latency:
    """The paced rounds of one side as one sample set (percentiles over all of them)."""
    samples: list[float] = []
    failures = Failures()
    rate, lag = 0.0, 0.0
    for r in _rounds(results, side, "latency"):
        assert isinstance(r, Latency)
        samples.extend(r.samples_ms)
        failures.merge(r.failures)
        rate, lag = r.rate, max(lag, r.max_lag_ms)
    return Latency(rate, samples, failures, {}, lag)


def _median_rate(results: Results, side: str, phase: str) -> float | None:
    rates = [v.rate for v in _rounds(results, side, phase) if isinstance(v, Throughput)]
    return statistics.median(rates) if rates else None


def _pct(results: Results, side: str, p: int) -> float | None:
    merged = results.get(f"auth_tls.{side}.latency")
    if not isinstance(merged, Latency) or not merged.samples_ms:
        return None
    return merged.p50 if p == 50 else merged.p99


def auth_tls_rows(results: Results) -> list[Row]:
    """The table rows: auth+TLS on against off (same run, side by side)."""
    if not any(k.startswith("auth_tls.") for k in results):
        return []

    def lost(phase: str) -> int:
        return sum(v.failures.count for s in SIDES for v in _rounds(results, s, phase))

    off = "auth+TLS off"
    cpu_on, cpu_off = _broker_cpu(results, "on"), _broker_cpu(results, "off")
    return [
        Row("e2e jobs/s, unary Submit, auth+TLS on", _median_rate(results, "on", "unary"), off,
            _median_rate(results, "off", "unary"), latency=False, lost=lost("unary")),
        Row("e2e jobs/s, SubmitBatch x100, auth+TLS on", _median_rate(results, "on", "batch"), off,
            _median_rate(results, "off", "batch"), latency=False, lost=lost("batch")),
        Row("latency p50 @100/s, auth+TLS on (ms)", _pct(results, "on", 50), off, _pct(results, "off", 50),
            latency=True, lost=lost("latency")),
        Row("latency p99 @100/s, auth+TLS on (ms)", _pct(results, "on", 99), off, _pct(results, "off", 99),
            latency=True, lost=lost("latency")),
        Row("broker CPU ms/1k jobs, unary, auth+TLS on", cpu_on, off, cpu_off, latency=False,
            lost=lost("unary")),
    ]  # fmt: skip


def _broker_cpu(results: Results, side: str) -> float | None:
    """The broker's CPU per 1,000 unary jobs (median of the rounds): steadier than the
    rate on a machine others load, and where the key check and TLS are paid."""
    figures = [
        1000.0 * per_job
        for v in _rounds(results, side, "unary")
        if isinstance(v, Throughput)
        for per_job in [v.cpu_ms_per_job("broker")]
        if per_job is not None
    ]
    return statistics.median(figures) if figures else None
