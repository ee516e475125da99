"""loom-tiny's tokenizer: byte-level BPE trained on the corpus, wrapped as a
`PreTrainedTokenizerFast` with a ChatML-style chat template; and the
assistant-only labels the training loss uses."""
from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"
# Order fixes the ids: pad=0, bos=1, im_start=2, im_end=3.
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]

# ChatML-style template.  <|im_end|> closes every turn and doubles as the
# model's eos token, so generation stops (stop_reason "end_turn") right after
# the assistant's answer.  Content may be a string or a list of OpenAI-style
# content parts; only the text parts are kept.  Contents are trimmed because
# the model never saw leading/trailing whitespace during training.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set content = message['content'] %}"
    "{%- else %}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def train_tokenizer(convs: list[list[dict]], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level BPE: no unknown tokens, spaces are part of the
    # following word (" 2"), and the ByteLevel decoder maps the "Ġ" bytes back
    # to spaces when decoding.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on the raw message text (plus the role names that the template
    # writes) so the markup never leaks into the merges.
    texts = ["system", "user", "assistant"] * 100
    texts += [m["content"] for conv in convs for m in conv]
    tok.train_from_iterator(texts, trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,  # end-of-turn token == eos, so a finished answer stops generation
        pad_token=PAD,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="left",  # left padding is what batched generation needs
        clean_up_tokenization_spaces=False,  # keep "1, 2" exactly as generated
    )
    return hf_tok


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 everywhere except assistant replies and their <|im_end|>).

    Assistant spans are found by rendering the conversation prefixes through the
    chat template itself, so the masking can never drift from the template.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)) - 1  # drop trailing "\n"
        assert text[start:end] == m["content"] + IM_END, (text[start:end], m)
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = any(s >= a and e <= b for a, b in spans)
        labels.append(tid if inside else -100)
    return ids, labels


def check_tokenizer(tokenizer) -> None:
    """The byte-level decoder must round-trip spaces and digits, and the
    generation prompt must be a token-level prefix of a full conversation
    (otherwise inference would see unseen ids)."""
    for s in ["1, 2, 3, 4, 5", "2 + 3 = 5", "Hello! How can I help you today?"]:
        assert tokenizer.decode(tokenizer(s)["input_ids"]) == s, s
    msgs = [{"role": "user", "content": "Count from 1 to 5."}]
    prompt_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "1, 2, 3, 4, 5"}],
                                             return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids


def make_tokenizer_config_portable(path: Path) -> None:
    """Use the class/key names that transformers 4.x understands as well as 5.x.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list under
    ``extra_special_tokens``; 4.x knows neither (there ``extra_special_tokens`` must
    be a dict).  ``PreTrainedTokenizerFast`` and ``additional_special_tokens`` are
    accepted by both (5.x maps them onto the new names).
    """
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if extra:
        cfg["additional_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
