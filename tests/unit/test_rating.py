from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tokenmill.ledger.rating import (
    Band,
    PeriodPosition,
    PlanVersion,
    TokenCounts,
    charged_part,
    check_bands,
    graduated_amount,
    rate_request,
    volume_amount,
)

BANDS = (Band(1000, Decimal("2")), Band(3000, Decimal("1")), Band(None, Decimal("0.5")))


def plan(mode="graduated", included=0, bands=BANDS) -> PlanVersion:
    return PlanVersion(
        "tier:standard",
        "v1",
        datetime(2026, 1, 1, tzinfo=UTC),
        "USD",
        mode,
        included,
        "charge",
        {"input": bands, "cached_input": bands, "output": bands},
    )


def test_graduated_prices_each_band_at_its_own_rate():
    # 1000 x 2 + 2000 x 1 + 500 x 0.5 per million
    assert graduated_amount(BANDS, 3500) == Decimal("4250") / 1_000_000


def test_volume_prices_every_token_at_the_band_the_total_reaches():
    assert volume_amount(BANDS, 1000) == Decimal("2000") / 1_000_000
    assert volume_amount(BANDS, 3500) == Decimal("1750") / 1_000_000


def test_included_quota_is_used_input_first_then_cached_then_output():
    assert charged_part(TokenCounts(5, 5, 5), 7) == TokenCounts(0, 3, 5)
    assert charged_part(TokenCounts(5, 5, 5), -3) == TokenCounts(5, 5, 5)


@pytest.mark.parametrize("mode", ["graduated", "volume"])
def test_request_charges_add_up_to_the_period_amount(mode):
    position, total = PeriodPosition(), Decimal(0)
    for tokens in (400, 900, 1, 2500, 77):
        charge = rate_request(plan(mode, included=300), position, TokenCounts(output=tokens))
        position, total = charge.after, total + charge.total
    charged = 400 + 900 + 1 + 2500 + 77 - 300
    expected = (graduated_amount if mode == "graduated" else volume_amount)(BANDS, charged)
    assert total == expected


def test_a_volume_request_that_reaches_a_cheaper_band_is_a_discount():
    before = rate_request(plan("volume"), PeriodPosition(), TokenCounts(output=1000)).after
    assert rate_request(plan("volume"), before, TokenCounts(output=1)).total < 0


@pytest.mark.parametrize(
    "bands",
    [
        (),
        (Band(10, Decimal(1)),),
        (Band(10, Decimal(1)), Band(5, Decimal(1)), Band(None, Decimal(1))),
        (Band(None, Decimal(-1)),),
        (Band(None, Decimal("0.0000001")),),
    ],
)
def test_bad_bands_are_refused(bands):
    with pytest.raises(ValueError):
        check_bands(bands)
