"""The bench's random-weight Llamas, made in a subprocess (the client process never imports torch)."""
from __future__ import annotations

import json
from pathlib import Path

from bench.common import MODELS

def _big_tokenizer(vocab_size: int):
    """Same special tokens and chat template as loom.toy_models, a corpus large enough for `vocab_size`."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loom.toy_models import CHAT_TEMPLATE

    rng = random.Random(0)
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    sylls = [c + v for c in cons for v in vow] + [c + v + e for c in cons for v in vow for e in "nrst"]
    words = ["".join(rng.choice(sylls) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    corpus = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(4000)]
    corpus += ["Hello! How are you today? The capital of France is Paris. Count from 1 to 5. 1, 2, 3, 4, 5."] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def make_models_main(cache: Path, names: list[str]) -> None:
    import torch

    import loom.toy_models as toy

    out = {}
    for name in names:
        spec = dict(MODELS[name])
        corpus = spec.pop("corpus")
        path = cache / "models" / name
        original = toy.make_tokenizer
        if corpus == "big":
            toy.make_tokenizer = _big_tokenizer  # make_llama looks it up at call time
        try:
            toy.make_llama(path, seed=0, **spec)
        finally:
            toy.make_tokenizer = original
        cfg = json.loads((path / "config.json").read_text())
        h, L, I, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
        kvh = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        hd = h // cfg["num_attention_heads"]
        params = V * h * 2 + L * (2 * h * h + 2 * h * kvh * hd + 3 * h * I + 2 * h) + h
        out[name] = {"path": str(path), "hidden_size": h, "layers": L, "heads": cfg["num_attention_heads"],
                     "kv_heads": kvh, "head_dim": hd, "intermediate": I, "vocab_size": V,
                     "max_positions": cfg["max_position_embeddings"], "parameters": params,
                     "parameters_m": round(params / 1e6, 1)}
    print(json.dumps({"models": out, "torch": torch.__version__}))
