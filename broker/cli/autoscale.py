"""``laneway autoscale``: the autoscaler as a process that starts its own workers.

Here, in the CLI layer, because it starts ``laneway worker`` children with the
helpers ``laneway up`` uses (``ready.spawn``); the scaling itself is
``laneway.broker.autoscale``. ``laneway up --workers auto`` runs this as a child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from types import TracebackType

from nats.aio.client import Client as NatsClient

from laneway.broker.autoscale.scaler import Autoscaler
from laneway.broker.cli.nats_flags import NatsFlags
from laneway.broker.cli.ready import READY_FD_ENV, spawn
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.nats.connection import connect_nats

__all__ = ["AutoscaleProcess"]


class AutoscaleProcess:
    """``async with AutoscaleProcess(...)``: scales the pools until exit, then stops
    every worker it started."""

    def __init__(
        self,
        config: LanewayConfig,
        *,
        nats_url: str,
        config_path: Path | None,
        nats_flags: NatsFlags | None = None,
    ) -> None:
        self._config = config
        self._nats_url = nats_url
        flags = nats_flags or NatsFlags()
        # As `laneway up` does: the URL and secrets in the environment, not on `ps`.
        self._env = {**os.environ, **flags.child_env(), "NATS_URL": nats_url}
        # Our own start-up pipe to `laneway up` is not the workers' to report on.
        ready_fd = self._env.pop(READY_FD_ENV, "")
        if ready_fd.isdigit():
            # Nor to hold: `up` reads it to its end, which never comes while a worker
            # (started before we report) keeps a copy. uvloop's spawn keeps every
            # inheritable descriptor, and `up` handed us this one inheritable.
            with contextlib.suppress(OSError):
                os.set_inheritable(int(ready_fd), False)
        self._args = [*(["--config", str(config_path)] if config_path else []), *flags.child_args()]
        self._nc: NatsClient | None = None
        self._scaler: Autoscaler | None = None

    async def _start(self, provider: str, n: int) -> asyncio.subprocess.Process:
        args = ["worker", *self._args, "--provider", provider]
        child = await spawn(f"{provider} worker {n}", args, env=self._env, ready_pipe=False)
        return child.proc

    async def __aenter__(self) -> AutoscaleProcess:
        self._nc = await connect_nats(
            self._nats_url,
            name="laneway-autoscale",
            connect_timeout=self._config.nats.connect_timeout_s,
            auth=self._config.nats.credentials.auth(),
        )
        try:
            self._scaler = await Autoscaler(self._config, self._nc, self._start).__aenter__()
        except BaseException:
            await self._nc.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._scaler is not None:
                await self._scaler.__aexit__(exc_type, exc, tb)
        finally:
            if self._nc is not None:
                await self._nc.close()
