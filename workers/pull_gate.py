"""What a puller asks before each pull: how many jobs of a lane it may take now,
and whether it may leave a pull waiting on the lane (``laneway.workers.fleet.routing.RouteGate``
is the real one; ``OpenGate`` lets everything through)."""

from __future__ import annotations

from typing import Protocol

from laneway.broker.core.topology import LaneConsumer
from laneway.workers.fleet.routing import Admission

__all__ = ["Gate", "OpenGate"]


class Gate(Protocol):
    """Decides how many jobs of a lane may be pulled now (``laneway.workers.fleet.routing.RouteGate``)."""

    async def admit(self, consumer: LaneConsumer, want: int) -> Admission: ...

    async def release(self, consumer: LaneConsumer, unused: int, probe: str = "") -> None: ...

    def may_park(self, consumer: LaneConsumer) -> bool: ...


class OpenGate:
    """No gate: every lane may always be pulled."""

    async def admit(self, consumer: LaneConsumer, want: int) -> Admission:
        return Admission(want)

    async def release(self, consumer: LaneConsumer, unused: int, probe: str = "") -> None:
        return None

    def may_park(self, consumer: LaneConsumer) -> bool:
        return True
