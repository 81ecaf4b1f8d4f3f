"""What the fuzzer runs against: the shared process stack (``tests.stack``) with one
worker and a mock provider, each its own process, so the broker's memory is
measured alone."""

from __future__ import annotations

from pathlib import Path

from tests.stack import Stack

__all__ = ["CONFIG", "fuzz_stack"]

# A template for ``Stack``: braces are doubled.
CONFIG = """
broker:
  grpc_addr: "127.0.0.1:0"
queue:
  ack_wait_s: 2
workers:
  retry_backoff_s: 0.05
  retry_backoff_max_s: 0.2
  shutdown_grace_s: 1
providers:
  mock:
    type: mock
    concurrency: 16
routes:
  chat:
    targets: [{{provider: mock, model: mock-chat}}]
  embed:
    targets: [{{provider: mock, model: mock-embedding}}]
"""


def fuzz_stack(workdir: Path) -> Stack:
    """``async with fuzz_stack(dir) as stack``: ``stack.address`` serves BrokerService."""
    return Stack(workdir, workers=1, config=CONFIG)
