"""Worker processes of one provider pool: started, stopped newest first, restarted.

The supervisor does not know how a worker is started: the CLI passes ``start`` (built
on the child-process helpers ``laneway up`` uses), so this layer does not import the
CLI above it. Scale-down is a SIGTERM: the worker stops pulling, finishes its calls
within ``workers.shutdown_grace_s`` and hands the rest back to the queue; a worker
still running after the grace and a margin is killed (JetStream redelivers its jobs).
A stopping worker no longer counts, and it is waited for in the background: the
autoscaler's next step (a scale-up, say) does not wait for its grace to run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from types import TracebackType

import structlog

__all__ = ["PoolSupervisor", "StartWorker"]

log = structlog.get_logger("laneway.autoscale")

StartWorker = Callable[[str, int], Awaitable[asyncio.subprocess.Process]]
"""Start worker number N of a provider's pool; return as soon as the process exists
(not once it serves: it is tracked from then on, so nothing it does can orphan it,
and a worker still starting counts, so a slow start does not start another)."""


class PoolSupervisor:
    """``async with PoolSupervisor(...)``: the pool's children; all stopped on exit."""

    def __init__(self, provider: str, start: StartWorker, *, stop_timeout_s: float) -> None:
        self.provider = provider
        self._start = start
        self._stop_timeout_s = stop_timeout_s
        self._children: list[asyncio.subprocess.Process] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._started = 0
        self._lock = asyncio.Lock()

    @property
    def count(self) -> int:
        """Children running and not stopping (a crashed one is no longer counted)."""
        return sum(p.returncode is None for p in self._children)

    @property
    def stopping(self) -> int:
        """Children sent SIGTERM that have not exited yet."""
        return len(self._stopping)

    async def __aenter__(self) -> PoolSupervisor:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every child and wait until each has exited."""
        await self.scale_to(0)
        # Every stop runs to its end (each kills its worker after the timeout): no
        # worker outlives the supervisor, and no stop task is left behind.
        await asyncio.gather(*self._stopping, return_exceptions=True)

    async def scale_to(self, desired: int) -> None:
        """Start or stop children until ``desired`` run; a crashed child is replaced."""
        async with self._lock:
            crashed = [p for p in self._children if p.returncode not in (None, 0)]
            for proc in crashed:
                log.warning("worker exited", provider=self.provider, pid=proc.pid, status=proc.returncode)
            # Only here, under the lock, is the list replaced: a reader of ``count`` while
            # a start is awaited must not swap it from under the append below.
            self._children = [p for p in self._children if p.returncode is None]
            while self.count < desired:
                self._started += 1
                proc = await self._start(self.provider, self._started)
                self._children.append(proc)
            while self.count > desired:
                # Newest first: the oldest hold warm connections.
                self._children = [p for p in self._children if p.returncode is None]
                newest = self._children.pop()
                with contextlib.suppress(ProcessLookupError):
                    newest.send_signal(signal.SIGTERM)
                task = asyncio.create_task(self._reap(newest), name=f"laneway-autoscale-stop-{newest.pid}")
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        """Wait for a worker sent SIGTERM; kill it once the timeout is over."""
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), self._stop_timeout_s)
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # cut short (the autoscaler itself is cancelled): no orphan worker
            raise
        except TimeoutError:
            log.warning("worker did not stop in time; killed", provider=self.provider, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
