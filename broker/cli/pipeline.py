"""``laneway pipeline``: start, follow, show and cancel pipeline runs (``docs/pipelines.md``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

import laneway
from laneway.broker.cli.common import (
    LOCAL_BROKER,
    Broker,
    JsonOpt,
    broker_options,
    client_call,
    echo_json,
)
from laneway.v1 import pipeline_pb2

__all__ = ["pipeline_app"]

pipeline_app = typer.Typer(no_args_is_help=True, help="Pipeline runs: chains of steps from the config.")

# How often --wait looks at the run: it prints steps, which the run's state has and
# the log's entries only imply.
_POLL_S = 0.2


def _name(enum: type[pipeline_pb2.PipelineRunState | pipeline_pb2.PipelineStepState], value: int) -> str:
    prefix = "PIPELINE_RUN_STATE_" if enum is pipeline_pb2.PipelineRunState else "PIPELINE_STEP_STATE_"
    return str(enum.Name(value)).removeprefix(prefix)  # type: ignore[arg-type]


def _seconds(step_or_run: pipeline_pb2.PipelineStep | pipeline_pb2.PipelineRun) -> str:
    start = (
        step_or_run.start_time
        if isinstance(step_or_run, pipeline_pb2.PipelineStep)
        else step_or_run.create_time
    )
    if not start.seconds or not step_or_run.end_time.seconds:
        return ""
    return f" {(step_or_run.end_time.ToNanoseconds() - start.ToNanoseconds()) / 1e9:.2f}s"


def step_line(step: pipeline_pb2.PipelineStep) -> str:
    """One step: name, kind, state, jobs done of all, time taken."""
    jobs = f" jobs={step.succeeded + step.failed}/{step.children}" if step.children else ""
    failed = f" failed={step.failed}" if step.failed else ""
    done = step.state >= pipeline_pb2.PIPELINE_STEP_STATE_SUCCEEDED
    items = f" items={step.items}" if step.kind in ("split", "gather", "sink") and done else ""
    state = _name(pipeline_pb2.PipelineStepState, step.state)
    return f"  {step.name} {step.kind} {state}{jobs}{failed}{items}{_seconds(step)}"


def run_lines(run: pipeline_pb2.PipelineRun) -> list[str]:
    """The run's line, then each step's."""
    error = f" error={run.error!r}" if run.error else ""
    head = (
        f"{run.run_id} {run.pipeline} {_name(pipeline_pb2.PipelineRunState, run.state)}{_seconds(run)}{error}"
    )
    return [head, *(step_line(s) for s in run.steps)]


def event_line(event: pipeline_pb2.PipelineRunEvent) -> str:
    """One entry of a run's log: seq, kind, then what it names."""
    parts = [str(event.seq), event.kind, event.step, event.job_id, event.state]
    if event.kind == "step_started":
        parts.append(f"jobs={event.count}")
    if event.error:
        parts.append(f"error={event.error!r}")
    return " ".join(p for p in parts if p)


async def _follow(client: laneway.AsyncClient, run_id: str, as_json: bool) -> pipeline_pb2.PipelineRun:
    """Print each step as it changes, until the run ends; the run at its end."""
    shown: dict[str, str] = {}
    while True:
        run = await client.get_pipeline_run(run_id)
        for step in run.steps:
            line = step_line(step)
            if shown.get(step.name) != line and step.state != pipeline_pb2.PIPELINE_STEP_STATE_PENDING:
                shown[step.name] = line
                if not as_json:
                    typer.echo(line)
        if run.state != pipeline_pb2.PIPELINE_RUN_STATE_RUNNING:
            return run
        await asyncio.sleep(_POLL_S)  # polling the run's state (above)


@pipeline_app.command("run")
@broker_options
def pipeline_run(
    name: str,
    input_file: Annotated[Path, typer.Option("--input", help="File with the run's input text ('-': stdin).")],
    key: Annotated[str, typer.Option(help="Idempotency key: the same key starts one run.")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run's steps until it ends.")] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print every entry of the run's log as it comes, until it ends.")
    ] = False,
    as_json: JsonOpt = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Start a run of pipeline NAME; prints its run id (and, with --wait, its steps as
    they go, or with --stream every entry of its log; then exit 1 unless it succeeds)."""
    try:
        text = typer.get_text_stream("stdin").read() if str(input_file) == "-" else input_file.read_text()
    except OSError as err:
        raise typer.BadParameter(f"--input: cannot read {input_file}: {err.strerror or err}") from None

    async def go() -> bool:
        async with broker.client() as client:
            started = await client.start_pipeline(name, text, idempotency_key=key)
            if as_json:
                echo_json(
                    pipeline_pb2.StartPipelineResponse(run_id=started.run_id, duplicate=started.duplicate)
                )
            else:
                typer.echo(started.run_id + (" (duplicate)" if started.duplicate else ""))
            if stream:
                last = pipeline_pb2.PipelineRunEvent()
                async for last in client.stream_pipeline_run(started.run_id):
                    echo_json(last) if as_json else typer.echo(event_line(last))
                return bool(last.run_state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED)
            if not wait:
                return True
            run = await _follow(client, started.run_id, as_json)
        if as_json:
            echo_json(run)
        else:
            typer.echo(run_lines(run)[0])
        return run.state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED

    client_call(go())


@pipeline_app.command("get")
@broker_options
def pipeline_get(
    run_id: str,
    as_json: JsonOpt = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """A run as it stands: its state and each step's state, jobs and time taken."""

    async def go() -> bool:
        async with broker.client() as client:
            run = await client.get_pipeline_run(run_id)
        if as_json:
            echo_json(run)
        else:
            for line in run_lines(run):
                typer.echo(line)
        return True

    client_call(go())


@pipeline_app.command("cancel")
@broker_options
def pipeline_cancel(
    run_id: str,
    reason: Annotated[str, typer.Option(help="Why (recorded as the run's error).")] = "",
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Cancel a run that has not ended; its jobs still queued or running are cancelled."""

    async def go() -> bool:
        async with broker.client() as client:
            answer = await client.cancel_pipeline_run(run_id, reason)
        state = _name(pipeline_pb2.PipelineRunState, answer.state)
        typer.echo(f"{run_id} {state}" + ("" if answer.cancelled else " (had ended already)"))
        return True

    client_call(go())


@pipeline_app.command("resume")
@broker_options
def pipeline_resume(
    run_id: str,
    reason: Annotated[str, typer.Option(help="Why (recorded in the run's log).")] = "",
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Redrive a run that failed at a step: that step's failed items run again and the
    run goes on from there (finished steps are not run again). Exit 1 if it did not
    fail at a step."""

    async def go() -> bool:
        async with broker.client() as client:
            answer = await client.resume_pipeline_run(run_id, reason)
        state = _name(pipeline_pb2.PipelineRunState, answer.state)
        typer.echo(
            f"{run_id} {state}" + ("" if answer.resumed else " (not resumed: it did not fail at a step)")
        )
        return answer.resumed

    client_call(go())


@pipeline_app.command("list")
@broker_options
def pipeline_list(
    pipeline: Annotated[str, typer.Option(help="Only runs of this pipeline.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100,
    as_json: JsonOpt = False,
    broker: Broker = LOCAL_BROKER,
) -> None:
    """Pipeline runs, oldest first: one line each (as the first line of `get`)."""

    async def go() -> bool:
        shown, token = 0, ""
        async with broker.client() as client:
            while shown < limit:
                page = await client.list_pipeline_runs(
                    pipeline=pipeline, page_size=min(1000, limit - shown), page_token=token
                )
                for run in page.runs:
                    echo_json(run) if as_json else typer.echo(run_lines(run)[0])
                shown += len(page.runs)
                token = page.next_page_token
                if not token:
                    break
        if not shown and not as_json:
            typer.echo("no pipeline runs", err=True)
        return True

    client_call(go())
