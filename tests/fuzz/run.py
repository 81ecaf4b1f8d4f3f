"""Send generated requests to every BrokerService RPC and sort the answers.

A valid answer is OK or a status that names what is wrong (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED with its ErrorInfo, ...) or
DEADLINE_EXCEEDED from the fuzzer's own short deadline (a stream that waits for a
job, a redrive paced slowly). INTERNAL, UNKNOWN, UNAVAILABLE from a healthy broker,
and RESOURCE_EXHAUSTED from gRPC's own limits (no ErrorInfo: e.g. trailers too
large) are failures.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import dead_letter_pb2, job_pb2, ops_pb2

from .bodies import Wire, bodies, render

__all__ = ["Failure", "Report", "fuzz", "seed_requests", "vocabulary"]

SERVICE = pb.DESCRIPTOR.services_by_name["BrokerService"]
_UNARY_DEADLINE_S = 3.0
# Streams are read until their first message or status: a stream that waits for a job
# to finish ends at this deadline (DEADLINE_EXCEEDED, ours).
_STREAM_DEADLINE_S = 0.3
_FAILING = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
}
_MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Failure:
    method: str
    code: str
    details: str
    body: bytes


@dataclass
class Report:
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    by_method: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "statuses": dict(self.statuses.most_common()),
            "by_method": {f"{m} {c}": n for (m, c), n in sorted(self.by_method.items())},
            "failures": len(self.failures),
            "failure_examples": [
                {"method": f.method, "code": f.code, "details": f.details[:300], "body": f.body[:200].hex()}
                for f in self.failures[:10]
            ],
        }


def vocabulary(job_ids: Sequence[str]) -> list[str]:
    """Words worth drawing for string fields: names the stack knows, mock provider
    switches (so some jobs fail, retry and reach dead letters), real job ids."""
    return [
        "chat", "embed", "mock", "mock-chat", "normal", "mock.fail", "503x1", "400", "429x1",
        "permanent_error", "attempts_exhausted", "k", "hi", *job_ids,
    ]  # fmt: skip


def seed_requests(job_ids: Sequence[str]) -> dict[str, list[bytes]]:
    """Valid requests per RPC (jobs that run, reads of jobs that exist), for the fuzzer
    to send as they are and with drawn fields over them."""

    def chat(text: str, **extra: object) -> job_pb2.JobSpec:
        spec = job_pb2.JobSpec(route="chat", **extra)  # type: ignore[arg-type]
        spec.chat.messages.add(content=text)
        return spec

    embed = job_pb2.JobSpec(route="embed")
    embed.embedding.texts.extend(["a", "b"])
    failing = chat("fails", metadata={"mock.fail": "400"})
    debounced = chat("debounced", debounce=job_pb2.Debounce(key="k", window={"nanos": 200_000_000}))  # type: ignore[arg-type]
    delayed = chat("delayed", delay={"nanos": 300_000_000})
    jobs = [chat("hi"), embed, failing, debounced, delayed]
    some = job_ids[:2]
    requests: dict[str, list[object]] = {
        "Submit": [pb.SubmitRequest(job=j) for j in jobs],
        "SubmitBatch": [pb.SubmitBatchRequest(jobs=jobs[:3])],
        "StreamResults": [
            pb.StreamResultsRequest(job_ids=some),
            pb.StreamResultsRequest(job_ids=some, final_only=True),
        ],
        "Run": [pb.RunRequest(job=jobs[0]), pb.RunRequest(job=failing, final_only=True)],
        "GetJob": [pb.GetJobRequest(job_id=j) for j in some],
        "CancelJob": [pb.CancelJobRequest(job_id=j, reason="fuzz") for j in some],
        "ListDeadLetters": [pb.ListDeadLettersRequest(page_size=10)],
        "RedriveDeadLetters": [
            pb.RedriveDeadLettersRequest(
                filter=dead_letter_pb2.DeadLetterFilter(route="chat"), rate_per_second=1000, limit=2
            )
        ],
        "GetProviderHealth": [ops_pb2.GetProviderHealthRequest(providers=["mock"])],
        "GetStats": [ops_pb2.GetStatsRequest()],
        "ListWebhookDeadLetters": [pb.ListWebhookDeadLettersRequest(page_size=10)],
        "GetWebhookDeadLetter": [pb.GetWebhookDeadLetterRequest(seq=1)],
        "RedeliverWebhookDeadLetters": [pb.RedeliverWebhookDeadLettersRequest(seqs=[1, 2])],
    }
    return {name: [r.SerializeToString() for r in reqs] for name, reqs in requests.items()}  # type: ignore[attr-defined]


def _has_error_info(err: grpc.RpcError) -> bool:
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            return any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details)
    return False


def _call(channel: grpc.Channel, method: MethodDescriptor, body: bytes) -> tuple[grpc.StatusCode, str, bool]:
    """(status, details, whether the status carries an ErrorInfo) of one raw request."""
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(body, timeout=_STREAM_DEADLINE_S)
            try:
                next(stream)
            except StopIteration:
                pass  # ended OK without a message (e.g. resumed after the final event)
            stream.cancel()  # type: ignore[attr-defined]
        else:
            channel.unary_unary(path)(body, timeout=_UNARY_DEADLINE_S)
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.CANCELLED and method.server_streaming:
            return grpc.StatusCode.OK, "", False  # our own cancel after the first message
        return code, err.details() or "", _has_error_info(err)  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, "", False


def is_failure(code: grpc.StatusCode, error_info: bool) -> bool:
    if code in _FAILING:
        return True
    # gRPC's own limits (e.g. metadata too large) carry no ErrorInfo; the broker's always do.
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and not error_info


def fuzz(
    address: str,
    *,
    requests: int,
    seed: int,
    seeds: Mapping[str, Sequence[bytes]],
    words: Sequence[str],
    concurrency: int = 16,
    checkpoint: Callable[[int], None] | None = None,
) -> Report:
    """Send ``requests`` generated requests (``concurrency`` at a time) to ``address``.

    ``checkpoint(n)`` is called every tenth of the way, from the generating thread."""
    report = Report()
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(concurrency)
    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
    ]
    methods = list(SERVICE.methods)
    drawn = st.one_of(
        *(
            bodies(m.input_type, seeds=seeds.get(m.name, ()), vocabulary=words).map(lambda b, m=m: (m, b))
            for m in methods
        )
    )

    def record(method: MethodDescriptor, body: bytes) -> None:
        try:
            code, details, info = _call(channel, method, body)
        finally:
            slots.release()
        with lock:
            report.requests += 1
            report.statuses[code.name] += 1
            report.by_method[(method.name, code.name)] += 1
            if is_failure(code, info):
                report.failures.append(Failure(method.name, code.name, details, body))

    sent = 0
    every = max(1, requests // 10)

    @settings(
        max_examples=requests,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis_seed(seed)
    @given(drawn)
    def send(item: tuple[MethodDescriptor, Wire]) -> None:
        nonlocal sent
        method, recipe = item
        slots.acquire()  # bounded: at most ``concurrency`` bodies in flight
        pool.submit(record, method, render(recipe))
        sent += 1
        if checkpoint is not None and sent % every == 0:
            checkpoint(sent)

    start = time.monotonic()
    with grpc.insecure_channel(address, options=options) as channel, ThreadPoolExecutor(concurrency) as pool:
        send()
    report.seconds = time.monotonic() - start
    return report
