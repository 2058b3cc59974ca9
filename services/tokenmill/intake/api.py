"""The intake's HTTP API: the async job API, the OpenAI-compatible routes, usage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill import powercap, service, tokenizer, tokenstream
from tokenmill.intake import (
    admin_customers,
    admin_power,
    admin_prices,
    admission,
    invoices_admin,
    jobs,
    openapi,
    probes,
    streaming,
    views,
)
from tokenmill.intake import usage as usage_view
from tokenmill.intake.admin_api import ADMIN_PREFIX, AdminDependencies
from tokenmill.intake.errors import ApiError, answering, error_response
from tokenmill.intake.keys import Customer, KeyCache
from tokenmill.intake.limits import BodySizeLimit
from tokenmill.intake.outages import StorageOutage
from tokenmill.intake.requests import (
    Api,
    GenerationRequest,
    InvalidRequest,
    check_fits,
    prompt_chars,
    validate,
)
from tokenmill.ledger import invoice_render, invoices
from tokenmill.settings import Settings

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY_CHARS_MAX = 255
# Prompts up to this many characters are counted in tokens on the event loop (under about
# 0.4 ms with a chat template); longer ones in a thread.
INLINE_COUNT_CHARS_MAX = 256
# Job ids are "job_" and a ULID; anything else cannot name a job, and a NUL could not even be
# looked up (Postgres text holds none).
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "malformed_json", "the request body is not valid JSON")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    return ApiError(
        400, "invalid_request", f"{field or 'body'}: {first.get('msg', 'invalid')}", field
    )


async def customer(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(openapi.BEARER)],
) -> Customer:
    found = None
    if bearer is not None:
        found = await request.app.state.keys.customer(bearer.credentials)
    if found is None:
        raise ApiError(
            401,
            "invalid_api_key",
            "missing or invalid API key; send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if found.suspended:
        raise ApiError(
            403,
            "customer_suspended",
            f"customer {found.customer_id} is suspended; its keys are refused until an "
            "operator resumes it",
        )
    return found


async def json_body(request: Request) -> None:
    """Refuse a body that does not say it is JSON, before anything reads it as such."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the body must be JSON: send Content-Type: application/json, not {content_type!r}",
        )


CustomerDep = Annotated[Customer, Depends(customer)]
IdempotencyKey = Annotated[
    str | None,
    # Declared for the document; accept() checks it, to answer in the API's own error shape.
    Header(
        alias="Idempotency-Key",
        json_schema_extra={"minLength": 1, "maxLength": IDEMPOTENCY_KEY_CHARS_MAX},
    ),
]
JsonBody = [Depends(json_body)]


# Days as strings, not dates: a bad day gets the API's own 400 that says what is wrong.
_DATE = {"format": "date"}
UsageFrom = Annotated[
    str | None,
    Query(alias="from", description="First day (UTC), YYYY-MM-DD.", json_schema_extra=_DATE),
]
UsageTo = Annotated[
    str | None,
    Query(alias="to", description="Last day (UTC), YYYY-MM-DD, included.", json_schema_extra=_DATE),
]
UsageGroupBy = Annotated[
    str | None,
    Query(
        description="Also sum the usage per day (UTC), model or tier.",
        json_schema_extra={"enum": list(usage_view.GROUP_BY)},
    ),
]


def create_app(settings: Settings, wire: service.Wiring) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.running("intake", settings, wire) as runtime:
            app.state.runtime = runtime
            app.state.keys = KeyCache(runtime.db, settings)
            app.state.waiter = jobs.CompletionWaiter(runtime.db)
            app.state.tokenizer = await asyncio.to_thread(tokenizer.load, settings)
            app.state.power = powercap.LevelFollower(runtime.redis, settings)
            app.state.tokens = streaming.TokenFollower(settings)
            # Cancels sent for streams whose clients hung up, kept until they are done.
            app.state.hang_ups = set()
            following = asyncio.create_task(app.state.tokens.run(), name="token-streams")
            try:
                async with (
                    app.state.waiter.listening(),
                    app.state.keys.listening(),
                    app.state.power.following(),
                ):
                    yield
            finally:
                following.cancel()
                await asyncio.gather(following, *app.state.hang_ups, return_exceptions=True)

    app = FastAPI(title="tokenmill intake", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.include_router(admin_prices.router, prefix=ADMIN_PREFIX, dependencies=AdminDependencies)
    openapi.install(app, settings)
    too_large = ApiError(
        413, "body_too_large", f"the request body is over {settings.request_body_bytes_max} bytes"
    )
    app.add_middleware(
        BodySizeLimit,
        size_bytes_max=settings.request_body_bytes_max,
        too_large=answering(too_large),
    )
    storage_down = ApiError(
        503,
        "storage_unavailable",
        "the platform cannot reach its storage right now; send the request again "
        "shortly, with the same Idempotency-Key so that it cannot make a second job",
        headers={"Retry-After": str(settings.outage_retry_after_s)},
    )
    app.add_middleware(
        StorageOutage,
        unavailable=answering(storage_down),
        log_interval_s=settings.outage_log_interval_s,
    )

    app.include_router(admin_customers.router, prefix=ADMIN_PREFIX, dependencies=AdminDependencies)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        # Starlette's 405 names the allowed methods in its headers (Allow); keep them.
        error = ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers)
        return error_response(request, error)

    async def accept(
        request: Request, who: Customer, body: GenerationRequest, api: Api, key: str | None
    ):
        if key is not None and not (
            0 < len(key) <= IDEMPOTENCY_KEY_CHARS_MAX and key.isprintable()
        ):
            raise ApiError(
                400, "invalid_request", "Idempotency-Key must be 1 to 255 printable characters"
            )
        try:
            checked = validate(body, api, settings)
            # Tokenizing a long prompt takes milliseconds (about 1 µs a character): off the
            # event loop. A short one costs less than the hop to a thread and back.
            if prompt_chars(checked) <= INLINE_COUNT_CHARS_MAX:
                prompt_tokens = check_fits(checked, api, request.app.state.tokenizer)
            else:
                prompt_tokens = await asyncio.to_thread(
                    check_fits, checked, api, request.app.state.tokenizer
                )
        except InvalidRequest as exc:
            raise ApiError(400, "invalid_request", str(exc), exc.param) from exc
        runtime = request.app.state.runtime
        level = request.app.state.power.current()
        if shed := admin_power.curtailed(level, who.tier, settings.power_retry_after_s):
            # A retry of a request accepted before the cap bit is not a new request: it gets
            # its job (or its 409), as the 429 advised the client to retry.
            if key is None or not await jobs.key_used(runtime.db, who, key):
                raise shed
        # FastAPI's own server span is current here, so the job event's headers carry it.
        try:
            return await jobs.submit(
                runtime.db, runtime.streams, who, checked, api, settings.model, key, prompt_tokens
            )
        except admission.Refused as exc:
            raise ApiError(402, "insufficient_quota", str(exc)) from exc
        except jobs.IdempotencyConflict as exc:
            raise ApiError(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body",
            ) from exc

    async def finished(request: Request, who: Customer, row) -> Any:
        row = await request.app.state.waiter.wait(who, row["request_id"], settings.chat_wait_s)
        if row["status"] == "failed" or (row["status"] == "cancelled" and not row["output_text"]):
            raise ApiError(400, "generation_failed", row["error"] or "the job failed")
        if row["status"] != "completed":
            # The job runs and is billed whatever the client does next; a client that retried
            # would start (and pay for) another one. OpenAI's SDKs retry a 5xx unless told not to.
            raise ApiError(
                504,
                "timeout",
                f"job {row['request_id']} is still {row['status']}; it will complete and "
                f"can be read at /v1/jobs/{row['request_id']}",
                headers={"x-should-retry": "false"},
            )
        return row

    @app.post("/v1/jobs", status_code=202, dependencies=JsonBody)
    async def submit_job(
        request: Request, body: GenerationRequest, who: CustomerDep, key: IdempotencyKey = None
    ) -> JSONResponse:
        row, created = await accept(request, who, body, "jobs", key)
        return JSONResponse(
            views.job(row),
            status_code=202 if created else 200,
            headers={"Location": f"/v1/jobs/{row['request_id']}"},
        )

    @app.get("/v1/jobs/{job_id}")
    async def get_job(
        request: Request,
        job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)],
        who: CustomerDep,
    ) -> dict[str, Any]:
        row = await jobs.find(request.app.state.runtime.db, who, job_id)
        if row is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        partial = None
        if row["status"] == "running":
            # What it has streamed so far; a Redis that does not answer only hides that.
            with contextlib.suppress(RedisError):
                redis = request.app.state.runtime.redis
                partial = await tokenstream.partial_text(redis, settings, job_id)
        return views.job(row, partial)

    async def cancel_job(request: Request, who: Customer, job_id: str):
        """Record the cancel, then signal the workers (again, if it was cancelled before: a
        signal lost to a Redis failure is sent once more)."""
        runtime = request.app.state.runtime
        try:
            row = await jobs.cancel(runtime.db, who, job_id)
        except jobs.AlreadyFinished as exc:
            raise ApiError(
                409,
                "job_finished",
                f"job {job_id} is {exc.row['status']} already; there is nothing to cancel",
            ) from exc
        if row is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        if row["status"] == "cancelled" and row["started_at"] is None:
            # Settled here: the end of its stream comes from here too.
            end = tokenstream.End(0, "", "cancelled", error=row["error"])
            async with runtime.redis.pipeline(transaction=False) as pipe:
                tokenstream.add(pipe, settings, job_id, [end])
                await pipe.execute()
        await tokenstream.request_cancel(runtime.redis, settings, job_id)
        return row

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(
        request: Request,
        job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)],
        who: CustomerDep,
    ) -> dict[str, Any]:
        return views.job(await cancel_job(request, who, job_id))

    def hang_up(request: Request, who: Customer, job_id: str) -> None:
        """A streaming client hung up: its job stops as if cancelled (a draining intake, which
        cuts streams itself, lets the jobs run and bill as a waiting chat's would)."""
        drain = getattr(request.app.state, "drain", None)
        if drain is not None and drain.started:
            return
        task = asyncio.create_task(stop_hung_up(request, who, job_id))
        request.app.state.hang_ups.add(task)
        task.add_done_callback(request.app.state.hang_ups.discard)

    async def stop_hung_up(request: Request, who: Customer, job_id: str) -> None:
        try:
            await cancel_job(request, who, job_id)
        except ApiError:
            pass  # It finished as the client left: nothing to stop.
        except Exception:
            # Nobody awaits this task; the job then runs to its end and bills as usual.
            log.exception("could not stop %s after its client hung up", job_id)

    async def answer(
        request: Request, who: Customer, body: GenerationRequest, api: Api, key: str | None
    ) -> Any:
        """A chat or text completion: the whole answer once done, or a stream of it."""
        if not body.stream:
            row, _ = await accept(request, who, body, api, key)
            row = await finished(request, who, row)
            return views.chat_completion(row) if api == "chat" else views.text_completion(row)
        follower: streaming.TokenFollower = request.app.state.tokens
        if follower.open >= settings.streams_open_max:
            raise ApiError(
                503,
                "too_many_streams",
                f"this intake streams {follower.open} answers already; send the request again "
                "shortly, or with stream=false",
                headers={"Retry-After": str(settings.outage_retry_after_s)},
            )
        row, created = await accept(request, who, body, api, key)
        job_id = row["request_id"]

        async def read_record():
            return await jobs.find(request.app.state.runtime.db, who, job_id)

        options = body.stream_options
        answer = streaming.Answer(
            row,
            include_usage=options is not None and options.include_usage,
            read_record=read_record,
            # Only the request that made the job stops it; a replay that hangs up does not.
            on_hang_up=(lambda: hang_up(request, who, job_id)) if created else None,
        )
        return StreamingResponse(
            streaming.events(answer, follower, settings.chat_wait_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/jobs/{job_id}/events")
    async def get_job_events(
        request: Request,
        job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)],
        who: CustomerDep,
    ) -> dict[str, Any]:
        pool = request.app.state.runtime.db
        if await jobs.find(pool, who, job_id) is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        return {"object": "list", "job_id": job_id, "data": await jobs.events(pool, who, job_id)}

    @app.post("/v1/chat/completions", dependencies=JsonBody)
    async def chat_completions(
        request: Request, body: GenerationRequest, who: CustomerDep, key: IdempotencyKey = None
    ) -> Any:
        return await answer(request, who, body, "chat", key)

    @app.post("/v1/completions", dependencies=JsonBody)
    async def completions(
        request: Request, body: GenerationRequest, who: CustomerDep, key: IdempotencyKey = None
    ) -> Any:
        return await answer(request, who, body, "completions", key)

    @app.get("/v1/models")
    async def models(who: CustomerDep) -> dict[str, Any]:
        model = {"id": settings.model, "object": "model", "created": 0, "owned_by": "tokenmill"}
        return {"object": "list", "data": [model]}

    @app.get("/v1/usage")
    async def usage(
        request: Request,
        who: CustomerDep,
        start: UsageFrom = None,
        end: UsageTo = None,
        group_by: UsageGroupBy = None,
    ) -> dict[str, Any]:
        query = usage_view.parse_query(start, end, group_by)
        db, limit = request.app.state.runtime.db, settings.usage_groups_max
        tiers = await usage_view.usage_by(db, who, query, "tier", limit)
        groups = None
        if query.group_by is not None:
            groups = await usage_view.usage_by(db, who, query, query.group_by, limit)
        return usage_view.view(who, query, tiers, groups)

    @app.get("/v1/invoices")
    async def list_invoices(request: Request, who: CustomerDep) -> dict[str, Any]:
        found = await invoices.list_invoices(
            request.app.state.runtime.db,
            customer_id=who.customer_id,
            limit=settings.invoices_list_max,
        )
        return {"object": "list", "data": [invoice_render.summary_json(i) for i in found]}

    @app.get("/v1/invoices/{invoice_id}")
    async def get_invoice(
        request: Request,
        invoice_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)],
        who: CustomerDep,
    ) -> Response:
        found = await invoices.find_invoice(
            request.app.state.runtime.db, invoice_id, who.customer_id
        )
        if found is None:
            raise ApiError(404, "not_found", f"no invoice {invoice_id}")
        if "application/pdf" in request.headers.get("accept", ""):
            pdf = await asyncio.to_thread(invoice_render.invoice_pdf, found)
            name = found.number or found.invoice_id
            disposition = {"Content-Disposition": f'inline; filename="{name}.pdf"'}
            return Response(pdf, media_type="application/pdf", headers=disposition)
        return JSONResponse(invoice_render.invoice_json(found))

    # Probes and metrics (see probes.py): unauthenticated, as Kubernetes and Prometheus call
    # them. Liveness only says the process answers; readiness checks what serving needs.
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        ready, body = await probes.readiness_of(request.app.state)
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        status, text = await probes.metrics_of(request.app.state)
        return Response(text, status_code=status, media_type=probes.METRICS_MEDIA_TYPE)

    app.include_router(invoices_admin.router, prefix=ADMIN_PREFIX, dependencies=AdminDependencies)
    app.include_router(admin_power.router, prefix=ADMIN_PREFIX, dependencies=AdminDependencies)
    return app
