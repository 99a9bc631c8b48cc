"""Waiting on a condition with a deadline, never a fixed sleep: one helper for tests/ (tests/helpers.py
re-exports it), experiments/ and topologies/ alike.

    wait_until(lambda: m.stats()["active"] == 0, 5, "connections closed")
"""
from __future__ import annotations

import time
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
