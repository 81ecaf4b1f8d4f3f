"""One attempt's provider call, in the shape its input needs: gathered into a batch
(embeddings, classification), streamed delta by delta into the job's log (chat with
``stream``), or a plain call. Every provider failure comes back classified, never
raised; only losing the job's log (a compare-and-set refused) raises."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from laneway.broker.core.events import EventLog, PendingAppend
from laneway.broker.core.model import (
    ChatInput,
    ClassificationInput,
    EmbeddingInput,
    JobEvent,
    JobResult,
    QueuedJob,
)
from laneway.workers.batching import ClassificationBatcher, EmbeddingBatcher
from laneway.workers.metrics import WorkerMetrics
from laneway.workers.providers.base import CallContext, Provider, ProviderError, call_provider
from laneway.workers.providers.classify import classify_exception
from laneway.workers.retry import RetryPolicy
from laneway.workers.streaming import DeltaWriter, stream_chat

__all__ = ["Target", "call_target"]


@dataclass(frozen=True)
class Target:
    """Where a route's jobs go from this pool, and how they are retried."""

    provider: Provider
    model: str
    retry: RetryPolicy
    embed_batcher: EmbeddingBatcher | None = None
    """Shares provider calls between this route's embedding jobs, when batching is on."""
    classify_batcher: ClassificationBatcher | None = None
    """Shares chat calls between this route's classification jobs, when batching is on."""


async def call_target(
    target: Target,
    job: QueuedJob,
    written: PendingAppend,
    ctx: CallContext,
    events: EventLog,
    metrics: WorkerMetrics | None,
) -> tuple[JobResult | ProviderError, JobEvent, int]:
    """Call the provider: the result or its classified error, and the log's new tail
    (the stored RUNNING event, or a streaming call's last delta) with its sequence.
    Raises EventConflict when the log moved on without us."""
    provider, request = target.provider, job.spec.input
    outcome: JobResult | ProviderError
    if not (isinstance(request, ChatInput) and request.stream):
        try:
            if isinstance(request, EmbeddingInput) and target.embed_batcher is not None:
                outcome = await target.embed_batcher.embed(request, ctx)
            elif isinstance(request, ClassificationInput) and target.classify_batcher is not None:
                outcome = await target.classify_batcher.classify(request, ctx)
            else:
                outcome = await call_provider(provider, target.model, request, ctx)
        except ProviderError as err:
            outcome = err
        except Exception as exc:
            # An adapter bug or an unexpected library error: classified, never fatal.
            outcome = classify_exception(exc, provider=provider.name)
        return outcome, written.event, await written.stored()
    writer = DeltaWriter(events, written)
    first_token = (
        functools.partial(metrics.first_token, provider.name, target.model) if metrics is not None else None
    )
    outcome = await stream_chat(provider, target.model, request, ctx, writer, first_token=first_token)
    last, seq = await writer.finish()
    return outcome, last, seq
