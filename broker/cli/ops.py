"""``laneway providers``, ``laneway stats`` and ``laneway top``: what the fleet is doing.

All three read the broker (``GetProviderHealth``, ``GetStats``), never NATS, so they
work from any machine that reaches the gRPC port. ``top`` computes job rates itself
from the cumulative delivery counters of two readings a refresh apart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

import laneway
from laneway.broker.cli.common import (
    LOCAL_BROKER,
    Broker,
    broker_options,
    client_call,
)
from laneway.broker.cli.top_runs import RunsView, RunWatch, render_runs, watch_quietly
from laneway.errors import ApiError
from laneway.ops import circuit_name, delivery_rates, lane_name, oldest_age_s
from laneway.v1 import ops_pb2

__all__ = ["providers", "render_providers", "render_top", "stats", "top"]

# Wide enough for every column when stdout is not a terminal (rich would assume 80).
_PIPE_WIDTH = 160
_CIRCUIT_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


def _json(message: Message) -> str:
    # Zero figures included: a lane with nothing waiting must still say depth 0.
    return json.dumps(
        MessageToDict(message, always_print_fields_with_no_presence=True), separators=(",", ":")
    )


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=_PIPE_WIDTH)


# --- formatting ------------------------------------------------------------------------


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _when(ts: Timestamp, now: float, *, future: bool) -> str:
    at = ts.ToNanoseconds() / 1e9
    clock = datetime.fromtimestamp(at).strftime("%H:%M:%S")
    delta = at - now if future else now - at
    return f"{clock} ({'in ' if future else ''}{_age(max(0.0, delta))}{'' if future else ' ago'})"


def _rate(p: ops_pb2.ProviderHealth) -> str:
    parts = []
    if p.configured_rpm:
        now = f"{p.current_rpm:.0f}" if p.HasField("current_rpm") else "-"
        parts.append(f"{now}/{p.configured_rpm} rpm")
    if p.HasField("current_tpm"):
        # Shown also without a configured tpm: the provider's token headers cap it then.
        limit = f"/{p.configured_tpm}" if p.configured_tpm else " (headers)"
        parts.append(f"{p.current_tpm:.0f}{limit} tpm")
    return ", ".join(parts) or "unlimited"


def _budget(p: ops_pb2.ProviderHealth) -> str:
    return f"{p.budget:.0f}" if p.HasField("budget") else "unlimited"


def _in_flight(p: ops_pb2.ProviderHealth) -> str:
    return f"{p.in_flight}/{p.max_concurrent}" if p.max_concurrent else "-"


def _circuit(p: ops_pb2.ProviderHealth, now: float) -> Text:
    name = circuit_name(p.circuit_state)
    label = name if p.circuit_enabled else f"{name} (off)"
    if p.HasField("open_end_time"):
        label += f" until {_when(p.open_end_time, now, future=True)}"
    return Text(label, style=_CIRCUIT_STYLE.get(name, ""))


def _last_error(p: ops_pb2.ProviderHealth, now: float) -> str:
    if not p.last_error:
        return "-"
    text = p.last_error if len(p.last_error) <= 60 else p.last_error[:59] + "…"
    if p.HasField("last_error_time"):
        text += f" ({_age(max(0.0, now - p.last_error_time.ToNanoseconds() / 1e9))} ago)"
    if p.consecutive_failures:
        text += f" x{p.consecutive_failures}"
    return text


def _last_minute(p: ops_pb2.ProviderHealth) -> str:
    if not p.recent_calls:
        return "-"
    parts = [f"{p.recent_calls} calls", f"{100 * p.error_rate:.1f}% failed"]
    if p.rate_limited_rate:
        parts.append(f"{100 * p.rate_limited_rate:.1f}% 429")
    if p.HasField("latency_p50"):
        p50, p95 = p.latency_p50.ToTimedelta(), p.latency_p95.ToTimedelta()
        parts.append(f"p50 {p50.total_seconds():.2f}s p95 {p95.total_seconds():.2f}s")
    return ", ".join(parts)


def render_providers(found: Sequence[ops_pb2.ProviderHealth], now: float) -> Table:
    table = Table(title="providers", title_justify="left", expand=False)
    for column in ("provider", "circuit", "rate now/configured", "budget", "in flight", "paused until"):
        table.add_column(column, no_wrap=True)
    table.add_column("last minute", overflow="fold")
    table.add_column("last error", overflow="fold")
    for p in found:
        paused = _when(p.pause_end_time, now, future=True) if p.HasField("pause_end_time") else "-"
        if p.pause_reason:
            paused += f" {p.pause_reason}"
        table.add_row(
            p.provider,
            _circuit(p, now),
            _rate(p),
            _budget(p),
            _in_flight(p),
            paused,
            _last_minute(p),
            _last_error(p, now),
        )
    return table


def render_top(
    current: ops_pb2.GetStatsResponse,
    rates: dict[tuple[str, str], float],
    note: str = "",
    runs: RunsView | None = None,
) -> RenderableType:
    """One frame of ``laneway top``: lanes per route, then providers, then pipeline
    runs (``top_runs``) when there are any."""
    now = current.read_time.ToNanoseconds() / 1e9
    lanes = Table(title="lanes", title_justify="left")
    for column in ("route", "lane", "waiting", "leased", "oldest", "jobs/s", "dead letters"):
        lanes.add_column(column, no_wrap=True, justify="left" if column in ("route", "lane") else "right")
    for route in current.routes:
        for index, lane in enumerate(route.lanes):
            name = lane_name(lane.lane)
            age = oldest_age_s(lane)
            rate = rates.get((route.route, name))
            lanes.add_row(
                route.route if index == 0 else "",
                name,
                str(lane.depth),
                str(lane.leased),
                _age(age) if age is not None else "-",
                f"{rate:.1f}" if rate is not None else "-",
                str(route.dead_letters) if index == 0 else "",
            )
    clock = datetime.fromtimestamp(now).strftime("%H:%M:%S")
    header = Text(f"laneway top  {clock}" + (f"  {note}" if note else ""), style="bold")
    parts: list[RenderableType] = [header, lanes]
    if any(route.tiers for route in current.routes):
        parts.append(render_tiers(current.routes))
    parts.append(render_providers(current.providers, now))
    if runs is not None:
        parts.extend(render_runs(runs, now))
    return Group(*parts)


def render_tiers(routes: Sequence[ops_pb2.RouteStats]) -> Table:
    """Weighted tiers: each target's weight against its share of the starts so far."""
    table = Table(title="weighted tiers", title_justify="left")
    for column in ("route", "tier", "provider", "weight", "share of starts", "starts", "owed", "worker"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("route", "provider") else "right")
    for route in routes:
        for tier in route.tiers:
            weights = sum(x.weight for x in tier.targets)
            starts = sum(x.starts for x in tier.targets)
            for index, x in enumerate(tier.targets):
                share = f"{100 * x.starts / starts:.1f}%" if starts else "-"
                table.add_row(
                    route.route if index == 0 else "",
                    str(tier.tier) if index == 0 else "",
                    x.provider,
                    f"{x.weight} ({100 * x.weight / weights:.0f}%)",
                    share,
                    str(x.starts),
                    f"{x.owed:+.1f}",
                    "present" if x.present else "absent",
                )
    return table


# --- commands --------------------------------------------------------------------------


@broker_options
def providers(
    names: Annotated[list[str] | None, typer.Argument(help="Only these providers.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the response as one JSON object.")] = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Providers' circuit state, rate now against the configured one, budget, last error."""

    async def go() -> bool:
        async with broker.client() as client:
            found = await client.get_provider_health(names or [])
        if as_json:
            typer.echo(_json(ops_pb2.GetProviderHealthResponse(providers=found)))
        else:
            _console().print(render_providers(found, time.time()))
        return True

    client_call(go())


@broker_options
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print the response as one JSON object.")] = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Queue figures per route and lane, dead letters and provider health (GetStats)."""

    async def go() -> bool:
        async with broker.client() as client:
            current = await client.get_stats()
        if as_json:
            typer.echo(_json(current))
        else:
            _console().print(render_top(current, {}))
        return True

    client_call(go())


@broker_options
def top(
    once: Annotated[
        bool, typer.Option("--once", help="Print one frame and exit (no terminal needed).")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Live view of lanes (waiting, leased, oldest, jobs/s, dead letters), providers and pipeline runs."""

    async def go() -> bool:
        async with broker.client(timeout=max(2.0, interval * 2)) as client:
            current = await client.get_stats()
            watch = RunWatch()
            runs = await watch_quietly(watch, client)
            if once:
                _console().print(render_top(current, {}, runs=runs))
                return True
            await _live(client, current, interval, watch, runs)
        return True

    client_call(go())


async def _live(
    client: laneway.AsyncClient,
    current: ops_pb2.GetStatsResponse,
    interval: float,
    watch: RunWatch,
    runs: RunsView | None,
) -> None:
    """Refresh until Ctrl-C; a broker that stops answering is shown, not fatal."""
    previous: ops_pb2.GetStatsResponse | None = None
    note = ""
    with Live(render_top(current, {}, runs=runs), auto_refresh=False, console=Console()) as live:
        while True:
            await asyncio.sleep(interval)  # the refresh period, not synchronisation
            try:
                fresh = await client.get_stats()
            except ApiError as err:
                note = f"[stale: {err}]"
            else:
                previous, current, note = current, fresh, ""
                runs = await watch_quietly(watch, client) or runs
            live.update(render_top(current, delivery_rates(previous, current), note, runs), refresh=True)
