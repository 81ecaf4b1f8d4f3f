"""Pure wire code: protobuf <-> domain, validation, ids, topology names. No server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from laneway.broker.core import topology as t
from laneway.broker.core.errors import TopologyError
from laneway.broker.core.events import first_event
from laneway.broker.core.model import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    ClassificationInput,
    EmbeddingInput,
    EmbeddingOutput,
    ErrorClass,
    GenerationParams,
    JobError,
    JobSpec,
    JobState,
    QueuedJob,
    TokenUsage,
    new_job_id,
    utcnow,
)
from laneway.broker.core.wire.events import decode_event, encode_event
from laneway.broker.core.wire.jobs import NAME_RE, decode_queued_job, encode_queued_job, spec_from_pb
from laneway.broker.core.wire.timestamps import set_timestamp, to_datetime
from laneway.errors import InvalidArgument
from laneway.v1 import job_pb2


def _job() -> QueuedJob:
    spec = JobSpec(
        route="chat",
        lane="high",
        input=ChatInput((ChatMessage("system", "be brief"), ChatMessage("user", "hi"))),
        metadata={"tenant": "a"},
        idempotency_key="k1",
        deadline=utcnow(),
    )
    return QueuedJob(job_id=new_job_id(), spec=spec, enqueued_at=utcnow())


def test_queued_job_round_trip() -> None:
    job = _job()
    assert decode_queued_job(encode_queued_job(job)) == job


@pytest.mark.parametrize(
    "spec",
    [
        JobSpec(
            route="chat",
            lane="low",
            input=ChatInput(
                (ChatMessage("user", "hi"),),
                GenerationParams(max_tokens=5, temperature=0.0, top_p=0.5, stop=("x", "y")),
                stream=True,
            ),
            not_before=utcnow(),
            debounce_key="user-7",
            providers=("a", "b"),
            exclude_providers=("c",),
        ),
        JobSpec(route="embed", lane="normal", input=EmbeddingInput(("one", "two"))),
        JobSpec(
            route="tag", lane="high", input=ClassificationInput("text", ("yes", "no")), deadline=utcnow()
        ),
    ],
)
def test_queued_job_round_trip_every_input_and_field(spec: JobSpec) -> None:
    # Queued jobs are decoded without validation (it ran at submit): nothing may be lost.
    job = QueuedJob(job_id=new_job_id(), spec=spec, enqueued_at=utcnow())
    assert decode_queued_job(encode_queued_job(job)) == job


def test_event_round_trip_with_result_and_error() -> None:
    base = first_event(_job())
    running = base.next(JobState.RUNNING, attempt=1, provider="p", model="m", started_at=utcnow())
    done = running.next(JobState.SUCCEEDED, result=ChatOutput("hello", "length", TokenUsage(3, 1)))
    assert decode_event(encode_event(done)) == done
    assert done.seq == 3
    assert done.finished_at is not None
    failed = running.next(
        JobState.NOT_ENQUEUED, error=JobError("invalid_request", "nope", ErrorClass.PERMANENT, 400)
    )
    assert decode_event(encode_event(failed)) == failed
    embedded = running.next(JobState.SUCCEEDED, result=EmbeddingOutput(((0.5, -0.25),), TokenUsage(2, 0)))
    assert decode_event(encode_event(embedded)).result == embedded.result


def test_unspecified_lane_takes_the_default() -> None:
    pb = job_pb2.JobSpec(route="chat", chat=job_pb2.ChatInput(messages=[job_pb2.ChatMessage(content="x")]))
    spec = spec_from_pb(pb, field="job", default_lane="low")
    assert spec.lane == "low"
    assert spec.input == ChatInput((ChatMessage("user", "x"),))


@pytest.mark.parametrize(
    ("pb", "field"),
    [
        (job_pb2.JobSpec(), "job.route"),
        (job_pb2.JobSpec(route="a b"), "job.route"),
        (job_pb2.JobSpec(route="r", lane=9), "job.lane"),
        (job_pb2.JobSpec(route="r", metadata={"k": "v" * 2000}), "job.metadata[k]"),
        (job_pb2.JobSpec(route="r", idempotency_key="k" * 300), "job.idempotency_key"),
        (
            job_pb2.JobSpec(route="r", embedding=job_pb2.EmbeddingInput(texts=["ok", ""])),
            "job.embedding.texts[1]",
        ),
        (
            job_pb2.JobSpec(
                route="r", classification=job_pb2.ClassificationInput(text="t", labels=["a", "a"])
            ),
            "job.classification.labels",
        ),
        (
            job_pb2.JobSpec(
                route="r",
                chat=job_pb2.ChatInput(
                    messages=[job_pb2.ChatMessage(content="x")], params=job_pb2.GenerationParams(max_tokens=0)
                ),
            ),
            "job.chat.params.max_tokens",
        ),
    ],
)
def test_validation_names_the_field(pb: job_pb2.JobSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        spec_from_pb(pb, field="job", default_lane="normal")
    assert caught.value.field == field
    assert caught.value.message.startswith(field + ":")


def test_job_ids_are_subject_safe_sortable_and_unique() -> None:
    ids = [new_job_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(NAME_RE.match(i) and len(i) == 26 for i in ids)
    assert ids[0][:10] <= ids[-1][:10]  # millisecond time prefix


def test_subjects_and_names() -> None:
    assert t.job_subject("chat", "high") == "laneway.jobs.chat.high"
    assert t.event_subject("abc") == "laneway.events.abc"
    assert t.LaneConsumer("chat", "low").name == "jobs_chat_low"


@pytest.mark.parametrize("version", ["2.10.22", "2.11.9", "v2.9.0"])
def test_old_servers_are_refused_with_a_reason(version: str) -> None:
    with pytest.raises(TopologyError, match="too old"):
        t.check_server_version(version)


@pytest.mark.parametrize("version", ["2.12.0", "2.15.1", "3.0.0-beta"])
def test_current_servers_pass(version: str) -> None:
    t.check_server_version(version)


@given(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=st.just(UTC)
    )
)
def test_timestamp_conversion_matches_protobufs_own(dt: datetime) -> None:

    ours, theirs = Timestamp(), Timestamp()
    set_timestamp(dt, ours)
    theirs.FromDatetime(dt)
    assert ours == theirs
    assert to_datetime(ours) == theirs.ToDatetime(tzinfo=UTC) == dt


_HEADER_LINE = st.tuples(
    st.binary(max_size=12)
    | st.sampled_from([b"Nats-Sequence", b" Laneway-Job-Seq ", b"bad name", b"\xc3\xa9"]),
    st.sampled_from([b":", b": ", b"", b":\t"]),
    st.binary(max_size=16) | st.sampled_from([b"42", b" SUCCEEDED ", b"\xff\xfe"]),
).map(b"".join)


@given(st.lists(_HEADER_LINE, max_size=8))
def test_fast_header_parser_matches_the_librarys(lines: list[bytes]) -> None:
    from nats.aio.client import Client

    from laneway.broker.core.nats.connection import FastHeaderClient

    raw = b"\r\n".join(lines) + b"\r\n\r\n"
    assert FastHeaderClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_next_event_carries_every_field_but_the_payload() -> None:
    import dataclasses

    from laneway.broker.core.model import JobEvent, Notify

    start = utcnow()
    sample: dict[str, object] = {
        "job_id": "j",
        "seq": 4,
        "state": JobState.RUNNING,
        "route": "chat",
        "lane": "low",
        "time": start,
        "enqueued_at": start,
        "attempt": 2,
        "provider": "p",
        "model": "m",
        "started_at": start,
        "finished_at": start,
        "result": ChatOutput("text"),
        "error": JobError("e", "m"),
        "metadata": {"k": "v"},
        "not_before": start,
        "superseded_by": "other",
        "delta": "piece",
        "reset": True,
        "tenant": "acme",
        "notify": (Notify("https://example.com/hook", "all", "main"),),
    }
    # A field added to JobEvent must be added here, and to JobEvent.next.
    assert set(sample) == {f.name for f in dataclasses.fields(JobEvent)}
    after = JobEvent(**sample).next(JobState.RETRYING)  # type: ignore[arg-type]
    payload = {"result": None, "error": None, "delta": None, "reset": False}
    for name, value in sample.items():
        if name in payload:
            assert getattr(after, name) == payload[name], name
        elif name not in ("seq", "state", "time"):
            assert getattr(after, name) == value, name
    assert (after.seq, after.state) == (5, JobState.RETRYING) and after.time >= start
    done = after.next(JobState.SUCCEEDED)
    assert done.finished_at == done.time  # a final event is stamped finished
