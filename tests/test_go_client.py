"""The Go example client (clients/go/main.go), built from stubs generated out of protos/,
against a real broker and worker pool: a compiled language checks the v1 contract end to end.

Of the Go code only main.go is committed: the stubs are generated here into a temp GOPATH with
protoc, protoc-gen-go and protoc-gen-go-grpc, and the build is offline (GOPATH mode, no
module proxy) against the grpc-go and protobuf-go sources Debian installs under
/usr/share/gocode. When any of these is missing the tests skip and say which, with the
Debian package that brings it. The build cache is build/go-cache (a cold build of grpc-go
takes ~15 s on two cores, a warm one under a second); clients/go/README.md has the commands.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from laneway.broker.server.process import BrokerServer
from laneway.workers.pool import WorkerPool

ROOT = Path(__file__).resolve().parent.parent
GO_DIR = ROOT / "clients" / "go"
PROTO_DIR = ROOT / "protos"
GO_CACHE = ROOT / "build" / "go-cache"
# Debian's golang-*-dev packages install Go sources here (a GOPATH tree).
DEBIAN_GOPATH = Path("/usr/share/gocode")
# The import paths the generated stubs and main.go need, and the Debian package of each.
GO_SOURCES = {
    "google.golang.org/grpc": "golang-google-grpc-dev",
    "google.golang.org/protobuf": "golang-google-protobuf-dev",
    "github.com/golang/protobuf": "golang-github-golang-protobuf-1-5-dev",
    "google.golang.org/genproto/googleapis/rpc/errdetails": "golang-google-genproto-dev",
}
RUN_TIMEOUT_S = 30


def _missing_toolchain() -> list[str]:
    """What the build needs and this machine lacks, each with the Debian package that brings it."""
    missing = []
    for tool, package in (
        ("go", "golang-go"),
        ("protoc-gen-go", "protoc-gen-go"),
        ("protoc-gen-go-grpc", "protoc-gen-go-grpc"),
    ):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian: {package})")
    if shutil.which("protoc-gen-go") and not _protoc_gen_go_is_apiv2():
        missing.append(
            "protoc-gen-go v1.20 or later (this one is the old v1.3 plugin of golang-goprotobuf-dev;"
            " Debian: protoc-gen-go, which replaces it)"
        )
    for import_path, package in GO_SOURCES.items():
        if not (DEBIAN_GOPATH / "src" / import_path).is_dir():
            missing.append(f"the {import_path} sources in {DEBIAN_GOPATH}/src (Debian: {package})")
    return missing


def _protoc_gen_go_is_apiv2() -> bool:
    """protoc-gen-go v1.20+ (protobuf-go APIv2) answers --version; v1.3 reads a request from stdin."""
    try:
        proc = subprocess.run(
            ["protoc-gen-go", "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    found = re.match(rb"protoc-gen-go v(\d+)\.(\d+)", proc.stdout)
    return found is not None and (int(found[1]), int(found[2])) >= (1, 20)


def _protoc() -> list[str]:
    """protoc from PATH (Debian: protobuf-compiler), else the one grpcio-tools bundles."""
    protoc = shutil.which("protoc")
    return [protoc] if protoc else [sys.executable, "-m", "grpc_tools.protoc"]


def _run(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> None:
    proc = subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/go built against freshly generated stubs; the binary's path."""
    missing = _missing_toolchain()
    if missing:
        pytest.skip("cannot build the Go client, missing: " + "; ".join(missing))
    base = tmp_path_factory.mktemp("go")
    gopath = base / "gopath"
    src = gopath / "src"  # protoc writes under go_package's import path, inside this GOPATH
    src.mkdir(parents=True)
    protos = sorted(str(p) for p in (PROTO_DIR / "laneway" / "v1").glob("*.proto"))
    _run([*_protoc(), f"-I{PROTO_DIR}", f"--go_out={src}", f"--go-grpc_out={src}", *protos])
    GO_CACHE.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GO111MODULE": "off",  # GOPATH mode: packages come from the GOPATH trees, never a proxy
        "GOPATH": os.pathsep.join([str(gopath), str(DEBIAN_GOPATH)]),
        "GOCACHE": str(GO_CACHE),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOENV": "off",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",  # no C compiler needed
    }
    binary = base / "laneway-go"
    _run(["go", "build", "-o", str(binary), "."], env=env, cwd=GO_DIR, timeout=300)
    return binary


async def _run_client(binary: Path, *args: str) -> tuple[int, str, str]:
    """Run the client without blocking the event loop that also serves the broker."""
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the Go client did not finish within {RUN_TIMEOUT_S}s") from None
    assert proc.returncode is not None
    out, err = stdout.decode(), stderr.decode()
    print(f"$ laneway-go {' '.join(args)}  (exit {proc.returncode})\n{out}{err}")  # shown by pytest -rP
    return proc.returncode, out, err


async def test_go_client_submits_and_streams_to_succeeded(
    go_client: Path, worker: WorkerPool, broker: BrokerServer
) -> None:
    code, out, err = await _run_client(
        go_client, "-addr", broker.address, "-route", "chat", "-text", "hello from go", "-timeout", "20s"
    )
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert re.search(r"^submitted job_id=\S+$", out, re.MULTILINE), out
    events = re.findall(r"^seq=(\d+) state=(\w+)$", out, re.MULTILINE)
    assert [int(seq) for seq, _ in events] == list(range(1, len(events) + 1)), out
    assert events[-1][1] == "JOB_STATE_SUCCEEDED", out
    final = re.search(r'^final state=JOB_STATE_SUCCEEDED text="(.+)"$', out, re.MULTILINE)
    assert final, out
    assert final.group(1) == "hello from go"  # the mock provider echoes the input


async def test_go_client_prints_code_and_error_info_reason(go_client: Path, broker: BrokerServer) -> None:
    code, out, err = await _run_client(go_client, "-addr", broker.address, "-route", "nope")
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "error: code=InvalidArgument" in err, err
    assert re.search(
        r"^error: reason=UNKNOWN_ROUTE domain=laneway\.v1 metadata=map\[.*route:nope", err, re.M
    ), err
    assert "submitted" not in out
