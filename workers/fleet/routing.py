"""Which provider takes a route's job: overflow and failover across the route's targets.

Every provider pool pulls the lanes of every route it is a target of, but only
when it should take that work (``RouteGate``):

- the primary (first target) pulls while its circuit is closed and the fleet
  limiter has budget for it, and only as many jobs as it was granted;
- a later target pulls only while every target before it is unavailable: its
  circuit is open, or it is at its limit (rate, Retry-After pause, fleet
  concurrency). So overflow goes to the next target exactly when the one before
  is full, and failover follows the circuit within a limiter update (KV watch);
- a half-open circuit lets a pool pull one job per probe it claims, so traffic
  returns to a healed provider gradually (then through its limiter's budget).

Why not JetStream consumer priority groups (``priority_policy: prioritized``)?
They arbitrate between pulls that are already waiting, but whether a pool may pull
at all is the limiter's decision, made before the pull; with pulls gated by
budget, the server-side arbitration adds nothing, and it would need consumers
created through raw API calls that nats-py cannot re-apply. The gate is one
place that knows every target's rate, pause and circuit.

Once a job is pulled, ``TargetChooser`` confirms the pool's provider may run it
(the job's pins and exclusions, the circuit at that moment), or runs it on the
next allowed target this process serves, or hands it back to the queue.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass

from laneway.broker.config.model import LanewayConfig, RouteTarget
from laneway.broker.core.model import ChatInput, ClassificationInput, EmbeddingInput, JobInput, QueuedJob
from laneway.broker.core.topology import LaneConsumer
from laneway.workers.fleet.limiter import FleetLimiter
from laneway.workers.fleet.tier_shares import TierShares

__all__ = ["Admission", "Choice", "Grant", "RouteGate", "TargetChooser", "estimate_tokens"]

# A later target re-checks whether the targets before it filled up this often,
# besides being woken by every change of their state.
_OVERFLOW_POLL_S = 0.1
# A parked delivery waits this long at most for budget before going back to the queue.
_PARKED_WAIT_S = 2.0
# A target owing its tier's next starts to the others looks again this often.
_SHARE_RECHECK_S = 0.05


@dataclass(frozen=True, slots=True)
class Grant:
    """What a pulled job already holds: a budget slot of the pool's provider, a probe."""

    held: bool = False
    probe: str = ""


@dataclass(frozen=True, slots=True)
class Admission:
    """How many jobs a pool may pull from a lane now, or when to ask again."""

    granted: int
    retry_s: float = math.inf
    probe: str = ""


class RouteGate:
    """The pull gate of one provider's pool across the routes it serves."""

    def __init__(
        self, limiter: FleetLimiter, config: LanewayConfig, provider: str, shares: TierShares | None = None
    ) -> None:
        self._limiter = limiter
        self._config = config
        self.provider = provider
        self._shares = shares
        self._model = config.routes_of(provider)
        # The targets each route prefers to this provider: those of the tiers before its own.
        self._ahead: dict[str, tuple[RouteTarget, ...]] = {}
        for name in self._model:
            tiers = config.routes[name].tiers
            index = next(i for i, tier in enumerate(tiers) if any(x.provider == provider for x in tier))
            self._ahead[name] = tuple(x for tier in tiers[:index] for x in tier)

    @property
    def routes(self) -> list[str]:
        return list(self._model)

    def _available(self, target: RouteTarget) -> bool:
        return self._limiter.available(target.provider, target.model)

    def _weighted(self, route: str) -> TierShares | None:
        shares = self._shares
        return shares if shares is not None and shares.weighted(route, self.provider) else None

    def _all_open(self, route: str) -> bool:
        targets = self._config.routes[route].targets
        return all(self._limiter.phase(t.provider) == "open" for t in targets)

    def may_park(self, consumer: LaneConsumer) -> bool:
        """Whether a long-poll on this lane may take the next job that arrives. Later
        targets park only in failover (all before them open), since a parked pull
        cannot be withdrawn when the targets before it free up."""
        route = consumer.route
        lim = self._limiter
        phase = lim.phase(self.provider)
        if phase == "half_open":
            # The delivery claims its probe on arrival (TargetChooser).
            return lim.probe_free(self.provider)
        if phase != "closed":
            return False
        if lim.at_limit(self.provider, self._model[route]):
            return False
        shares = self._weighted(route)
        if shares is not None and shares.allowance(route, self.provider) < 1:
            return False  # the tier's other targets are owed its next starts
        return all(lim.phase(t.provider) == "open" for t in self._ahead[route])

    async def admit(self, consumer: LaneConsumer, want: int) -> Admission:
        route = consumer.route
        lim, model = self._limiter, self._model[route]
        phase = lim.phase(self.provider)
        if phase == "open":
            if self._config.routes[route].when_all_down == "fail" and self._all_open(route):
                # Pulled only to be failed fast by the runner (counted as starts, like any
                # held job, so that TargetChooser's give-back balances).
                if (shares := self._weighted(route)) is not None:
                    shares.started(route, self.provider, want)
                return Admission(want)
            return Admission(0, max(0.05, lim.reopens_in(self.provider)))
        if any(self._available(t) for t in self._ahead[route]):
            return Admission(0, _OVERFLOW_POLL_S)
        probe = ""
        # Probes go regardless of the tier's split: a healing provider is no live peer.
        shares = self._weighted(route) if phase == "closed" else None
        if phase == "half_open":
            probe = await lim.take_probe(self.provider)
            if not probe:
                return Admission(0, 0.5)
            want = 1
        elif shares is not None:
            allowed = shares.allowance(route, self.provider)
            if allowed < 1:
                # The others' starts (a state change) wake the puller; this is the fallback.
                return Admission(0, _SHARE_RECHECK_S)
            want = int(min(want, allowed))
        granted = await lim.grant(self.provider, model, want)
        if not granted:
            # Concurrency frees when a call ends (a state change wakes the puller).
            return Admission(0, lim.wait_s(self.provider, model) or 0.25)
        if shares is not None:
            shares.started(route, self.provider, granted)  # what the pull leaves unused is given back
        return Admission(granted, probe=probe)

    async def release(self, consumer: LaneConsumer, unused: int, probe: str = "") -> None:
        await self._limiter.refund(self.provider, self._model[consumer.route], unused)
        shares = self._weighted(consumer.route)
        if shares is not None and not probe:
            shares.started(consumer.route, self.provider, -unused)
        if probe:
            await self._limiter.drop_probe(self.provider, probe)


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a pulled job runs: ``provider`` (with its ``probe`` id, if one), or, when
    ``provider`` is empty, back to the queue after ``delay_s``; ``no_target`` when the
    route fails fast and every allowed target is down."""

    provider: str = ""
    probe: str = ""
    delay_s: float = 0.0
    no_target: bool = False


class TargetChooser:
    """Picks the target a pulled job runs on, taking budget for it."""

    def __init__(
        self,
        limiter: FleetLimiter,
        config: LanewayConfig,
        served: Iterable[str],
        shares: TierShares | None = None,
    ) -> None:
        self._limiter = limiter
        self._config = config
        self._served = set(served)  # providers with a pool in this process
        self._shares = shares

    async def choose(self, job: QueuedJob, pulled_by: str, grant: Grant) -> Choice:
        choice = await self._choose(job, pulled_by, grant)
        shares, route = self._shares, job.spec.route
        if shares is not None and (not grant.held or choice.provider != pulled_by):
            # The pull counted a held job as a start of its puller (RouteGate.admit):
            # move it where it runs, or give it back; a parked delivery counts now.
            if grant.held and not grant.probe:  # a probe's pull counted nothing
                shares.started(route, pulled_by, -1)
            if choice.provider:
                shares.started(route, choice.provider, 1)
        return choice

    async def _choose(self, job: QueuedJob, pulled_by: str, grant: Grant) -> Choice:
        lim = self._limiter
        route = self._config.routes[job.spec.route]
        models = {t.provider: t.model for t in route.targets}
        own_model = models[pulled_by]
        probe = grant.probe
        if not probe and lim.phase(pulled_by) == "half_open" and job.spec.allows(pulled_by):
            probe = await lim.take_probe(pulled_by)
        runnable = probe or lim.phase(pulled_by) == "closed"
        if (
            job.spec.allows(pulled_by)
            and runnable
            and (grant.held or await self._wait_for_budget(pulled_by, own_model))
        ):
            return Choice(pulled_by, probe)
        if probe:
            await lim.drop_probe(pulled_by, probe)
        if grant.held:
            await lim.refund(pulled_by, own_model, 1)
        for target in route.targets:
            name = target.provider
            if name == pulled_by or name not in self._served or not job.spec.allows(name):
                continue
            # Wait a moment for its next slot rather than hand the job back: handed back,
            # it would come straight back to this pool while the job's target is full.
            if lim.phase(name) == "closed" and await self._wait_for_budget(name, target.model):
                return Choice(name)
        allowed = [t.provider for t in route.targets if job.spec.allows(t.provider)]
        if all(lim.phase(name) == "open" for name in allowed):
            if route.when_all_down == "fail":
                return Choice(no_target=True)
            return Choice(delay_s=max(0.5, min(lim.reopens_in(name) for name in allowed)))
        return Choice(delay_s=0.25)

    async def _wait_for_budget(self, provider: str, model: str) -> bool:
        """Wait a little for a budget slot (a parked delivery, or a job this pool may not run)."""
        lim = self._limiter
        # Book the next slot, so this job goes before anyone who asks later.
        booked = await lim.reserve(provider, model, _PARKED_WAIT_S)
        if booked is not None:
            if booked > 0:
                # Until the booked slot, not synchronisation. A slot free now costs no
                # sleep(0): yielding would let the pull loop's sweep run before this job.
                await asyncio.sleep(booked)
            return True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _PARKED_WAIT_S
        while True:
            if await lim.grant(provider, model, 1):
                return True
            wait = min(lim.wait_s(provider, model) or 0.05, give_up - loop.time())
            if wait <= 0:
                return False
            await asyncio.sleep(wait)  # until the budget's next slot, not synchronisation


def estimate_tokens(job_input: JobInput, default_max_tokens: int = 256) -> int:
    """Tokens a call will use, reserved before it is sent: characters / 4 for the
    prompt (a common rule of thumb for English) plus the output allowance."""
    if isinstance(job_input, ChatInput):
        prompt = sum(len(m.content) for m in job_input.messages)
        return prompt // 4 + 1 + (job_input.params.max_tokens or default_max_tokens)
    if isinstance(job_input, EmbeddingInput):
        return sum(len(text) for text in job_input.texts) // 4 + 1
    assert isinstance(job_input, ClassificationInput)
    return len(job_input.text) // 4 + 16 * len(job_input.labels) + 16
