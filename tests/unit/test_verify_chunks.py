"""How verify cuts its walk into chunks: every position once, in order, small chunks at the ends."""

from __future__ import annotations

import pytest

from tokenmill.ledger.verify import _chunk_stop


def _sizes(first: int, last: int, rows: int) -> list[int]:
    sizes, start = [], first
    while start <= last:
        stop = _chunk_stop(start, first, last, rows)
        assert start < stop <= last + 1
        sizes.append(stop - start)
        start = stop
    return sizes


@pytest.mark.parametrize(
    ("first", "last", "rows"), [(1, 1_000_000, 50_000), (1, 30, 8), (10, 40, 7), (5, 5, 3)]
)
def test_chunks_cover_the_walk_once_and_never_exceed_the_fetch(
    first: int, last: int, rows: int
) -> None:
    sizes = _sizes(first, last, rows)
    assert sum(sizes) == last - first + 1
    assert max(sizes) <= rows


def test_a_long_walk_starts_and_ends_with_small_chunks() -> None:
    sizes = _sizes(1, 1_000_000, 50_000)
    assert sizes[:6] == [3125, 3125, 6250, 12500, 25000, 50000]
    assert sizes[-5:] == [25000, 12500, 6250, 3125, 3125]
