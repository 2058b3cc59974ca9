"""Telemetry service: publishes the energy each meter counted, one window at a time."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from decimal import Decimal

from tokenmill import service
from tokenmill.events import PowerSample, utc_now
from tokenmill.meters import Meter, create_meter
from tokenmill.money import to_decimal
from tokenmill.streams import consume, publish_event
from tokenmill.telemetry import control

log = logging.getLogger(__name__)


def sample(
    meter: Meter, region: str, start: datetime, end: datetime, energy_j: Decimal
) -> PowerSample:
    window_s = to_decimal(max((end - start).total_seconds(), 1e-6))
    return PowerSample(
        producer="telemetry",
        customer_id="",
        request_id="",
        region=region,
        meter=meter.name,
        device=meter.device,
        estimated=meter.estimated,
        window_start=start,
        window_end=end,
        energy_j=energy_j,
        power_w=(energy_j / window_s).quantize(Decimal("0.000001")),
    )


async def sample_forever(rt: service.Runtime, meter: Meter) -> None:
    """Publish one sample per interval. A window whose publish failed is folded into the next,
    so the samples always add up to what the meter counted."""
    start, start_j = utc_now(), meter.energy_j()
    while True:
        await asyncio.sleep(rt.settings.power_sample_interval_s)
        end, end_j = utc_now(), meter.energy_j()
        assert end_j >= start_j, "meters count up"
        try:
            window = sample(meter, rt.settings.region, start, end, end_j - start_j)
            await publish_event(rt.broker, rt.streams.power, window, rt.signing_keys)
        except Exception as exc:  # Redis unavailable: widen the window instead of losing it.
            log.warning("power sample not published (%s); folding it into the next window", exc)
            continue
        start, start_j = end, end_j


async def wire(rt: service.Runtime):
    meter = create_meter(rt.settings, rt.settings.device)
    log.info("metering %s with %s (estimated=%s)", meter.device, meter.name, meter.estimated)
    # The power cap: grid signals on the control stream, and the controller that sheds load.
    consume(rt.broker, rt.settings, rt.streams.control, "telemetry",
            lambda event, delivery: control.on_control(rt, event, delivery))  # fmt: skip
    return [sample_forever(rt, meter), control.Controller(rt).run()]
