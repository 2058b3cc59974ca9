"""Price plans in Postgres: reading a version with its bands, and adding versions and
negotiated plans (the admin's `tokenmill prices` and /admin/v1/prices)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from tokenmill.ledger.rating import TOKEN_CLASSES, Band, PlanVersion


async def load_version(
    conn: asyncpg.Connection, plan_id: str, effective_from: datetime
) -> PlanVersion:
    """The version of `plan_id` that took effect at `effective_from`, with its bands."""
    header = await conn.fetchrow(
        "SELECT * FROM ledger.price_plans WHERE plan_id = $1 AND effective_from = $2",
        plan_id,
        effective_from,
    )
    if header is None:
        raise LookupError(f"no plan {plan_id!r} from {effective_from.isoformat()}")
    rows = await conn.fetch(
        "SELECT token_class, up_to_tokens, price_per_mtok FROM ledger.price_bands "
        "WHERE plan_id = $1 AND effective_from = $2 ORDER BY token_class, band_no",
        plan_id,
        effective_from,
    )
    bands = {
        c: tuple(
            Band(r["up_to_tokens"], r["price_per_mtok"]) for r in rows if r["token_class"] == c
        )
        for c in TOKEN_CLASSES
    }
    return PlanVersion(
        plan_id=plan_id,
        version=header["version"],
        effective_from=effective_from,
        currency=header["currency"],
        tiers_mode=header["tiers_mode"],
        included_tokens_monthly=header["included_tokens_monthly"],
        quota_policy=header["quota_policy"],
        bands=bands,
    )


async def versions_in_force(
    conn: asyncpg.Connection, keys: list[tuple[str, str, datetime]]
) -> list[PlanVersion]:
    """For each (customer, tier, submitted_at), the plan version the customer paid under then:
    its negotiated plan if one was in force (ledger.plan_for), else its tier's."""
    rows = await conn.fetch(
        "SELECT k.i, v.plan_id, v.effective_from "
        "FROM unnest($1::text[], $2::text[], $3::timestamptz[]) WITH ORDINALITY "
        "AS k(customer_id, tier, at, i) "
        "LEFT JOIN LATERAL ledger.plan_at(ledger.plan_for(k.customer_id, k.tier, k.at), k.at) v "
        "ON true ORDER BY k.i",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )
    loaded: dict[tuple[str, datetime], PlanVersion] = {}
    found = []
    for key, row in zip(keys, rows, strict=True):
        if row["plan_id"] is None:
            raise LookupError(f"no price plan in force for {key}")
        version = (row["plan_id"], row["effective_from"])
        if version not in loaded:
            loaded[version] = await load_version(conn, *version)
        found.append(loaded[version])
    return found


def describe(plan: PlanVersion) -> dict[str, object]:
    """A plan version as JSON-ready values (CLI --json and the admin API)."""
    return {
        "plan_id": plan.plan_id,
        "version": plan.version,
        "effective_from": plan.effective_from.isoformat(),
        "currency": plan.currency,
        "tiers_mode": plan.tiers_mode,
        "included_tokens_monthly": plan.included_tokens_monthly,
        "quota_policy": plan.quota_policy,
        "bands": {
            c: [
                {"up_to_tokens": b.up_to_tokens, "price_per_mtok": str(b.price_per_mtok)}
                for b in bands
            ]
            for c, bands in plan.bands.items()
        },
    }
