"""Geometry of sets of hidden-state vectors: the numbers behind the Weaver
client's `/analyze` and `/compare` (see analysis-spec.md beside CONTRACT.md).

Pure numpy/scipy/scikit-learn, no HTTP: `analyze_geometry(X, seed)` and
`analyze_bilateral(S, R, seed)` take float arrays (one vector a row) and
return dataclasses whose `as_json()` is the answer's JSON shape.
"""
from loom.analysis.bilateral import BilateralResult, analyze_bilateral
from loom.analysis.geometry import GeometryResult, analyze_geometry
from loom.analysis.inputs import MAX_DIMS, MAX_VECTORS, MIN_VECTORS, InputError, check_same_dims, check_vectors

__all__ = [
    "MAX_DIMS",
    "MAX_VECTORS",
    "MIN_VECTORS",
    "BilateralResult",
    "GeometryResult",
    "InputError",
    "analyze_bilateral",
    "analyze_geometry",
    "check_same_dims",
    "check_vectors",
]
