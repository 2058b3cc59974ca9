"""The facility power cap at the intake: the operator's routes (/admin/v1/power/cap) and the
refusal of a shed tier's new requests (tokenmill.powercap has the state, the telemetry
controller the decisions)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from tokenmill import powercap
from tokenmill.intake.errors import ApiError
from tokenmill.intake.invoices_admin import admin_responses
from tokenmill.powercap import Level

router = APIRouter(tags=["admin"])
SOURCE = "admin-api"
# The document's bound; a deployment's power_cap_w_max may be lower (the route checks it).
CAP_W_MAX = 100_000_000.0


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PowerCapRequest(_Closed):
    cap_w: float = Field(
        gt=0, le=CAP_W_MAX, strict=True, description="The facility's power budget, in watts."
    )
    reason: str = Field(default="", max_length=500, description="Why, for the event log.")


class CapView(_Closed):
    cap_w: str | None = Field(description="Watts, exact; null when there is no cap.")
    source: str | None
    reason: str | None
    event_id: str | None
    set_at: str | None


class CurtailmentView(_Closed):
    level: int = Field(ge=0, le=powercap.LEVEL_MAX)
    shed_tiers: list[Literal["free", "standard", "premium"]]
    measured_w: str | None
    cap_w: str | None
    reason: str
    changed_at: float
    decided_at: float


class PowerStatus(_Closed):
    object: Literal["power_status"]
    cap: CapView
    curtailment: CurtailmentView


async def _set(request: Request, cap_w: Any, reason: str) -> dict[str, Any]:
    runtime = request.app.state.runtime
    settings = request.app.state.settings
    try:
        watts = None if cap_w is None else powercap.parse_cap_w(cap_w, settings.power_cap_w_max)
    except powercap.CapError as exc:
        raise ApiError(400, "invalid_request", str(exc), "cap_w") from exc
    event = powercap.cap_event(watts, SOURCE, reason, settings.region)
    await powercap.set_cap(
        runtime.redis, runtime.broker, runtime.streams, runtime.signing_keys, event
    )
    return await powercap.status(runtime.redis, settings.stream_prefix)


@router.get(
    "/power/cap",
    response_model=None,
    responses=admin_responses("The power cap in force and the curtailment level.", PowerStatus),
)
async def power_status(request: Request) -> dict[str, Any]:
    runtime = request.app.state.runtime
    return await powercap.status(runtime.redis, request.app.state.settings.stream_prefix)


@router.put(
    "/power/cap",
    response_model=None,
    responses=admin_responses("The cap was set; the status now.", PowerStatus, (413,)),
)
async def set_power_cap(request: Request, body: PowerCapRequest) -> dict[str, Any]:
    """Set the facility power budget. Curtailment follows within a control interval once the
    measured power is over it; the change is a `power.cap_set` event in the log."""
    return await _set(request, body.cap_w, body.reason)


@router.delete(
    "/power/cap",
    response_model=None,
    responses=admin_responses("The cap was cleared; the status now.", PowerStatus),
)
async def clear_power_cap(request: Request) -> dict[str, Any]:
    """Clear the power budget: the controller lifts every curtailment at its next interval."""
    return await _set(request, None, "cleared")


def curtailed(level: Level, tier: str, retry_after_s: int) -> ApiError | None:
    """The 429 for a new request of a tier the power cap sheds now, or None."""
    if tier not in level.shed_tiers:
        return None
    measured = "unknown" if level.measured_w is None else f"{level.measured_w} W"
    return ApiError(
        429,
        "power_curtailed",
        f"the facility is over its power budget (measured {measured}, cap {level.cap_w} W): "
        f"new {tier}-tier requests are paused; retry after {retry_after_s} s. Requests "
        "already accepted still complete.",
        headers={"Retry-After": str(retry_after_s)},
    )
