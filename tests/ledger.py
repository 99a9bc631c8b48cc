"""What the reliability suite did, for README's summary table: cases, bytes compared, faults
injected, inputs fuzzed. Written to $MIMBOX_RELIABILITY_SUMMARY at the end of the session."""
from collections import Counter

totals: Counter = Counter()


def add(cases: int = 0, bytes_compared: int = 0, faults: int = 0, inputs: int = 0) -> None:
    totals.update(cases=cases, bytes_compared=bytes_compared, faults=faults, inputs=inputs)
