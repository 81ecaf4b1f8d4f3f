"""Embedding jobs share provider calls: fewer calls, same per-job results."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import laneway
from broker.model import ChatInput, EmbeddingInput, EmbeddingOutput, ErrorClass, JobError, TokenUsage
from laneway.v1 import job_pb2 as S
from workers.batching import EmbeddingBatcher
from workers.pool import WorkerPool
from workers.provider import CallContext, ProviderError
from workers.simulation import unit_vector

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
