"""A route's config: the provider/model targets a route name maps to, in order and
in weighted tiers, and its retry and batching overrides (part of
``laneway.broker.config.model``'s file)."""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from pydantic import Field, field_validator

from laneway.broker.config.providers import ConfigModel

__all__ = ["BatchConfig", "RouteConfig", "RouteTarget", "group_tiers"]


class RouteTarget(ConfigModel):
    """One provider/model pair a route can send jobs to."""

    provider: Annotated[str, Field(min_length=1)]
    """Name of a provider under ``providers``."""
    model: Annotated[str, Field(min_length=1)]
    """Model name passed to the provider, e.g. ``mock-chat``."""
    tier: Annotated[int | None, Field(ge=0)] = None
    """Targets listed together with the same ``tier`` share the route's work by
    ``weight``; a later tier takes overflow and failover from the earlier ones, as a
    later target does. Tiers go up along the list. Unset: a tier of its own."""
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    """This target's share of its tier's job starts, against the weights of the tier's
    other targets (e.g. 3 and 1: three quarters and one quarter). A target at its
    limit, with its circuit open or with no worker running gives its share to the
    others. Only meaningful in a tier of several targets."""


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
    circuit open (failover). Targets sharing a ``tier`` split its work by ``weight``.
    Each provider may appear once per route."""
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
    def _check_targets(cls, value: tuple[RouteTarget, ...]) -> tuple[RouteTarget, ...]:
        # Routing and job pins name targets by provider, so one provider per route.
        seen: set[str] = set()
        for target in value:
            if target.provider in seen:
                raise ValueError(f"provider '{target.provider}' is listed twice; list each provider once")
            seen.add(target.provider)
        tiers = group_tiers(value)
        labels = [tier[0].tier for tier in tiers if tier[0].tier is not None]
        for before, after in itertools.pairwise(labels):
            if after == before:
                raise ValueError(f"the targets of tier {after} must be listed next to each other")
            if after < before:
                raise ValueError(f"tiers go up along the list: tier {after} is listed after tier {before}")
        for tier in tiers:
            if len(tier) == 1 and tier[0].weight != 1:
                raise ValueError(
                    f"target '{tier[0].provider}' has a weight but no tier shared with another"
                    " target; weights split a tier's work (give the targets one `tier`)"
                )
        return value

    @property
    def tiers(self) -> tuple[tuple[RouteTarget, ...], ...]:
        """The targets grouped into tiers, in preference order."""
        return group_tiers(self.targets)

    @property
    def weighted_tiers(self) -> tuple[tuple[int, tuple[RouteTarget, ...]], ...]:
        """The tiers of several targets (those that split work by weight), with their
        ``tier`` number."""
        return tuple(
            (tier[0].tier, tier) for tier in self.tiers if len(tier) > 1 and tier[0].tier is not None
        )


def group_tiers(targets: tuple[RouteTarget, ...]) -> tuple[tuple[RouteTarget, ...], ...]:
    """Consecutive targets with the same (set) ``tier`` form one tier; any other target
    is a tier of its own."""
    groups: list[list[RouteTarget]] = []
    for target in targets:
        if groups and target.tier is not None and groups[-1][0].tier == target.tier:
            groups[-1].append(target)
        else:
            groups.append([target])
    return tuple(tuple(group) for group in groups)
