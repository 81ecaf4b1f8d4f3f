"""Laneway's Python client: ``AsyncClient`` (asyncio, ``laneway.async_client``) and
``Client`` (blocking, ``laneway.sync_client``), method for method the same.

    import laneway

    async with laneway.AsyncClient("127.0.0.1:50051") as client:
        final = await client.run("chat", laneway.chat("hello"))
        print(final.result.chat.text)

Connecting (TLS, credentials, metadata, the caller's own channel) is described in
``laneway.channel``. Errors are ``laneway.errors`` exceptions decoded from the gRPC
status (``laneway.error_details``: reason, field, metadata, retry delay).
``stream_results``, ``wait``, ``run``, ``run_stream`` and ``stream_pipeline_run``
resume by sequence number when the broker goes away mid-stream, for up to
``resume_timeout`` seconds (default 300), so callers see every event exactly once.
Pipeline runs (``start_pipeline``...) are in ``laneway.pipelines``.
"""

from __future__ import annotations

from laneway.async_client import AsyncClient
from laneway.calls import CancelOutcome, OnDisconnect, Submitted
from laneway.dead_letters import DeadLetterPage, Redriven
from laneway.pipelines import PipelineCancelOutcome, PipelineResumeOutcome, PipelineRunPage, PipelineStarted
from laneway.streams import FINAL_STATES
from laneway.sync_client import Client

__all__ = [
    "FINAL_STATES",
    "AsyncClient",
    "CancelOutcome",
    "Client",
    "DeadLetterPage",
    "OnDisconnect",
    "PipelineCancelOutcome",
    "PipelineResumeOutcome",
    "PipelineRunPage",
    "PipelineStarted",
    "Redriven",
    "Submitted",
]
