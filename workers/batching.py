"""Gathering embedding jobs into one provider call.

Each job still has its own lease, event log, retries and deadline; only the
provider call is shared. A job waits at most ``max_wait_s`` for others, and a
batch goes as soon as it holds ``max_items`` texts. Results are split back by
position. A provider error fails every job of the batch with that error, so each
retries on its own; a permanent error (one bad input can spoil a whole request)
first re-tries the jobs one by one, so only the bad one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType

from broker.model import EmbeddingInput, EmbeddingOutput, ErrorClass, TokenUsage
from laneway.errors import Unavailable
from workers.classify import classify_exception
from workers.provider import CallContext, Provider

__all__ = ["EmbeddingBatcher"]


@dataclass
class _Item:
    request: EmbeddingInput
    ctx: CallContext
    future: asyncio.Future[EmbeddingOutput]


class EmbeddingBatcher:
    """``async with EmbeddingBatcher(provider, model, max_items=32, max_wait_s=0.002) as b``."""

    def __init__(self, provider: Provider, model: str, *, max_items: int, max_wait_s: float) -> None:
        self._provider = provider
        self._model = model
        self._max_items = max_items
        self._max_wait = max_wait_s
        self._pending: list[_Item] = []
        self._texts = 0
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()
        #: Provider calls made, for metrics and the bench.
        self.calls = 0

    async def __aenter__(self) -> EmbeddingBatcher:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def embed(self, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        if self._max_items <= 1 or len(request.texts) >= self._max_items:
            self.calls += 1
            return await self._provider.embed(self._model, request, ctx)
        if self._texts + len(request.texts) > self._max_items:
            self._flush()
        item = _Item(request, ctx, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._texts += len(request.texts)
        if self._texts >= self._max_items:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_wait, self._flush)
        try:
            return await item.future
        except asyncio.CancelledError:
            if item in self._pending:  # cancelled before its batch went: leave the batch
                self._pending.remove(item)
                self._texts -= len(item.request.texts)
            raise

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._pending, self._texts = self._pending, [], 0
        if items:
            task = asyncio.create_task(self._call(items), name="laneway-embed-batch")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, items: list[_Item]) -> None:
        texts = tuple(t for item in items for t in item.request.texts)
        first = items[0].ctx
        ctx = CallContext(
            job_id=first.job_id,
            attempt=first.attempt,
            observe=first.observe,
            job_ids=tuple(item.ctx.job_id for item in items),
        )
        self.calls += 1
        try:
            out = await self._provider.embed(self._model, EmbeddingInput(texts), ctx)
            if len(out.vectors) != len(texts):
                raise ValueError(f"{len(out.vectors)} vectors for {len(texts)} texts")
        except asyncio.CancelledError:
            _fail(items, Unavailable("worker stopping"))
            raise
        except Exception as exc:
            err = classify_exception(exc, provider=self._provider.name)
            if err.error.error_class is ErrorClass.PERMANENT and len(items) > 1:
                await asyncio.gather(*(self._call([item]) for item in items))
            else:
                _fail(items, err)
            return
        _split(items, out, len(texts))

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        _fail(self._pending, Unavailable("worker stopping"))
        self._pending, self._texts = [], 0
        for task in list(self._calls):
            task.cancel()
        for task in list(self._calls):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _fail(items: list[_Item], err: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(err)


def _split(items: list[_Item], out: EmbeddingOutput, total_texts: int) -> None:
    """Each job gets its vectors and a share of the usage by its number of texts."""
    start = 0
    for item in items:
        n = len(item.request.texts)
        share = TokenUsage(input_tokens=round(out.usage.input_tokens * n / total_texts))
        if not item.future.done():
            item.future.set_result(EmbeddingOutput(vectors=out.vectors[start : start + n], usage=share))
        start += n
