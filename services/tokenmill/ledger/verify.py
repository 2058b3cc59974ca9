"""`tokenmill audit verify`: walk the hash chain and find the first place where it breaks.

Every hash is recomputed from the event bodies as they are stored now, and every checkpoint is
checked against the hashes walked: a body changed, a row deleted, two rows swapped, or a chain
rewritten after such a change (it then no longer matches the checkpoints signed before) is
reported at its position with what went wrong.

Speed is how few Python objects an event costs: a chunk's chain rows and its events' bodies
are read as two range scans (one per connection, in parallel on the server), each as rows
that pack hundreds of events rather than a row an event: the chain's seqs and hashes packed in
bytea, the bodies joined by newlines in one text (canonical JSON holds none), split and unpacked
in C and checked by map() over SHA-256 in C. The next chunk's queries are on the server while
this one is hashed, and the event loop reads their results between groups. A chunk that is not
the usual one (a position or an event missing, a body with a newline, a hash that does not
follow) is read again row by row to find and explain its break, so the messages and positions
are those of the plain walk.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import operator
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from tokenmill.ledger.chain import GENESIS_HASH, Checkpoint, checkpoints, iso, link

# How far past a broken row verify looks for the body that was sealed there, to tell rows
# swapped from a body changed.
REORDER_LOOKAHEAD_ROWS = 10_000
# A chunk's events are read as one seq range when the range is at most this many times the
# chunk (events sealed in about seq order); otherwise, by their seqs one by one.
_RANGE_SLACK = 4
# A chunk's events are read as groups of this many consecutive seqs, one row a group, and its
# chain rows as groups of this many positions: about a hundred rows a chunk rather than one an
# event, each small enough that neither the server nor this process builds a value so large
# that its memory is fresh (page faults cost more here than the copying), which a whole chunk
# as one value would.
_GROUP_SEQS = 512
_GROUP_POSITIONS = 2048
# The events of a chunk of positions [$1, $2) are one range scan of seqs, in one statement, so
# that it is sent with the chain's query and runs on the server while the chunk before is
# hashed (a separate query for the seq range would wait for that hashing to finish). The
# range is a row joined laterally, so the planner scans the seq index from its low to its high
# end (as bounds computed in a WHERE clause, it would scan the whole log); OFFSET 0 keeps it
# from answering min() and max() by walking the event_seq index from its end until a row of
# the range turns up, a scan of the whole chain. Nothing when the chunk's seqs are spread over
# $3 times its length or more.
_CHUNK_SEQ_RANGE = (
    "WITH chunk AS MATERIALIZED (SELECT min(s) AS low, max(s) AS high FROM "
    "(SELECT event_seq AS s FROM ledger.event_chain WHERE position >= $1 AND position < $2 "
    "OFFSET 0) seqs) "
)
_EVENTS_IN_SEQ_RANGE = _CHUNK_SEQ_RANGE + (
    "SELECT e.seq, e.body FROM chunk CROSS JOIN LATERAL (SELECT seq, body FROM ledger.events "
    "WHERE seq BETWEEN chunk.low AND chunk.high ORDER BY seq) e "
    "WHERE chunk.high - chunk.low < ($2 - $1) * $3"
)
# The same events as groups of $4 consecutive seqs, one row a group: how many bodies, their
# seqs (8 bytes each, big-endian) as one bytea and their bodies as one text, one line each.
# Canonical JSON never holds a raw newline (json.dumps escapes it), so the lines are the bodies
# unless one was changed to hold one, which the count of lines tells.
_EVENT_GROUPS = _CHUNK_SEQ_RANGE + (
    "SELECT g.bodies, g.seqs, g.text FROM chunk "
    "CROSS JOIN LATERAL generate_series(chunk.low, chunk.high, $4) first "
    "CROSS JOIN LATERAL (SELECT count(body), string_agg(int8send(seq), ''::bytea), "
    "string_agg(body, E'\\n') FROM (SELECT seq, body FROM ledger.events "
    "WHERE seq BETWEEN first AND least(first + $4 - 1, chunk.high) ORDER BY seq) e) "
    "g(bodies, seqs, text) "
    "WHERE g.bodies > 0 AND chunk.high - chunk.low < ($2 - $1) * $3"
)
# A chunk's chain rows as groups of $3 consecutive positions, one row a group: how many rows,
# their seqs (as above) and their hashes (32 bytes each) in position order, each as one bytea.
_CHAIN_GROUPS = (
    "SELECT g.count, g.seqs, g.hashes FROM generate_series($1::bigint, $2 - 1, $3) first "
    "CROSS JOIN LATERAL (SELECT count(*), string_agg(int8send(event_seq), ''::bytea), "
    "string_agg(hash, ''::bytea) FROM (SELECT event_seq, hash FROM ledger.event_chain "
    "WHERE position >= first AND position < least(first + $3, $2) ORDER BY position) c) "
    "g(count, seqs, hashes) WHERE g.count > 0"
)


@dataclass
class Report:
    """What verify found: counts, and the first break (problem None when the chain holds)."""

    position_from: int
    position_to: int = 0
    events_verified: int = 0
    checkpoints_verified: int = 0
    unsealed: int = 0
    problem: str | None = None
    position: int | None = None
    seq: int | None = None
    detail: str = ""
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def fail(self, problem: str, position: int, seq: int | None, detail: str) -> None:
        assert self.problem is None, "only the first break is reported"
        self.problem, self.position, self.seq, self.detail = problem, position, seq, detail

    def as_json(self) -> dict[str, object]:
        rate = self.events_verified / self.elapsed_s if self.elapsed_s > 0 else 0
        return {
            "ok": self.ok,
            "from": self.position_from,
            "to": self.position_to,
            "events_verified": self.events_verified,
            "checkpoints_verified": self.checkpoints_verified,
            "unsealed": self.unsealed,
            "problem": self.problem,
            "position": self.position,
            "seq": self.seq,
            "detail": self.detail,
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(rate),
        }

    def text(self) -> str:
        counts = (
            f"{self.events_verified} events at positions {self.position_from}.."
            f"{self.position_to}, {self.checkpoints_verified} checkpoints, "
            f"{self.unsealed} events not sealed yet"
        )
        if self.ok:
            return f"OK: {counts} ({self.elapsed_s:.2f}s)"
        at = f"position {self.position}" + (f" (seq {self.seq})" if self.seq else "")
        return f"BROKEN at {at}: {self.problem}: {self.detail}\nverified before it: {counts}"


async def verify(
    database_url: str,
    trusted_key: bytes | None,
    position_from: int = 1,
    position_to: int | None = None,
    fetch_rows: int = 50_000,
) -> Report:
    """Walk the chain from `position_from` to `position_to` (its end by default).

    From a later position than 1, the stored hash before it is the starting point: the walk
    proves the range follows from it, and the checkpoints in the range prove what it was.
    `trusted_key` is the operator's public key; a checkpoint by any other key is refused.
    """
    assert position_from >= 1 and fetch_rows > 0
    chain_conn = await _connect(database_url)
    events_conn = await _connect(database_url)
    try:
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        report = Report(position_from)
        end = await chain_conn.fetchval("SELECT max(position) FROM ledger.event_chain") or 0
        last = end if position_to is None else min(position_to, end)
        report.unsealed = await chain_conn.fetchval("SELECT count(*) FROM ledger.unsealed")
        wanted = await checkpoints(chain_conn, position_from, position_to)
        walk = _Walk(chain_conn, events_conn, report, wanted, trusted_key)
        await walk.run(last, fetch_rows)
        if report.ok:
            _check_beyond_end(report, wanted, end)
        report.elapsed_s = loop.time() - started_s
        return report
    finally:
        await chain_conn.close()
        await events_conn.close()


async def _connect(database_url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(database_url)
    # Bodies as the raw UTF-8 bytes Postgres stores, the bytes that were hashed: no decoding
    # and re-encoding per row. (A connection of its own: the codec stays with it.)
    await conn.set_type_codec(
        "text", schema="pg_catalog", encoder=bytes, decoder=bytes, format="binary"
    )
    # Each chunk is one short query: compiling it would cost more than running it.
    await conn.execute("SET jit = off")
    return conn


def _check_beyond_end(report: Report, wanted: list[Checkpoint], end: int) -> None:
    """A checkpoint past the chain's end means rows were cut off it."""
    beyond = [c for c in wanted if c.position > end]
    if beyond:
        report.fail(
            "rows missing",
            end + 1,
            None,
            f"the chain ends at position {end}, but the checkpoint signed at "
            f"{iso(beyond[0].signed_at)} covers position {beyond[0].position}",
        )


Chunk = tuple[list[asyncpg.Record], list[bytes | None]]


class _Walk:
    def __init__(
        self,
        chain_conn: asyncpg.Connection,
        events_conn: asyncpg.Connection,
        report: Report,
        wanted: list[Checkpoint],
        trusted_key: bytes | None,
    ):
        self._chain_conn = chain_conn
        self._events_conn = events_conn
        self._report = report
        self._wanted = wanted
        self._trusted_key = trusted_key

    async def run(self, last: int, fetch_rows: int) -> None:
        report = self._report
        prev_hash = await self._hash_before(report.position_from)
        if prev_hash is None:
            report.fail("rows missing", report.position_from - 1, None, "no chain row there")
            return
        start = report.position_from
        chunk_stop = functools.partial(_chunk_stop, first=start, last=last, rows=fetch_rows)
        pending = self._read(start, chunk_stop(start))
        while start <= last:
            stop = chunk_stop(start)
            usual = await self._usual_chunk(*pending, stop - start)
            if stop <= last:
                pending = self._read(stop, chunk_stop(stop))
                await asyncio.sleep(0)  # Sends the next chunk's queries before hashing this one.
            hashes = usual and await _hashes_if_chained(*usual, prev_hash)
            if not hashes:
                if stop <= last:  # Frees the connections; the next round takes the results.
                    await asyncio.gather(*pending)
                hashes = await self._checked_chunk(start, stop, prev_hash)
                if hashes is None:
                    return
            report.events_verified += len(hashes) // 32
            report.position_to = stop - 1
            if not self._checkpoints_hold(hashes, start, stop):
                return
            prev_hash = hashes[-32:]
            start = stop
        report.position_to = max(report.position_to, last)

    def _read(self, start: int, stop: int) -> tuple[asyncio.Task, asyncio.Task]:
        """Start reading the chunk at positions [start, stop): its hashes and its bodies.

        Two tasks of their own, not one gathering both: each sends its query at the event
        loop's next turn, while a task that gathered them would only start them a turn later,
        after the chunk before had been hashed, and the server would sit idle meanwhile.
        """
        return (
            asyncio.create_task(
                self._chain_conn.fetch(_CHAIN_GROUPS, start, stop, _GROUP_POSITIONS)
            ),
            asyncio.create_task(
                self._events_conn.fetch(_EVENT_GROUPS, start, stop, _RANGE_SLACK, _GROUP_SEQS)
            ),
        )

    @staticmethod
    async def _usual_chunk(
        chain_read: asyncio.Task, events_read: asyncio.Task, positions: int
    ) -> tuple[bytes, Iterable[list[bytes] | None]] | None:
        """The chunk's stored hashes (packed) and its events' bodies in position order, in
        batches (None for one whose lines are not its bodies), or None unless it is the usual
        chunk: every position there, and each one's event."""
        chain_groups, groups = await chain_read, await events_read
        # Positions are unique: as many rows as positions in the range means none is missing.
        if sum([group[0] for group in chain_groups]) != positions or not groups:
            return None
        seqs = b"".join([group[1] for group in chain_groups])
        hashes = b"".join([group[2] for group in chain_groups])
        if len(hashes) != 32 * positions:
            return None  # A hash of another length (its CHECK dropped) shifts those after it.
        if b"".join([group[1] for group in groups]) == seqs:
            # The events in seq order are the chain's in position order. Each group is split
            # only when it is hashed, so that its bodies reuse the memory of the group before.
            return hashes, map(_bodies, groups)
        bodies = _paired(groups, seqs)
        return None if bodies is None else (hashes, [bodies])

    async def _checked_chunk(self, start: int, stop: int, prev_hash: bytes) -> bytes | None:
        """Read the chunk again row by row and check it: its hashes (packed) if it holds, else
        None with the first break reported."""
        rows, bodies = await self._chunk(start, stop)
        broken = _first_break(rows, bodies, start, stop, prev_hash)
        if broken is not None:
            await self._explain(rows, bodies, start, broken, prev_hash)
            return None
        return b"".join([row[2] for row in rows])

    async def _chunk(self, start: int, stop: int) -> Chunk:
        """Chain rows at positions [start, stop) and their events' bodies (None where gone)."""
        rows, events = await asyncio.gather(
            self._chain_conn.fetch(
                "SELECT position, event_seq, hash FROM ledger.event_chain "
                "WHERE position >= $1 AND position < $2 ORDER BY position",
                start,
                stop,
            ),
            self._events(start, stop),
        )
        seqs = [row[1] for row in rows]
        if [event[0] for event in events] == seqs:  # The usual case: one event per row, in order.
            return rows, [event[1] for event in events]
        by_seq = dict(events)
        return rows, [by_seq.get(seq) for seq in seqs]

    async def _events(self, start: int, stop: int) -> list[asyncpg.Record]:
        """The events sealed at positions [start, stop), by seq: one range scan when they were
        sealed in about seq order (the usual case), else one lookup each."""
        events = await self._events_conn.fetch(_EVENTS_IN_SEQ_RANGE, start, stop, _RANGE_SLACK)
        if events:
            return events
        # The seqs are spread too widely for one range scan, or the chunk has no event at all.
        return await self._events_conn.fetch(
            "SELECT e.seq, e.body FROM ledger.events e JOIN ledger.event_chain c "
            "ON c.event_seq = e.seq WHERE c.position >= $1 AND c.position < $2 ORDER BY e.seq",
            start,
            stop,
        )

    async def _hash_before(self, position: int) -> bytes | None:
        if position == 1:
            return GENESIS_HASH
        return await self._chain_conn.fetchval(
            "SELECT hash FROM ledger.event_chain WHERE position = $1", position - 1
        )

    def _checkpoints_hold(self, hashes: bytes, start: int, stop: int) -> bool:
        for checkpoint in self._wanted:
            if start <= checkpoint.position < stop:
                offset = 32 * (checkpoint.position - start)
                stored_hash = hashes[offset : offset + 32]
                if not _checkpoint_holds(self._report, checkpoint, stored_hash, self._trusted_key):
                    return False
        return True

    async def _explain(
        self,
        rows: list[asyncpg.Record],
        bodies: list[bytes | None],
        start: int,
        index: int,
        prev_hash: bytes,
    ) -> None:
        """Say why row `index` of the chunk breaks the chain."""
        report = self._report
        report.events_verified += index
        report.position_to = start + index - 1
        if index:
            prev_hash = rows[index - 1][2]
        expected = start + index
        if index >= len(rows) or rows[index][0] != expected:
            report.fail("rows missing", expected, None, f"no chain row at position {expected}")
            return
        position, seq, stored_hash = rows[index]
        body = bodies[index]
        if body is None:
            report.fail("rows missing", position, seq, f"the event sealed here (seq {seq}) is gone")
            return
        moved = await self._find_moved(position, prev_hash, stored_hash)
        if moved is not None:
            detail = f"the event sealed here is now at seq {moved[1]} (position {moved[0]})"
            report.fail("rows reordered", position, seq, detail)
            return
        detail = f"the body of event {_event_id(body)} no longer hashes to the sealed hash"
        report.fail("payload changed", position, seq, detail)

    async def _find_moved(
        self, position: int, prev_hash: bytes, stored_hash: bytes
    ) -> tuple[int, int] | None:
        """Where the body sealed at `position` is now, if it is among the rows near it."""
        rows = await self._events_conn.fetch(
            "SELECT c.position, e.seq, e.body FROM ledger.event_chain c "
            "JOIN ledger.events e ON e.seq = c.event_seq "
            "WHERE c.position BETWEEN $1::bigint - $2 AND $1::bigint + $2 AND c.position <> $1",
            position,
            REORDER_LOOKAHEAD_ROWS,
        )
        for row in rows:
            if link(prev_hash, row["body"]) == stored_hash:
                return row["position"], row["seq"]
        return None


def _chunk_stop(start: int, first: int, last: int, rows: int) -> int:
    """Where the chunk at `start` ends: `rows` on, except near the walk's ends, where chunks
    grow from a sixteenth of it and shrink back by halves. The verifier waits idle for the
    first chunk, and the server for the last one to be hashed: small ones shorten both waits.
    """
    size = min(rows, start - first, (last + 1 - start) // 2)
    return min(start + max(rows // 16, size, 1), last + 1)


def _first_break(
    rows: list[asyncpg.Record],
    bodies: list[bytes | None],
    start: int,
    stop: int,
    prev_hash: bytes,
) -> int | None:
    """The index of the first row of the chunk that breaks the chain, or None."""
    if len(rows) != stop - start or (rows and rows[-1][0] != stop - 1):
        # Some position is missing: find the first one (rows are unique, by position).
        for index, row in enumerate(rows):
            if row[0] != start + index:
                return index
        return len(rows)
    present = bodies.index(None) if None in bodies else len(bodies)
    hashes = [row[2] for row in rows[:present]]
    broken = _first_unchained(hashes, bodies[:present], prev_hash)
    return present if broken is None and present < len(rows) else broken


async def _hashes_if_chained(
    hashes: bytes, batches: Iterable[list[bytes] | None], prev_hash: bytes
) -> bytes | None:
    """`hashes` when each of them follows from the one before, over the bodies in `batches`.

    Between batches the event loop reads what the server has sent of the next chunk: otherwise
    the server would stop sending it, and working on it, as soon as the socket's buffers fill.
    """
    end = 0
    for bodies in batches:
        if bodies is None:
            return None
        start, end = end, end + 32 * len(bodies)
        if _first_unchained(_unpack32(hashes[start:end]), bodies, prev_hash) is not None:
            return None
        prev_hash = hashes[end - 32 : end]
        await asyncio.sleep(0)
    return hashes


def _bodies(group: asyncpg.Record) -> list[bytes] | None:
    """A group's bodies: its lines, unless a body holds a newline (more lines than seqs) or is
    NULL (fewer bodies than seqs)."""
    count, seqs, text = group
    lines = text.split(b"\n")
    return lines if len(lines) == count == len(seqs) // 8 else None


def _paired(groups: list[asyncpg.Record], seqs: bytes) -> list[bytes] | None:
    """The bodies of the chain's `seqs` (packed) in its order, when some event was sealed out of
    seq order (a late commit); None when one is gone or a group's lines are not its bodies."""
    by_seq: dict[int, bytes] = {}
    for group in groups:
        bodies = _bodies(group)
        if bodies is None:
            return None
        by_seq.update(zip(_int8s(group[1]), bodies, strict=True))
    bodies = list(map(by_seq.get, _int8s(seqs)))
    return None if None in bodies else bodies


def _int8s(packed: bytes) -> tuple[int, ...]:
    """The big-endian 8-byte integers that int8send() packed one after the other."""
    return struct.unpack(f">{len(packed) // 8}q", packed)


def _unpack32(packed: bytes) -> list[bytes]:
    """The 32-byte hashes packed one after the other, split by one call in C."""
    return list(struct.unpack("32s" * (len(packed) // 32), packed))


_digest = operator.methodcaller("digest")


def _first_unchained(hashes: list[bytes], bodies: list[bytes], prev_hash: bytes) -> int | None:
    """The index of the first hash that is not sha256(the hash before it || its body), or None.

    The hot loop of verify, one SHA-256 a row, run by map() in C: no Python bytecode per row.
    """
    assert len(hashes) == len(bodies)
    computed = list(
        map(_digest, map(hashlib.sha256, map(bytes.__add__, [prev_hash, *hashes[:-1]], bodies)))
    )
    if computed == hashes:
        return None
    pairs = enumerate(zip(computed, hashes, strict=True))
    return next(index for index, (mine, stored) in pairs if mine != stored)


def _event_id(body: bytes) -> str:
    try:
        return str(json.loads(body).get("event_id"))
    except (ValueError, AttributeError):
        return "(its body is not a JSON object)"


def _checkpoint_holds(
    report: Report, checkpoint: Checkpoint, stored_hash: bytes, trusted_key: bytes | None
) -> bool:
    at = f"the checkpoint signed at {iso(checkpoint.signed_at)}"
    if trusted_key is not None and checkpoint.public_key != trusted_key:
        report.fail("bad signature", checkpoint.position, None, f"{at} is by another key")
    elif not checkpoint.signature_valid():
        report.fail("bad signature", checkpoint.position, None, f"{at} has a bad signature")
    elif checkpoint.head_hash != stored_hash:
        detail = (
            f"{at} signed hash {checkpoint.head_hash.hex()[:16]}, the chain has "
            f"{stored_hash.hex()[:16]} (the chain was rewritten up to here)"
        )
        report.fail("checkpoint mismatch", checkpoint.position, None, detail)
    else:
        report.checkpoints_verified += 1
        return True
    return False
