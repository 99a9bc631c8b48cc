"""Measurement helpers: each returns plain numbers or tidy rows."""
from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def with_descendants(pids: list[int], host=None) -> list[int]:
    """These processes and every process they started, still alive (/proc/PID/task/TID/children).
    host: a remote host (topologies.remote) whose pids these are: its process table, read there."""
    if getattr(host, "remote", False):
        table = [line.split() for line in host.cmd("ps -e -o pid=,ppid=").splitlines()]
        kids: dict[int, list[int]] = {}
        for f in table:
            if len(f) == 2 and f[0].isdigit() and f[1].isdigit():
                kids.setdefault(int(f[1]), []).append(int(f[0]))
        children = lambda pid: kids.get(pid, [])  # noqa: E731
    else:
        children = _local_children
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += children(pid)
    return out


def _local_children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def runqueue_wait_s(pids: list[int], host=None) -> float:
    """Seconds these processes' threads have spent runnable but waiting for a CPU, so far
    (/proc/PID/task/TID/schedstat, second field): the scheduler's delay, not their work.
    host: a remote host whose pids these are (read there, in one command)."""
    if getattr(host, "remote", False):
        if not pids:
            return 0.0
        files = " ".join(f"/proc/{int(p)}/task/*/schedstat" for p in pids)
        out = host.cmd(f"cat {files} 2>/dev/null | awk '{{s += $2}} END {{printf \"%.0f\\n\", s}}'").strip()
        return int(out) / 1e9 if out.isdigit() else 0.0
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9
