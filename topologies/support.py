"""The one helper library of tests/, experiments/ and topologies/ (as the kernel's MPTCP selftests share
one): waiting on a condition with a deadline, never a fixed sleep; ports and NFQUEUE numbers tried
before they are handed out; scratch network namespaces with unique names, always deleted; child
processes stopped with a deadline.

    wait_until(lambda: m.stats()["active"] == 0, 5, "connections closed")
    reading = watch(read, 1.0, changed)      # a window for a negative: "nothing happens within 1 s"
    port, queue = free_port(), free_queues(2)
    with scratch_netns("mimbox-doctor") as ns: ...
    stop_process(p)                          # SIGTERM, then SIGKILL past the grace
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from typing import Callable, TypeVar

T = TypeVar("T")


class NotWithin(AssertionError):
    """A condition that did not come true in time (an AssertionError: a test's failure says so)."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "condition", every: float = 0.02) -> T:
    """Call predicate() until it returns something true, and return that; NotWithin naming `what`
    (and the last value) after `timeout` seconds. A predicate that raises fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise NotWithin(f"not within {timeout:g}s: {what} (last: {value!r})")
        time.sleep(every)


def watch(read: Callable[[], T], window: float, changed: Callable[[T], bool], every: float = 0.05) -> T:
    """Read `read()` for up to `window` seconds and return the first reading for which changed()
    holds, else the last one. For negatives ("the converter does not forward it"): the window is
    far longer than the microseconds the converter takes to act, and a positive ends it early."""
    deadline = time.monotonic() + window
    while True:
        r = read()
        if changed(r) or time.monotonic() > deadline:
            return r
        time.sleep(every)


# -- ports and queues -------------------------------------------------------------------------------------
def port_free(port: int) -> bool:
    """Whether TCP `port` can be bound here now, on both families (nothing of this namespace holds it)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == 97:   # EAFNOSUPPORT: no IPv6 here
                    continue
                return False
    return True


class Allocator:
    """Listening ports and NFQUEUE numbers for whatever a run starts without naming them: every system
    and test of a run gets its own, and a MiMBox a block of queues (one per worker it may start), so no
    two overlap whatever the core count. A port is tried before it is handed out (one this namespace
    holds is skipped). Two runs on one machine (a suite beside a developer's tests) take apart ranges:
    MIMBOX_ALLOCATE_FROM=30000. Below the kernel's ephemeral range (32768-60999): no client's port."""
    FIRST = 17000

    def __init__(self):
        first = int(os.environ.get("MIMBOX_ALLOCATE_FROM", self.FIRST))
        self.next_port = first
        self.next_queue = first

    def port(self) -> int:
        while True:
            port, self.next_port = self.next_port, self.next_port + 1
            if port_free(port):
                return port

    def queues(self, n: int) -> int:
        """The first of `n` consecutive queue numbers."""
        self.next_queue += n
        return self.next_queue - n


ALLOCATE = Allocator()


def free_port() -> int:
    """A listening port no other test or system of this run uses, and nothing here holds."""
    return ALLOCATE.port()


def free_queues(n: int = 1) -> int:
    """The first of `n` NFQUEUE numbers no other test or system of this run uses."""
    return ALLOCATE.queues(n)


# -- namespaces and processes -----------------------------------------------------------------------------
@contextlib.contextmanager
def scratch_netns(prefix: str = "mimbox-scratch"):
    """A named network namespace of its own (a unique name: PREFIX-<8 hex>), loopback up; on exit its
    processes are killed and it is deleted, whatever happened."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def stop_process(p: subprocess.Popen, grace: float = 10.0) -> int:
    """Stop a child: SIGTERM, then SIGKILL if it has not exited within `grace` seconds; its status."""
    if p.poll() is None:
        p.terminate()
        try:
            return p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
    return p.wait(timeout=10)
