"""What every test uses to wait and to pick resources (as the kernel's MPTCP selftests share one
helper library): a wait is on a condition with a deadline, never a fixed sleep; ports and NFQUEUE
numbers come from the project's allocator (experiments.systems.ALLOCATE), never typed in a test.

    wait_until(lambda: m.stats()["active"] == 0, 5, "connections closed")
    reading = watch(read, 1.0, changed)      # a window for a negative: "nothing happens within 1 s"
    port, queue = free_port(), free_queues(2)
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from experiments.systems import ALLOCATE
from topologies.waits import wait_until  # noqa: F401  (the one wait, shared with experiments/)

T = TypeVar("T")


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


def free_port() -> int:
    """A listening port no other test or system of this run uses."""
    return ALLOCATE.port()


def free_queues(n: int = 1) -> int:
    """The first of `n` NFQUEUE numbers no other test or system of this run uses."""
    return ALLOCATE.queues(n)
