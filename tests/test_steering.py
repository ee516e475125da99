"""Steering over real HTTP, against a reference that applies the same op with a forward hook in-process."""
from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

from tests.reference import Reference, Run, assert_close, decode_array, steering_hooks

PROMPT = "The capital of France is"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def plain(ref) -> Run:
    return ref.greedy(ref.prompt_ids(PROMPT), MAX_TOKENS)


def direction(ref: Reference, plain: Run, layer: int, op: str, seed: int = 0) -> np.ndarray:
    """A vector strong enough to matter: for add, a random direction as long as the layer's state at the
    last prompt token; for ablate, halfway between that state's direction and a random one (ablating
    the state's exact direction would leave ~0 there, whose norm then amplifies rounding)."""
    state = ref.state(plain, layer)[len(plain.prompt_ids) - 1]
    v = np.random.default_rng(seed).standard_normal(state.shape[0])
    v = v / np.linalg.norm(v) * np.linalg.norm(state)
    return (state + v if op == "ablate" else v).astype(np.float32)


def generate(client: httpx.Client, stack, steering: list[dict] | None, prompt: str = PROMPT, **extra) -> dict:
    body = {"model": stack.default_model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_hidden_states": True, "hidden_state_layers": [-1], "hidden_state_positions": "all",
            "hidden_state_format": "base64", **extra}
    if steering is not None:
        body["steering"] = steering
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wire(items: list[dict]) -> list[dict]:
    """Vectors as JSON lists for one half of the cases and base64 for the other: both encodings are served."""
    out = []
    for i, item in enumerate(items):
        vector = np.asarray(item["vector"], dtype=np.float32)
        if i % 2:
            encoded = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            out.append({**item, "vector": encoded, "dtype": "float32"})
        else:
            out.append({**item, "vector": vector.tolist()})
    return out


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
@pytest.mark.parametrize("op", ["add", "ablate"])
@pytest.mark.parametrize("layer", [0, 2, -1])
def test_steered_generation_matches_the_hooked_reference(stack, ref, plain, layer, op, positions):
    items = [{"layer": layer, "vector": direction(ref, plain, layer, op), "scale": 1.5 if op == "add" else 1.0,
              "op": op, "positions": positions}]
    ids = ref.prompt_ids(PROMPT)
    run = ref.greedy(ids, MAX_TOKENS, steering_hooks(items, len(ids)))
    with stack.client() as client:
        answer = generate(client, stack, wire(items))
        with client.stream("POST", "/generate", json={"model": stack.default_model, "prompt": PROMPT,
                                                      "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                                                      "steering": wire(items)}) as r:
            streamed = "".join(json.loads(line[6:])["delta"]["text"] for line in r.iter_lines()
                               if line.startswith("data: ") and '"content_block_delta"' in line)
    assert answer["text"] == ref.text(run.completion) == streamed
    # Hidden states returned for a steered request are the steered ones.
    assert_close(decode_array(answer["hidden_states"]["-1"]), run.states[-1], f"{op} at {layer}, {positions}")


def test_steering_changes_the_answer(stack, ref, plain):
    """The cases above would pass trivially if steering did nothing: here it must change the text."""
    items = [{"layer": 0, "vector": direction(ref, plain, 0, "add"), "scale": 1.5, "op": "add", "positions": "all"}]
    with stack.client() as client:
        steered = generate(client, stack, wire(items))
        unsteered = generate(client, stack, None)
    assert unsteered["text"] == ref.text(plain.completion)
    assert steered["text"] != unsteered["text"]


@pytest.mark.parametrize("case", ["zero vector", "scale 0", "zero ablate"])
def test_a_zero_vector_or_scale_changes_nothing(stack, ref, plain, case):
    width = ref.model.config.hidden_size
    item = {"layer": 2, "vector": np.zeros(width, dtype=np.float32), "scale": 3.0, "op": "add"}
    if case == "scale 0":
        item.update(vector=direction(ref, plain, 2, "add"), scale=0.0)
    elif case == "zero ablate":
        item.update(op="ablate")
    with stack.client() as client:
        steered = generate(client, stack, wire([item]))
        unsteered = generate(client, stack, None)
    assert steered["text"] == unsteered["text"]
    # Two separate runs: equal up to the last bits a CPU kernel may vary by (the worker skips such
    # an intervention outright: test_runner_research.py checks that no hook runs for it).
    assert_close(decode_array(steered["hidden_states"]["-1"]), decode_array(unsteered["hidden_states"]["-1"]),
                 case, tol=1e-6)


def test_in_a_batch_of_8_every_request_equals_its_solo_run(stack, ref, plain):
    """Four rows steered with different vectors, layers and ops; four unsteered; all at once."""
    prompts = ["The capital of France is", "Hello", "Count from 1 to 10:", "Once upon a time",
               "What is 2 + 3?", "Good morning!", "The sky is", "Say something."]
    steerings = [
        [{"layer": 0, "vector": direction(ref, plain, 0, "add", 1), "scale": 1.5, "op": "add", "positions": "all"}],
        [{"layer": 2, "vector": direction(ref, plain, 2, "ablate"), "op": "ablate", "positions": "generated"}],
        [{"layer": -1, "vector": direction(ref, plain, -1, "add", 2), "scale": 0.8, "positions": "prompt"},
         {"layer": 1, "vector": direction(ref, plain, 1, "add", 3), "scale": 1.0}],
        [{"layer": 3, "vector": direction(ref, plain, 3, "add", 4), "scale": 2.0, "op": "add", "positions": "all"}],
        None, None, None, None,
    ]
    with stack.client() as client:
        alone = [generate(client, stack, wire(s) if s else None, p) for p, s in zip(prompts, steerings)]

    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            async def one(prompt: str, items: list[dict] | None) -> dict:
                body = {"model": stack.default_model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "return_hidden_states": True, "hidden_state_layers": [-1], "hidden_state_positions": "all",
                        "hidden_state_format": "base64"}
                if items:
                    body["steering"] = wire(items)
                r = await client.post("/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(p, s) for p, s in zip(prompts, steerings)))

    batched = asyncio.run(together())
    for i, (a, b) in enumerate(zip(alone, batched)):
        assert b["text"] == a["text"], i
        assert_close(decode_array(b["hidden_states"]["-1"]), decode_array(a["hidden_states"]["-1"]), f"request {i}")
    for i in range(4, 8):  # the unsteered ones are the unsteered baseline
        assert batched[i]["text"] == ref.text(ref.greedy(ref.prompt_ids(prompts[i]), MAX_TOKENS).completion)
    for i in range(4):  # and the steered ones are what the reference makes of their steering
        ids = ref.prompt_ids(prompts[i])
        run = ref.greedy(ids, MAX_TOKENS, steering_hooks(steerings[i], len(ids)))
        assert batched[i]["text"] == ref.text(run.completion), i
