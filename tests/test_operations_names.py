"""Model names: a model loaded from a path answers to the path as typed, its absolute path and its short id.

Two different directories with the same name get distinct ids (`twin` and
`twin-2`), and each name reaches its own weights: checked against the
final hidden state an in-process transformers model computes for the same
prompt (absolute tolerance 1e-4, float32).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, Stack, start_stack, stream_chat, text_of, user

PROMPT = "Hello there"


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    from loom.toy_models import make_llama

    root = tmp_path_factory.mktemp("twins")
    first = make_llama(root / "a" / "twin", seed=1)
    second = make_llama(root / "b" / "twin", seed=2)
    other = make_llama(root / "elsewhere" / "stray", seed=3)
    return root, first, second, other


@pytest.fixture(scope="module")
def twin_stack(tmp_path_factory, twins):
    root, first, second, _ = twins
    # Typed as an operator would, relative to where `loom serve` runs; only b/ is a model directory.
    typed_first = os.path.relpath(first, REPO)
    s = start_stack(tmp_path_factory.mktemp("twin-stack"), str(second), [root / "b"], extra=["--model", typed_first])
    s.typed_first = typed_first  # type: ignore[attr-defined]
    yield s
    s.stop()


def reference_final_state(path: Path) -> np.ndarray:
    """The final (post-norm) hidden state at the prompt's last token, computed in-process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        return model.model(input_ids=ids).last_hidden_state[0, -1].numpy()


def served_final_state(stack: Stack, name: str) -> tuple[str, np.ndarray]:
    with stack.client() as client:
        r = client.post("/generate", json={"model": name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                           "return_hidden_states": True, "hidden_state_layers": [-1]})
    assert r.status_code == 200, (name, r.text)
    body = r.json()
    return body["metadata"]["model"], np.array(body["hidden_states"]["-1"]["data"], dtype=np.float32).reshape(-1)


def entries(stack: Stack) -> dict[str, dict]:
    with stack.client() as client:
        return {m["model_id"]: m for m in client.get("/models").json()["loaded_models"]}


def test_same_named_directories_get_distinct_ids_and_their_own_weights(twin_stack: Stack, twins):
    _, first, second, _ = twins
    models = entries(twin_stack)
    # The first --model keeps the name; the second directory called `twin` gets `twin-2`.
    assert set(models) == {"twin", "twin-2"}, models
    assert models["twin-2"]["source"] == str(second.resolve())
    assert models["twin"]["source"] == str(first.resolve())
    assert twin_stack.typed_first in models["twin"]["aliases"]  # type: ignore[attr-defined]
    assert str(first.resolve()) in models["twin"]["aliases"]
    assert str(second.resolve()) in models["twin-2"]["aliases"]
    with twin_stack.client() as client:
        health = client.get("/health").json()
    listed = [m for w in health["workers"] for m in w["models"]]
    assert all({"model_id", "source", "aliases"} <= set(m) for m in listed), listed

    for model_id, path in (("twin", first), ("twin-2", second)):
        expected = reference_final_state(path)
        for name in models[model_id]["aliases"]:
            served_id, state = served_final_state(twin_stack, name)
            assert served_id == model_id, name
            np.testing.assert_allclose(state, expected, atol=1e-4, rtol=0, err_msg=name)
    # The two really differ, so the comparison above tells them apart.
    assert not np.allclose(reference_final_state(first), reference_final_state(second), atol=1e-2)


def test_chat_load_and_delete_accept_every_alias(twin_stack: Stack, twins):
    _, first, _, _ = twins
    typed = twin_stack.typed_first  # type: ignore[attr-defined]
    before = entries(twin_stack)["twin"]
    with twin_stack.client() as client:
        events = stream_chat(client, {"model": typed, "messages": user("hi"), "max_tokens": 3, "temperature": 0})
        assert events[-1].name == "message_delta" and events[-1].data["metadata"]["model"] == "twin", events[-1]
        assert text_of(events)
        r = client.post("/v1/chat/completions", json={"model": str(first.resolve()), "messages": user("hi"),
                                                      "max_tokens": 2})
        assert r.status_code == 200 and r.json()["metadata"]["model"] == "twin", r.text
        # Loading a loaded model by any of its names answers at once with that model: nothing is reloaded.
        for name in (typed, str(first.resolve()), "twin"):
            r = client.post("/models/load", json={"model": name})
            assert r.status_code == 200, r.text
            assert r.json()["model_id"] == "twin" and r.json()["load_time_seconds"] == before["load_time_seconds"]
        # DELETE by the absolute path ('/' written '--'), then the short id is gone too.
        r = client.delete("/models/" + str(first.resolve()).replace("/", "--"))
        assert r.status_code == 200, r.text
        assert "twin" not in entries(twin_stack)
        # Its path is outside the model directories: over HTTP it cannot be loaded again.
        r = client.post("/generate", json={"model": typed, "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found", r.text
        # A bare name is looked up in the model directories: `twin` there is b/twin, loaded as twin-2.
        r = client.post("/generate", json={"model": "twin", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["metadata"]["model"] == "twin-2", r.text


def test_http_loads_paths_only_inside_model_dirs(twin_stack: Stack, twins):
    root, first, second, other = twins
    with twin_stack.client() as client:
        # Outside every configured model directory: refused, by absolute or relative path.
        for path in (str(other.resolve()), os.path.relpath(other, REPO), str(first.resolve())):
            if path == str(first.resolve()) and "twin" in entries(twin_stack):
                continue  # loaded by the operator: answering for it is not loading it
            r = client.post("/models/load", json={"model": path})
            assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found", (path, r.text)
        # Inside one (b/ is a --model-dir): accepted, by its path, and already loaded as twin-2.
        r = client.post("/models/load", json={"model": str(second.resolve())})
        assert r.status_code == 200 and r.json()["model_id"] == "twin-2", r.text
        # A model directory's model unloaded, then loaded over HTTP by a path inside the directory:
        # `twin` may still be taken by the operator's twin, so the id follows the same rule.
        assert client.delete("/models/twin-2").status_code == 200
        twin_taken = "twin" in entries(twin_stack)
        r = client.post("/models/load", json={"model": str(second.resolve())})
        assert r.status_code == 200, r.text
        reloaded = r.json()["model_id"]
        assert reloaded == ("twin-2" if twin_taken else "twin")
    served_id, state = served_final_state(twin_stack, str(second.resolve()))
    assert served_id == reloaded
    np.testing.assert_allclose(state, reference_final_state(second), atol=1e-4, rtol=0)
