"""What metrics cost: the end-to-end SubmitBatch throughput of two identical stacks
measured in one run, one with metrics off and one with them on.

- off: broker and worker record nothing (their metrics objects are replaced by
  ones that drop every observation) and serve no ``/metrics``;
- on: broker and worker record everything and serve ``/metrics``, which the bench
  scrapes once a second during the measured phases, as Prometheus would (the
  broker's scrape reads queue figures from JetStream).

Both stacks run side by side and the phases alternate off/on, on/off, ... so drift
of a noisy machine weighs on both sides alike; the figures are the ratios of the
medians: throughput, and broker + worker CPU per job (the target: metrics cost at
most 5 % more CPU per job, ``bench.targets.METRICS_CPU_RATIO``). Every job
must end SUCCEEDED with the echoed prompt; the scraped worker must have counted
every job of the "on" stack.

Run alone with ``python -m bench --only metrics``. ``python -m bench.metrics_bench
broker|worker ARGS`` is the "off" side's child process: ``laneway`` with recording
disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
from prometheus_client.parser import text_string_to_metric_families

import laneway
from bench import targets as goal
from bench.laneway_bench import CONFIG, Jobs
from bench.measure import Count, Latency, Throughput, closed_loop
from bench.report import Row, progress
from bench.settings import ROUTE, Settings
from bench.stack import BenchError, Workspace, wait_grpc_health, wait_pull_waiting, wait_stream_empty
from laneway.broker.cli.natsd import free_port
from laneway.broker.config.model import load_config
from laneway.broker.core import topology as topo
from laneway.broker.core.model import JobError, JobEvent, TokenUsage
from laneway.broker.server.metrics import BrokerMetrics
from laneway.workers.metrics import WorkerMetrics

__all__ = ["metrics_rows", "run_metrics"]

Results = dict[str, Throughput | Latency | Count]

SIDES = ("off", "on")
SCRAPE_INTERVAL_S = 1.0


class _Stack:
    """One running stack: its client, NATS connection, pids and metrics ports."""

    def __init__(self, side: str, client: laneway.AsyncClient, nc: Any, pids: dict[str, int | None]) -> None:
        self.side = side
        self.client = client
        self.nc = nc
        self.pids = pids
        self.ports: list[int] = []


async def _start(ws: Workspace, side: str) -> tuple[str, Any, dict[str, int | None], list[int]]:
    """nats, broker and worker; with ``side`` "on" both serve ``/metrics``."""
    server = await ws.start_nats()
    addr = f"127.0.0.1:{free_port()}"
    config = ws.dir / "laneway.yaml"
    config.write_text(f'broker:\n  grpc_addr: "{addr}"\n' + CONFIG.format(route=ROUTE))
    load_config(config)  # fail here, with the config error, rather than in a child
    common = ["--config", str(config), "--nats-url", server.url]
    ports: list[int] = []
    if side == "on":
        cli = [sys.executable, "-m", "laneway.broker.cli"]
        ports = [free_port(), free_port()]
        broker_args = ["--metrics-port", str(ports[0])]
        worker_args = ["--metrics-port", str(ports[1])]
    else:
        cli = [sys.executable, "-m", "bench.metrics_bench"]
        broker_args = worker_args = []
    broker = await ws.spawn("broker", [*cli, "broker", *common, "--grpc-addr", addr, *broker_args])
    await wait_grpc_health(addr, broker)
    worker = await ws.spawn("worker", [*cli, "worker", *common, *worker_args])
    nc = await nats.connect(server.url, name=f"bench-metrics-{side}")
    try:
        await wait_pull_waiting(nc.jetstream(), topo.JOBS_STREAM, topo.consumer_name(ROUTE, "normal"), worker)
    except BaseException:
        await nc.close()
        raise
    pids = {"bench": os.getpid(), "nats-server": _nats_pid(), "broker": broker.pid, "worker": worker.pid}
    return addr, nc, pids, ports


_seen_nats: set[int] = set()


def _nats_pid() -> int | None:
    """The nats-server child started last: with two stacks up, ``Workspace.nats_pid``
    would name the first one for both."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in _seen_nats:
            continue
        with contextlib.suppress(OSError):
            head, _, tail = (entry / "stat").read_text().rpartition(")")
            if head.partition("(")[2] == "nats-server" and int(tail.split()[1]) == os.getpid():
                _seen_nats.add(int(entry.name))
                return int(entry.name)
    return None


class _Scraper:
    """Scrapes ``/metrics`` of the given ports every second while running."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self.scrapes = 0
        self.errors: list[str] = []
        self.last: dict[int, str] = {}

    async def scrape_once(self, http: httpx.AsyncClient) -> None:
        for port in self._ports:
            try:
                response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
                response.raise_for_status()
            except httpx.HTTPError as err:
                self.errors.append(f"scrape of :{port} failed: {type(err).__name__}")
                continue
            self.scrapes += 1
            self.last[port] = response.text

    async def run(self) -> None:
        async with httpx.AsyncClient() as http:
            while True:
                await self.scrape_once(http)
                await asyncio.sleep(SCRAPE_INTERVAL_S)  # the scrape interval, not synchronisation


def _jobs_counted(text: str) -> float:
    """Jobs the scraped worker brought to a final state, all routes and states."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "laneway_jobs_finished_total"
    )


def _order(rounds: int) -> Iterator[tuple[int, str]]:
    """off, on, then on, off, ...: each side goes first in alternate rounds."""
    for r in range(rounds):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            yield r + 1, side


async def run_metrics(s: Settings) -> Results:
    results: Results = {}
    # Short phases, many rounds: a busy machine's drift then shifts both sides alike.
    rounds = 2 if s.quick else 5
    b, inflight = s.batch_size, s.batches_in_flight
    ops = 2 * math.ceil(s.jobs / b)
    t = s.follow_timeout_s + 10.0
    async with (
        Workspace("metrics-off") as ws_off,
        Workspace("metrics-on") as ws_on,
        contextlib.AsyncExitStack() as exit,
    ):
        stacks: dict[str, _Stack] = {}
        for side, ws in (("off", ws_off), ("on", ws_on)):
            addr, nc, pids, ports = await _start(ws, side)
            exit.push_async_callback(nc.close)
            client = await exit.enter_async_context(laneway.AsyncClient(addr, timeout=30.0))
            stacks[side] = _Stack(side, client, nc, pids)
            stacks[side].ports = ports
        jobs = {side: Jobs(st.client, b, s.follow_timeout_s) for side, st in stacks.items()}
        for side in SIDES:
            progress(f"Metrics: warm-up, metrics {side}")
            await closed_loop(jobs[side].batch, ops=inflight, concurrency=inflight, jobs_per_op=b, timeout=t)
        scraper = _Scraper(stacks["on"].ports)
        run_on = 0
        for r, side in _order(rounds):
            progress(f"Metrics: round {r}/{rounds}, metrics {side}: {ops * b} jobs, SubmitBatch of {b}")
            task = asyncio.create_task(scraper.run()) if side == "on" else None
            try:
                result = await closed_loop(
                    jobs[side].batch,
                    ops=ops,
                    concurrency=inflight,
                    jobs_per_op=b,
                    timeout=t,
                    pids=stacks[side].pids,
                )
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            results[f"metrics.{side}.r{r}.throughput"] = result
            if side == "on":
                run_on += ops * b
        for side, ws in (("off", ws_off), ("on", ws_on)):
            for child in ws.children:
                child.check_alive()
            left = await wait_stream_empty(stacks[side].nc.jetstream(), topo.JOBS_STREAM)
            if left:
                results[f"metrics.{side}.r1.throughput"].failures.add(
                    f"left unacked on {topo.JOBS_STREAM}", left
                )
        # The "on" side really measured: the worker counted every job it ran.
        async with httpx.AsyncClient() as http:
            await scraper.scrape_once(http)
        warmup = inflight * b
        counted = _jobs_counted(scraper.last.get(stacks["on"].ports[1], ""))
        check = results[f"metrics.on.r{rounds}.throughput"]
        if counted != run_on + warmup:
            check.failures.add(f"worker metrics counted {counted:.0f} jobs, ran {run_on + warmup}")
        check.failures.extend(scraper.errors)
        results["metrics.on.scrapes"] = Count("scrapes of /metrics", scraper.scrapes, run_on)
        ratio = _ratio(results)
        if ratio is not None:
            progress(f"Metrics: on/off throughput ratio {ratio:.3f} (median of {rounds} rounds each)")
        cpu_on, cpu_off = _median_cpu(results, "on"), _median_cpu(results, "off")
        if cpu_on is not None and cpu_off:
            progress(
                f"Metrics: broker+worker CPU per 1,000 jobs: off {cpu_off:.0f} ms, on {cpu_on:.0f} ms "
                f"({cpu_on / cpu_off - 1:+.1%})"
            )
        for ws in (ws_off, ws_on):
            ws.failed = ws.failed or any(v.failures.count for v in results.values())
    return results


def _median_rate(results: Results, side: str) -> float | None:
    rates = [
        v.rate for k, v in results.items() if k.startswith(f"metrics.{side}.r") and isinstance(v, Throughput)
    ]
    return statistics.median(rates) if rates else None


def _cpu_ms_per_1000(r: Throughput) -> float | None:
    """CPU the broker and worker spent per 1,000 jobs of a phase."""
    per_job = r.cpu_ms_per_job("broker", "worker")
    return None if per_job is None else per_job * 1000.0


def _median_cpu(results: Results, side: str) -> float | None:
    figures = [
        f
        for k, v in results.items()
        if k.startswith(f"metrics.{side}.r") and isinstance(v, Throughput)
        for f in [_cpu_ms_per_1000(v)]
        if f is not None
    ]
    return statistics.median(figures) if figures else None


def _ratio(results: Results) -> float | None:
    on, off = _median_rate(results, "on"), _median_rate(results, "off")
    return on / off if on is not None and off else None


def metrics_rows(results: Results) -> list[Row]:
    """The table row: throughput with metrics on against off (medians of the rounds)."""
    on, off = _median_rate(results, "on"), _median_rate(results, "off")
    if on is None and off is None:
        return []
    lost = sum(v.failures.count for k, v in results.items() if k.startswith("metrics."))
    return [
        Row(
            "e2e jobs/s, SubmitBatch x100, metrics on",
            on,
            "metrics off",
            off,
            latency=False,
            lost=lost,
        ),
        Row(
            "broker+worker CPU ms/1k jobs, metrics on",
            _median_cpu(results, "on"),
            "metrics off",
            _median_cpu(results, "off"),
            latency=False,
            target=goal.METRICS_CPU_RATIO,
            lost=lost,
            target_on_difference=True,
            at_most=True,
        ),
    ]


# --- the "off" side's child process -----------------------------------------------------


class _SilentWorkerMetrics(WorkerMetrics):
    """Drops every observation: a worker with metrics off."""

    def job_started(self, event: JobEvent) -> None:
        pass

    def job_event(self, event: JobEvent) -> None:
        pass

    def provider_answer(
        self, provider: str, model: str, status: int, latency_s: float, usage: TokenUsage | None
    ) -> None:
        pass

    def first_token(self, provider: str, model: str, seconds: float) -> None:
        pass

    def rate_limits(self, provider: str, requests: int | None, tokens: int | None) -> None:
        pass

    def provider_error(self, provider: str, error: JobError) -> None:
        pass

    def rate_limited(self, provider: str, retry_after_s: float | None) -> None:
        pass

    def limiter(self, provider: str, model: str, rpm: float, budget: float) -> None:
        pass

    def circuit(self, provider: str, phase: str) -> None:
        pass


class _SilentBrokerMetrics(BrokerMetrics):
    """Drops every observation: a broker with metrics off."""

    def job_submitted(self, route: str, lane: str, tenant: str = "other") -> None:
        pass


def _serve_silently(argv: list[str]) -> None:
    """``laneway broker|worker ARGS`` with recording disabled. The process objects
    look their metrics class up in their module when built, so swapping the module
    attribute is enough; nothing else changes."""
    import laneway.broker.cli.app
    import laneway.broker.server.process
    import laneway.workers.pool

    if not argv or argv[0] not in ("broker", "worker"):
        raise BenchError("usage: python -m bench.metrics_bench broker|worker ARGS")
    swaps = (
        (laneway.broker.server.process, "BrokerMetrics", _SilentBrokerMetrics),
        (laneway.workers.pool, "WorkerMetrics", _SilentWorkerMetrics),
    )
    for module, name, silent in swaps:
        assert isinstance(getattr(module, name), type), f"{module.__name__}.{name} moved"
        setattr(module, name, silent)
    sys.argv = ["laneway", *argv]
    laneway.broker.cli.app.run()


if __name__ == "__main__":
    _serve_silently(sys.argv[1:])
