"""``laneway dlq``: list, show and redrive dead letters."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf.timestamp_pb2 import Timestamp

import laneway
from laneway.broker.cli.common import (
    LOCAL_BROKER,
    Broker,
    JsonOpt,
    broker_options,
    client_call,
    echo_json,
    parse_when,
)
from laneway.dead_letters import dlq_filter
from laneway.v1 import dead_letter_pb2, job_pb2

__all__ = ["dlq_app"]

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: jobs that failed for good.")

RouteOpt = Annotated[str, typer.Option(help="Only this route.")]
ReasonOpt = Annotated[
    str, typer.Option(help="Only this reason: permanent_error, attempts_exhausted, max_deliveries.")
]
ErrorCodeOpt = Annotated[
    str, typer.Option(help="Only jobs whose final error has this code (invalid_request, rate_limited, ...).")
]
SinceOpt = Annotated[str, typer.Option(help="Dead-lettered at or after: ISO time or age (30m, 2h, 1d).")]
UntilOpt = Annotated[str, typer.Option(help="Dead-lettered before: ISO time or age.")]
TenantOpt = Annotated[
    str, typer.Option(help="Admins: only this tenant's (other keys always see only their own tenant's).")
]


def _check_filter(reason: str, error_code: str) -> None:
    try:
        dlq_filter(reason=reason, error_code=error_code)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _ts(ts: Timestamp) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def _reason(value: int) -> str:
    return dead_letter_pb2.DeadLetterReason.Name(value).removeprefix("DEAD_LETTER_REASON_").lower()  # type: ignore[arg-type]


def _code(value: int) -> str:
    return job_pb2.JobErrorCode.Name(value).removeprefix("JOB_ERROR_CODE_").lower()  # type: ignore[arg-type]


def _summary(dl: laneway.DeadLetter) -> str:
    lane = job_pb2.Lane.Name(dl.spec.lane).removeprefix("LANE_").lower()
    tenant = f" tenant={dl.tenant}" if dl.tenant else ""
    return (
        f"{dl.job_id} {dl.spec.route}/{lane} {_reason(dl.reason)} {_code(dl.error.code)} "
        f"attempts={len(dl.attempts)} at={_ts(dl.dead_letter_time)}{tenant}"
    )


@dlq_app.command("list")
@broker_options
def dlq_list(
    route: RouteOpt = "",
    reason: ReasonOpt = "",
    error_code: ErrorCodeOpt = "",
    since: SinceOpt = "",
    until: UntilOpt = "",
    tenant: TenantOpt = "",
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100,
    as_json: JsonOpt = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Dead letters, oldest first."""
    _check_filter(reason, error_code)
    since_at = parse_when(since, "--since") if since else None
    until_at = parse_when(until, "--until") if until else None

    async def go() -> bool:
        shown, token = 0, ""
        async with broker.client() as client:
            while shown < limit:
                page = await client.list_dead_letters(
                    route=route,
                    reason=reason,
                    error_code=error_code,
                    since=since_at,
                    until=until_at,
                    page_size=min(1000, limit - shown),
                    page_token=token,
                    tenant=tenant,
                )
                for dl in page.dead_letters:
                    echo_json(dl) if as_json else typer.echo(_summary(dl))
                shown += len(page.dead_letters)
                token = page.next_page_token
                if not token:
                    break
        if not shown and not as_json:
            typer.echo("no dead letters", err=True)
        return True

    client_call(go())


@dlq_app.command("show")
@broker_options
def dlq_show(
    job_id: str,
    as_json: JsonOpt = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """One dead letter in full: the job, every attempt and its error."""

    async def go() -> bool:
        async with broker.client() as client:
            found = (await client.list_dead_letters(job_ids=[job_id])).dead_letters
        if not found:
            typer.echo(f"error: no dead letter for job {job_id}", err=True)
            raise typer.Exit(2)
        dl = found[0]
        if as_json:
            echo_json(dl)
            return True
        typer.echo(_summary(dl))
        typer.echo(f"  error: {_code(dl.error.code)} ({dl.error.http_status or '-'}): {dl.error.message}")
        typer.echo(f"  enqueued: {_ts(dl.enqueue_time)}  deliveries: {dl.deliveries or '-'}")
        for a in dl.attempts:
            ended = _ts(a.end_time) if a.HasField("end_time") else "-"
            error = f"{_code(a.error.code)}: {a.error.message}" if a.HasField("error") else "-"
            typer.echo(f"  attempt {a.attempt} {a.provider}/{a.model} {_ts(a.start_time)} -> {ended} {error}")
        return True

    client_call(go())


@dlq_app.command("redrive")
@broker_options
def dlq_redrive(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Dead-lettered job ids.")] = None,
    route: RouteOpt = "",
    reason: ReasonOpt = "",
    error_code: ErrorCodeOpt = "",
    since: SinceOpt = "",
    until: UntilOpt = "",
    tenant: TenantOpt = "",
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter (when no filter is given).")] = False,
    to_route: Annotated[str, typer.Option(help="Submit onto this route instead.")] = "",
    to_lane: Annotated[str, typer.Option(help="Submit onto this lane instead: high, normal, low.")] = "",
    rate: Annotated[float, typer.Option(help="Jobs per second (default: dlq.redrive_rate_per_s).")] = 0.0,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 1000,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Submit dead letters again as new jobs, paced; prints `old -> new` per job."""
    _check_filter(reason, error_code)
    if to_lane and to_lane not in ("high", "normal", "low"):
        raise typer.BadParameter(f"--to-lane must be high, normal or low, not {to_lane!r}")

    async def go() -> bool:
        async with broker.client() as client:
            done = await client.redrive_dead_letters(
                job_ids=job_ids or [],
                route=route,
                reason=reason,
                error_code=error_code,
                since=parse_when(since, "--since") if since else None,
                until=parse_when(until, "--until") if until else None,
                all=all_,
                to_route=to_route,
                to_lane=to_lane,
                rate_per_second=rate,
                limit=limit,
                tenant=tenant,
            )
        for r in done:
            if r.error is not None:
                typer.echo(f"{r.job_id} error: {r.error}")
            else:
                run = f" (pipeline run {r.pipeline_run_id} resumed)" if r.pipeline_run_id else ""
                typer.echo(f"{r.job_id} -> {r.new_job_id}{run}")
        if not done:
            typer.echo("nothing to redrive", err=True)
        return all(r.error is None for r in done)

    client_call(go())
