"""The admin API's credential: one operator token, never a customer key.

Admin routes (customers, keys, prices, budgets, credits, invoices, reports) live in their own
modules, each an APIRouter; `create_app` mounts them all under ADMIN_PREFIX behind
`admin_credential`. A request without the admin token gets 401; one that carries a customer's
API key gets 403, so a leaked customer key can never reach another customer's books.
"""

from __future__ import annotations

import dataclasses
import hmac
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from tokenmill import datadir
from tokenmill.intake import openapi
from tokenmill.intake.errors import ApiError
from tokenmill.settings import Settings

ADMIN_PREFIX = "/admin/v1"
ADMIN_TOKEN_FILE = "admin.token"


def with_admin_token(settings: Settings) -> Settings:
    """`settings` with an admin token: the configured one, or else the data dir's, created
    (owner-only) the first time, so `up` keeps the same one across restarts."""
    if settings.admin_token:
        return settings
    token = datadir.secret(Path(settings.data_dir) / ADMIN_TOKEN_FILE)
    return dataclasses.replace(settings, admin_token=token)


async def admin_credential(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(openapi.BEARER)],
) -> None:
    expected = request.app.state.settings.admin_token
    if not expected:
        raise ApiError(
            403,
            "admin_disabled",
            "this intake has no admin credential configured; set TOKENMILL_ADMIN_TOKEN",
        )
    given = bearer.credentials if bearer is not None else ""
    # Constant time, so the token cannot be found byte by byte from response times.
    if given and hmac.compare_digest(given.encode(), expected.encode()):
        return
    if given and await request.app.state.keys.customer(given) is not None:
        raise ApiError(
            403,
            "admin_only",
            "this route needs the admin credential; a customer API key cannot use it",
        )
    raise ApiError(
        401,
        "invalid_admin_token",
        "missing or invalid admin credential; send Authorization: Bearer <admin token>",
        headers={"WWW-Authenticate": "Bearer"},
    )


AdminDependencies = [Depends(admin_credential)]
