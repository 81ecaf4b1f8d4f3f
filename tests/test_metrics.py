"""Prometheus metrics against the real stack: a known workload, then exact figures
scraped over HTTP from the worker's and the broker's ``/metrics``."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import laneway
from laneway.broker.core.model import TokenUsage
from laneway.broker.server.metrics import BrokerMetrics
from laneway.broker.server.process import BrokerServer
from laneway.v1 import job_pb2
from laneway.workers.metrics import WorkerMetrics, provider_prices
from laneway.workers.pool import WorkerPool

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
    # End to end: one observation per job brought to a final state, whatever the state.
    finished = sum(v for (n, labels), v in s.items() if n == "laneway_jobs_finished_total")
    assert value(s, "laneway_job_end_to_end_seconds_count", **chat) == finished == 15
    e2e_sum = value(s, "laneway_job_end_to_end_seconds_sum", **chat)
    assert e2e_sum >= value(s, "laneway_job_processing_seconds_sum", **chat) > 0
    assert value(s, "laneway_dead_lettered_total", route="chat", error_class="permanent") == 2
    # The mock has no prices: its usage is counted, its cost is 0.
    assert ("laneway_provider_cost_total", frozenset(mock.items())) in s
    assert value(s, "laneway_provider_cost_total", **mock) == 0
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
        assert value(s, "laneway_submitted_total", route="chat", lane="normal", tenant="other") == 10
        assert value(s, "laneway_submitted_total", route="chat", lane="high", tenant="other") == 2
        assert value(s, "laneway_dead_letters", route="chat") == 0
        # Waiting jobs have an age; an empty lane has none.
        assert value(s, "laneway_queue_oldest_job_age_seconds", route="chat", lane="normal") > 0
        assert value(s, "laneway_queue_oldest_job_age_seconds", route="chat", lane="high") > 0
        assert value(s, "laneway_queue_oldest_job_age_seconds", route="embed", lane="normal") == 0

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
        assert value(s, "laneway_queue_oldest_job_age_seconds", route="chat", lane="normal") == 0


async def test_metrics_are_off_unless_asked(broker, nats_server, config) -> None:
    assert broker.metrics_port is None
    async with WorkerPool(config, nats_url=nats_server.url) as pool:
        assert pool.metrics_port is None


async def test_oldest_job_age_is_the_first_waiting_jobs(nats_server, config) -> None:
    loop = asyncio.get_running_loop()
    async with (
        BrokerServer(
            config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False, metrics_port=0
        ) as broker,
        laneway.AsyncClient(broker.address, timeout=10) as client,
    ):
        first_submitted = loop.time()
        await client.submit("chat", laneway.chat("first"))
        lane = {"route": "chat", "lane": "normal"}

        async def aged() -> bool:
            s = await scrape(broker.metrics_port)
            return value(s, "laneway_queue_oldest_job_age_seconds", **lane) >= 0.5

        await eventually(aged)
        # A newer job does not make the lane look younger: the age is the first job's.
        await client.submit("chat", laneway.chat("second"))
        s = await scrape(broker.metrics_port)
        age = value(s, "laneway_queue_oldest_job_age_seconds", **lane)
        assert 0.5 <= age <= loop.time() - first_submitted + 0.5
        assert value(s, "laneway_queue_depth", **lane) == 2


def test_fresh_broker_metrics_list_the_queue_families() -> None:
    names = {f.name for f in BrokerMetrics().registry.collect()}
    assert {
        "laneway_queue_depth",
        "laneway_queue_ack_pending",
        "laneway_queue_oldest_job_age_seconds",
        "laneway_dead_letters",
        "laneway_submitted",
    } <= names


def registry_value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_cost_is_tokens_times_the_configured_prices() -> None:
    config = make_config(
        "providers: {mock: {type: mock}, slow: {type: mock}, paid: {type: openai, "
        "base_url: 'http://127.0.0.1:1/v1', api_key_env: '', "
        "cost_per_1k_input_tokens: 0.5, cost_per_1k_output_tokens: 1.5}}"
    )
    prices = provider_prices(config.providers)
    assert prices == {"paid": (0.5, 1.5)}  # the mocks have no prices
    metrics = WorkerMetrics(prices=prices)
    metrics.provider_answer("paid", "gpt-x", 200, 0.2, TokenUsage(input_tokens=1200, output_tokens=300))
    metrics.provider_answer("paid", "gpt-x", 200, 0.1, TokenUsage(input_tokens=800, output_tokens=700))
    metrics.provider_answer("paid", "gpt-x", 503, 0.1, None)
    metrics.provider_answer("mock", "mock-chat", 200, 0.01, TokenUsage(input_tokens=5000, output_tokens=5000))
    # (2000 input x 0.5 + 1000 output x 1.5) / 1000
    assert registry_value(metrics, "laneway_provider_cost_total", provider="paid", model="gpt-x") == 2.5
    assert registry_value(metrics, "laneway_provider_cost_total", provider="mock", model="mock-chat") == 0
    tokens = {"provider": "paid", "model": "gpt-x", "gen_ai_token_type": "output"}
    assert registry_value(metrics, "gen_ai_client_token_usage_sum", **tokens) == 1000
    # The constructor the worker pool calls still works: no prices, no cost.
    unpriced = WorkerMetrics()
    unpriced.provider_answer("paid", "gpt-x", 200, 0.2, TokenUsage(input_tokens=1200, output_tokens=300))
    assert registry_value(unpriced, "laneway_provider_cost_total", provider="paid", model="gpt-x") == 0


def test_time_to_first_token_and_rate_limited_answers() -> None:
    metrics = WorkerMetrics()
    metrics.first_token("openai", "gpt-x", 0.25)
    metrics.first_token("openai", "gpt-x", 0.75)
    ttft = {"provider": "openai", "model": "gpt-x"}
    assert registry_value(metrics, "gen_ai_client_operation_time_to_first_chunk_seconds_count", **ttft) == 2
    assert registry_value(metrics, "gen_ai_client_operation_time_to_first_chunk_seconds_sum", **ttft) == 1.0
    metrics.rate_limited("openai", 2.0)
    metrics.rate_limited("openai", None)
    assert registry_value(metrics, "laneway_provider_rate_limited_total", provider="openai") == 2
    assert registry_value(metrics, "laneway_provider_retry_after_seconds_count", provider="openai") == 1
    assert registry_value(metrics, "laneway_provider_retry_after_seconds_sum", provider="openai") == 2.0


def test_limiter_gauges_skip_unbounded_figures() -> None:
    metrics = WorkerMetrics()
    metrics.limiter("openai", "", 600.0, 3.5)
    metrics.limiter("openai", "gpt-x", 60.0, 0.0)
    assert registry_value(metrics, "laneway_provider_limiter_rate_rpm", provider="openai", model="") == 600
    assert registry_value(metrics, "laneway_provider_limiter_budget", provider="openai", model="") == 3.5
    assert registry_value(metrics, "laneway_provider_limiter_budget", provider="openai", model="gpt-x") == 0
    metrics.limiter("other", "", math.inf, math.inf)
    assert (
        metrics.registry.get_sample_value(
            "laneway_provider_limiter_rate_rpm", {"provider": "other", "model": ""}
        )
        is None
    )
    metrics.limiter("openai", "", math.inf, 1.0)  # an unbounded rate leaves the last finite one
    assert registry_value(metrics, "laneway_provider_limiter_rate_rpm", provider="openai", model="") == 600
    assert registry_value(metrics, "laneway_provider_limiter_budget", provider="openai", model="") == 1


def test_circuit_state_and_opens() -> None:
    metrics = WorkerMetrics()

    def state() -> float:
        return registry_value(metrics, "laneway_provider_circuit_state", provider="openai")

    def opens() -> float:
        return registry_value(metrics, "laneway_provider_circuit_opens_total", provider="openai")

    metrics.circuit("openai", "closed")
    assert (state(), opens()) == (0, 0)
    metrics.circuit("openai", "open")
    metrics.circuit("openai", "open")  # reported again: not a new opening
    assert (state(), opens()) == (2, 1)
    metrics.circuit("openai", "half_open")
    assert (state(), opens()) == (1, 1)
    metrics.circuit("openai", "open")  # a failed probe opens it again
    assert (state(), opens()) == (2, 2)
    metrics.circuit("openai", "half_open")
    metrics.circuit("openai", "closed")
    assert (state(), opens()) == (0, 2)
    with pytest.raises(ValueError, match="unknown circuit phase"):
        metrics.circuit("openai", "ajar")
