"""Replicated state on a 3-node nats-server cluster (``tests.cluster``).

- raising ``nats.replicas`` on an existing deployment: a broker started with a higher
  count scales every stream and bucket in place, data intact;
- the cluster-size check names ``nats.replicas``, the count wanted and found;
- node loss under load: a non-leader node, then the jobs stream's leader, killed with
  SIGKILL while jobs are submitted, streamed and run, each brought back; the promises
  are those of one node (``tests.chaos.load.account``), and the pauses are printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

import laneway
from laneway.broker.core import topology as t
from laneway.broker.core.errors import TopologyError
from laneway.broker.server.process import BrokerServer
from laneway.v1 import job_pb2
from laneway.workers.pool import WorkerPool
from tests.chaos.node_loss import node_loss
from tests.cluster import Cluster
from tests.conftest import eventually, make_config


async def test_raising_replicas_scales_every_stream_and_bucket_with_data_intact(tmp_path: Path) -> None:
    async with Cluster(tmp_path / "cluster") as cluster:
        r1 = make_config("nats:\n  replicas: 1\n")
        job_ids: list[str] = []
        async with (
            BrokerServer(r1, nats_url=cluster.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
            WorkerPool(r1, nats_url=cluster.url),
            laneway.AsyncClient(broker.address, timeout=30) as client,
        ):
            for i in range(20):
                done = await client.submit("chat", laneway.chat(f"r1-{i}"), idempotency_key=f"k{i}")
                job_ids.append(done.job_id)
            for job_id in job_ids:
                assert (await client.wait(job_id, timeout=30)).state == job_pb2.JOB_STATE_SUCCEEDED
        nc = await cluster.connect()
        try:
            js = nc.jetstream()
            listed = await js.streams_info()
            before = {s.config.name: (s.config.num_replicas, s.state.messages) for s in listed}
            assert before and all(r == 1 for r, _ in before.values()), before
            buckets = (t.IDEMPOTENCY_BUCKET, t.PROVIDERS_BUCKET, t.KEYS_BUCKET)
            streams = (t.JOBS_STREAM, t.EVENTS_STREAM, t.DLQ_STREAM, t.ADVISORY_STREAM)
            assert {f"KV_{b}" for b in buckets} | set(streams) <= set(before)

            # A cluster of 3 cannot hold 5 replicas: start-up says so, naming the key.
            r5 = make_config("nats:\n  replicas: 5\n")
            too_many = BrokerServer(r5, nats_url=cluster.url, grpc_addr="127.0.0.1:0", reuse_port=False)
            with pytest.raises(
                TopologyError, match=r"nats.replicas is 5 .* 3 JetStream servers up, 5 needed"
            ):
                await too_many.__aenter__()

            # The documented way up: start with the higher count.
            r3 = make_config("nats:\n  replicas: 3\n")
            async with (
                BrokerServer(r3, nats_url=cluster.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
                laneway.AsyncClient(broker.address, timeout=30) as client,
            ):

                async def all_current_at_3() -> bool:
                    # One by one: a listing leaves out streams whose leader is being elected.
                    for name in before:
                        try:
                            s = await js.stream_info(name)
                        except (nats.errors.TimeoutError, nats.js.errors.APIError):
                            return False
                        peers = s.cluster.replicas if s.cluster is not None else None
                        if s.config.num_replicas != 3 or not peers or len(peers) != 2:
                            return False
                        if not all(p.current for p in peers):
                            return False
                    return True

                await eventually(all_current_at_3, timeout=60, interval=0.2)
                after = {n: (3, (await js.stream_info(n)).state.messages) for n in before}
                assert after == {n: (3, m) for n, (_, m) in before.items()}
                for stream in (t.JOBS_STREAM, t.ADVISORY_STREAM):
                    for consumer in await js.consumers_info(stream):
                        assert consumer.config.num_replicas == 3, consumer
                        assert consumer.cluster is not None, consumer
                        assert len(consumer.cluster.replicas or []) == 2, consumer
                # The data reads back through the new replicas.
                for job_id in job_ids:
                    assert (await client.get_job(job_id)).state == job_pb2.JOB_STATE_SUCCEEDED
                again = await client.submit("chat", laneway.chat("r1-0"), idempotency_key="k0")
                assert again.job_id == job_ids[0]

            # With a node down, its client URL leaves the INFO the check counts: the jobs
            # stream's peers still show three servers, so a broker (re)started now starts.
            # (A start during the elections that follow a node loss waits for them, up to
            # nats.connect_timeout_s; once they are over, the check is what is tested.)
            leader = await cluster.stream_leader(t.JOBS_STREAM)
            await cluster.kill_node(next(n for n in cluster.names if n != leader))
            for name in before:
                await cluster.stream_leader(name)
            patient = make_config("nats:\n  replicas: 3\n  connect_timeout_s: 30\n")
            async with BrokerServer(patient, nats_url=cluster.url, grpc_addr="127.0.0.1:0", reuse_port=False):
                pass
        finally:
            await nc.close()


async def test_node_loss_under_load_keeps_every_promise(tmp_path: Path) -> None:
    """A follower node, then the jobs stream's leader, killed with SIGKILL under load."""
    result = await node_loss(tmp_path, rate=20.0, phase=100)
    print(f"cluster node loss: {json.dumps(result.summary())}")
    report = result.report
    assert report.accepted > 0
    assert report.refused_that_ran == 0, report.examples
    assert report.stuck == 0, report.examples
    assert report.more_than_one_final == 0, report.examples
    assert report.calls_after_final == 0, report.examples
    assert report.streams_missed_final == 0, report.examples
    assert report.non_json_log_lines == 0, report.examples
    assert [k.leader for k in result.kills] == [False, True]
