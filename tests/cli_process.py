"""Running the ``laneway`` command as a child process, for the tests that check what
it prints and how it exits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

__all__ = ["Ran", "run_laneway"]

ROOT = Path(__file__).resolve().parent.parent


class Ran(NamedTuple):
    code: int
    out: str
    err: str
    seconds: float


async def run_laneway(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    stdin: bytes | None = None,
    drop: tuple[str, ...] = (),
) -> Ran:
    """Run ``laneway ARGS`` (environment: this one's without ``drop``, updated with
    ``env``; ``stdin`` fed to it); killed with its children if it outlives ``timeout``."""
    started = time.monotonic()
    base = {k: v for k, v in os.environ.items() if k not in drop}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", *args,
        cwd=ROOT, env={**base, **(env or {})},
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode(), time.monotonic() - started)
