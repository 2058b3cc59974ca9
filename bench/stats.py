"""Statistics the benchmarks print."""

from __future__ import annotations


def percentile(values: list[float], share: float) -> float:
    """Nearest rank: the value at `share` of the way through `values` in order."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
