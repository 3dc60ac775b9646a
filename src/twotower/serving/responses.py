"""How the HTTP service answers: ASCII-safe JSON, and every error as ``{"detail": ...}``.

Every response to a bad request is a 4xx with ``{"detail": "..."}`` naming the field
or value at fault (a 422 also lists the validation errors); nothing a client sends
gives a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from twotower.errors import DataError
from twotower.serving import schemas
from twotower.serving.query import UnknownItemError, UnknownQueryError
from twotower.serving.stores.base import StoreUnavailableError

log = logging.getLogger(__name__)

# What a lookup documents beside its answer: an unknown id, or a request it cannot answer.
ERRORS = {404: {"model": schemas.ErrorResponse}, 422: {"model": schemas.ErrorResponse}}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: any text a client sent, even a lone
    surrogate (valid in JSON, not in UTF-8), can be echoed back without failing."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def status_of(error: DataError) -> int:
    """The status a request gets for ``error``: 503 when the user-state store cannot
    be reached (worth a retry), 404 for an unknown id, else 422."""
    if isinstance(error, StoreUnavailableError):
        return 503
    return 404 if isinstance(error, (UnknownQueryError, UnknownItemError)) else 422


def refusal(error: DataError) -> HTTPException:
    """The HTTP error to raise for a request the artifact cannot answer."""
    return HTTPException(status_of(error), str(error))


def add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"detail": "..."}``; validation errors as one readable line."""
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [_describe(error) for error in exc.errors()]
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return AsciiJSONResponse({"detail": "; ".join(problems), "errors": errors}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return AsciiJSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return AsciiJSONResponse({"detail": "internal error (logged by the service)"}, status_code=500)


def _describe(error: dict[str, Any]) -> str:
    """One validation error as text: where, what, and the value sent."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    where = ".".join(loc) if loc else "body"
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return f"the body is not valid JSON ({reason})"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}"
    if kind == "missing" and where == "body":
        return "the request needs a JSON body"
    if kind == "value_error":
        return f"{where}: {error.get('msg', '').removeprefix('Value error, ')}"
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{where}: {error.get('msg', 'invalid')} (got {shown})"
