"""A tracer (strace -c, perf record) on a running system's processes for the length of one load:

    with tracing(["strace", "-c", "-f", "-q", "-p", "123"], [123]) as t:
        run_the_load()
    table = t.stderr_text          # strace -c prints its table when it ends

It yields once the tracer holds every thread of the processes (strace: each thread's TracerPid is the
tracer; perf: the tracer holds at least one perf event a thread), so the load starts traced rather
than after a guessed delay, and it ends the tracer with SIGINT (both print or write what they
gathered), whatever happens in the block.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from topologies.support import NotWithin, wait_until


def threads(pids: list[int]) -> list[int]:
    """Every thread of these processes (their task ids), those still alive."""
    out = []
    for pid in pids:
        try:
            out += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            pass
    return out


def tracer_of(tid: int) -> int:
    """The pid ptrace-attached to thread `tid` (0: none, or the thread is gone)."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def perf_events(pid: int) -> int:
    """How many perf events process `pid` holds open."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    n += 1
    except OSError:
        pass
    return n


def holds(tracer: int, pids: list[int]) -> bool:
    """Whether process `tracer` traces every thread of `pids` (by ptrace or by perf events)."""
    ts = threads(pids)
    if not ts:
        return False
    return all(tracer_of(t) == tracer for t in ts) or perf_events(tracer) >= len(ts)


@contextlib.contextmanager
def tracing(argv: list[str], pids: list[int], timeout: float = 15.0):
    """Run the tracer `argv` (which names `pids`) around the with block; yields its Popen once it holds
    them (RuntimeError with what it said if it exits or does not within `timeout`). After the block the
    Popen's `stderr_text` is what the tracer wrote to stderr."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    p.stderr_text = ""
    try:
        try:
            wait_until(lambda: p.poll() is not None or holds(p.pid, pids), timeout,
                       f"{argv[0]} attached to {len(threads(pids))} threads", every=0.02)
        except NotWithin as e:
            raise RuntimeError(str(e)) from None
        if p.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited ({p.returncode}): {p.stderr.read()[-1000:]}")
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        try:
            _, p.stderr_text = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            _, p.stderr_text = p.communicate(timeout=30)
