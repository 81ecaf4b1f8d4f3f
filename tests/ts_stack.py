"""A real stack for the TypeScript client's tests (clients/typescript/test/), driven
over stdin/stdout: ``.venv/bin/python -m tests.ts_stack``.

nats-server, one broker and one worker as separate processes (``tests.stack.Stack``),
so the broker can be killed and started again on the same address mid-test.

Protocol (one JSON object per line on stdout, one command per line on stdin):

- on start: ``{"ready": true, "address": "127.0.0.1:PORT"}``; with ``LANEWAY_TS_TLS=tls``
  (or ``mtls``) the broker serves TLS (and requires client certificates) on certificates
  from ``tests.certs``, and the answer adds ``"tls": {"ca", "clientCert", "clientKey"}``
  (PEM file paths);
- ``restart-broker``: SIGKILL the broker, start a new one on the same address, then
  ``{"restarted": true, "address": ...}`` once it serves;
- ``restart-broker graceful``: the same with SIGTERM (the broker drains: open streams
  end UNAVAILABLE with reason SHUTTING_DOWN);
- ``kill-broker`` then ``start-broker``: an outage as long as the test likes, each
  answered ``{"killed": true}`` / ``{"started": true, "address": ...}``;
- ``quit`` (or stdin closed): tear everything down and exit 0.

Any failure is printed as ``{"error": "..."}`` and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.certs import make_certs
from tests.stack import Stack

__all__ = ["TS_CONFIG"]

# chat: instant mock; stream: 80 ms per streamed word (a 40-word message takes ~3 s);
# doomed: every call fails with a 503 and one failure opens its circuit for 10
# minutes, so with when_all_down: fail the route then refuses jobs (NO_HEALTHY_TARGET);
# slow: 1.5 s a call, so a run of the pipeline "slow" is under way long enough to
# restart the broker in it. Braces doubled: Stack formats the config with call_log.
TS_CONFIG = """\
broker:
  grpc_addr: "127.0.0.1:0"
workers:
  retry_backoff_s: 0.05
  retry_backoff_max_s: 0.2
  shutdown_grace_s: 2
  max_attempts: 2
providers:
  mock:
    type: mock
    concurrency: 64
    call_log: "{call_log}"
  streamer:
    type: mock
    concurrency: 8
    token_delay_ms: 80
  doomed:
    type: mock
    concurrency: 4
    error_rates:
      503: 1.0
    circuit:
      consecutive_failures: 1
      open_s: 600
      max_open_s: 600
  slow:
    type: mock
    concurrency: 4
    latency_ms: 1500
routes:
  chat:
    targets:
      - provider: mock
        model: mock-chat
  stream:
    targets:
      - provider: streamer
        model: mock-chat
  doomed:
    when_all_down: fail
    targets:
      - provider: doomed
        model: mock-chat
  slow:
    targets:
      - provider: slow
        model: mock-chat
pipelines:
  analysis:
    steps:
      - name: extract
        kind: chat
        route: chat
        template: "facts of: {{{{ input }}}}"
      - name: summarize
        kind: chat
        route: chat
        template: "summary of {{{{ steps.extract.text }}}}"
  slow:
    steps:
      - name: wait
        kind: chat
        route: slow
        template: "{{{{ input }}}}"
      - name: after
        kind: chat
        route: chat
        template: "after {{{{ steps.wait.text }}}}"
"""


# Past the config's shutdown grace (2 s): a broker still running then is stuck.
_SIGTERM_GRACE_S = 30


async def stop_broker(stack: Stack) -> None:
    """SIGTERM the broker and wait for it to exit (Stack only kills it)."""
    proc = stack._broker  # Stack has no graceful stop of the broker alone
    assert proc is not None
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), _SIGTERM_GRACE_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(
            f"the broker did not exit within {_SIGTERM_GRACE_S} s of SIGTERM; its log ends:\n"
            + stack.log_tail(stack.broker_log)
        ) from None


def say(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    """A timestamped progress line on stderr: the node tests print it when a command fails."""
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} ts_stack: {text}\n")
    sys.stderr.flush()


def _with_tls(root: Path, mode: str) -> tuple[str, dict[str, bytes], dict[str, str]]:
    """The config with broker TLS, the Python client's TLS arguments, the paths for Node."""
    certs = make_certs(root / "certs")
    block = f"  tls:\n    cert_file: {certs.server_cert}\n    key_file: {certs.server_key}\n"
    if mode == "mtls":
        block += f"    client_ca_file: {certs.ca}\n"
    config = TS_CONFIG.replace('  grpc_addr: "127.0.0.1:0"\n', '  grpc_addr: "127.0.0.1:0"\n' + block, 1)
    client = {"root_certificates": certs.read("ca")}
    if mode == "mtls":
        client |= {"certificate_chain": certs.read("client_cert"), "private_key": certs.read("client_key")}
    paths = {"ca": str(certs.ca), "clientCert": str(certs.client_cert), "clientKey": str(certs.client_key)}
    return config, client, paths


async def serve(root: Path) -> None:
    mode = os.environ.get("LANEWAY_TS_TLS", "")
    if mode not in ("", "tls", "mtls"):
        raise ValueError(f"LANEWAY_TS_TLS must be tls or mtls, not {mode!r}")
    config, client_tls, paths = _with_tls(root, mode) if mode else (TS_CONFIG, {}, {})
    async with Stack(root, workers=1, config=config, client_tls=client_tls) as stack:
        say({"ready": True, "address": stack.address, "root": str(root), **({"tls": paths} if mode else {})})
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            command = line.strip()
            if not line or command == "quit":
                break
            if not command:
                continue
            started = time.monotonic()
            note(f"{command}: begun")
            if command in ("restart-broker", "restart-broker graceful"):
                if command.endswith("graceful"):
                    await stop_broker(stack)
                else:
                    await stack.kill_broker()
                await stack.start_broker()
                say({"restarted": True, "address": stack.address})
            elif command == "kill-broker":
                await stack.kill_broker()
                say({"killed": True})
            elif command == "start-broker":
                await stack.start_broker()
                say({"started": True, "address": stack.address})
            else:
                say({"error": f"unknown command {command!r}"})
            note(f"{command}: done in {time.monotonic() - started:.2f} s")


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="laneway-ts-"))
    try:
        asyncio.run(serve(root))
        return 0
    except BaseException as err:  # report anything to the test, which prints it
        say({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
