"""The metrics a worker process records: jobs it ran, provider answers, the fleet
limiter and circuit breaker as this process sees them.

Names follow Prometheus conventions and, where one exists, the OpenTelemetry GenAI
semantic conventions (``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration``,
``gen_ai.client.operation.time_to_first_chunk``), translated to Prometheus naming.
Labels are bounded: route, lane, provider, model, state, error class, status class;
never job ids, callers or metadata.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge

from laneway.broker.core.model import ErrorClass, JobError, JobEvent, JobState, TokenUsage
from laneway.broker.observability.metrics_core import FastCounter, FastHistogram

__all__ = [
    "CIRCUIT_PHASES",
    "WorkerMetrics",
    "error_class_label",
    "provider_prices",
    "status_class",
]

# Seconds: from milliseconds (a fast mock) to the ten minutes a long generation may take.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Queue waits can be much longer (delayed retries, busy lanes).
_WAIT_BUCKETS = (*_DURATION_BUCKETS, 1800, 3600)
# Tokens per call, powers of 4 as the OpenTelemetry GenAI conventions recommend.
_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))
# Retry-After values providers send: a second or two up to the minutes of a quota window.
_RETRY_AFTER_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 900, 3600)

#: Circuit phases and the value ``laneway_provider_circuit_state`` takes for each.
CIRCUIT_PHASES: Mapping[str, int] = {"closed": 0, "half_open": 1, "open": 2}

Prices = Mapping[str, tuple[float, float]]


def error_class_label(error: JobError) -> str:
    """``transient``, ``rate_limited`` or ``permanent``."""
    return ErrorClass(error.error_class).name.lower()


def status_class(status: int) -> str:
    """An HTTP status as a bounded label: ``2xx``, ``4xx``, ``429``, ``5xx`` or ``none``
    (no answer: connection failure, timeout)."""
    if status == 429:
        return "429"
    if 200 <= status < 600:
        return f"{status // 100}xx"
    return "none"


def provider_prices(providers: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """(input, output) price per 1000 tokens of each provider config that has one
    (the HTTP types' ``cost_per_1k_*``), for ``WorkerMetrics(prices=...)``."""
    prices: dict[str, tuple[float, float]] = {}
    for name, cfg in providers.items():
        per_in = float(getattr(cfg, "cost_per_1k_input_tokens", 0.0) or 0.0)
        per_out = float(getattr(cfg, "cost_per_1k_output_tokens", 0.0) or 0.0)
        if per_in or per_out:
            prices[name] = (per_in, per_out)
    return prices


class WorkerMetrics:
    """What a worker process measures: jobs it ran and every provider answer.

    ``prices`` maps a provider to its (input, output) price per 1000 tokens; calls of
    providers without one cost 0. Limiter and circuit figures are fleet-wide state seen
    by this process: every worker reports the same values, so dashboards take ``max``.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, prices: Prices | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._prices = dict(prices or {})
        self._phases: dict[str, str] = {}
        r = self.registry
        self.jobs_finished = FastCounter(
            "laneway_jobs_finished",
            "Jobs a worker brought to a final state (succeeded, dead_lettered, expired, ...).",
            ["route", "lane", "state"],
            registry=r,
        )
        self.job_retries = FastCounter(
            "laneway_job_retries",
            "Failed attempts that were scheduled for a retry, by the failure's error class.",
            ["route", "error_class"],
            registry=r,
        )
        self.dead_lettered = FastCounter(
            "laneway_dead_lettered",
            "Jobs a worker dead-lettered, by the last failure's error class (the DLQ's growth).",
            ["route", "error_class"],
            registry=r,
        )
        self.job_wait = FastHistogram(
            "laneway_job_wait_seconds",
            "Seconds from a job's enqueueing to its first RUNNING event.",
            ["route", "lane"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.job_processing = FastHistogram(
            "laneway_job_processing_seconds",
            "Seconds from a job's first RUNNING event to its final one (retries included).",
            ["route", "lane"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.job_end_to_end = FastHistogram(
            "laneway_job_end_to_end_seconds",
            "Seconds from a job's enqueueing to its final event, whatever the final state.",
            ["route", "lane"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.provider_calls = FastCounter(
            "laneway_provider_calls",
            "Provider calls by the answer's status class (2xx, 4xx, 429, 5xx; none: no answer).",
            ["provider", "model", "status_class"],
            registry=r,
        )
        self.provider_errors = FastCounter(
            "laneway_provider_errors",
            "Failed provider calls by error class (transient, rate_limited, permanent).",
            ["provider", "error_class"],
            registry=r,
        )
        self.operation_duration = FastHistogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration: seconds from sending a provider request to its answer.",
            ["provider", "model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_chunk = FastHistogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Seconds from sending a streamed provider request to its first chunk (time to first token).",
            ["provider", "model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.token_usage = FastHistogram(
            "gen_ai_client_token_usage",
            "Tokens used per provider call, by gen_ai_token_type (input or output).",
            ["provider", "model", "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.cost = FastCounter(
            "laneway_provider_cost",
            "Estimated cost of provider calls from their token usage and the config's prices "
            "(cost_per_1k_*_tokens, in the config's currency); 0 for providers without prices.",
            ["provider", "model"],
            registry=r,
        )
        self.rate_limit_remaining = Gauge(
            "laneway_provider_rate_limit_remaining",
            "Requests or tokens left in the provider's rate-limit window, from its last answer's headers.",
            ["provider", "kind"],
            registry=r,
        )
        self.rate_limited_answers = FastCounter(
            "laneway_provider_rate_limited",
            "Provider answers refusing for load (429, 503/529 overloaded) that the limiter acted on.",
            ["provider"],
            registry=r,
        )
        self.retry_after = FastHistogram(
            "laneway_provider_retry_after_seconds",
            "Retry-After of the provider's rate-limited answers, when they carried one.",
            ["provider"],
            buckets=_RETRY_AFTER_BUCKETS,
            registry=r,
        )
        self.limiter_rate = Gauge(
            "laneway_provider_limiter_rate_rpm",
            "Requests per minute the fleet limiter allows now (adaptive: cut on 429s, then recovering); "
            'model "" is the provider-wide limit.',
            ["provider", "model"],
            registry=r,
        )
        self.limiter_budget = Gauge(
            "laneway_provider_limiter_budget",
            "Requests the fleet limiter would let through right now (its bucket); "
            'model "" is the provider-wide limit.',
            ["provider", "model"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "laneway_provider_circuit_state",
            "The provider's fleet-wide circuit breaker: 0 closed, 1 half-open (probing), 2 open.",
            ["provider"],
            registry=r,
        )
        self.circuit_opens = FastCounter(
            "laneway_provider_circuit_opens",
            "Times this process saw the provider's circuit enter the open phase "
            "(from closed, or a failed probe).",
            ["provider"],
            registry=r,
        )

    def job_started(self, event: JobEvent) -> None:
        """A job's first RUNNING event (not a retry's)."""
        if event.started_at is not None:
            wait = (event.started_at - event.enqueued_at).total_seconds()
            self.job_wait.labels(event.route, event.lane).observe(max(wait, 0.0))

    def job_event(self, event: JobEvent) -> None:
        """An event this worker appended: counts finals and retries."""
        if event.state.is_final:
            self.jobs_finished.labels(event.route, event.lane, event.state.name.lower()).inc()
            finished = event.finished_at or event.time
            if event.started_at is not None:
                took = (finished - event.started_at).total_seconds()
                self.job_processing.labels(event.route, event.lane).observe(max(took, 0.0))
            # Clocks of the broker (enqueued_at) and the worker may differ slightly: never negative.
            total = (finished - event.enqueued_at).total_seconds()
            self.job_end_to_end.labels(event.route, event.lane).observe(max(total, 0.0))
            if event.state is JobState.DEAD_LETTERED:
                cls = error_class_label(event.error) if event.error is not None else "none"
                self.dead_lettered.labels(event.route, cls).inc()
        elif event.state is JobState.RETRYING and event.error is not None:
            self.job_retries.labels(event.route, error_class_label(event.error)).inc()

    def provider_answer(
        self, provider: str, model: str, status: int, latency_s: float, usage: TokenUsage | None
    ) -> None:
        """One answer (or the lack of one, ``status`` 0) from a provider."""
        self.provider_calls.labels(provider, model, status_class(status)).inc()
        if status:
            self.operation_duration.labels(provider, model).observe(latency_s)
        if usage is not None:
            self.token_usage.labels(provider, model, "input").observe(usage.input_tokens)
            self.token_usage.labels(provider, model, "output").observe(usage.output_tokens)
            per_in, per_out = self._prices.get(provider, (0.0, 0.0))
            cost = (usage.input_tokens * per_in + usage.output_tokens * per_out) / 1000.0
            self.cost.labels(provider, model).inc(cost)

    def first_token(self, provider: str, model: str, seconds: float) -> None:
        """A streamed call's first chunk arrived ``seconds`` after its request was sent."""
        self.time_to_first_chunk.labels(provider, model).observe(max(seconds, 0.0))

    def rate_limits(self, provider: str, requests: int | None, tokens: int | None) -> None:
        if requests is not None:
            self.rate_limit_remaining.labels(provider, "requests").set(requests)
        if tokens is not None:
            self.rate_limit_remaining.labels(provider, "tokens").set(tokens)

    def provider_error(self, provider: str, error: JobError) -> None:
        self.provider_errors.labels(provider, error_class_label(error)).inc()

    def rate_limited(self, provider: str, retry_after_s: float | None) -> None:
        """A 429 or overload answer the limiter acted on, with its Retry-After if any."""
        self.rate_limited_answers.labels(provider).inc()
        if retry_after_s is not None and math.isfinite(retry_after_s) and retry_after_s >= 0:
            self.retry_after.labels(provider).observe(retry_after_s)

    def limiter(self, provider: str, model: str, rpm: float, budget: float) -> None:
        """The fleet limiter's current rate and budget for ``provider`` (``model`` "":
        provider-wide). Unbounded figures (no limit configured) are not exported."""
        if math.isfinite(rpm):
            self.limiter_rate.labels(provider, model).set(rpm)
        if math.isfinite(budget):
            self.limiter_budget.labels(provider, model).set(budget)

    def circuit(self, provider: str, phase: str) -> None:
        """The provider's circuit phase: ``closed``, ``half_open`` or ``open``."""
        value = CIRCUIT_PHASES.get(phase)
        if value is None:
            raise ValueError(f"unknown circuit phase {phase!r}; expected one of {sorted(CIRCUIT_PHASES)}")
        self.circuit_state.labels(provider).set(value)
        previous = self._phases.get(provider)
        self._phases[provider] = phase
        if phase == "open" and previous != "open":
            self.circuit_opens.labels(provider).inc()
