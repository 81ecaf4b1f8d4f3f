"""What every provider type's config block is built from.

A provider type's own config model (next to its factory: ``laneway.workers.providers.openai``,
``laneway.workers.fakes.mock``, a plugin's module) subclasses ``ProviderConfigBase`` and
adds its settings; ``laneway.broker.config.provider_types`` finds the installed types.
The blocks shared by every type live here: limits, the circuit breaker, error rates.

API keys are never part of the config: a block names the environment variable
that holds its key (``api_key_env``), read when the provider is built, so a key
cannot leak through a config dump, a repr or the JSON schema.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "CircuitConfig",
    "ConfigModel",
    "ErrorRates",
    "LimitsConfig",
    "ModelLimits",
    "ProviderConfigBase",
]

_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Cost = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class ConfigModel(BaseModel):
    """Base of every config model: unknown keys are errors, field docstrings become
    the JSON schema's descriptions."""

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
    max_open_s: _Seconds = 20.0
    """Cap on how long the circuit stays open between probes (so a provider back from a
    long outage gets its traffic back within about this long)."""
    probes: Annotated[int, Field(ge=1)] = 3
    """Probe calls (at most this many in flight, fleet-wide) that must all succeed to
    close the circuit again; traffic then returns gradually, through the limiter."""


def _rates_at_most_one(rates: dict[int, float]) -> dict[int, float]:
    if sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"rates add up to {sum(rates.values()):g}, more than 1")
    return rates


# HTTP error status -> share of calls answered with it (mock and fake provider).
ErrorRates = Annotated[
    dict[Annotated[int, Field(ge=400, le=599)], Annotated[float, Field(ge=0, le=1)]],
    AfterValidator(_rates_at_most_one),
]


class ProviderConfigBase(ConfigModel):
    """What every provider type's config block has; the rest is the type's own.

    A subclass narrows ``type`` to ``Literal["<its name>"]`` with that default, which
    is how a provider block selects its type."""

    type: str
    """Provider type; selects which settings below are allowed."""
    concurrency: Annotated[int, Field(ge=1)] = 16
    """Most calls one worker process runs against this provider at once."""
    limits: LimitsConfig = LimitsConfig()
    """Fleet-wide rate and concurrency limits of this provider (adaptive: cut on 429s,
    Retry-After honoured by every worker, rate-limit headers heeded)."""
    circuit: CircuitConfig = CircuitConfig()
    """Fleet-wide circuit breaker of this provider."""
