"""What the HTTP provider adapters share: the httpx client, timeouts, rate-limit
headers, error bodies, SSE streams with stall detection, and reporting.

Timeouts, per call (the sooner of ``total_timeout_s`` and the job's deadline bounds
the whole call, streamed or not):

- ``connect_timeout_s``: TCP/TLS connect;
- streamed calls: ``first_token_timeout_s`` for the response headers and again for
  the first event, then ``stall_timeout_s`` between events. These are asyncio timers
  around each wait (so time spent by the consumer between events never counts); the
  socket read timeout is set no lower, as a backstop only;
- non-streamed calls: the answer only comes once the whole text is generated, so
  only the total bounds them (a 30 s header timeout would kill long generations).

Every failure ends as a ``ProviderError`` classified by ``laneway.workers.providers.classify``; httpx
exceptions are translated to the built-in ones it understands first. The client
never retries (httpx does not by default): retrying is the worker's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Protocol, TypeVar

import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError, aconnect_sse
from pydantic import Field, field_validator

from laneway.broker.config.providers import ProviderConfigBase
from laneway.broker.core.errors import ConfigError
from laneway.broker.core.model import ChatOutput, ErrorClass, JobError, TokenUsage
from laneway.workers.providers.base import CallContext, ProviderError, RateLimits, ResponseInfo
from laneway.workers.providers.classify import (
    classify_exception,
    classify_status,
    connect_failed,
)
from laneway.workers.providers.rate_headers import retry_after_header

__all__ = [
    "HttpProvider",
    "HttpProviderConfig",
    "StreamState",
    "error_fields",
    "resolve_api_key",
]

_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Cost = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class HttpProviderConfig(ProviderConfigBase):
    """Settings shared by the provider types that call an HTTP API."""

    base_url: str
    """API root the endpoint paths are appended to."""
    api_key_env: str
    """Name of the environment variable holding the API key; empty sends no key."""
    headers: Annotated[dict[str, str], Field(repr=False)] = {}  # noqa: RUF012 (pydantic copies it)
    """Extra HTTP headers sent with every request (e.g. a gateway's routing header or
    key; use ``${VAR}`` for secrets). Left out of the config's repr, since they may
    carry credentials."""
    concurrency: Annotated[int, Field(ge=1)] = 16
    """Most calls one worker process runs against this provider at once (also the size
    of its HTTP connection pool)."""
    connect_timeout_s: _Seconds = 5.0
    """Seconds to wait for a TCP/TLS connection to the API."""
    first_token_timeout_s: _Seconds = 30.0
    """Seconds a streamed call waits for the response headers, and then for the first
    event. A non-streamed answer arrives whole once generated, so those calls are bounded
    by ``total_timeout_s`` instead."""
    total_timeout_s: _Seconds = 600.0
    """Seconds one call may take in all, streamed or not (a job deadline that comes
    sooner shortens it)."""
    stall_timeout_s: _Seconds = 30.0
    """Seconds a streamed answer may stay silent between two events before the call is
    abandoned as stalled (a transient error, so the job is retried)."""
    cost_per_1k_input_tokens: _Cost = 0.0
    """Price of 1000 input (prompt) tokens, in your currency of choice; 0 if unknown."""
    cost_per_1k_output_tokens: _Cost = 0.0
    """Price of 1000 output (completion) tokens; 0 if unknown."""
    models: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    """Model names this provider serves (informational, e.g. for ``config check``);
    empty means not listed."""

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got '{value}'")
        # Paths are appended as "/chat/completions"; a trailing slash would double it.
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _check_api_key_env(cls, value: str) -> str:
        # A pasted key instead of a variable name would otherwise end up in the config dump.
        if value and not value.replace("_", "").isalnum():
            raise ValueError(
                "expected the name of an environment variable (letters, digits, _), not the key itself"
            )
        return value


C = TypeVar("C", bound=HttpProviderConfig)
T = TypeVar("T")

_ERROR_TEXT_LIMIT = 300


def error_fields(body: bytes) -> tuple[str, str]:
    """``(code, message)`` from an error body: OpenAI ``{"error": {"code", "type", "message"}}``,
    Anthropic ``{"type": "error", "error": {"type", "message"}}``, or the flat shape some
    OpenAI-compatible servers use. The code is the provider's code, else its error type."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return "", text[:_ERROR_TEXT_LIMIT]
    if not isinstance(data, dict):
        return "", text[:_ERROR_TEXT_LIMIT]
    err = data.get("error")
    if isinstance(err, str):
        return "", err[:_ERROR_TEXT_LIMIT]
    fields: dict[str, Any] = err if isinstance(err, dict) else data
    code = next((v for v in (fields.get("code"), fields.get("type")) if isinstance(v, str) and v), "")
    message = fields.get("message") or fields.get("detail") or text
    return code, str(message)[:_ERROR_TEXT_LIMIT]


def resolve_api_key(name: str, config: HttpProviderConfig, env: Mapping[str, str] | None = None) -> str:
    """The API key from the variable ``config.api_key_env`` names ("" when it names none)."""
    if not config.api_key_env:
        return ""
    value = (os.environ if env is None else env).get(config.api_key_env, "").strip()
    if not value:
        raise ConfigError(
            f"providers.{name}.api_key_env: environment variable {config.api_key_env} is not set "
            "(it must hold the API key; set api_key_env to '' for a server without auth)"
        )
    return value


def _no_answer(exc: BaseException, provider: str) -> ProviderError:
    """A failure without a usable HTTP answer, via classify_exception (which knows
    built-in exceptions, not httpx's)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return connect_failed(f"{type(exc).__name__}: {exc}", provider=provider)
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return classify_exception(TimeoutError(), provider=provider)
    if isinstance(exc, SSEError | httpx.DecodingError):
        return classify_exception(ValueError(str(exc)), provider=provider)
    if isinstance(exc, httpx.TransportError):
        return classify_exception(ConnectionError(f"{type(exc).__name__}: {exc}"), provider=provider)
    return classify_exception(exc, provider=provider)


# How long the end of a streamed body may take to arrive after its terminator.
_DRAIN_S = 0.5


class StreamState(Protocol):
    """One vendor's reading of a chat stream; ``done`` once its terminator came.
    ``feed`` returns an event's text delta, if any, and raises ValueError on a
    malformed event and ProviderError on an error event."""

    done: bool

    def feed(self, event: ServerSentEvent) -> str | None: ...

    def output(self) -> ChatOutput: ...


class HttpProvider(Generic[C]):
    """Base of the HTTP adapters: owns the client, sends, classifies and reports."""

    def __init__(
        self,
        name: str,
        config: C,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        # The key lives only in the client's default headers: not on self, so no repr
        # or attribute dump shows it.
        headers = {**self._auth_headers(resolve_api_key(name, config, env)), **config.headers}
        self._client = httpx.AsyncClient(
            base_url=config.base_url,
            headers=headers,
            timeout=self._timeout(read=config.first_token_timeout_s),
            limits=httpx.Limits(
                max_connections=config.concurrency, max_keepalive_connections=config.concurrency
            ),
            transport=transport,
        )
        # Non-streamed answers come whole after generation: reading may take the whole budget.
        self._whole_timeout = self._timeout(read=config.total_timeout_s)
        # Streams: asyncio timers enforce the first-token and stall limits; the socket
        # read timeout is a backstop that must not fire before them.
        self._stream_timeout = self._timeout(read=max(config.first_token_timeout_s, config.stall_timeout_s))

    def _timeout(self, *, read: float) -> httpx.Timeout:
        c = self.config
        # The worker pool caps calls at `concurrency`, the pool's size, so waiting for a
        # pooled connection is rare; the total timer bounds it anyway.
        return httpx.Timeout(
            connect=c.connect_timeout_s, read=read, write=c.first_token_timeout_s, pool=c.total_timeout_s
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.config.base_url!r})"

    # --- vendor hooks -------------------------------------------------------------

    def _auth_headers(self, api_key: str) -> dict[str, str]:
        raise NotImplementedError

    def _rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        raise NotImplementedError

    def _error_code(self, code: str, message: str) -> str:
        """The code to classify an error by (vendors refine their codes here)."""
        return code

    def _status_error(self, status: int, body: bytes, headers: Mapping[str, str], url: str) -> ProviderError:
        code, message = error_fields(body)
        return classify_status(
            status,
            provider=self.name,
            code=self._error_code(code, message),
            message=f"{self.name}: HTTP {status}: {message}" if message else "",
            retry_after=retry_after_header(headers),
            url=url,
        )

    # --- calls --------------------------------------------------------------------

    def _budget(self, ctx: CallContext) -> float:
        budget = self.config.total_timeout_s
        if ctx.deadline is not None:
            budget = min(budget, (ctx.deadline - datetime.now(UTC)).total_seconds())
        return max(budget, 0.0)

    def _report(
        self,
        ctx: CallContext,
        model: str,
        status: int,
        started: float,
        limits: RateLimits,
        *,
        usage: TokenUsage | None = None,
        error: ProviderError | None = None,
    ) -> None:
        latency = time.monotonic() - started
        job_error = error.error if error is not None else None
        ctx.report(ResponseInfo(self.name, model, status, latency, limits, usage, job_error))

    async def _post(
        self,
        path: str,
        payload: dict[str, Any],
        ctx: CallContext,
        model: str,
        parse: Callable[[Any], tuple[T, TokenUsage | None]],
    ) -> T:
        """POST ``payload`` and ``parse`` the JSON answer into (result, usage)."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._budget(ctx)):
                response = await self._client.post(path, json=payload, timeout=self._whole_timeout)
        except (TimeoutError, httpx.HTTPError) as exc:
            raise _no_answer(exc, self.name) from exc
        limits = self._rate_limits(response.headers)
        status = response.status_code
        if not response.is_success:
            err = self._status_error(status, response.content, response.headers, str(response.url))
            self._report(ctx, model, status, started, limits, error=err)
            raise err
        try:
            result, usage = parse(response.json())
        except ProviderError as exc:
            self._report(ctx, model, status, started, limits, error=exc)
            raise
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            # Undecodable JSON or an unexpected shape: both are a malformed answer.
            bad = classify_exception(ValueError(f"malformed answer: {exc!r}"), provider=self.name).error
            err = ProviderError(dataclasses.replace(bad, http_status=status))
            self._report(ctx, model, status, started, limits, error=err)
            raise err from exc
        self._report(ctx, model, status, started, limits, usage=usage)
        return result

    async def _stream(
        self, path: str, payload: dict[str, Any], ctx: CallContext, model: str, state: StreamState
    ) -> AsyncIterator[str | ChatOutput]:
        """Text deltas from an SSE answer, then the final ChatOutput."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = loop.time() + self._budget(ctx)
        cfg = self.config
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout_at(min(deadline, loop.time() + cfg.first_token_timeout_s)):
                    source: EventSource = await stack.enter_async_context(
                        aconnect_sse(self._client, "POST", path, json=payload, timeout=self._stream_timeout)
                    )
                    response = source.response
                    if not response.is_success:
                        await response.aread()
            except (TimeoutError, httpx.HTTPError) as exc:
                raise _no_answer(exc, self.name) from exc
            status = response.status_code
            limits = self._rate_limits(response.headers)
            if not response.is_success:
                err = self._status_error(status, response.content, response.headers, str(response.url))
                self._report(ctx, model, status, started, limits, error=err)
                raise err
            events = source.aiter_sse()
            stack.push_async_callback(events.aclose)
            first = True
            try:
                while not state.done:
                    wait = cfg.first_token_timeout_s if first else cfg.stall_timeout_s
                    try:
                        # The timer covers only the wait for the next event, never a yield.
                        async with asyncio.timeout_at(min(deadline, loop.time() + wait)):
                            event = await anext(events)
                    except StopAsyncIteration:
                        break
                    first = False
                    delta = state.feed(event)
                    if delta:
                        yield delta
                if not state.done:
                    raise self._truncated("the stream ended without its terminator", status)
                output = state.output()
                await _drain(events, loop.time() + _DRAIN_S)
            except (TimeoutError, ValueError, LookupError, TypeError, httpx.HTTPError, ProviderError) as exc:
                timed_out = loop.time() >= deadline
                err = self._stream_error(exc, status, first=first, total=timed_out)
                self._report(ctx, model, status, started, limits, error=err)
                raise err from (None if err is exc else exc)
            self._report(ctx, model, status, started, limits, usage=output.usage)
        yield output

    def _stream_error(self, exc: Exception, status: int, *, first: bool, total: bool) -> ProviderError:
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, httpx.RemoteProtocolError):
            # The server closed the connection mid-body: the stream was cut short.
            return self._truncated(f"connection closed mid-stream ({exc})", status)
        cfg = self.config
        if isinstance(exc, TimeoutError):
            if total:
                what = f"call took longer than total_timeout_s ({cfg.total_timeout_s:g}s) or its deadline"
            elif first:
                what = f"no first event within first_token_timeout_s ({cfg.first_token_timeout_s:g}s)"
            else:
                what = f"stream stalled: no event for stall_timeout_s ({cfg.stall_timeout_s:g}s)"
            err = classify_exception(exc, provider=self.name).error
            err = dataclasses.replace(err, message=f"{self.name}: {what}")
        elif isinstance(exc, ValueError | LookupError | TypeError):
            err = classify_exception(ValueError(f"malformed stream event: {exc!r}"), provider=self.name).error
        else:
            err = _no_answer(exc, self.name).error
        # The answer did come, with this status; it broke while being read.
        return ProviderError(dataclasses.replace(err, http_status=status))

    def _truncated(self, why: str, status: int) -> ProviderError:
        # Neither an HTTP status nor an exception classify.py could judge: a stream cut
        # short is a provider or network hiccup, so transient, with a code of its own.
        return ProviderError(
            JobError("truncated_stream", f"{self.name}: {why}", ErrorClass.TRANSIENT, status)
        )

    async def aclose(self) -> None:
        await self._client.aclose()


async def _drain(events: AsyncIterator[ServerSentEvent], deadline: float) -> None:
    """Read what follows a stream's terminator (normally just the end of the body).

    A response closed before its body was read to the end cannot go back to the
    connection pool: every streamed call would then open a new connection, and to a
    real provider a TLS handshake. A server that keeps talking is cut off at
    ``deadline``: the answer is complete, only the connection is lost.
    """
    with contextlib.suppress(TimeoutError, httpx.HTTPError, SSEError):
        async with asyncio.timeout_at(deadline):
            async for _ in events:
                pass
