"""The lean path of ``POST /recall``: a plainly valid request answered without the framework.

    body -> recall_codec.decode (C: JSON, types, bounds) -> Query -> micro-batcher
         -> Result -> recall_codec.encode_answer (C) -> the response's two messages

Plain ASGI, inside the body limit and the metrics (``middleware.py``), before the
framework's routing: a ``POST /recall`` whose JSON body the codec takes is answered
here, with no routing, no dependency resolution, no pydantic model and no response
class on its way. Every other request, a ``/recall`` body the codec does not take
included, goes on to the framework unchanged (its body handed on as read), so a bad
request gets the very 4xx it always got, and ``/recall`` keeps its FastAPI route: the
OpenAPI schema documents it, and the route answers what this path leaves to it.

The answers are the route's: 200 with ``RecallResponse``'s JSON, 404 / 422 / 503 with
``{"detail": ...}`` (``responses.status_of``; 503 also while shutting down); an unexpected
error propagates to the app's handler of errors (a 500), as the route's does. The
request is labelled with the route for the metrics.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from twotower.errors import DataError
from twotower.serving import recall_codec
from twotower.serving.middleware import ASGIApp, Message, Receive, Scope, Send
from twotower.serving.responses import status_of
from twotower.serving.state import ServiceState

JSON_HEADERS = [(b"content-type", b"application/json")]


class LeanRecall:
    """Answers plainly valid ``POST /recall`` requests itself; hands on every other.

    Args:
        app: the framework's app, which answers every other request.
        state: the service whose micro-batcher answers the queries.
        route: the framework's ``/recall`` route, set as the request's route (the
            metrics label requests by its path).
    """

    def __init__(self, app: ASGIApp, state: ServiceState, route: Any) -> None:
        self.app = app
        self.state = state
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/recall" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await _body(receive)
        if body is None:  # the client went away
            return
        query = recall_codec.decode(body) if body and _json_content(scope["headers"]) else None
        if query is None:  # the framework's, with the body as read
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = self.route
        try:
            (answer,), artifact = await self.state.answer([query])
        except HTTPException as err:  # shutting down
            await _send(send, err.status_code, _detail(err.detail))
            return
        if isinstance(answer, DataError):
            await _send(send, status_of(answer), _detail(str(answer)))
            return
        payload = recall_codec.encode_answer(answer, artifact.fingerprint, artifact.version)
        await _send(send, 200, payload)


def _detail(detail: str) -> bytes:
    """An error's body, as ``responses.py`` writes every error."""
    return recall_codec.encode({"detail": detail})


def _json_content(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the framework would read the body as JSON and as nothing else: no
    content type, or ``application/json`` (with any parameters)."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return True


async def _body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client went away first."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    if not message.get("more_body", False):
        return message.get("body", b"")
    parts = [message.get("body", b"")]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
    return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` once, then whatever ``receive`` gives."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send(send: Send, status: int, payload: bytes) -> None:
    """A whole JSON response, headed as the framework's ``JSONResponse`` heads one."""
    headers = [(b"content-length", str(len(payload)).encode()), *JSON_HEADERS]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
