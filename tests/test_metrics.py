"""Prometheus metrics against the real stack: a known workload, then exact figures
scraped over HTTP from the worker's and the broker's ``/metrics``."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

import laneway
from broker.server import BrokerServer
from laneway.v1 import job_pb2
from workers.pool import WorkerPool

from .conftest import eventually, make_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int | None) -> Samples:
    assert port is not None
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_worker_metrics_count_a_known_workload(broker, client, nats_server) -> None:
    # An rpm limit so the mock sends rate-limit figures, as a real provider's headers do.
    config = make_config("providers: {mock: {type: mock, concurrency: 8, rpm: 100000}, slow: {type: mock}}")
    ok = [laneway.job("chat", laneway.chat(f"fine {i}")) for i in range(10)]
    bad = [laneway.job("chat", laneway.chat(f"bad {i}"), metadata={"mock.fail": "400"}) for i in range(2)]
    flaky = [laneway.job("chat", laneway.chat(f"flaky {i}"), metadata={"mock.fail": "503"}) for i in range(3)]
    async with WorkerPool(config, nats_url=nats_server.url, metrics_port=0) as pool:
        outcomes = await client.submit_batch([*ok, *bad, *flaky])
        ids = [o.job_id for o in outcomes if isinstance(o, laneway.Submitted)]
        assert len(ids) == 15
        finals = {e.job_id: e.state async for e in client.stream_results(ids, final_only=True)}
        assert sorted(finals.values()).count(job_pb2.JOB_STATE_SUCCEEDED) == 13

        chat = {"route": "chat", "lane": "normal"}

        async def counted() -> bool:
            # The final event reaches callers as the worker stores it: the counters follow.
            s = await scrape(pool.metrics_port)
            return (
                value(s, "laneway_jobs_finished_total", **chat, state="succeeded") == 13
                and value(s, "laneway_jobs_finished_total", **chat, state="dead_lettered") == 2
            )

        await eventually(counted)
        s = await scrape(pool.metrics_port)

    mock = {"provider": "mock", "model": "mock-chat"}
    assert value(s, "laneway_job_retries_total", route="chat", error_class="transient") == 3
    assert value(s, "laneway_job_retries_total", route="chat", error_class="permanent") == 0
    assert value(s, "laneway_provider_calls_total", **mock, status_class="2xx") == 13
    assert value(s, "laneway_provider_calls_total", **mock, status_class="4xx") == 2
    assert value(s, "laneway_provider_calls_total", **mock, status_class="5xx") == 3
    assert value(s, "laneway_provider_calls_total", **mock, status_class="none") == 0
    assert value(s, "laneway_provider_errors_total", provider="mock", error_class="permanent") == 2
    assert value(s, "laneway_provider_errors_total", provider="mock", error_class="transient") == 3
    # One wait and one processing time per job, whatever its number of attempts.
    assert value(s, "laneway_job_wait_seconds_count", **chat) == 15
    assert value(s, "laneway_job_processing_seconds_count", **chat) == 15
    assert value(s, "gen_ai_client_operation_duration_seconds_count", **mock) == 18
    for kind in ("input", "output"):
        assert value(s, "gen_ai_client_token_usage_count", **mock, gen_ai_token_type=kind) == 13
        assert value(s, "gen_ai_client_token_usage_sum", **mock, gen_ai_token_type=kind) > 0
    remaining = value(s, "laneway_provider_rate_limit_remaining", provider="mock", kind="requests")
    assert 0 < remaining < 100000
    # Nothing per job: no label carries a job id.
    assert not any(v in ids for _, labels in s for _, v in labels)


async def test_broker_metrics_show_queue_depth_and_dead_letters(nats_server, config) -> None:
    async with (
        BrokerServer(
            config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False, metrics_port=0
        ) as broker,
        laneway.AsyncClient(broker.address, timeout=10) as client,
    ):
        normal = [laneway.job("chat", laneway.chat(f"wait {i}")) for i in range(7)]
        high = [laneway.job("chat", laneway.chat(f"urgent {i}"), lane="high") for i in range(2)]
        bad = [laneway.job("chat", laneway.chat(f"bad {i}"), metadata={"mock.fail": "400"}) for i in range(3)]
        outcomes = await client.submit_batch([*normal, *high, *bad])
        ids = [o.job_id for o in outcomes if isinstance(o, laneway.Submitted)]
        assert len(ids) == 12

        # No worker runs: every job waits in its lane.
        s = await scrape(broker.metrics_port)
        assert value(s, "laneway_queue_depth", route="chat", lane="normal") == 10
        assert value(s, "laneway_queue_depth", route="chat", lane="high") == 2
        assert value(s, "laneway_queue_depth", route="embed", lane="normal") == 0
        assert value(s, "laneway_queue_ack_pending", route="chat", lane="normal") == 0
        assert value(s, "laneway_submitted_total", route="chat", lane="normal") == 10
        assert value(s, "laneway_submitted_total", route="chat", lane="high") == 2
        assert value(s, "laneway_dead_letters", route="chat") == 0

        async with WorkerPool(config, nats_url=nats_server.url):
            [_ async for _ in client.stream_results(ids, final_only=True)]

            async def drained() -> bool:
                s = await scrape(broker.metrics_port)
                return (
                    value(s, "laneway_dead_letters", route="chat") == 3
                    and value(s, "laneway_queue_depth", route="chat", lane="normal") == 0
                    and value(s, "laneway_queue_ack_pending", route="chat", lane="normal") == 0
                )

            # Dead letters are stored (and jobs acked) just after their final event.
            await eventually(drained)
        s = await scrape(broker.metrics_port)
        assert value(s, "laneway_dead_letters", route="embed") == 0
        assert value(s, "laneway_queue_depth", route="chat", lane="high") == 0


async def test_metrics_are_off_unless_asked(broker, nats_server, config) -> None:
    assert broker.metrics_port is None
    async with WorkerPool(config, nats_url=nats_server.url) as pool:
        assert pool.metrics_port is None
