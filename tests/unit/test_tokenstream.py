"""The pure parts of streaming: what text a worker may release before a stop string is
settled, and how a reader assembles an answer from entries that may repeat."""

from __future__ import annotations

import pytest

from tokenmill.tokenstream import Delta, End, Text, decode, encode
from tokenmill.worker.deltas import visible


@pytest.mark.parametrize(
    ("raw", "stop", "shown"),
    [
        ("Hello wor", (), "Hello wor"),
        ("Hello wor", ("world",), "Hello "),  # "wor" may become the stop string.
        ("Hello world!", ("world",), "Hello "),  # Never past a stop string.
        ("Hello w", ("END", "wx"), "Hello "),
        ("Hello x", ("END", "wx"), "Hello x"),
        ("a\n\n", ("\n\n",), "a"),
    ],
)
def test_text_that_could_still_be_a_stop_string_is_held_back(raw, stop, shown):
    assert visible(raw, stop) == shown


def test_a_reader_takes_only_text_past_what_it_has():
    text = Text()
    assert text.take(Delta(0, "Hel")) == "Hel"
    assert text.take(Delta(3, "lo")) == "lo"
    # A re-run worker streams from the start again: nothing is repeated.
    assert text.take(Delta(0, "Hello")) == ""
    assert text.take(Delta(0, "Hello, w")) == ", w"
    assert text.take(Delta(20, "gap")) == ""  # Entries lost in between: not spliced.
    end = End(8, "orld", "stop", 4, 3, 2)
    assert text.take(end) == "orld" and text.text == "Hello, world" and text.end == end


@pytest.mark.parametrize(
    "entry", [Delta(3, "héllo"), End(5, "", "cancelled", error="cancelled"), End(0, "x", "stop")]
)
def test_entries_survive_the_stream(entry):
    as_stored = {key.encode(): value.encode() for key, value in encode(entry).items()}
    assert decode(as_stored) == entry
