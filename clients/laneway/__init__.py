"""Laneway: a gRPC broker for AI work. This package is its Python client.

import laneway

with laneway.Client("127.0.0.1:50051") as client:
    final = client.run("chat", laneway.chat("hello"), lane="high")
    print(final.result.chat.text)
"""

from laneway.client import (
    FINAL_STATES,
    AsyncClient,
    CancelOutcome,
    Client,
    DeadLetterPage,
    Redriven,
    Submitted,
)
from laneway.errors import (
    ApiError,
    InvalidArgument,
    LanewayError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from laneway.inputs import JobInput, chat, classification, embedding, job
from laneway.v1.dead_letter_pb2 import DeadLetter
from laneway.v1.job_pb2 import JobEvent, JobState

__all__ = [
    "FINAL_STATES",
    "ApiError",
    "AsyncClient",
    "CancelOutcome",
    "Client",
    "DeadLetter",
    "DeadLetterPage",
    "InvalidArgument",
    "JobEvent",
    "JobInput",
    "JobState",
    "LanewayError",
    "NotFound",
    "Redriven",
    "ResourceExhausted",
    "Submitted",
    "Unavailable",
    "chat",
    "classification",
    "embedding",
    "job",
]

__version__ = "0.1.0"
