"""POST /analyze/geometry and /analyze/bilateral: what the Weaver client's
`/analyze` and `/compare` call (analysis-spec.md beside CONTRACT.md).

The body is spooled to a temporary file as it arrives and its path handed
to a process pool (api/analysis_pool.py): parsing and checking up to
10,000 x 16,384 floats, then the analysis, never run on the event loop, and
this process never holds the body whole, so /health and streams stay fast
while analyses run.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.analysis_pool import AnalysisPool, BadRequest, Job, bilateral_job, geometry_job
from api.analysis_schemas import BilateralRequest, GeometryRequest
from api.auth import require_api_key
from api.events import error_body
from loom import protocol as P
from loom.client.analysis import BilateralAnalysis, GeometryAnalysis

log = logging.getLogger("loom.api.analysis")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.analysis_pool = AnalysisPool()
    try:
        yield
    finally:
        app.state.analysis_pool.close()


router = APIRouter(tags=["analysis"], dependencies=[Depends(require_api_key)], lifespan=_lifespan)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a JSON body the route reads itself (so /docs still shows every field)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


_ERRORS = {422: {"description": 'Bad input: {"type":"error","error":{"type":"invalid_request_error",'
                                '"message":"<field>: <what is wrong>"}}'}}


SPOOL_WRITE = 4 << 20  # bytes gathered per write


async def _spool(request: Request) -> str:
    """The body, written to a new temporary file as it arrives; its path."""
    fd, path = tempfile.mkstemp(prefix="loom-analysis-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            parts: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                parts.append(chunk)
                size += len(chunk)
                if size >= SPOOL_WRITE:
                    # In a thread: a write may wait for the disk once gigabytes are dirty.
                    await asyncio.to_thread(f.write, b"".join(parts))
                    parts, size = [], 0
            f.write(b"".join(parts))
    except BaseException:
        os.unlink(path)
        raise
    return path


async def _analyze(request: Request, job: Job) -> dict[str, Any] | JSONResponse:
    path = await _spool(request)
    try:
        return await request.app.state.analysis_pool.run(job, path)
    except BadRequest as exc:
        raise RequestValidationError(exc.errors) from None
    except Exception:  # a died process (BrokenProcessPool) or a bug: an answer, not a dropped connection
        log.exception("analysis failed")
        return JSONResponse(error_body(P.ErrorType.INTERNAL, "the analysis failed on the server (see its log); "
                                                             "a very large set may have run out of memory"),
                            status_code=500)
    finally:
        os.unlink(path)


@router.post("/analyze/geometry", response_model=GeometryAnalysis, responses=_ERRORS,
             openapi_extra=_json_body(GeometryRequest),
             summary="Describe one set of vectors: density, coverage, grains (Weaver's /analyze)")
async def analyze_geometry(request: Request) -> Any:
    return await _analyze(request, geometry_job)


@router.post("/analyze/bilateral", response_model=BilateralAnalysis, responses=_ERRORS,
             openapi_extra=_json_body(BilateralRequest),
             summary="Compare two sets of vectors of the same dimension (Weaver's /compare)")
async def analyze_bilateral(request: Request) -> Any:
    return await _analyze(request, bilateral_job)
