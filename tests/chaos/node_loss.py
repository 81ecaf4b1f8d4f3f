"""Node loss on a 3-node cluster under steady load, and how long the work paused.

Against a cluster (``tests.cluster``) with ``nats.replicas: 3``, a broker and workers
as separate processes (``tests.stack``) listing every node: Submit at a steady rate
with half the jobs streamed (``tests.chaos.load``), then SIGKILL one node that does
not lead the jobs stream, bring it back, SIGKILL the jobs stream's leader, bring it
back. The counts are the chaos suite's (``account``); the pauses are the longest gap
between successive accepted submits, and between successive job completions, in the
window from just before each kill to the next fault (or the end of the load).

``tests/test_cluster.py`` runs a short version in ``make test``; ``make soak-cluster``
runs a longer one (several rounds of both kills) and exits 1 on a broken promise:

    .venv/bin/python -m tests.chaos.node_loss [--rounds 3] [--rate 40] [--phase 400]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import laneway
from laneway.broker.core import topology as t
from tests.cluster import Cluster
from tests.stack import CHAOS_CONFIG, Stack

from .load import Load, Report, account

__all__ = ["CLUSTER_CONFIG", "Kill", "NodeLoss", "longest_gap", "main", "node_loss"]

CLUSTER_CONFIG = CHAOS_CONFIG + "nats:\n  replicas: 3\n"


@dataclass
class Kill:
    """One SIGKILL of a node: which, whether it led the jobs stream, and the pauses."""

    node: str
    leader: bool
    at: float
    submit_pause_s: float = 0.0
    completion_pause_s: float = 0.0


@dataclass
class NodeLoss:
    report: Report
    kills: list[Kill] = field(default_factory=list)
    refused_reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            **self.report.as_dict(),
            "refused_reasons": self.refused_reasons,
            "kills": [
                {
                    "node": k.node,
                    "jobs_stream_leader": k.leader,
                    "submit_pause_s": round(k.submit_pause_s, 2),
                    "completion_pause_s": round(k.completion_pause_s, 2),
                }
                for k in self.kills
            ],
        }


def longest_gap(times: list[float], start: float, end: float) -> float:
    """Longest time without an event in [start, end], edges included (sorted ``times``):
    a window with no event at all is one gap of its whole length."""
    inside = [x for x in times if start <= x <= end]
    points = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(points))


async def node_loss(root: Path, *, rate: float, phase: int, rounds: int = 1, workers: int = 2) -> NodeLoss:
    """``rounds`` of (kill a follower, restart it, kill the jobs leader, restart it),
    ``phase`` submissions apart, then the accounting."""
    cluster = Cluster(root / "cluster")
    kills: list[Kill] = []
    async with (
        Stack(root, workers=workers, config=CLUSTER_CONFIG, nats=cluster) as stack,
        laneway.AsyncClient(stack.address, timeout=30) as client,
        Load(client, rate=rate, prefix="node-loss") as load,
    ):
        mark = phase
        await load.until(mark)
        for _ in range(rounds):
            for kill_leader in (False, True):
                leader = await cluster.stream_leader(t.JOBS_STREAM)
                node = leader if kill_leader else next(n for n in cluster.names if n != leader)
                kills.append(Kill(node, kill_leader, time.time()))
                await cluster.kill_node(node)
                print(f"node-loss: killed {node} (jobs leader: {kill_leader}) at {mark}", file=sys.stderr)
                mark += phase
                await load.until(mark)
                await cluster.start_node(node)
                await cluster.wait_formed()
                mark += phase
                await load.until(mark)
        await load.stop()
        ended = time.time()
        report = await account(stack, load, settle_s=90.0)
    edges = [k.at for k in kills[1:]] + [ended]
    for k, end in zip(kills, edges, strict=True):
        k.submit_pause_s = longest_gap(load.accepted_at, k.at - 1.0, end)
        k.completion_pause_s = longest_gap(report.finished_at, k.at - 1.0, end)
    return NodeLoss(report, kills, dict(Counter(load.refused.values())))


def broken(report: Report) -> bool:
    return bool(
        report.refused_that_ran
        or report.stuck
        or report.more_than_one_final
        or report.calls_after_final
        or report.streams_missed_final
        or report.non_json_log_lines
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--phase", type=int, default=400, help="submissions between faults")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="laneway-node-loss-") as tmp:
        result = asyncio.run(
            node_loss(Path(tmp), rate=args.rate, phase=args.phase, rounds=args.rounds, workers=args.workers)
        )
    print(json.dumps(result.summary(), indent=2))
    return 1 if broken(result.report) else 0


if __name__ == "__main__":
    sys.exit(main())
