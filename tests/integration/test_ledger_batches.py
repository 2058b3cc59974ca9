"""The real ledger consumer on real Redis and Postgres: completions booked in batches, once,
with a verdict that came before its completion credited once and a poison entry dead-lettered
alone, its neighbours booked."""

from __future__ import annotations

from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually, publish_signed
from tests.integration.test_journal import (
    assert_books_hold,
    completion,
    prepaid_added,
    verdict,
)
from tokenmill import service
from tokenmill.events import new_id
from tokenmill.ledger import journal
from tokenmill.ledger.main import wire as ledger_wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams


async def test_consumer_books_batches_once_and_a_poison_entry_fails_alone(
    pool, redis: RedisClient, test_settings: Settings
):
    streams = Streams(test_settings.stream_prefix)
    customer = f"cus_{new_id()}"
    done = [completion(customer, prompt_tokens=100 + i) for i in range(30)]
    poison = completion(customer, prompt_tokens=10, cached=11)  # More cached than prompt.
    await publish_signed(test_settings, streams.billing, prepaid_added(customer, "0.0001"))
    await publish_signed(test_settings, streams.quality, verdict(done[3]))  # Before completion.
    for event in [*done[:15], poison, *done[15:], *done[:10]]:  # Ten redelivered.
        await publish_signed(test_settings, streams.completions, event)

    async with service.running("ledger", test_settings, ledger_wire):

        async def all_booked() -> bool:
            booked = await pool.fetchval(
                "SELECT count(*) FROM ledger.request_usage WHERE customer_id = $1", customer
            )
            return booked == len(done)

        async def poison_dead_lettered() -> bool:
            return await redis.xlen(Streams.dead_letters(streams.completions)) == 1

        await eventually(all_booked)
        await eventually(poison_dead_lettered, timeout_s=30)

    async with pool.acquire() as conn:
        covered = await conn.fetchval(
            "SELECT count(*) FROM ledger.posting_events e JOIN ledger.postings p "
            "USING (posting_id) WHERE p.kind = 'usage' AND e.event_id = ANY($1::text[])",
            [e.event_id for e in done],
        )
        assert covered == len(done)  # Each completion in one usage summary.
        credits = await conn.fetch(
            "SELECT kind FROM ledger.postings WHERE request_id = ANY($1::text[])",
            [e.request_id for e in done],
        )
        assert [c["kind"] for c in credits] == ["credit:defective"]
        kinds = await conn.fetch(
            "SELECT kind FROM ledger.postings WHERE customer_id = $1 ORDER BY kind", customer
        )  # Usage summaries name no one customer.
        assert [k["kind"] for k in kinds] == ["credit:defective", "prepaid"]
        (credit,) = await conn.fetch(
            "SELECT * FROM ledger.credits WHERE customer_id = $1", customer
        )
        assert credit["request_id"] == done[3].request_id
        assert await journal.balance(conn, journal.prepaid(customer)) == 0
        await assert_books_hold(conn)
    ((_, fields),) = await redis.xrange(Streams.dead_letters(streams.completions))
    assert poison.event_id.encode() in fields[b"data"]
