"""The operator token: a bearer token on the API, the same token in a cookie on the dashboard.

The comparison is constant-time (:func:`hmac.compare_digest`). A missing and a wrong token
are both 401 with a message that says which, never echoing the token.
"""

from __future__ import annotations

import hmac
from typing import Final

from fastapi import HTTPException, Request, status

__all__ = ["COOKIE", "TokenCheck"]

COOKIE: Final = "nanofleet_token"
MAX_TOKEN_CHARS: Final = 4096


class TokenCheck:
    """A FastAPI dependency: passes a request carrying the operator token, else 401."""

    def __init__(self, token: str, *, allow_cookie: bool = False) -> None:
        self._token = token.encode()
        self._allow_cookie = allow_cookie

    def matches(self, presented: str | None) -> bool:
        """True when ``presented`` is the operator token."""
        if not presented or len(presented) > MAX_TOKEN_CHARS:
            return False
        return hmac.compare_digest(presented.encode(), self._token)

    def presented(self, request: Request) -> str | None:
        """The token the request carries (Authorization: Bearer, or the cookie if allowed)."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            return value.strip() if scheme.lower() == "bearer" else None
        if self._allow_cookie:
            return request.cookies.get(COOKIE)
        return None

    def __call__(self, request: Request) -> None:
        presented = self.presented(request)
        if presented is None:
            raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        if not self.matches(presented):
            raise _unauthorized("invalid bearer token")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail={"error": "unauthorized", "field": "authorization", "message": message},
        headers={"WWW-Authenticate": "Bearer"},
    )
