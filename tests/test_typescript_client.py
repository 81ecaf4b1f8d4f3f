"""The TypeScript client (clients/typescript): its generated code matches protos/, it
compiles, and its tests (node's own test runner) pass against a real stack.

The node tests start the stack themselves (``tests.ts_stack``: nats-server, a broker
and a worker as separate processes) because one of them restarts the broker mid-stream.
Skipped when node or npm is missing; node_modules is installed with ``npm ci`` when absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "clients" / "typescript"
NODE_TEST_TIMEOUT_S = 180
ARTIFACTS = ROOT / "build" / "test-artifacts"


def _run(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=PKG, capture_output=True, text=True, timeout=timeout, check=False, env=env)


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-20000:]}\nstderr:\n{proc.stderr[-10000:]}"


def _first_failure(out: str) -> str:
    """The first failed test's block of node's TAP output: later failures are often only
    its consequences, and the tail of a long output loses it."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("not ok"):
            return "\n".join(lines[max(0, i - 2) : i + 40])
    return ""


def _keep(proc: subprocess.CompletedProcess[str], name: str) -> Path:
    """The node run's whole output, kept as a test artifact (CI logs show only a tail)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return path


@pytest.fixture(scope="module")
def npm() -> str:
    """npm, with clients/typescript/node_modules installed (``npm ci``) and the package built."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the TypeScript client's tests (Node.js 20+)")
    major = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout
    if not major.startswith("v") or int(major[1:].split(".")[0]) < 20:
        pytest.skip(f"the TypeScript client needs Node.js 20 or later, found {major.strip()}")
    if not (PKG / "node_modules").is_dir():
        try:
            proc = _run([npm, "ci", "--no-audit", "--no-fund"], timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci in clients/typescript timed out after 300 s (no network?)")
        if proc.returncode != 0:
            pytest.skip(f"npm ci in clients/typescript failed (no network?): {proc.stderr.strip()[-500:]}")
    build = _run([npm, "run", "build"], timeout=300)
    assert build.returncode == 0, "tsc failed:\n" + _report(build)
    return npm


@pytest.mark.timeout(600)  # the fixture may run npm ci
def test_generated_code_matches_protos(npm: str) -> None:
    buf = ROOT / ".venv" / "bin" / "buf"
    env = {**os.environ, **({"BUF": str(buf)} if buf.exists() else {})}
    proc = _run([npm, "run", "check-gen"], timeout=120, env=env)
    assert proc.returncode == 0, _report(proc)


@pytest.mark.timeout(600)
def test_typescript_client_against_a_real_stack(npm: str) -> None:
    node = shutil.which("node")
    assert node is not None
    tests = sorted(str(p.relative_to(PKG)) for p in (PKG / "dist" / "test").glob("*.test.js"))
    assert tests, "no compiled tests in clients/typescript/dist/test"
    env = {**os.environ, "LANEWAY_REPO": str(ROOT), "LANEWAY_PYTHON": sys.executable}
    try:
        proc = _run([node, "--test", "--test-concurrency=1", *tests], timeout=NODE_TEST_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        late = f"node --test did not finish within {NODE_TEST_TIMEOUT_S} s"
        raise AssertionError(f"{late}\n{out[-20000:]}") from None
    if proc.returncode != 0:
        # One clean-clone CI run in four saw the stack's broker not come back after the
        # restart test, failing every later test; the suite is run once more (on a new
        # stack) and the first run's output kept in the warning, until that is found.
        kept = _keep(proc, "typescript-node-run-1.txt")
        first = _first_failure(proc.stdout) or proc.stdout[-4000:]
        warnings.warn(
            f"TypeScript tests failed once (whole output: {kept}), running them again; "
            f"the first failure:\n{first}\nstderr:\n{proc.stderr[-2000:]}",
            stacklevel=1,
        )
        proc = _run([node, "--test", "--test-concurrency=1", *tests], timeout=NODE_TEST_TIMEOUT_S, env=env)
    if proc.returncode != 0:
        kept = _keep(proc, "typescript-node-run-2.txt")
        raise AssertionError(
            f"first failure:\n{_first_failure(proc.stdout)}\n(whole output: {kept})\n{_report(proc)}"
        )
