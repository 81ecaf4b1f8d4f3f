"""CPU time of processes from /proc (Linux), to tell which process was busy in a phase."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CpuMeter", "child_pid", "cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> tuple[str, list[str]] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, tail = raw.rpartition(")")
    return head.partition("(")[2], tail.split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads); None if unknown."""
    parsed = _stat_fields(pid)
    if parsed is None:
        return None
    fields = parsed[1]
    # After "(comm)": state is fields[0]; utime and stime are stat fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def child_pid(comm: str, parent: int | None = None) -> int | None:
    """The pid of a direct child of ``parent`` (default: this process) named ``comm``."""
    parent = os.getpid() if parent is None else parent
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        parsed = _stat_fields(int(entry.name))
        if parsed is not None and parsed[0] == comm and int(parsed[1][1]) == parent:
            return int(entry.name)
    return None


class CpuMeter:
    """CPU use of named processes between ``start()`` and ``stop()``, in percent of one core."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self._pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def start(self) -> CpuMeter:
        self._t0 = time.perf_counter()
        self._start = {}
        for name, pid in self._pids.items():
            used = cpu_seconds(pid)
            if used is not None:
                self._start[name] = used
        return self

    def stop(self, *, seconds: float | None = None) -> dict[str, float]:
        """Percentages over ``seconds`` (default: the time since ``start``): a phase
        that ended with idle waits for lost jobs passes the time it was busy."""
        wall = max(seconds if seconds else time.perf_counter() - self._t0, 1e-9)
        out: dict[str, float] = {}
        for name, before in self._start.items():
            after = cpu_seconds(self._pids[name])
            if after is not None:
                out[name] = round(100.0 * (after - before) / wall, 1)
        return out
