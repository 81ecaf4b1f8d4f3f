"""Laneway: a gRPC broker for AI work. This package is its Python client.

import laneway

with laneway.Client("127.0.0.1:50051") as client:
    final = client.run("chat", laneway.chat("hello"), lane="high")
    print(final.result.chat.text)

Everything a caller needs is here: the clients, their results, every exception
they raise (``laneway.errors``), the input helpers and the ``laneway.v1`` messages
they return. The server side (``laneway.broker``, ``laneway.workers``) is not.
"""

from laneway.async_client import AsyncClient
from laneway.calls import CancelOutcome, OnDisconnect, Submitted
from laneway.dead_letters import DeadLetterPage, Redriven
from laneway.errors import (
    Aborted,
    AlreadyExists,
    ApiError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    LanewayError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from laneway.inputs import JobInput, JobOptions, chat, classification, embedding, job
from laneway.pipelines import (
    PipelineCancelOutcome,
    PipelineResumeOutcome,
    PipelineRunPage,
    PipelineStarted,
)
from laneway.streams import FINAL_STATES
from laneway.sync_client import Client
from laneway.v1.dead_letter_pb2 import DeadLetter
from laneway.v1.job_pb2 import Job, JobEvent, JobState
from laneway.v1.pipeline_pb2 import PipelineRun, PipelineRunEvent, PipelineRunState

__all__ = [
    "FINAL_STATES",
    "Aborted",
    "AlreadyExists",
    "ApiError",
    "AsyncClient",
    "CancelOutcome",
    "Cancelled",
    "Client",
    "DeadLetter",
    "DeadLetterPage",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "Job",
    "JobEvent",
    "JobInput",
    "JobOptions",
    "JobState",
    "LanewayError",
    "NotFound",
    "OnDisconnect",
    "PermissionDenied",
    "PipelineCancelOutcome",
    "PipelineResumeOutcome",
    "PipelineRun",
    "PipelineRunEvent",
    "PipelineRunPage",
    "PipelineRunState",
    "PipelineStarted",
    "Redriven",
    "ResourceExhausted",
    "Submitted",
    "Unauthenticated",
    "Unavailable",
    "chat",
    "classification",
    "embedding",
    "job",
]

__version__ = "0.1.0"
