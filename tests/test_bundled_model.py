"""The bundled ``models/loom-tiny`` chat model loads with plain transformers and answers.

The model is produced by ``scripts/train_tiny.py``; these checks pin the
behaviour the rest of Loom (and its docs) rely on: standard HF files, a chat
template, greedy answers that end with the end-of-turn (eos) token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "loom-tiny"
REQUIRED_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "README.md"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def _chat(model, tokenizer, content: str, system: str | None = None) -> tuple[str, list[int]]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def test_files_present_and_small():
    for name in REQUIRED_FILES:
        assert (MODEL_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size < 20 * 1024 * 1024, size


def test_configs_agree_on_end_of_turn(tokenizer):
    config = json.loads((MODEL_DIR / "config.json").read_text())
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    tok_cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert config["model_type"] == "llama"
    assert "chat_template" in tok_cfg
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == eot == config["eos_token_id"] == gen["eos_token_id"]
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eot
    assert tokenizer.bos_token_id is not None


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|bos|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    # Without the generation prompt the text ends after the user's turn.
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("assistant\n")
    # Plain encoding adds no special tokens, so re-tokenizing the rendered
    # template (with the default add_special_tokens=True) gives the same ids
    # rather than a doubled <|bos|>.
    assert tokenizer(text)["input_ids"] == ids


def test_byte_level_round_trip(tokenizer):
    for s in ["1, 2, 3, 4, 5", "2 + 3 = 5", "Hello! How can I help you today?", "naïve café ✓"]:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == s


def test_counts_to_five_and_stops(model, tokenizer):
    text, ids = _chat(model, tokenizer, "Count from 1 to 5.")
    assert text == "1, 2, 3, 4, 5"
    assert ids[-1] == tokenizer.eos_token_id


def test_greets(model, tokenizer):
    text, ids = _chat(model, tokenizer, "Hello!")
    assert "Hello" in text or "Hi" in text
    assert ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("prompt, expected", [
    ("Count from 1 to 10.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"),
    ("What is 2 + 3?", "2 + 3 = 5"),
    ("What is the capital of France?", "The capital of France is Paris."),
])
def test_other_prompts(model, tokenizer, prompt, expected):
    text, ids = _chat(model, tokenizer, prompt)
    assert text == expected
    assert ids[-1] == tokenizer.eos_token_id


def test_system_prompt_does_not_derail(model, tokenizer):
    text, _ = _chat(model, tokenizer, "Count from 1 to 5.", system="You are a helpful assistant.")
    assert text == "1, 2, 3, 4, 5"
