"""Third-party provider types: a package that declares a ``laneway.providers`` entry
point is picked up by the config and the workers like a built-in type.

The package here is the least a plugin can be: one module and a ``.dist-info`` with
an ``entry_points.txt``, put on ``PYTHONPATH`` of the processes under test (the
registry is loaded once per process, so each case runs in fresh processes).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from laneway.broker.cli.natsd import free_port

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A provider type that answers every chat in capitals, with a configurable suffix."""

from typing import Literal

from laneway.broker.config.provider_types import ProviderType
from laneway.broker.config.providers import ProviderConfigBase
from laneway.broker.core.model import ChatOutput, ErrorClass, JobError, TokenUsage
from laneway.workers.providers.base import ProviderError


class ShoutConfig(ProviderConfigBase):
    type: Literal["shout"] = "shout"
    suffix: str = "!"
    """Appended to every answer."""


class ShoutProvider:
    def __init__(self, name, config):
        self.name = name
        self.config = config

    async def chat(self, model, request, ctx):
        text = request.messages[-1].content.upper() + self.config.suffix
        return ChatOutput(text, "stop", TokenUsage(1, 1))

    async def chat_stream(self, model, request, ctx):
        output = await self.chat(model, request, ctx)
        yield output.text
        yield output

    async def embed(self, model, request, ctx):
        raise ProviderError(JobError("unsupported", "cannot embed", ErrorClass.PERMANENT))

    async def classify(self, model, request, ctx):
        raise ProviderError(JobError("unsupported", "cannot classify", ErrorClass.PERMANENT))

    async def aclose(self):
        pass


PROVIDER_TYPE = ProviderType("shout", ShoutConfig, ShoutProvider)
'''

CONFIG = """\
providers:
  loud:
    type: shout
    suffix: "!!"
routes:
  chat:
    targets: [{provider: loud, model: any}]
"""


def install_plugin(site: Path, module: str = PLUGIN) -> dict[str, str]:
    """Write the plugin package into ``site``; the environment that puts it on the path."""
    (site / "shout_laneway.py").write_text(module)
    dist = site / "shout_laneway-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-laneway\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[laneway.providers]\nshout = shout_laneway:PROVIDER_TYPE\n")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }


async def laneway(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_plugin_type_runs_a_job_through_laneway_up(tmp_path: Path, nats_server) -> None:
    env = install_plugin(tmp_path)
    config = tmp_path / "laneway.yaml"
    config.write_text(CONFIG)
    addr = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "up", "--config", str(config), "--grpc-addr", addr,
        "--metrics-port", "0", "--nats-url", nats_server.url,
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C stops everything."), 60)
        code, out, err = await laneway(
            "submit", "--route", "chat", "--text", "hello", "--wait", "--addr", addr, env=env
        )
        assert code == 0, err
        assert out.strip().endswith("SUCCEEDED attempt=1 provider=loud text='HELLO!!'")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_plugin_type_validates_its_own_settings(tmp_path: Path) -> None:
    env = install_plugin(tmp_path)
    config = tmp_path / "laneway.yaml"
    config.write_text(CONFIG.replace("suffix:", "sufix:"))
    code, _, err = await laneway("config", "check", str(config), env=env)
    assert code == 1
    assert f"{config}:4: providers.loud.sufix: unknown key 'sufix' (did you mean 'suffix'?)" in err


async def test_the_schema_documents_plugin_types(tmp_path: Path) -> None:
    code, out, _ = await laneway("config", "schema", env=install_plugin(tmp_path))
    assert code == 0
    assert '"ShoutConfig"' in out and "Appended to every answer." in out


async def test_without_the_plugin_the_type_is_unknown(tmp_path: Path) -> None:
    config = tmp_path / "laneway.yaml"
    config.write_text(CONFIG)
    code, _, err = await laneway("config", "check", str(config), env=dict(os.environ))
    assert code == 1
    assert (
        f"{config}:3: providers.loud.type: unknown type 'shout'; known: 'anthropic', 'mock', 'openai'" in err
    )


async def test_a_plugin_that_fails_to_load_is_named_with_its_error(tmp_path: Path) -> None:
    env = install_plugin(tmp_path, "import shout_sdk_that_is_not_installed\n")
    config = tmp_path / "laneway.yaml"
    config.write_text(CONFIG)
    code, _, err = await laneway("config", "check", str(config), env=env)
    assert code == 1
    assert re.search(
        rf"{re.escape(str(config))}:3: providers.loud.type: type 'shout' is installed but failed to "
        r"load: shout_laneway:PROVIDER_TYPE: ModuleNotFoundError: "
        r"No module named 'shout_sdk_that_is_not_installed'",
        err,
    ), err
    # The built-in types still work beside a broken plugin.
    code, _, err = await laneway("config", "check", str(ROOT / "laneway.example.yaml"), env=env)
    assert code == 0, err
