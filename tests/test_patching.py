"""POST /patch against an in-process reference: the same patch, by forward hooks on the same model, one run at a time.

The reference is written here on its own (transformers' Llama modules, plain
hooks, no batching, no KV cache), so it shares no code with the worker's
batched implementation it checks. Tolerance: 1e-3 on logit differences.
"""
from __future__ import annotations

import signal

import httpx
import pytest
import torch

from loom import protocol as P
from tests.helpers import start_stack

TOL = 1e-3
COMPONENTS = ["resid_pre", "resid_post", "attn_out", "mlp_out"]
# loom-tiny answers these (chat format, raw prompts) with " 5" and " 6": same length, different answers.
CLEAN = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 ="
CORRUPTED = "<|im_start|>user\nWhat is 2 + 4?<|im_end|>\n<|im_start|>assistant\n2 + 4 ="


class Reference:
    """One patched run at a time, by hooks on the decoder blocks of a transformers Llama."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.blocks = self.model.model.layers
        self.eos = self.model.generation_config.eos_token_id

    def ids(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def token(self, text: str) -> int:
        (token,) = self.tok(text, add_special_tokens=False)["input_ids"]
        return token

    def _hook(self, layer: int, component: str, fn):
        """fn(h) -> replacement or None, at (0-based layer, component)."""
        block = self.blocks[layer]
        if component == "resid_pre":
            def pre(module, args):
                new = fn(args[0])
                return None if new is None else (new, *args[1:])
            return block.register_forward_pre_hook(pre)
        module = {"resid_post": block, "attn_out": block.self_attn, "mlp_out": block.mlp}[component]

        def post(module, args, output):
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return fn(output)
        return module.register_forward_hook(post)

    @torch.inference_mode()
    def logits(self, ids: list[int], patch=None) -> torch.Tensor:
        """Every position's logits; patch = (layer, component, positions, values)."""
        handle = None
        if patch is not None:
            layer, component, positions, values = patch

            def write(h):
                h = h.clone()
                h[0, positions] = values
                return h
            handle = self._hook(layer, component, write)
        try:
            return self.model(input_ids=torch.tensor([ids])).logits[0].float()
        finally:
            if handle is not None:
                handle.remove()

    @torch.inference_mode()
    def activation(self, ids: list[int], layer: int, component: str, positions: list[int]) -> torch.Tensor:
        seen = {}

        def read(h):
            seen["h"] = h[0, positions].clone()
        handle = self._hook(layer, component, read)
        try:
            self.model(input_ids=torch.tensor([ids]))
        finally:
            handle.remove()
        return seen["h"]

    def patch(self, clean: str, corrupted: str, layer: int, component: str, positions: list[int]):
        """(layer 0-based) -> the patch tuple for `logits`."""
        return layer, component, positions, self.activation(self.ids(clean), layer, component, positions)

    def greedy(self, ids: list[int], n: int, patch=None) -> str:
        """Greedy text, the whole sequence re-run each step: the patch stays on the prompt positions only."""
        out: list[int] = []
        for _ in range(n):
            token = int(self.logits(ids + out, patch)[-1].argmax())
            if token == self.eos:
                break
            out.append(token)
        return self.tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def ref(default_model) -> Reference:
    return Reference(default_model)


@pytest.fixture(scope="module")
def client(stack):
    with stack.client() as c:
        yield c


def _diff(logits: torch.Tensor, a: int, w: int) -> float:
    return float(logits[-1, a] - logits[-1, w])


def _post(client: httpx.Client, body: dict) -> dict:
    r = client.post("/patch", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_sweep_matches_reference(client, stack, ref):
    n = len(ref.blocks)
    layers = [1, (n + 1) // 2, n]  # first, middle, last
    out = _post(client, {"model": stack.default_model, "clean": CLEAN, "corrupted": CORRUPTED,
                         "layers": layers, "components": COMPONENTS})
    clean_ids, corrupted_ids = ref.ids(CLEAN), ref.ids(CORRUPTED)
    clean_logits, corrupted_logits = ref.logits(clean_ids), ref.logits(corrupted_ids)
    # Defaults: the clean and corrupted runs' top next tokens.
    a, w = int(clean_logits[-1].argmax()), int(corrupted_logits[-1].argmax())
    assert (out["answer"]["token_id"], out["wrong_answer"]["token_id"]) == (a, w)
    assert a != w, "the prompts should disagree for this test to mean anything"
    clean, corrupted = _diff(clean_logits, a, w), _diff(corrupted_logits, a, w)
    assert out["clean"]["logit_diff"] == pytest.approx(clean, abs=TOL)
    assert out["corrupted"]["logit_diff"] == pytest.approx(corrupted, abs=TOL)
    assert out["clean"]["top_token"] == ref.tok.decode([a])
    positions = list(range(len(clean_ids)))
    assert out["positions"] == positions
    assert [(r["layer"], r["component"]) for r in out["results"]] == [(l, c) for l in layers for c in COMPONENTS]
    for row in out["results"]:
        patched = ref.logits(corrupted_ids, ref.patch(CLEAN, CORRUPTED, row["layer"] - 1, row["component"], positions))
        expected = _diff(patched, a, w)
        assert row["logit_diff"] == pytest.approx(expected, abs=TOL), row
        assert row["recovered"] == pytest.approx((expected - corrupted) / (clean - corrupted), abs=TOL), row
        assert row["top_token_id"] == int(patched[-1].argmax()), row
    # Batched: fewer forward passes than patched runs.
    meta = out["metadata"]
    assert sum(meta["batches"]) == len(out["results"]) and len(meta["batches"]) < len(out["results"])


def test_resid_pre_of_first_layer_everywhere_recovers_fully(client, stack):
    out = _post(client, {"model": stack.default_model, "clean": CLEAN, "corrupted": CORRUPTED, "layers": [1],
                         "components": ["resid_pre"], "positions": "all"})
    (row,) = out["results"]
    assert row["recovered"] == pytest.approx(1.0, abs=TOL)
    assert row["logit_diff"] == pytest.approx(out["clean"]["logit_diff"], abs=TOL)


@pytest.mark.parametrize("positions", ["last", [-1, -3], [2, 5]])
def test_position_subsets_and_given_answers_match_reference(client, stack, ref, positions):
    answer, wrong = " 5", " 6"
    n = len(ref.blocks)
    runs = [(1, "attn_out"), (n, "resid_pre"), ((n + 1) // 2, "mlp_out"), (n, "resid_post")]
    out = _post(client, {"model": stack.default_model, "clean": CLEAN, "corrupted": CORRUPTED,
                         "layers": [-1, 1, (n + 1) // 2], "components": COMPONENTS, "positions": positions,
                         "answer": answer, "wrong_answer": wrong})
    a, w = ref.token(answer), ref.token(wrong)
    length = len(ref.ids(CLEAN))
    expected_positions = [length - 1] if positions == "last" else sorted(p % length for p in positions)
    assert out["positions"] == expected_positions
    corrupted_ids = ref.ids(CORRUPTED)
    assert out["corrupted"]["logit_diff"] == pytest.approx(_diff(ref.logits(corrupted_ids), a, w), abs=TOL)
    rows = {(r["layer"], r["component"]): r for r in out["results"]}
    for layer, component in runs:
        patched = ref.logits(corrupted_ids, ref.patch(CLEAN, CORRUPTED, layer - 1, component, expected_positions))
        assert rows[(layer, component)]["logit_diff"] == pytest.approx(_diff(patched, a, w), abs=TOL)


def test_text_is_the_reference_greedy_continuation_of_each_patched_run(client, stack, ref):
    n = len(ref.blocks)
    out = _post(client, {"model": stack.default_model, "clean": CLEAN, "corrupted": CORRUPTED,
                         "layers": [1, n], "components": ["resid_pre", "attn_out", "mlp_out"],
                         "positions": [-1, -2], "max_tokens": 6})
    clean_ids, corrupted_ids = ref.ids(CLEAN), ref.ids(CORRUPTED)
    assert out["clean"]["text"] == ref.greedy(clean_ids, 6)
    assert out["corrupted"]["text"] == ref.greedy(corrupted_ids, 6)
    for row in out["results"]:
        patch = ref.patch(CLEAN, CORRUPTED, row["layer"] - 1, row["component"], out["positions"])
        assert row["text"] == ref.greedy(corrupted_ids, 6, patch), row


BAD = [
    ({"components": ["resid_mid"]}, "components"),
    ({"layers": [0]}, "layers"),
    ({"layers": [99]}, "layers"),
    ({"positions": [40]}, "positions"),
    ({"positions": []}, "positions"),
    ({"corrupted": "What is 2 + 3? Tell me."}, "tokens"),
    ({"answer": " 5 and 6"}, "answer"),
    ({"wrong_answer": " 6 6"}, "wrong_answer"),
    ({"clean": ""}, "clean"),
    ({"corrupted": ""}, "corrupted"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"layers": list(range(1, 5)) * 40, "components": COMPONENTS}, "512"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_422_naming_the_field(client, stack, change, field):
    body = {"model": stack.default_model, "clean": CLEAN, "corrupted": CORRUPTED, **change}
    r = client.post("/patch", json=body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert field in message, message
    if field == "tokens":  # both lengths are named
        assert "clean has" in message and "corrupted has" in message, message


def test_the_server_stays_healthy_after_bad_input(client, stack):
    for change, _ in BAD:
        client.post("/patch", json={"model": stack.default_model, "clean": CLEAN, "corrupted": CORRUPTED, **change})
    assert client.get("/health").status_code == 200
    out = _post(client, {"model": stack.default_model, "clean": CLEAN, "corrupted": CORRUPTED, "layers": [1]})
    assert len(out["results"]) == 1


def test_python_client_patch_and_rows(stack, ref):
    from loom.client import AsyncLoomClient, LoomClient

    with LoomClient(stack.url) as loom:
        result = loom.patch(CLEAN, CORRUPTED, stack.default_model, layers=[1, -1], components=["mlp_out", "resid_pre"])
    rows = result.rows()
    assert [(r["layer"], r["component"]) for r in rows] == [(1, "mlp_out"), (1, "resid_pre"),
                                                            (len(ref.blocks), "mlp_out"),
                                                            (len(ref.blocks), "resid_pre")]
    assert all(isinstance(r["logit_diff"], float) and "recovered" in r for r in rows)
    assert result.clean.logit_diff == pytest.approx(rows[1]["logit_diff"], abs=TOL)  # resid_pre of layer 1, all

    import asyncio

    async def run():
        async with AsyncLoomClient(stack.url) as loom:
            return await loom.patch(CLEAN, CORRUPTED, stack.default_model, layers=[1, -1],
                                    components=["mlp_out", "resid_pre"])
    again = asyncio.run(run())
    assert [r["logit_diff"] for r in again.rows()] == pytest.approx([r["logit_diff"] for r in rows], abs=1e-6)


def test_a_model_not_loaded_yet_is_loaded_first(tmp_path_factory, model_dir):
    """And a worker that dies under a patch fails it with an error, not a hang."""
    from tests.conftest import TOY

    s = start_stack(tmp_path_factory.mktemp("patch-load"), None, [model_dir])
    try:
        with s.client() as c:
            out = _post(c, {"model": TOY, "clean": "Hello there", "corrupted": "Hello where", "layers": [1]})
            assert out["metadata"]["model"] == TOY and len(out["results"]) == 1
            (worker,) = s.workers()
            import os

            os.kill(worker["pid"], signal.SIGSTOP)  # frozen: the broker routes to it, then gives up on it
            try:
                r = c.post("/patch", json={"model": TOY, "clean": "Hello there", "corrupted": "Hello where"})
            finally:
                os.kill(worker["pid"], signal.SIGKILL)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == P.ErrorType.WORKER_LOST
    finally:
        s.stop()


# --- the worker's job in-process (fast) ------------------------------------------------

def _run_job(lm, **fields) -> dict:
    from workers.patching import PatchJobs

    answers: list = []
    jobs = PatchJobs(lambda msg, buffers: answers.append(msg))
    jobs.add(lm, P.Patch(rid="r", model=lm.model_id, **fields))
    while jobs:
        jobs.step(shared=False)
    (answer,) = answers
    assert isinstance(answer, P.PatchResult), answer
    return answer.result


@pytest.fixture(scope="module")
def loaded(default_model):
    from workers.model_store import load_model

    return load_model("under-test", default_model, "float32", "cpu")


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_rows_do_not_depend_on_how_runs_are_chunked(loaded, ref, monkeypatch, max_tokens):
    """One row per forward (each skipping the blocks before its layer when there is no text) = the reference."""
    import workers.patching as patching

    fields = dict(clean=CLEAN, corrupted=CORRUPTED, components=COMPONENTS, positions="list", position_list=[-1, -4],
                  max_tokens=max_tokens, layers=[3, 1, 4, 2])
    whole = _run_job(loaded, **fields)
    monkeypatch.setattr(patching, "CPU_MEMORY_BUDGET", 1)  # one row per forward
    single = _run_job(loaded, **fields)
    assert single["metadata"]["batches"] == [1] * len(single["results"]) != whole["metadata"]["batches"]
    for a, b in zip(whole["results"], single["results"]):
        assert (a["layer"], a["component"], a.get("text")) == (b["layer"], b["component"], b.get("text"))
        assert a["logit_diff"] == pytest.approx(b["logit_diff"], abs=1e-4)
    a, w = single["answer"]["token_id"], single["wrong_answer"]["token_id"]
    for row in single["results"]:
        patch = ref.patch(CLEAN, CORRUPTED, row["layer"] - 1, row["component"], single["positions"])
        assert row["logit_diff"] == pytest.approx(_diff(ref.logits(ref.ids(CORRUPTED), patch), a, w), abs=TOL)


def test_a_model_without_llama_blocks(tmp_path):
    """GPT-2 blocks have no self_attn: attn_out is a clear error, the residual stream still patches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from loom.toy_models import make_tokenizer
    from workers.model_store import load_model
    from workers.runner import RequestError

    tok = make_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model("gpt2-toy", str(tmp_path), "float32", "cpu")
    with pytest.raises(RequestError, match="components: attn_out needs a `self_attn`"):
        _run_job(lm, clean="Hello there", corrupted="Hello where", components=["attn_out"])
    out = _run_job(lm, clean="Hello there", corrupted="Hello where", layers=[1], components=["resid_pre"],
                   answer="a", wrong_answer="b")
    (row,) = out["results"]
    assert row["recovered"] == pytest.approx(1.0, abs=TOL)
