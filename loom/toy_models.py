"""Random-weight Llama models with a real tokenizer, for tests and benchmarks.

They are saved with `save_pretrained` and loaded back through the same
`from_pretrained` path as any hub model, so nothing about them is special.
"""
from __future__ import annotations

import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [
        "Count from 1 to 5. 1, 2, 3, 4, 5. Hello! How are you today? The capital of France is Paris.",
        string.ascii_letters + string.digits + string.punctuation,
        "héllo wörld — naïve café ☕ 日本語 emoji 🎉",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def make_llama(path: Path, hidden_size: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
               vocab_size: int = 512, max_positions: int = 512, seed: int = 0) -> Path:
    """Save a random Llama and its tokenizer to `path` (skipped if already there)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random weights would end a greedy answer at a random point; a zero
        # logit for the special tokens (others spread around it) keeps greedy
        # answers going until max_tokens, so tests can count on long streams.
        model.lm_head.weight[: len(tokenizer.all_special_ids) + 2].zero_()
        model.lm_head.weight[tokenizer.all_special_ids].zero_()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
