"""HTTP answers shared by every route: compact JSON, errors, SSE headers."""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson
from fastapi.responses import JSONResponse, StreamingResponse

from api.broker_client import BrokerError
from api.events import error_body
from loom import protocol as P

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: BrokerError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after or 1)))} if exc.error_type == P.ErrorType.OVERLOADED else None
    status = P.HTTP_STATUS.get(exc.error_type, 500)
    return ORJSONResponse(error_body(exc.error_type, exc.message), status_code=status, headers=headers)


def sse_once(event: bytes) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield event

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
