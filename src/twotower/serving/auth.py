"""Who may call the endpoints that change the service: a bearer token, or loopback."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from fastapi import HTTPException


def authorize(tokens: list[str | None], authorization: str | None, client: Any) -> None:
    """One of the configured tokens must be presented; with none configured, only
    loopback clients pass."""
    tokens = [token for token in tokens if token is not None]
    if not tokens:
        host = getattr(client, "host", None)
        try:
            local = host is not None and ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            raise HTTPException(
                403, "this endpoint answers only loopback clients unless a token is set"
            )
        return
    if authorization is None or not authorization.startswith("Bearer "):
        raise HTTPException(401, "this endpoint needs 'Authorization: Bearer <token>'")
    given = authorization[len("Bearer ") :].encode()
    # every token compared, so the time taken does not tell which one was close
    matches = [hmac.compare_digest(given, token.encode()) for token in tokens]
    if not any(matches):
        raise HTTPException(403, "wrong token")
