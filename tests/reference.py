"""An in-process reference for activation tests: the same model directory, run by transformers itself.

States come from `output_hidden_states` (layer 0 the embeddings, layer i the
i-th decoder layer's output, -1 the final normed state that transformers
puts last); only decoder layer N, which transformers replaces by the normed
state, is read with a forward hook. Greedy generation recomputes the whole
sequence at every step (no KV cache), so nothing is shared with the server's
code path.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

TOL = 1e-4  # float32 states and log-probs: server (KV cache, batched, padded) vs reference


@dataclass
class Run:
    prompt_ids: list[int]
    tokens: list[int]  # generated, the end-of-turn token included when the model chose it
    ended: bool  # the model chose its end-of-turn token
    states: dict[int, np.ndarray]  # layer index as asked -> [positions run, H]
    logits: np.ndarray  # [positions run, vocab], float32

    @property
    def completion(self) -> list[int]:
        return self.tokens[:-1] if self.ended else self.tokens


class Reference:
    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        config = self.model.config
        self.num_layers = int(config.num_hidden_layers)
        self.eos = {int(i) for i in np.atleast_1d(self.model.generation_config.eos_token_id or [])}
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(int(self.tokenizer.eos_token_id))

    # --- prompts -------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # --- runs ----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, ids: list[int],
                hooks: Callable[[Any], list[Any]] | None = None) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Every layer's states ([T, H], keyed 0..N and -1) and the logits ([T, V]) for `ids`."""
        model = self.model
        last: dict[str, torch.Tensor] = {}
        layers = model.model.layers
        handles = [layers[-1].register_forward_hook(
            lambda m, a, out: last.__setitem__("h", out[0] if isinstance(out, tuple) else out))]
        if hooks is not None:
            handles += hooks(model)
        try:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        hs = out.hidden_states
        states = {i: hs[i][0].float().numpy() for i in range(self.num_layers)}
        states[self.num_layers] = last["h"][0].float().numpy()
        states[-1] = hs[-1][0].float().numpy()
        return states, out.logits[0].float().numpy()

    def greedy(self, ids: list[int], max_tokens: int, hooks: Callable[[Any], list[Any]] | None = None) -> Run:
        tokens: list[int] = []
        ended = False
        for _ in range(max_tokens):
            _, logits = self.forward(ids + tokens, hooks)
            token = int(np.argmax(logits[-1]))
            tokens.append(token)
            if token in self.eos:
                ended = True
                break
        # One pass over every position the model ran: the prompt and each
        # generated token but the last, which is never fed back.
        states, logits = self.forward(ids + tokens[:-1], hooks)
        return Run(ids, tokens, ended, states, logits)

    def state(self, run: Run, layer: int) -> np.ndarray:
        return run.states[layer] if layer in run.states else run.states[layer % (self.num_layers + 2)]

    def lens(self, state: np.ndarray, layer: int) -> np.ndarray:
        """log-softmax of the LM head on `state` ([H]), through the final norm unless layer -1."""
        with torch.inference_mode():
            h = torch.tensor(state)[None]
            if layer != -1:
                h = self.model.model.norm(h)
            return torch.log_softmax(self.model.lm_head(h).float(), dim=-1)[0].numpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.tensor(logits, dtype=torch.float32), dim=-1).numpy()


def decode_array(entry: dict[str, Any]) -> np.ndarray:
    """A contract array entry (list or base64 under "data", "vector" or "final") as [n, H] float32."""
    shape = entry["shape"]
    if entry.get("encoding") == "base64":
        dtype = {"float32": "<f4", "float16": "<f2"}[entry["dtype"]]
        flat = np.frombuffer(base64.b64decode(entry["data"]), dtype=dtype).astype(np.float32)
    else:
        values = entry.get("data", entry.get("vector", entry.get("final")))
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
    return flat.reshape(shape)


def assert_close(got: np.ndarray, want: np.ndarray, what: str, tol: float = TOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert diff <= tol, f"{what}: max |diff| {diff:.3g} > {tol}"


def steering_hooks(interventions: list[dict[str, Any]], prompt_len: int) -> Callable[[Any], list[Any]]:
    """Forward hooks applying the contract's steering ops the plain way: positions < prompt_len are
    the prompt, the rest generated; add h + s*v, ablate h - s*(h.v_hat)v_hat; in order."""

    def module(model: Any, layer: int) -> Any:
        n = model.config.num_hidden_layers
        slot = layer % (n + 2)
        if slot == 0:
            return model.model.embed_tokens
        return model.model.norm if slot == n + 1 else model.model.layers[slot - 1]

    def attach(model: Any) -> list[Any]:
        handles = []
        for item in interventions:
            vector = torch.tensor(np.asarray(item["vector"], dtype=np.float32))
            scale, op, where = item.get("scale", 1.0), item.get("op", "add"), item.get("positions", "all")

            def hook(m: Any, args: Any, out: Any, vector=vector, scale=scale, op=op, where=where) -> Any:
                h = out[0] if isinstance(out, tuple) else out
                chosen = torch.zeros(h.shape[1], dtype=torch.bool)
                if where in ("all", "prompt"):
                    chosen[:prompt_len] = True
                if where in ("all", "generated"):
                    chosen[prompt_len:] = True
                if op == "add":
                    new = h + scale * vector
                else:
                    unit = vector / vector.norm()
                    new = h - scale * (h @ unit)[..., None] * unit
                h = torch.where(chosen[None, :, None], new, h)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handles.append(module(model, item["layer"]).register_forward_hook(hook))
        return handles

    return attach
