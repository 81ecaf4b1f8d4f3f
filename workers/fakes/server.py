"""A fake AI provider over real HTTP on loopback, for tests and offline demos.

It speaks the OpenAI API (``/v1/chat/completions``, ``/v1/embeddings``,
``/v1/models``) and the Anthropic Messages API (``/v1/messages``) closely enough
for real HTTP adapters, including the ways providers fail: rate limits with
their headers, error bodies, latency, and scripted stalls, truncated streams
and malformed bodies::

    async with FakeProvider(FakeProviderSettings(api_key="k", rpm=60)) as fake:
        fake.script(Step(status=429, retry_after_s=1.0), Step(kind="truncate"))
        ...  # point an adapter at fake.base_url
        assert fake.requests[0].headers["authorization"] == "Bearer k"

Every model call is logged with its status (``fake.calls``), and a process that
did not start the fake can read and steer it over HTTP: ``GET /_laneway/stats``,
``GET /_laneway/calls?after=SEQ`` and ``POST /_laneway/control`` (change the error
rates or latency, script the next answers; see ``laneway.workers.fakes.common.parse_control``)::

    curl -d '{"script": [{"status": 429, "retry_after_s": 5}]}' localhost:8080/_laneway/control
    curl -d '{"error_rates": {"503": 1.0}}' localhost:8080/_laneway/control

Behaviour (limits, injected errors, latency, tokens) comes from
``laneway.workers.fakes.simulation``; the wire shapes from ``laneway.workers.fakes.openai``/``.anthropic``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any

from aiohttp import web

from laneway.workers.fakes.anthropic import AnthropicDialect
from laneway.workers.fakes.common import BadRequest, CallLog, ChatCall, Control, Dialect, Reply, StepKind
from laneway.workers.fakes.http import add_admin_routes, call_recorder, pause, send_json, send_stream
from laneway.workers.fakes.openai import OpenAIDialect, parse_embedding_input
from laneway.workers.fakes.simulation import (
    ErrorInjector,
    LatencyModel,
    RateLimiter,
    check_error_rates,
    count_tokens,
    format_retry_after,
    rate_limit_message,
    truncate_tokens,
    unit_vector,
)

__all__ = ["FakeProvider", "FakeProviderSettings", "ReceivedRequest", "Step", "StepKind"]

_MODELS = ["fake-chat", "fake-embedding"]
_OPENAI = OpenAIDialect()
_ANTHROPIC = AnthropicDialect()


@dataclass(frozen=True, slots=True)
class FakeProviderSettings:
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 0
    """Port to listen on; 0 picks a free one (see ``FakeProvider.base_url``)."""
    rpm: int = 0
    """Requests per minute before answering 429; 0 = unlimited (and no request headers)."""
    tpm: int = 0
    """Tokens per minute (prompt + max_tokens, or the output's size); 0 = unlimited."""
    latency_ms: float = 0.0
    """Mean delay before answering (or before a stream's first event), in milliseconds."""
    latency_jitter_ms: float = 0.0
    """Uniform +/- jitter on ``latency_ms``, in milliseconds."""
    token_delay_ms: float = 0.0
    """Delay before each streamed token, in milliseconds."""
    error_rates: Mapping[int, float] = field(default_factory=dict)
    """Share of model calls answered with each error status, e.g. ``{503: 0.05, 429: 0.01}``."""
    api_key: str = ""
    """When set, requests must carry it (OpenAI ``Authorization: Bearer``, Anthropic
    ``x-api-key``) or get a 401 with the provider's error body."""
    output: str = "echo"
    """Chat output: ``echo`` answers with the last user message; anything else verbatim."""
    embedding_dim: int = 8
    """Length of embedding vectors (a request's ``dimensions`` overrides it)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, not {self.port}")
        for name in ("rpm", "tpm", "latency_ms", "latency_jitter_ms", "token_delay_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")
        check_error_rates(self.error_rates)
        # A copy, so the settings stay frozen even if the caller's dict changes.
        object.__setattr__(self, "error_rates", MappingProxyType(dict(self.error_rates)))


@dataclass(frozen=True, slots=True)
class Step:
    """A scripted answer for the next model call (chat, messages or embeddings).

    ``Step(status=429, retry_after_s=1.0)`` is an error answer (with Retry-After);
    ``Step(kind="stall")`` accepts the call then hangs (a stream sends its first
    token first); ``"truncate"`` closes the connection mid-answer; ``"malformed"``
    answers 200 with a body that does not parse; ``Step()`` answers normally,
    skipping rate limits and injected errors.
    """

    status: int = 200
    kind: StepKind = "ok"
    """Defaults to ``"error"`` when ``status`` is not 200."""
    retry_after_s: float | None = None
    """Retry-After sent with an error answer."""
    error_code: str = ""
    """Overrides the error code in the body (OpenAI ``code``, Anthropic ``error.type``),
    e.g. ``context_length_exceeded``, ``insufficient_quota``."""

    def __post_init__(self) -> None:
        if self.kind == "ok" and self.status != 200:
            object.__setattr__(self, "kind", "error")
        if self.kind == "error" and not 400 <= self.status <= 599:
            raise ValueError(f"an error step needs a 4xx/5xx status, not {self.status}")
        if self.kind != "error" and self.status != 200:
            raise ValueError(f"a {self.kind!r} step answers 200, not {self.status}")


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    json: dict[str, Any]
    """The JSON body ({} when absent or not a JSON object)."""
    headers: dict[str, str]
    """Request headers, names lower-cased."""
    time: float
    """``time.monotonic()`` on arrival, to check how long clients waited between calls."""
    peer: str = ""
    """The client's ``host:port``: one value across calls means one reused connection."""


class FakeProvider:
    """The fake provider's HTTP server; start it with ``async with``."""

    def __init__(self, settings: FakeProviderSettings | None = None, *, seed: int | None = None) -> None:
        self.settings = s = settings or FakeProviderSettings()
        self.requests: list[ReceivedRequest] = []
        self.calls = CallLog()
        """Every model call with the status it was answered with."""
        self._rng = random.Random(seed)
        self._limiter = RateLimiter(s.rpm, s.tpm)
        self._errors = ErrorInjector(s.error_rates, self._rng)
        self._error_rates = dict(s.error_rates)
        self._latency = LatencyModel(s.latency_ms, s.latency_jitter_ms)
        self._steps: deque[Step] = deque()
        # Set on exit: handlers waiting (latency, stalls) end at once instead of
        # holding the server's shutdown for its timeout.
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("FakeProvider is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: the OpenAI base URL; Anthropic's ``/v1/messages`` is under it too."""
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    def script(self, *steps: Step | int | StepKind) -> None:
        """Force the next model calls' answers, in order (an int is an error status,
        a string a step kind); unscripted calls behave as configured."""
        for step in steps:
            if isinstance(step, Step):
                self._steps.append(step)
            elif isinstance(step, int):
                self._steps.append(Step(status=step))
            else:
                self._steps.append(Step(kind=step))

    def control(self, control: Control) -> dict[str, Any]:
        """Change behaviour at runtime (what ``POST /_laneway/control`` does); the new state.
        Raises ``BadRequest`` (changing nothing) for a scripted answer ``Step`` refuses."""
        try:
            steps = [
                Step(a.status, a.kind, a.retry_after_s, a.error_code)
                for a in control.script
                for _ in range(a.repeat)
            ]
        except ValueError as err:
            raise BadRequest(f"script: {err}", "script") from None
        if control.error_rates is not None:
            self._errors = ErrorInjector(control.error_rates, self._rng)
            self._error_rates = dict(control.error_rates)
        if control.latency_ms is not None or control.latency_jitter_ms is not None:
            old = self._latency
            mean = old.mean_ms if control.latency_ms is None else control.latency_ms
            jitter = old.jitter_ms if control.latency_jitter_ms is None else control.latency_jitter_ms
            self._latency = LatencyModel(mean, jitter)
        if control.clear_script:
            self._steps.clear()
        self._steps.extend(steps)
        if control.reset_log:
            self.calls.clear()
        return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "error_rates": {str(k): v for k, v in sorted(self._error_rates.items())},
            "latency_ms": self._latency.mean_ms,
            "latency_jitter_ms": self._latency.jitter_ms,
            "scripted": len(self._steps),
            "rpm": self.settings.rpm,
            "tpm": self.settings.tpm,
        }

    async def __aenter__(self) -> FakeProvider:
        if self._runner is not None:
            raise RuntimeError("FakeProvider is already running")
        self._closing.clear()
        app = web.Application(middlewares=[call_recorder(self.calls)])
        add_admin_routes(app, self.calls, self.control, self._state)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_post("/v1/messages", self._anthropic_chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client that gives up on a stall ends its handler.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.settings.host, self.settings.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # --- the request pipeline --------------------------------------------------------

    async def _receive(self, request: web.Request) -> ReceivedRequest:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        received = ReceivedRequest(
            method=request.method,
            path=request.path,
            json=body if isinstance(body, dict) else {},
            headers={k.lower(): v for k, v in request.headers.items()},
            time=time.monotonic(),
            peer=_peer(request),
        )
        self.requests.append(received)
        if raw and not isinstance(body, dict):
            raise BadRequest("We could not parse the JSON body of your request.")
        return received

    def _headers(self, dialect: Dialect) -> dict[str, str]:
        headers = dialect.rate_headers(self._limiter.snapshot(), now=time.time())
        headers[dialect.request_id_header] = f"req_{self._rng.getrandbits(96):024x}"
        return headers

    def _error(
        self,
        dialect: Dialect,
        status: int,
        message: str = "",
        *,
        code: str = "",
        param: str | None = None,
        limited_by: str = "",
        retry_after_s: float | None = None,
    ) -> web.Response:
        headers = self._headers(dialect)
        if retry_after_s is not None:
            headers["retry-after"] = format_retry_after(retry_after_s)
        body = dialect.error_body(status, message, code=code, param=param, limited_by=limited_by)
        return web.json_response(body, status=status, headers=headers)

    async def _admit(self, request: web.Request, dialect: Dialect) -> tuple[ReceivedRequest, Step]:
        """Record the call and decide its fate: raises ``_Refused`` with the answer
        for auth failures, bad JSON and scripted errors."""
        try:
            received = await self._receive(request)
        except BadRequest as err:
            raise _Refused(self._error(dialect, 400, err.message)) from None
        key = self.settings.api_key
        if key and not dialect.authorized(received.headers, key):
            raise _Refused(self._error(dialect, 401))
        step = self._steps.popleft() if self._steps else None
        if step is not None and step.kind == "error":
            raise _Refused(
                self._error(dialect, step.status, code=step.error_code, retry_after_s=step.retry_after_s)
            )
        return received, step or _UNSCRIPTED

    def _limit(self, dialect: Dialect, step: Step, model: str, tokens: int) -> None:
        """Apply rpm/tpm and injected errors to an unscripted call (``_Refused`` if it fails)."""
        if step is not _UNSCRIPTED:
            return
        decision = self._limiter.acquire(tokens)
        if not decision.allowed:
            message = rate_limit_message(decision, model, tokens)
            raise _Refused(
                self._error(
                    dialect,
                    429,
                    message,
                    limited_by=decision.limited_by,
                    retry_after_s=decision.retry_after_s,
                )
            )
        status = self._errors.pick()
        if status is not None:
            raise _Refused(self._error(dialect, status))

    # --- endpoints -------------------------------------------------------------------

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, _OPENAI)

    async def _anthropic_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, _ANTHROPIC)

    async def _chat(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        try:
            received, step = await self._admit(request, dialect)
            try:
                call = dialect.parse_chat(received.json)
            except BadRequest as err:
                raise _Refused(self._error(dialect, 400, err.message, param=err.param)) from None
            reply = self._reply(call)
            cost = reply.prompt_tokens + (call.max_tokens or reply.completion_tokens)
            self._limit(dialect, step, call.model, cost)
        except _Refused as refused:
            return refused.response
        if await pause(self._closing, self._latency.sample_s(self._rng)):
            return self._error(dialect, 503, "The server is shutting down.")
        headers = self._headers(dialect)
        if call.stream:
            delay = self.settings.token_delay_ms / 1000
            return await send_stream(
                request, dialect, reply, step.kind, headers, closing=self._closing, token_delay_s=delay
            )
        return await self._send_json(request, dialect.chat_body(reply), step.kind, headers, dialect)

    def _reply(self, call: ChatCall) -> Reply:
        output = call.last_user if self.settings.output == "echo" else self.settings.output
        text, truncated = truncate_tokens(output, call.max_tokens)
        return Reply(
            call=call,
            id_hex=f"{self._rng.getrandbits(96):024x}",
            created=int(time.time()),
            text=text,
            truncated=truncated,
            prompt_tokens=count_tokens(call.prompt),
            completion_tokens=count_tokens(text) if text else 0,
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        try:
            received, step = await self._admit(request, _OPENAI)
            try:
                model, texts, dimensions, b64 = parse_embedding_input(received.json)
            except BadRequest as err:
                raise _Refused(self._error(_OPENAI, 400, err.message, param=err.param)) from None
            self._limit(_OPENAI, step, model, sum(count_tokens(t) for t in texts))
        except _Refused as refused:
            return refused.response
        if await pause(self._closing, self._latency.sample_s(self._rng)):
            return self._error(_OPENAI, 503, "The server is shutting down.")
        dim = dimensions or self.settings.embedding_dim
        vectors = [unit_vector(t, dim) for t in texts]
        body = _OPENAI.embeddings_body(model, texts, vectors, base64_encoded=b64)
        return await self._send_json(request, body, step.kind, self._headers(_OPENAI), _OPENAI)

    async def _send_json(
        self,
        request: web.Request,
        body: dict[str, Any],
        kind: StepKind,
        headers: dict[str, str],
        dialect: Dialect,
    ) -> web.StreamResponse:
        def closed() -> web.StreamResponse:
            return self._error(dialect, 503, "The server is shutting down.")

        return await send_json(request, body, kind, headers, closing=self._closing, on_close=closed)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        anthropic = "anthropic-version" in request.headers or "x-api-key" in request.headers
        dialect: Dialect = _ANTHROPIC if anthropic else _OPENAI
        try:
            received = await self._receive(request)
        except BadRequest:
            received = self.requests[-1]  # a GET body is ignored, parsable or not
        key = self.settings.api_key
        if key and not dialect.authorized(received.headers, key):
            return self._error(dialect, 401)
        body = dialect.models_body(_MODELS, created=1_700_000_000)
        return web.json_response(body, headers=self._headers(dialect))


class _Refused(Exception):
    """Carries the answer for a call that will not reach the model."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


_UNSCRIPTED = Step()


def _peer(request: web.Request) -> str:
    transport = request.transport
    address = transport.get_extra_info("peername") if transport is not None else None
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else ""
