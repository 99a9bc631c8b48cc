"""What the reliability suite did, for README's summary table: cases, bytes compared, faults
injected, inputs fuzzed. Written to $MIMBOX_RELIABILITY_SUMMARY at the end of the session."""
from collections import Counter

totals: Counter = Counter()
measurements: dict = {}      # name -> what a test measured (e.g. the SYN flood), for README


def add(cases: int = 0, bytes_compared: int = 0, faults: int = 0, inputs: int = 0) -> None:
    totals.update(cases=cases, bytes_compared=bytes_compared, faults=faults, inputs=inputs)


def measured(name: str, values: dict) -> None:
    """Record what a test measured under `name` (numbers it asserted on)."""
    measurements[name] = values
