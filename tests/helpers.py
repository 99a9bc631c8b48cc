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

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "condition", every: float = 0.02) -> T:
    """Call predicate() until it returns something true, and return that; AssertionError naming
    `what` (and the last value) after `timeout` seconds. A predicate that raises fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {value!r})")
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


def free_port() -> int:
    """A listening port no other test or system of this run uses."""
    return ALLOCATE.port()


def free_queues(n: int = 1) -> int:
    """The first of `n` NFQUEUE numbers no other test or system of this run uses."""
    return ALLOCATE.queues(n)
