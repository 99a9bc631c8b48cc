"""What the reliability suite did, for README's summary table: cases, bytes compared, faults
injected, inputs fuzzed. Written to $MIMBOX_RELIABILITY_SUMMARY at the end of the session.

Every number is counted where it happened: bytes by the transfer helper (conftest.transfer), faults
by the helpers that inject them and check that they took effect (tests/faults.py)."""
from collections import Counter

totals: Counter = Counter()
faults: Counter = Counter()  # kind -> how many were injected (and seen to take effect)
measurements: dict = {}      # name -> what a test measured (e.g. the SYN flood), for README


def add(cases: int = 0, bytes_compared: int = 0, inputs: int = 0) -> None:
    totals.update(cases=cases, bytes_compared=bytes_compared, inputs=inputs)


def fault(kind: str, n: int = 1) -> None:
    """`n` faults of `kind` took effect (called by tests/faults.py, not by the tests themselves)."""
    faults[kind] += n
    totals["faults"] += n


def measured(name: str, values: dict) -> None:
    """Record what a test measured under `name` (numbers it asserted on)."""
    measurements[name] = values


def hostile(case: str, tried: str, got_through: str) -> None:
    """A hostile client's case (tests/test_hostile.py): what was tried, how much, and what got
    through (measured by the test that asserted it was nothing)."""
    measurements.setdefault("hostile", []).append({"case": case, "tried": tried, "got through": got_through})
