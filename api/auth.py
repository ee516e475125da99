"""Optional bearer-token authentication for every endpoint but /health."""
from __future__ import annotations

import hmac

from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="Set when the server was started with an API key")


async def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if not expected:
        return
    credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status_code=401, headers={"WWW-Authenticate": "Bearer"},
                            detail={"type": "authentication_error",
                                    "message": "missing or wrong API key: send `Authorization: Bearer <key>`"})
