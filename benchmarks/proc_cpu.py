"""Who spent the machine's CPU during a run, read from /proc (Linux), with no special tools.

Take a `snapshot()` just before a load starts and another just after it ends; `cpu_by_process`
gives each process's CPU seconds in between (a process started meanwhile counts from zero; one that
ended meanwhile is lost, so snapshot while what you measure is still running). Group processes by
descendants of the pids you started (a `serve run` process is the ancestor of every Ray process it
starts: GCS, raylet, dashboard, workers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessCPU:
    pid: int
    ppid: int
    name: str
    cpu_s: float


@dataclass(frozen=True)
class Snapshot:
    processes: dict[int, ProcessCPU]
    busy_s: float
    """Machine-wide CPU seconds spent (all cores, not idle or iowait) since boot."""
    total_s: float


def _read_process(pid: int) -> ProcessCPU | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields after it start at the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return ProcessCPU(pid, int(fields[1]), cmdline[:160] or stat[stat.find("(") + 1:stat.rfind(")")],
                      (utime + stime) / _TICKS)


def snapshot() -> Snapshot:
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            process = _read_process(int(entry))
            if process is not None:
                processes[process.pid] = process
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return Snapshot(processes, (sum(values[:8]) - idle) / _TICKS, sum(values[:8]) / _TICKS)


def descendants(snap: Snapshot, roots: set[int]) -> set[int]:
    """The roots and every process below them."""
    children: dict[int, list[int]] = {}
    for process in snap.processes.values():
        children.setdefault(process.ppid, []).append(process.pid)
    found, stack = set(), [pid for pid in roots if pid in snap.processes]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def cpu_by_process(before: Snapshot, after: Snapshot, pids: set[int]) -> dict[int, float]:
    """CPU seconds each of `pids` spent between the snapshots."""
    spent = {}
    for pid in pids:
        process = after.processes.get(pid)
        if process is None:
            continue
        earlier = before.processes.get(pid)
        spent[pid] = process.cpu_s - (earlier.cpu_s if earlier is not None and earlier.name == process.name else 0.0)
    return spent


def machine_busy(before: Snapshot, after: Snapshot) -> float:
    """The share of the machine's CPU (all cores) that was busy between the snapshots."""
    total = after.total_s - before.total_s
    return (after.busy_s - before.busy_s) / total if total > 0 else 0.0


def label(process: ProcessCPU) -> str:
    """A short name for a report: Ray's worker titles (ray::ServeReplica:app:ingress) or the program."""
    name = process.name
    if name.startswith("ray::"):
        return name.split()[0]
    program = name.split()[0].rsplit("/", 1)[-1] if name else "?"
    if "python" in program and len(name.split()) > 1:
        rest = name.split()[1:]
        module = rest[rest.index("-m") + 1] if "-m" in rest and rest.index("-m") + 1 < len(rest) else rest[0]
        return f"{program} {module.rsplit('/', 1)[-1]}"
    return program
