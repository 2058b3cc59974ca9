"""The baseline: a bare FastAPI endpoint that parses the same body and answers 202, nothing more."""

from __future__ import annotations

import itertools

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tokenmill.intake.requests import GenerationRequest

app = FastAPI()
_ids = itertools.count()


@app.post("/v1/jobs", status_code=202)
async def submit(body: GenerationRequest) -> JSONResponse:
    return JSONResponse({"id": f"job_{next(_ids)}", "status": "queued"}, status_code=202)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
