"""``python -m tests.fuzz [--requests N] [--seed S] [--output FILE]``: the fuzzer
against a fresh stack (nats-server, broker, worker); prints its figures as JSON
and exits 1 on any failing answer, a broker that is no longer healthy, or broker
memory that kept growing."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from .session import run_session

parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
parser.add_argument("--requests", type=int, default=10_000)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--concurrency", type=int, default=16)
parser.add_argument("--output", type=Path, default=None, help="also write the figures here")
args = parser.parse_args()

with tempfile.TemporaryDirectory(prefix="laneway-fuzz-") as workdir:
    result = asyncio.run(
        run_session(Path(workdir), requests=args.requests, seed=args.seed, concurrency=args.concurrency)
    )
text = json.dumps(result.summary(), indent=2)
print(text)
if args.output is not None:
    args.output.write_text(text + "\n")
sys.exit(0 if result.ok else 1)
