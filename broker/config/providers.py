"""Config blocks of the provider types (``mock``, ``openai``, ``anthropic``).

They live apart from ``laneway.broker.config.model``, which imports them into its
``ProviderConfig`` union; importing that module's ``_Model`` base from here would
be an import cycle, so ``ConfigModel`` repeats its three lines of settings.

API keys are never part of the config: a block names the environment variable
that holds its key (``api_key_env``), read when the provider is built, so a key
cannot leak through a config dump, a repr or the JSON schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AnthropicProviderConfig",
    "CircuitConfig",
    "ConfigModel",
    "ErrorRates",
    "HttpProviderConfig",
    "LimitsConfig",
    "MockProviderConfig",
    "ModelLimits",
    "OpenAIProviderConfig",
]

_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Cost = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class ConfigModel(BaseModel):
    """Base of the provider config models: the same settings as ``laneway.broker.config.model._Model``."""

    # Frozen: one config object is shared by every task of a process.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelLimits(ConfigModel):
    """Limits of one model where they differ from the provider's."""

    rpm: Annotated[int, Field(ge=0)] = 0
    """Requests per minute for this model, fleet-wide; 0: no request limit."""
    tpm: Annotated[int, Field(ge=0)] = 0
    """Tokens per minute for this model, fleet-wide; 0: no token limit."""


class LimitsConfig(ConfigModel):
    """What the provider allows, enforced across every worker process sharing the NATS
    cluster (state in JetStream KV): the fleet together stays within these."""

    rpm: Annotated[int, Field(ge=0)] = 0
    """Requests per minute the account allows, fleet-wide; 0: no request limit."""
    tpm: Annotated[int, Field(ge=0)] = 0
    """Tokens per minute the account allows, fleet-wide; 0: no token limit. A call
    reserves its prompt estimate (characters / 4) plus its ``max_tokens`` before it is
    sent, and the reservation is corrected with the usage the provider reports."""
    max_concurrent: Annotated[int, Field(ge=0)] = 0
    """Calls in flight at once across the fleet; 0: only each process's ``concurrency``."""
    models: dict[Annotated[str, Field(min_length=1)], ModelLimits] = {}
    """Per-model ``rpm``/``tpm`` where a model's limits differ from the provider's; a
    model listed here is limited by its own entry instead of the provider-wide one."""
    burst_s: _Seconds = 1.0
    """Burst allowance, in seconds of the rate: after a quiet spell up to
    ``rpm / 60 * burst_s`` requests may go at once."""
    decrease_factor: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.5
    """On a 429 or overload answer, the fleet's rate is multiplied by this."""
    recovery_s: _Seconds = 30.0
    """Seconds for the adaptive rate to climb back from zero to the configured limit
    (it grows linearly once the provider stops refusing)."""
    min_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.05
    """The adaptive rate never drops below this fraction of the configured limit."""

    def for_model(self, model: str) -> tuple[int, int]:
        """(rpm, tpm) that apply to calls of ``model``."""
        own = self.models.get(model)
        return (own.rpm, own.tpm) if own is not None else (self.rpm, self.tpm)

    def key_for(self, provider: str, model: str) -> str:
        """The limiter state a call of ``model`` draws on: its own if listed, else the provider's."""
        return f"{provider}.{model}" if model in self.models else provider


class CircuitConfig(ConfigModel):
    """The provider's circuit breaker, shared by the whole fleet: when it opens, no
    worker calls the provider and its routes' jobs go to their next healthy target."""

    enabled: bool = True
    """Turn the breaker off to keep calling a failing provider (jobs then retry as usual)."""
    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    """Failures in a row, counted across the fleet, that open the circuit. Failures are
    transient errors: 5xx, timeouts, connection errors, stalls; not 429s or bad input."""
    error_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5
    """Share of a process's calls in the last ``window_s`` failing that opens the circuit..."""
    min_calls: Annotated[int, Field(ge=1)] = 20
    """...once that window holds at least this many calls."""
    window_s: _Seconds = 10.0
    """Length of the error-rate window, in seconds."""
    open_s: _Seconds = 5.0
    """Seconds the circuit stays open before a few probe calls test the provider; each
    failed probe doubles it, up to ``max_open_s``."""
    max_open_s: _Seconds = 60.0
    """Cap on how long the circuit stays open between probes."""
    probes: Annotated[int, Field(ge=1)] = 3
    """Probe calls (at most this many in flight, fleet-wide) that must all succeed to
    close the circuit again; traffic then returns gradually, through the limiter."""


class HttpProviderConfig(ConfigModel):
    """Settings shared by the provider types that call an HTTP API."""

    base_url: str
    """API root the endpoint paths are appended to."""
    api_key_env: str
    """Name of the environment variable holding the API key; empty sends no key."""
    headers: Annotated[dict[str, str], Field(repr=False)] = {}
    """Extra HTTP headers sent with every request (e.g. a gateway's routing header or
    key; use ``${VAR}`` for secrets). Left out of the config's repr, since they may
    carry credentials."""
    concurrency: Annotated[int, Field(ge=1)] = 16
    """Most calls one worker process runs against this provider at once (also the size
    of its HTTP connection pool)."""
    limits: LimitsConfig = LimitsConfig()
    """Fleet-wide rate and concurrency limits of this provider (adaptive: cut on 429s,
    Retry-After honoured by every worker, rate-limit headers heeded)."""
    circuit: CircuitConfig = CircuitConfig()
    """Fleet-wide circuit breaker of this provider."""
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


class OpenAIProviderConfig(HttpProviderConfig):
    """The OpenAI API or an OpenAI-compatible server (vLLM, Ollama, LiteLLM, ...)."""

    type: Literal["openai"] = "openai"
    """Provider type; selects which settings below are allowed."""
    base_url: str = "https://api.openai.com/v1"
    """API root; ``/chat/completions`` and ``/embeddings`` are appended, e.g.
    ``http://127.0.0.1:11434/v1`` for a local Ollama."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (sent as a Bearer token);
    empty sends no Authorization header, for local servers without auth."""
    organization: str = ""
    """OpenAI organization id sent as ``OpenAI-Organization``; empty sends none."""
    json_response_format: bool = True
    """Ask for ``response_format: json_object`` in classification calls; turn off for
    servers that reject it (the answer is parsed leniently either way)."""


class AnthropicProviderConfig(HttpProviderConfig):
    """The Anthropic Messages API."""

    type: Literal["anthropic"] = "anthropic"
    """Provider type; selects which settings below are allowed."""
    base_url: str = "https://api.anthropic.com/v1"
    """API root; ``/messages`` is appended."""
    api_key_env: str = "ANTHROPIC_API_KEY"
    """Name of the environment variable holding the API key (sent as ``x-api-key``);
    empty sends none, e.g. behind a gateway that adds it."""
    anthropic_version: str = "2023-06-01"
    """Value of the ``anthropic-version`` header."""
    default_max_tokens: Annotated[int, Field(ge=1)] = 1024
    """``max_tokens`` for chat jobs that do not set one (the Messages API requires it)."""


def _rates_at_most_one(rates: dict[int, float]) -> dict[int, float]:
    if sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"rates add up to {sum(rates.values()):g}, more than 1")
    return rates


# HTTP error status -> share of calls answered with it (mock and fake provider).
ErrorRates = Annotated[
    dict[Annotated[int, Field(ge=400, le=599)], Annotated[float, Field(ge=0, le=1)]],
    AfterValidator(_rates_at_most_one),
]


class MockProviderConfig(ConfigModel):
    """A fake provider for tests, demos and benchmarks: no network, tunable latency and failures."""

    type: Literal["mock"] = "mock"
    """Provider type; selects which settings below are allowed."""
    concurrency: Annotated[int, Field(ge=1)] = 64
    """Most calls one worker process runs against this provider at once."""
    latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Mean simulated latency per call, in milliseconds."""
    latency_jitter_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Uniform +/- jitter added to ``latency_ms``, in milliseconds."""
    rpm: Annotated[int, Field(ge=0)] = 0
    """Requests per minute it accepts before answering 429 with Retry-After (0: unlimited)."""
    tpm: Annotated[int, Field(ge=0)] = 0
    """Tokens per minute it accepts before answering 429 with Retry-After (0: unlimited)."""
    error_rates: ErrorRates = {}
    """Share of calls (0-1) answered with each HTTP error status, e.g. ``{503: 0.05, 429:
    0.01}``, classified like a real provider's answers; the rates add up to at most 1."""
    retry_after_s: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
    """Retry-After, in seconds, sent with injected errors; unset sends none."""
    token_delay_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Delay before each streamed token of a ``stream`` chat job, in milliseconds."""
    call_log: str = ""
    """File to append one JSON line per call to (job id, attempt, input), to see exactly
    which calls a provider got; empty disables it."""
    output: str = "echo"
    """Chat output: ``echo`` repeats the last user message; any other string is returned as-is."""
    embedding_dim: Annotated[int, Field(ge=1, le=4096)] = 8
    """Length of the vectors returned for embedding jobs."""
    limits: LimitsConfig = LimitsConfig()
    """Fleet-wide limits the workers keep to when calling this provider (unlike ``rpm``
    and ``tpm`` above, which make the mock itself refuse)."""
    circuit: CircuitConfig = CircuitConfig()
    """Fleet-wide circuit breaker of this provider."""
