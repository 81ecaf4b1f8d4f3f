"""The Node.js example client (clients/node/example.js) against a real broker and worker pool.

The client loads the .proto files at runtime, so this also checks that the wire
contract is usable from another language without generated code.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
NODE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """The command prefix to run example.js; installs node_modules with ``npm ci`` once if missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: cannot run the Node.js client example")
    if not (NODE_DIR / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("clients/node/node_modules is missing and npm is not on PATH")
        try:
            proc = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci in clients/node timed out after 300 s (no network?)")
        if proc.returncode != 0:
            pytest.skip(f"npm ci in clients/node failed (no network?): {proc.stderr.strip()[-500:]}")
    return [node, str(NODE_DIR / "example.js")]


async def run_example(cmd: list[str], *args: str) -> tuple[int, str, str]:
    """Run example.js without blocking the event loop that also serves the broker."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, *args, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=NODE_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"node example.js did not finish within {NODE_TIMEOUT_S}s") from None
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_node_client_submit_stream_get(node_client, worker, broker) -> None:
    code, out, err = await run_example(
        node_client,
        "--addr",
        broker.address,
        "--route",
        "chat",
        "--text",
        "hello from node",
        "--lane",
        "LANE_HIGH",
    )
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"

    submitted = re.search(r"^submitted job_id=(\S+)$", out, re.MULTILINE)
    assert submitted, out
    job_id = submitted.group(1)

    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [e["state"] for e in events] == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert {e["job_id"] for e in events} == {job_id}
    assert events[-1]["result"] == "hello from node"
    assert all("result" not in e for e in events[:-1])

    assert re.search(r"^get_job state=JOB_STATE_SUCCEEDED seq=3$", out, re.MULTILINE), out


async def test_node_client_unknown_route_is_invalid_argument(node_client, broker) -> None:
    code, out, err = await run_example(node_client, "--addr", broker.address, "--route", "nope")
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "INVALID_ARGUMENT" in err or "code 3" in err, err
    assert "unknown route" in err, err
    assert "submitted" not in out
