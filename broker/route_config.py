"""A route's config: the provider/model targets a route name maps to, in order,
and its retry and batching overrides (part of ``broker.config``'s file)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from broker.provider_config import ConfigModel

__all__ = ["BatchConfig", "RouteConfig", "RouteTarget"]


class RouteTarget(ConfigModel):
    """One provider/model pair a route can send jobs to."""

    provider: Annotated[str, Field(min_length=1)]
    """Name of a provider under ``providers``."""
    model: Annotated[str, Field(min_length=1)]
    """Model name passed to the provider, e.g. ``mock-chat``."""
    weight: Annotated[int, Field(ge=1)] = 1
    """Reserved for weighted spreading between targets, which is not built: only 1 is
    accepted, so a config that relies on weights fails to load rather than being
    silently used in order."""

    @field_validator("weight")
    @classmethod
    def _check_weight(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                "weighted spreading is not supported yet: targets are used in the order"
                " listed (the first is primary, the next take overflow and failover);"
                " remove 'weight' or set it to 1"
            )
        return value


class BatchConfig(ConfigModel):
    """Gathering embedding and classification jobs of one route into one provider call."""

    max_items: Annotated[int, Field(ge=1, le=2048)] = 32
    """Most inputs (texts to embed, texts to classify) per provider call; 1 turns
    batching off."""
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)] = 2.0
    """Longest, in milliseconds, a job waits for others to share its call (a full
    batch goes at once)."""


class RouteConfig(ConfigModel):
    """A name clients submit jobs to, mapped to provider/model targets."""

    targets: Annotated[tuple[RouteTarget, ...], Field(min_length=1)]
    """Targets in preference order; the first is the primary. A target takes the
    route's jobs while every target before it is at its limit (overflow) or has its
    circuit open (failover). Each provider may appear once per route."""
    when_all_down: Literal["wait", "fail"] = "wait"
    """When every target a job may use has its circuit open: ``wait`` keeps jobs queued
    (until their deadline) for the first provider to recover; ``fail`` dead-letters
    queued jobs with ``no_healthy_target`` and refuses new ones with UNAVAILABLE."""
    max_attempts: Annotated[int | None, Field(ge=1)] = None
    """Attempts per job on this route; unset uses ``workers.max_attempts``."""
    retry_backoff_s: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    """First retry delay on this route; unset uses ``workers.retry_backoff_s``."""
    retry_backoff_max_s: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    """Retry delay cap on this route; unset uses ``workers.retry_backoff_max_s``."""
    batch: BatchConfig | None = None
    """Batching of this route's embedding jobs; unset uses the top-level ``batch``."""

    @field_validator("targets")
    @classmethod
    def _check_unique_providers(cls, value: tuple[RouteTarget, ...]) -> tuple[RouteTarget, ...]:
        # Routing and job pins name targets by provider, so one provider per route.
        seen: set[str] = set()
        for target in value:
            if target.provider in seen:
                raise ValueError(f"provider '{target.provider}' is listed twice; list each provider once")
            seen.add(target.provider)
        return value
