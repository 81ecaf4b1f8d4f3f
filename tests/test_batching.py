"""Embedding jobs share provider calls: fewer calls, same per-job results."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import laneway
from laneway.broker.core.model import (
    ChatInput,
    ClassificationInput,
    EmbeddingInput,
    EmbeddingOutput,
    ErrorClass,
    JobError,
    TokenUsage,
)
from laneway.v1 import job_pb2 as S
from laneway.workers.batching import EmbeddingBatcher
from laneway.workers.fakes.simulation import unit_vector
from laneway.workers.pool import WorkerPool
from laneway.workers.providers.base import CallContext, ProviderError

from .conftest import make_config


@pytest.mark.parametrize(("max_items", "limit"), [(32, 1000 // 32 + 8), (1, 1000)])
async def test_thousand_embedding_jobs_share_provider_calls(
    broker, client, nats_server, tmp_path: Path, max_items: int, limit: int
) -> None:
    log = tmp_path / "calls.jsonl"
    config = make_config(
        f"providers: {{mock: {{type: mock, concurrency: 64, call_log: '{log}'}}, slow: {{type: mock}}}}\n"
        f"batch: {{max_items: {max_items}, max_wait_ms: 20}}"
    )
    specs = [laneway.job("embed", laneway.embedding(f"text {i}")) for i in range(1000)]
    ids = [o.job_id for o in await client.submit_batch(specs)]
    async with WorkerPool(config, nats_url=nats_server.url):
        finals = {e.job_id: e async for e in client.stream_results(ids, final_only=True)}
    assert {e.state for e in finals.values()} == {S.JOB_STATE_SUCCEEDED}
    for i, job_id in enumerate(ids):
        got = finals[job_id].result.embedding.embeddings[0].values
        assert got == pytest.approx(unit_vector(f"text {i}", 8), rel=1e-6)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == limit if max_items == 1 else len(calls) <= limit
    assert sum(len(c.get("job_ids") or [c["job_id"]]) for c in calls) == 1000


class _Embedder:
    """A provider at the seam, for the batcher's own logic: fails on texts containing "bad"."""

    name = "unit"

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def embed(self, model: str, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        self.calls.append(request.texts)
        if any("bad" in t for t in request.texts):
            raise ProviderError(JobError("invalid_request", "bad input", ErrorClass.PERMANENT, 400))
        if any("down" in t for t in request.texts):
            raise ProviderError(JobError("provider_unavailable", "503", ErrorClass.TRANSIENT, 503))
        return EmbeddingOutput(
            tuple((float(len(t)),) for t in request.texts), TokenUsage(len(request.texts) * 2)
        )

    async def chat(self, model: str, request: ChatInput, ctx: CallContext) -> object:
        raise NotImplementedError


async def _embed_all(batcher: EmbeddingBatcher, texts: list[str]) -> list[EmbeddingOutput | BaseException]:
    calls = [batcher.embed(EmbeddingInput((t,)), CallContext(f"job{i}", 1)) for i, t in enumerate(texts)]
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_one_bad_input_fails_only_its_own_job() -> None:
    provider = _Embedder()
    async with EmbeddingBatcher(provider, "m", max_items=4, max_wait_s=0.01) as batcher:  # type: ignore[arg-type]
        out = await _embed_all(batcher, ["a", "bb", "bad", "dddd"])
    assert provider.calls[0] == ("a", "bb", "bad", "dddd")  # one call first, then one by one
    assert [o.vectors if isinstance(o, EmbeddingOutput) else type(o) for o in out] == [
        ((1.0,),),
        ((2.0,),),
        ProviderError,
        ((4.0,),),
    ]
    assert all(o.usage.input_tokens == 2 for o in out if isinstance(o, EmbeddingOutput))


async def test_a_provider_failure_fails_each_job_for_its_own_retry() -> None:
    provider = _Embedder()
    async with EmbeddingBatcher(provider, "m", max_items=3, max_wait_s=0.01) as batcher:  # type: ignore[arg-type]
        out = await _embed_all(batcher, ["down", "b", "c"])
    assert len(provider.calls) == 1
    assert all(isinstance(o, ProviderError) and o.error.code == "provider_unavailable" for o in out)


async def test_classification_jobs_share_structured_chat_calls(
    broker, client, nats_server, tmp_path: Path
) -> None:
    log = tmp_path / "calls.jsonl"
    config = make_config(
        f"providers: {{mock: {{type: mock, concurrency: 64, call_log: '{log}'}}, slow: {{type: mock}}}}\n"
        "batch: {max_items: 16, max_wait_ms: 20}"
    )
    words = ["positive", "negative", "neutral"]
    specs = [
        laneway.job("chat", laneway.classification(f"item {i} feels {words[i % 3]}", words))
        for i in range(200)
    ]
    ids = [o.job_id for o in await client.submit_batch(specs)]
    async with WorkerPool(config, nats_url=nats_server.url):
        finals = {e.job_id: e async for e in client.stream_results(ids, final_only=True)}
    assert [finals[j].result.classification.label for j in ids] == [words[i % 3] for i in range(200)]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) <= 200 // 16 + 8


async def _classify(fake_output: str, items: list[tuple[str, tuple[str, ...]]]) -> tuple[list[object], int]:
    """Classify ``items`` through the openai adapter against the HTTP fake answering
    ``fake_output``; the outcomes and the number of chat calls made."""
    from laneway.workers.batching import ClassificationBatcher
    from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings
    from laneway.workers.providers.openai import OpenAIProvider, OpenAIProviderConfig

    async with FakeProvider(FakeProviderSettings(output=fake_output)) as fake:
        provider = OpenAIProvider("http", OpenAIProviderConfig(base_url=fake.base_url, api_key_env=""))
        try:
            async with ClassificationBatcher(provider, "m", max_items=len(items), max_wait_s=0.05) as b:
                calls = [
                    b.classify(ClassificationInput(text, labels), CallContext(f"j{i}", 1))
                    for i, (text, labels) in enumerate(items)
                ]
                out = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await provider.aclose()
        return out, sum(r.path == "/v1/chat/completions" for r in fake.requests)


async def test_batched_classification_over_http_parses_labels_per_job() -> None:
    items = [("great stuff", ("pos", "neg")), ("awful", ("pos", "neg"))]
    out, calls = await _classify('{"labels": ["pos", "NEG"]}', items)
    assert calls == 1
    assert [o.label for o in out] == ["pos", "neg"]  # type: ignore[attr-defined]


async def test_a_label_outside_the_set_fails_only_its_job() -> None:
    items = [("great stuff", ("pos", "neg")), ("hmm", ("pos", "neg"))]
    out, _ = await _classify('{"labels": ["pos", "maybe"]}', items)
    assert out[0].label == "pos"  # type: ignore[attr-defined]
    assert isinstance(out[1], ProviderError) and out[1].error.code == "invalid_label"


async def test_an_unparsable_batch_answer_falls_back_to_one_call_per_job() -> None:
    # The fake echoes the user message: not the JSON list asked for, so each job is
    # asked on its own (where the echo names its one label).
    items = [("pos", ("pos", "neg")), ("neg", ("pos", "neg"))]
    out, calls = await _classify("echo", items)
    assert [o.label for o in out] == ["pos", "neg"]  # type: ignore[attr-defined]
    assert calls == 3
