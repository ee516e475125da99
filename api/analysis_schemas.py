"""Bodies of POST /analyze/geometry and /analyze/bilateral (analysis-spec.md).

The request models document the bodies on /docs; the vectors themselves are
checked with numpy (loom/analysis/inputs.py), not float by float, since a
request may carry 10,000 x 16,384 of them. The answers' models are the
Python client's (loom/client/analysis.py), defined once for both.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from loom.analysis.inputs import MAX_ABS, MAX_DIMS, MAX_VECTORS, MIN_VECTORS

_VECTORS = (f"{MIN_VECTORS} to {MAX_VECTORS} vectors, one list of numbers each, all of the same length "
            f"(1 to {MAX_DIMS}); finite numbers within ±{MAX_ABS:g}")
# For the docs (and schema-driven clients): what JSON Schema can say of one vector.
Vector = Annotated[list[Annotated[float, Field(ge=-MAX_ABS, le=MAX_ABS)]], Field(min_length=1, max_length=MAX_DIMS)]


class AnalysisOptions(BaseModel):
    """The fields besides the vectors (validated by pydantic)."""

    model_config = ConfigDict(extra="ignore")
    seed: int | None = Field(0, ge=0, le=2**32 - 1,
                             description="seed of the one random generator (numpy RandomState) the analysis "
                                         "draws from: the same vectors and seed give the same numbers; "
                                         "null means 0")


class GeometryRequest(AnalysisOptions):
    vectors: list[Vector] = Field(..., min_length=MIN_VECTORS, max_length=MAX_VECTORS,
                                       description=f"the set to describe: {_VECTORS}")


class BilateralRequest(AnalysisOptions):
    sender_vectors: list[Vector] = Field(..., min_length=MIN_VECTORS, max_length=MAX_VECTORS,
                                              description=f"the first set: {_VECTORS}")
    receiver_vectors: list[Vector] = Field(..., min_length=MIN_VECTORS, max_length=MAX_VECTORS,
                                                description="the second set, of the same dimension as "
                                                            f"sender_vectors: {_VECTORS}")
