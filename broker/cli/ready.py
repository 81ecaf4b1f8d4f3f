"""How ``laneway up`` learns that a child process is serving, or why it is not.

``up`` starts each broker and worker with the write end of a pipe, named by
``LANEWAY_READY_FD``. The child writes ``ready`` once it serves, or its start-up error,
and closes it; a child that dies first closes it by exiting. So ``up`` waits on one
read with no polling, announces the stack only once every part serves, and names the
part that failed and why (the child's own stderr stays on the terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field

from laneway.broker.core.errors import TopologyError

__all__ = [
    "READY",
    "READY_FD_ENV",
    "Child",
    "report",
    "spawn",
    "stop_children",
    "stop_on_signals",
    "until_one_exits",
]

READY_FD_ENV = "LANEWAY_READY_FD"
READY = "ready"


def report(message: str) -> None:
    """Child side: tell ``laneway up`` (when it started us) ``READY`` or the start-up
    error; only the first report counts."""
    fd = os.environ.pop(READY_FD_ENV, "")
    if not fd.isdigit():
        return
    with contextlib.suppress(OSError):
        os.write(int(fd), message.encode(errors="replace")[:4000])  # below PIPE_BUF: one write
        os.close(int(fd))


@dataclass
class Child:
    """A process ``laneway up`` started and what it reported."""

    name: str
    proc: asyncio.subprocess.Process
    _ready_fd: int | None = field(default=None, repr=False)

    async def wait_ready(self, timeout: float) -> None:
        """Return once the child reports it serves; raise naming it and its error if it
        fails, exits or stays silent for ``timeout`` seconds."""
        fd, self._ready_fd = self._ready_fd, None
        if fd is None:
            return
        try:
            message = await asyncio.wait_for(_read_to_eof(fd), timeout)
        except TimeoutError:
            raise TopologyError(f"{self.name} did not start within {timeout:.0f}s") from None
        if message == READY:
            return
        try:
            status = await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            status = None  # it reported an error but hangs on: it is stopped with the rest
        how = f"exited with status {status}" if status is not None else "failed"
        raise TopologyError(f"{self.name} {how} during start-up: {message.strip() or 'see its output above'}")


async def _read_to_eof(fd: int) -> str:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return (await reader.read()).decode(errors="replace")
    finally:
        transport.close()


async def spawn(
    name: str, args: list[str], *, env: dict[str, str], ready_pipe: bool = True, quiet: bool = False
) -> Child:
    """Start ``laneway ARGS`` as ``name``; with ``ready_pipe``, it reports its start-up."""
    base = [sys.executable, "-m", "laneway.broker.cli"]
    stdout = asyncio.subprocess.DEVNULL if quiet else None
    if not ready_pipe:
        proc = await asyncio.create_subprocess_exec(*base, *args, env=env, stdout=stdout)
        return Child(name, proc)
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *base, *args, env={**env, READY_FD_ENV: str(write_fd)}, pass_fds=(write_fd,), stdout=stdout
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds its copy: its exit alone must end our read
    return Child(name, proc, read_fd)


def stop_on_signals() -> asyncio.Event:
    """An event SIGINT or SIGTERM sets (instead of raising KeyboardInterrupt)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_one_exits(children: list[Child], stop: asyncio.Event) -> None:
    """Wait for ``stop``; a child that exits first with an error fails the stack, by
    name. One that exits with 0 was stopped (Ctrl-C on a terminal reaches the whole
    process group, so a child may see it first): the stack stops without an error."""
    waits = {asyncio.create_task(c.proc.wait()): c for c in children}
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        child = waits.get(next(iter(done)))
        if stopper not in done and child is not None and child.proc.returncode != 0:
            raise TopologyError(
                f"{child.name} exited with status {child.proc.returncode}; the stack was stopped"
            )
    finally:
        for task in [stopper, *waits]:
            task.cancel()
        await asyncio.gather(stopper, *waits, return_exceptions=True)


async def stop_children(children: list[Child], timeout: float) -> None:
    """SIGTERM every child, then SIGKILL those still running after ``timeout`` seconds."""
    for child in children:
        if child._ready_fd is not None:  # never waited on (start-up failed before it)
            os.close(child._ready_fd)
            child._ready_fd = None
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    for child in children:
        try:
            await asyncio.wait_for(child.proc.wait(), timeout)
        except TimeoutError:
            child.proc.kill()
            await child.proc.wait()
