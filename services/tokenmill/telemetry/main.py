"""Telemetry service: publishes what the host's meter counted, one window at a time.

It reads its meter `power_read_hz` times a second and publishes one PowerSample per
`power_sample_interval_s` (1 s by default): the window's joules, its mean power and the peak
of its readings, so the event log holds 1 s aggregates whatever the read rate. It meters the
host (a CPU model charges every program's load here; the workers' own meters charge only
theirs), which is what a facility power budget is about.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import datetime
from decimal import Decimal

from tokenmill import service
from tokenmill.events import PowerSample, utc_now
from tokenmill.meters import Meter, create_meter
from tokenmill.money import to_decimal
from tokenmill.streams import consume, publish_event
from tokenmill.telemetry import control

log = logging.getLogger(__name__)
WATT_PLACES = Decimal("0.000001")


def sample(
    meter: Meter,
    region: str,
    start: datetime,
    end: datetime,
    energy_j: Decimal,
    power_w_max: Decimal | None = None,
    host: str = "",
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
        power_w=(energy_j / window_s).quantize(WATT_PLACES),
        power_w_max=power_w_max,
        host=host,
    )


async def sample_forever(rt: service.Runtime, meter: Meter) -> None:
    """Publish one sample per interval. A window whose publish failed is folded into the next,
    so the samples always add up to what the meter counted."""
    loop = asyncio.get_running_loop()
    read_s = 1 / rt.settings.power_read_hz
    start, start_j = utc_now(), meter.energy_j()
    peak_w = Decimal(0)
    host = socket.gethostname()
    while True:
        window_ends_s = loop.time() + rt.settings.power_sample_interval_s
        last_s, last_j = loop.time(), meter.energy_j()
        while loop.time() < window_ends_s:
            await asyncio.sleep(min(read_s, max(0.0, window_ends_s - loop.time())))
            now_s, now_j = loop.time(), meter.energy_j()
            if now_s > last_s:
                peak_w = max(peak_w, (now_j - last_j) / to_decimal(now_s - last_s))
            last_s, last_j = now_s, now_j
        end, end_j = utc_now(), last_j
        assert end_j >= start_j, "meters count up"
        try:
            window = sample(
                meter, rt.settings.region, start, end, end_j - start_j,
                peak_w.quantize(WATT_PLACES), host,
            )  # fmt: skip
            await publish_event(rt.broker, rt.streams.power, window, rt.signing_keys)
        except Exception as exc:  # Redis unavailable: widen the window instead of losing it.
            log.warning("power sample not published (%s); folding it into the next window", exc)
            continue
        start, start_j, peak_w = end, end_j, Decimal(0)


async def wire(rt: service.Runtime):
    meter = create_meter(rt.settings, rt.settings.device, scope="host")
    log.info("metering %s with %s (estimated=%s)", meter.device, meter.name, meter.estimated)
    # The power cap: grid signals on the control stream, and the controller that sheds load.
    consume(rt.broker, rt.settings, rt.streams.control, "telemetry",
            lambda event, delivery: control.on_control(rt, event, delivery))  # fmt: skip
    return [sample_forever(rt, meter), control.Controller(rt).run()]
