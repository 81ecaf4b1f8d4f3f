"""Time to first delta (TTFD): a streamed chat answer's first text through Laneway,
next to calling the provider directly.

The provider is the fake OpenAI-compatible HTTP server (``laneway fake-provider``)
in a child process, so the bench process's CPU stays out of its timing; it waits
``ttfd_token_delay_ms`` before each token. Both sides make sequential calls:

- direct: ``POST /chat/completions`` with ``"stream": true`` over httpx, from the
  request's start to the first non-empty ``choices[0].delta.content``;
- Laneway: the ``Run`` RPC with a ``stream=True`` chat job on a route to an
  ``openai`` provider pointing at the fake, from the call's start to the first
  event carrying a ``delta``.

Each call reads its answer to the end and must return the whole text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time

import httpx
from httpx_sse import aconnect_sse

import laneway
from bench.measure import Failures, Latency, Op, sequential, settle
from bench.report import progress
from bench.results import Results
from bench.settings import Settings
from bench.stack import BenchError, Child, Workspace, start_stack, wait_stream_empty
from laneway.broker.cli.natsd import free_port
from laneway.broker.core import topology as topo
from laneway.v1 import job_pb2

__all__ = ["TTFD_ROUTE", "run_ttfd"]

TTFD_ROUTE = "stream"
MODEL = "fake-chat"
# Three stream tokens: a call lasts about three token delays.
PROMPT = "hello streaming world"
# The direct and Laneway calls run in this many alternating rounds.
_ROUNDS = 8

Pids = dict[str, int | None]

TTFD_CONFIG = """\
queue:
  ack_wait_s: 30
workers:
  shutdown_grace_s: 2
providers:
  fake:
    type: openai
    base_url: {base_url}
    api_key_env: ""
    concurrency: 16
routes:
  {route}:
    targets: [{{provider: fake, model: {model}}}]
"""


async def _wait_http(url: str, child: Child, timeout: float = 30.0) -> None:
    """Poll ``GET url`` until it answers 200, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(timeout=1.0) as http:
        while loop.time() < deadline:
            child.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.05)  # poll interval under a deadline
    raise BenchError(f"{child.name} did not answer on {url} within {timeout:.0f}s")


async def _start_fake(ws: Workspace, s: Settings) -> tuple[str, Child]:
    port = free_port()
    argv = [sys.executable, "-m", "laneway.broker.cli", "fake-provider", "--port", str(port)]
    child = await ws.spawn("fake-provider", [*argv, "--token-delay-ms", f"{s.ttfd_token_delay_ms:g}"])
    base_url = f"http://127.0.0.1:{port}/v1"
    await _wait_http(f"{base_url}/models", child)
    return base_url, child


def _direct(http: httpx.AsyncClient, base_url: str, samples: list[float]) -> Op:
    """One streamed call straight to the provider; its TTFD goes to ``samples`` when it succeeds."""
    url = f"{base_url}/chat/completions"
    # The body the openai adapter sends for a streamed chat job.
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def op() -> list[str]:
        t0 = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        async with aconnect_sse(http, "POST", url, json=body) as source:
            source.response.raise_for_status()
            # Read to the end of the body, past [DONE]: a response closed early cannot
            # go back to httpx's pool, and every call would open a new connection (the
            # openai adapter reads its streams to the end for the same reason).
            async for sse in source.aiter_sse():
                if sse.data.strip() == "[DONE]":
                    continue
                for choice in json.loads(sse.data).get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content and choice.get("index", 0) == 0:
                        if first is None:
                            first = time.perf_counter() - t0
                        parts.append(content)
        if first is None:
            return ["no content delta streamed"]
        if "".join(parts) != PROMPT:
            return ["streamed a wrong text"]
        samples.append(first * 1000.0)
        return []

    return op


def _through_laneway(client: laneway.AsyncClient, samples: list[float]) -> Op:
    """One streamed chat job through the Run RPC; its TTFD goes to ``samples`` when it succeeds."""
    spec = laneway.job(TTFD_ROUTE, laneway.chat(PROMPT, stream=True))

    async def op() -> list[str]:
        t0 = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        final: job_pb2.JobEvent | None = None
        async for event in client.run_stream(spec):
            if event.reset:
                parts.clear()  # a failed attempt's text: the next attempt streams anew
            if event.HasField("delta"):
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(event.delta.text)
            if event.state in laneway.FINAL_STATES:
                final = event
        if final is None:
            return ["Run stream ended without a final event"]
        if final.state != job_pb2.JOB_STATE_SUCCEEDED:
            state = job_pb2.JobState.Name(final.state)
            return [f"{state}: {final.error.code} {final.error.message}".strip()]
        if first is None:
            return ["SUCCEEDED without a delta event"]
        if final.result.chat.text != PROMPT or "".join(parts) != PROMPT:
            return ["SUCCEEDED with a wrong text"]
        samples.append(first * 1000.0)
        return []

    return op


async def _timed(op: Op, samples: list[float], *, count: int, timeout: float, pids: Pids | None) -> Latency:
    """Sequential calls of ``op``; the figures are the TTFDs it recorded, not the calls' durations."""
    samples.clear()
    calls = await sequential(op, count=count, timeout=timeout, pids=pids)
    return dataclasses.replace(calls, samples_ms=list(samples))


def _merge(parts: list[Latency]) -> Latency:
    """One figure from equal rounds: all samples and failures, the mean CPU use."""
    merged = Latency(0.0, [], Failures(), {})
    for part in parts:
        merged.samples_ms.extend(part.samples_ms)
        merged.failures.merge(part.failures)
        for name, pct in part.cpu.items():
            merged.cpu[name] = round(merged.cpu.get(name, 0.0) + pct / len(parts), 1)
    return merged


async def run_ttfd(s: Settings) -> Results:
    results: Results = {}
    t = s.follow_timeout_s
    async with Workspace("ttfd") as ws:
        base_url, fake = await _start_fake(ws, s)
        body = TTFD_CONFIG.format(base_url=json.dumps(base_url), route=TTFD_ROUTE, model=MODEL)
        addr, nc, pids = await start_stack(ws, body, TTFD_ROUTE)
        up = time.perf_counter()
        pids["fake-provider"] = fake.pid
        samples: list[float] = []
        try:
            async with (
                httpx.AsyncClient(timeout=t) as http,
                laneway.AsyncClient(addr, timeout=30.0) as client,
            ):
                sides = {
                    "direct": _direct(http, base_url, samples),
                    "laneway": _through_laneway(client, samples),
                }
                progress(
                    f"Features: TTFD, {s.ttfd_token_delay_ms:g} ms per token: warm-up, direct HTTP "
                    f"stream and Run with a streamed chat job ({ws.dir})"
                )
                for side, op in sides.items():
                    results[f"features.ttfd.{side}.warmup"] = await _timed(
                        op, samples, count=s.ttfd_warmup_calls, timeout=t, pids=None
                    )
                # A long-running worker starts a fresh job's call while its RUNNING event is
                # written; a new one not yet (``settle``): measure the steady state.
                await settle(_through_laneway(client, []), since=up, timeout=t)
                # Rounds of each side in turn: a change of load on the machine weighs on both.
                rounds = min(_ROUNDS, s.ttfd_calls)
                progress(
                    f"Features: TTFD: {s.ttfd_calls} sequential calls each, direct and through Laneway, "
                    f"in {rounds} alternating rounds"
                )
                parts: dict[str, list[Latency]] = {side: [] for side in sides}
                for i in range(rounds):
                    count = s.ttfd_calls * (i + 1) // rounds - s.ttfd_calls * i // rounds
                    for side, op in sides.items():
                        parts[side].append(await _timed(op, samples, count=count, timeout=t, pids=pids))
                for side, latencies in parts.items():
                    results[f"features.ttfd.{side}"] = _merge(latencies)
            for child in ws.children:
                child.check_alive()
            left = await wait_stream_empty(nc.jetstream(), topo.JOBS_STREAM)
            if left:
                results["features.ttfd.laneway"].failures.add(f"left unacked on {topo.JOBS_STREAM}", left)
        finally:
            await nc.close()
        ws.failed = ws.failed or any(r.failures.count for r in results.values())
    return results
