"""Hidden-state vectors as JSON: exact round trips, and lines Weaver can read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from api.events import Want, message_delta
from api.floats import json_list
from loom import protocol as P


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_floats_round_trip_exactly_in_their_dtype(dtype):
    rng = np.random.default_rng(0)
    values = torch.tensor(rng.standard_normal(2048) * rng.choice([1e-6, 1e-3, 1, 50], 2048), dtype=torch.float32)
    values = values.to(getattr(torch, dtype))
    raw = (values.view(torch.int16) if dtype == "bfloat16" else values).numpy().tobytes()
    parsed = torch.tensor(json.loads(json_list(raw, dtype)), dtype=torch.float64).to(getattr(torch, dtype))
    assert torch.equal(parsed, values)


def test_shortest_form_is_short():
    raw = np.array([0.1, -2.5, 1e-5, 0.0], dtype=np.float16).tobytes()
    assert json.loads(json_list(raw, "float16")) == [0.1, -2.5, 1e-05, 0.0]
    assert json_list(raw, "float16") == b"[0.1,-2.5,1e-05,0]"


def test_message_delta_of_a_4096_wide_float16_model_stays_under_64_kib():
    rng = np.random.default_rng(1)
    # Typical final-layer activations span several orders of magnitude.
    vector = (rng.standard_normal(4096) * rng.choice([1e-3, 0.1, 1, 10], 4096)).astype(np.float16)
    final = P.Final(rid="r", stop_reason="end_turn", prompt_tokens=12, completion_tokens=50, generate_s=1.0,
                    model="TinyLlama/TinyLlama-1.1B-Chat-v1.0", dtype="float16",
                    arrays=[{"layer": -1, "keys": [-1], "shape": [1, 4096], "dtype": "float16"}])
    event = message_delta(final, [vector.tobytes()], Want(final=True, keys=None), 0.5)
    lines = event.split(b"\n")
    assert lines[0] == b"event: message_delta"
    assert len(lines[1]) < 60 * 1024, len(lines[1])
    data = json.loads(lines[1][len(b"data: "):])
    assert data["hidden_state"]["shape"] == [1, 4096]
    assert np.array_equal(np.array(data["hidden_state"]["final"], dtype=np.float16), vector)
