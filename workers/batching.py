"""Gathering jobs of one route into one provider call: embeddings and classifications.

Each job still has its own lease, event log, retries and deadline; only the
provider call is shared. A job waits at most ``max_wait_s`` for others, and a
batch goes as soon as it holds ``max_items`` inputs. Results are split back by
position.

- Embeddings: one embeddings call with every text. A provider error fails each
  job of the batch with that error, so each retries on its own; a permanent
  error (one bad input can spoil a whole request) first re-tries the jobs one
  by one, so only the bad one fails.
- Classifications run on chat models: one structured chat call lists every text
  with its own labels and asks for a JSON list of labels back. An answer of the
  wrong shape falls back to one classify call per job; a label outside a job's
  set fails that job (``invalid_label``), never a silent guess.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from laneway.broker.core.model import (
    ChatInput,
    ChatMessage,
    ClassificationInput,
    ClassificationOutput,
    EmbeddingInput,
    EmbeddingOutput,
    ErrorClass,
    GenerationParams,
    TokenUsage,
)
from laneway.errors import Unavailable
from laneway.workers.providers.base import CallContext, Provider, ProviderError
from laneway.workers.providers.classify import classify_exception
from laneway.workers.providers.labels import BATCH_SYSTEM_PROMPT, batch_request, parse_batch_labels

__all__ = ["ClassificationBatcher", "EmbeddingBatcher"]

In = TypeVar("In", EmbeddingInput, ClassificationInput)
Out = TypeVar("Out", EmbeddingOutput, ClassificationOutput)


@dataclass
class _Item(Generic[In, Out]):
    request: In
    ctx: CallContext
    future: asyncio.Future[Out]


class _Batcher(Generic[In, Out]):
    def __init__(self, provider: Provider, model: str, *, max_items: int, max_wait_s: float) -> None:
        self._provider = provider
        self._model = model
        self._max_items = max_items
        self._max_wait = max_wait_s
        self._pending: list[_Item[In, Out]] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()
        #: Provider calls made, for metrics and the bench.
        self.calls = 0

    async def __aenter__(self) -> _Batcher[In, Out]:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _weight(self, request: In) -> int:
        return 1

    async def _single(self, request: In, ctx: CallContext) -> Out:
        raise NotImplementedError

    async def _call_many(self, items: list[_Item[In, Out]], ctx: CallContext) -> None:
        raise NotImplementedError

    async def submit(self, request: In, ctx: CallContext) -> Out:
        weight = self._weight(request)
        if self._max_items <= 1 or weight >= self._max_items:
            self.calls += 1
            return await self._single(request, ctx)
        if self._size + weight > self._max_items:
            self._flush()
        loop = asyncio.get_running_loop()
        item: _Item[In, Out] = _Item(request, ctx, loop.create_future())
        self._pending.append(item)
        self._size += weight
        if self._size >= self._max_items:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_wait, self._flush)
        try:
            return await item.future
        except asyncio.CancelledError:
            if item in self._pending:  # cancelled before its batch went: leave the batch
                self._pending.remove(item)
                self._size -= weight
            raise

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._pending, self._size = self._pending, [], 0
        if items:
            task = asyncio.create_task(self._run(items), name="laneway-batch")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _run(self, items: list[_Item[In, Out]]) -> None:
        if len(items) == 1:
            item = items[0]
            self.calls += 1
            try:
                _resolve(item, await self._single(item.request, item.ctx))
            except asyncio.CancelledError:
                _fail(items, Unavailable("worker stopping"))
                raise
            except Exception as exc:
                _fail(items, classify_exception(exc, provider=self._provider.name))
            return
        first = items[0].ctx
        ctx = CallContext(
            job_id=first.job_id,
            attempt=first.attempt,
            observe=first.observe,
            job_ids=tuple(item.ctx.job_id for item in items),
        )
        self.calls += 1
        try:
            await self._call_many(items, ctx)
        except asyncio.CancelledError:
            _fail(items, Unavailable("worker stopping"))
            raise

    async def _one_by_one(self, items: list[_Item[In, Out]]) -> None:
        await asyncio.gather(*(self._run([item]) for item in items))

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        _fail(self._pending, Unavailable("worker stopping"))
        self._pending, self._size = [], 0
        for task in list(self._calls):
            task.cancel()
        for task in list(self._calls):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class EmbeddingBatcher(_Batcher[EmbeddingInput, EmbeddingOutput]):
    """``async with EmbeddingBatcher(provider, model, max_items=32, max_wait_s=0.002) as b``."""

    def _weight(self, request: EmbeddingInput) -> int:
        return len(request.texts)

    async def embed(self, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        return await self.submit(request, ctx)

    async def _single(self, request: EmbeddingInput, ctx: CallContext) -> EmbeddingOutput:
        return await self._provider.embed(self._model, request, ctx)

    async def _call_many(self, items: list[_Item[EmbeddingInput, EmbeddingOutput]], ctx: CallContext) -> None:
        texts = tuple(t for item in items for t in item.request.texts)
        try:
            out = await self._provider.embed(self._model, EmbeddingInput(texts), ctx)
            if len(out.vectors) != len(texts):
                raise ValueError(f"{len(out.vectors)} vectors for {len(texts)} texts")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = classify_exception(exc, provider=self._provider.name)
            if err.error.error_class is ErrorClass.PERMANENT:
                await self._one_by_one(items)
            else:
                _fail(items, err)
            return
        start = 0
        for item in items:
            n = len(item.request.texts)
            # Each job's share of the usage, by its number of texts.
            share = TokenUsage(input_tokens=round(out.usage.input_tokens * n / len(texts)))
            _resolve(item, EmbeddingOutput(vectors=out.vectors[start : start + n], usage=share))
            start += n


class ClassificationBatcher(_Batcher[ClassificationInput, ClassificationOutput]):
    """Classifications of one route in one structured chat call."""

    async def classify(self, request: ClassificationInput, ctx: CallContext) -> ClassificationOutput:
        return await self.submit(request, ctx)

    async def _single(self, request: ClassificationInput, ctx: CallContext) -> ClassificationOutput:
        return await self._provider.classify(self._model, request, ctx)

    async def _call_many(
        self, items: list[_Item[ClassificationInput, ClassificationOutput]], ctx: CallContext
    ) -> None:
        asked = [(item.request.text, item.request.labels) for item in items]
        chat = ChatInput(
            messages=(ChatMessage("system", BATCH_SYSTEM_PROMPT), ChatMessage("user", batch_request(asked))),
            params=GenerationParams(temperature=0.0),
        )
        try:
            answer = await self._provider.chat(self._model, chat, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = classify_exception(exc, provider=self._provider.name)
            if err.error.error_class is ErrorClass.PERMANENT:
                await self._one_by_one(items)
            else:
                _fail(items, err)
            return
        labels = parse_batch_labels(self._provider.name, answer.text, asked)
        if labels is None:
            # Not the shape we asked for: this model does not batch; ask one by one.
            await self._one_by_one(items)
            return
        n = len(items)
        usage = TokenUsage(answer.usage.input_tokens // n, answer.usage.output_tokens // n)
        for item, label in zip(items, labels, strict=True):
            if isinstance(label, ProviderError):
                _fail([item], label)
            else:
                _resolve(item, ClassificationOutput(label=label, usage=usage))


def _resolve(item: _Item[In, Out], result: Out) -> None:
    if not item.future.done():
        item.future.set_result(result)


def _fail(items: list[_Item[In, Out]], err: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(err)
