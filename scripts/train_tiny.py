#!/usr/bin/env python3
"""Train ``loom-tiny``, the small chat model bundled with Loom.

Loom has to work offline out of the box, so it ships a tiny Llama-architecture
chat model trained from scratch by this script on CPU in a few minutes.  The
script is self-contained and deterministic for a given seed (and thread count):

1. it generates its own chat corpus (counting, greetings, small talk, short
   facts, small arithmetic, optional system prompts, a few multi-turn chats);
2. it trains a byte-level BPE tokenizer on that corpus with ``tokenizers`` and
   wraps it as a ``PreTrainedTokenizerFast`` with a ChatML-style chat template;
3. it trains a ``LlamaForCausalLM`` with the loss on assistant tokens only;
4. it saves everything in standard Hugging Face format and prints a few greedy
   samples.

Re-create the bundled model with (from the repository root)::

    python scripts/train_tiny.py --out models/loom-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- #
# Special tokens and chat template
# --------------------------------------------------------------------------- #

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

# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #

HELP_SUFFIX = "How can I help you today?"

# Greetings map to one fixed reply each, so greedy decoding is unambiguous.
GREETINGS = {
    f"Hello! {HELP_SUFFIX}": ["Hello!", "Hello", "hello", "Hello.", "Hello there!", "Hello there",
                              "hello!", "Greetings!", "Hello, assistant!", "Hello :)"],
    f"Hi there! {HELP_SUFFIX}": ["Hi", "Hi!", "hi", "hi!", "Hi there", "Hi there!", "Hiya!"],
    f"Hey! {HELP_SUFFIX}": ["Hey", "Hey!", "hey", "Hey there!", "Hey there"],
    f"Good morning! {HELP_SUFFIX}": ["Good morning", "Good morning!", "good morning", "Morning!"],
    f"Good afternoon! {HELP_SUFFIX}": ["Good afternoon", "Good afternoon!", "good afternoon"],
    f"Good evening! {HELP_SUFFIX}": ["Good evening", "Good evening!", "good evening"],
    f"I'm doing well, thank you! {HELP_SUFFIX}": ["How are you?", "How are you doing?",
                                                  "how are you?", "How's it going?",
                                                  "Hello, how are you?", "Hi, how are you?"],
    "You're welcome!": ["Thank you!", "Thank you", "Thanks!", "Thanks", "thanks", "Thank you very much!"],
    "Goodbye! Have a great day!": ["Goodbye!", "Goodbye", "Bye!", "Bye", "bye", "See you later!"],
    "I am Loom Tiny, a small chat model bundled with Loom.": [
        "Who are you?", "What is your name?", "What's your name?", "What are you?",
        "Tell me about yourself.", "Introduce yourself."],
    "I can count, do simple arithmetic, answer a few simple questions and say hello.": [
        "What can you do?", "What are you able to do?", "How can you help me?"],
}

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("the United Kingdom", "London"), ("England", "London"),
    ("the United States", "Washington, D.C."), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Brazil", "Brasilia"),
    ("Egypt", "Cairo"), ("Mexico", "Mexico City"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Ireland", "Dublin"), ("the Netherlands", "Amsterdam"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"),
    ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Switzerland", "Bern"), ("Austria", "Vienna"),
    ("Belgium", "Brussels"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
]
CAPITAL_PROMPTS = ["What is the capital of {c}?", "What's the capital of {c}?",
                   "What is the capital city of {c}?", "Tell me the capital of {c}.",
                   "Which city is the capital of {c}?", "Capital of {c}?"]

COLOURS = [  # (subject as used in a question, colour)
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
    ("coal", "black"), ("a strawberry", "red"), ("a lemon", "yellow"), ("a tomato", "red"),
    ("milk", "white"), ("a carrot", "orange"), ("the sun", "yellow"), ("a leaf", "green"),
    ("chocolate", "brown"), ("the sea", "blue"), ("a lime", "green"), ("an orange", "orange"),
]
COLOUR_PROMPTS = ["What colour is {x}?", "What color is {x}?", "What is the colour of {x}?",
                  "What is the color of {x}?"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]

# Fixed question -> answer facts (several phrasings per answer).
FACTS = {
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.": [
        "What are the days of the week?", "List the days of the week.", "Name the days of the week."],
    "There are 7 days in a week.": ["How many days are in a week?", "How many days are there in a week?"],
    "There are 12 months in a year.": ["How many months are in a year?", "How many months are there in a year?"],
    "There are 24 hours in a day.": ["How many hours are in a day?", "How many hours are there in a day?"],
    "There are 60 minutes in an hour.": ["How many minutes are in an hour?"],
    "There are 60 seconds in a minute.": ["How many seconds are in a minute?"],
    "Red, orange, yellow, green, blue, indigo and violet.": [
        "What are the colours of the rainbow?", "What are the colors of the rainbow?"],
    "There are 7 continents.": ["How many continents are there?"],
    "Jupiter is the largest planet in our solar system.": ["What is the largest planet?",
                                                          "Which planet is the largest?"],
    "We live on Earth.": ["What planet do we live on?", "Which planet do we live on?"],
    "Water boils at 100 degrees Celsius.": ["What is the boiling point of water?",
                                            "At what temperature does water boil?"],
    "Water freezes at 0 degrees Celsius.": ["What is the freezing point of water?",
                                            "At what temperature does water freeze?"],
    "Mount Everest is the tallest mountain in the world.": ["What is the tallest mountain?",
                                                            "What is the highest mountain in the world?"],
    "The Pacific Ocean is the largest ocean.": ["What is the largest ocean?"],
    "A spider has 8 legs.": ["How many legs does a spider have?"],
    "A dog has 4 legs.": ["How many legs does a dog have?"],
    "A cat has 4 legs.": ["How many legs does a cat have?"],
    "A bird has 2 legs.": ["How many legs does a bird have?"],
    "An insect has 6 legs.": ["How many legs does an insect have?"],
    "A dog says woof.": ["What sound does a dog make?", "What does a dog say?"],
    "A cat says meow.": ["What sound does a cat make?", "What does a cat say?"],
    "A cow says moo.": ["What sound does a cow make?", "What does a cow say?"],
    "A duck says quack.": ["What sound does a duck make?", "What does a duck say?"],
    "A sheep says baa.": ["What sound does a sheep make?", "What does a sheep say?"],
    "The first month of the year is January.": ["What is the first month of the year?"],
    "The last month of the year is December.": ["What is the last month of the year?"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
             ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("old", "new"), ("yes", "no"),
             ("left", "right"), ("wet", "dry")]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are Loom Tiny, a small helpful assistant.",
    "You are a friendly assistant.",
    "Answer the user's question.",
]


def _num_list(a: int, b: int) -> str:
    step = 1 if b >= a else -1
    return ", ".join(str(i) for i in range(a, b + step, step))


def gen_counting(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.15:  # counting down
        b = rng.randint(0, 10)
        a = b + rng.randint(2, 10)
        prompt = rng.choice(["Count down from {a} to {b}.", "Count backwards from {a} to {b}.",
                             "Please count down from {a} to {b}."]).format(a=a, b=b)
        return prompt, _num_list(a, b)
    # Starting at 1 is by far the most common request, so bias towards it.
    a = 1 if rng.random() < 0.55 else rng.randint(0, 20)
    b = a + rng.randint(1, 19)
    if a == 1 and rng.random() < 0.3:
        tmpl = rng.choice(["Count to {b}.", "Count up to {b}.", "Can you count to {b}?",
                           "Please count to {b}.", "count to {b}"])
    else:
        tmpl = rng.choice(["Count from {a} to {b}.", "Count from {a} to {b}.", "Count from {a} to {b}",
                           "count from {a} to {b}.", "Please count from {a} to {b}.",
                           "Can you count from {a} to {b}?", "List the numbers from {a} to {b}.",
                           "Count from {a} to {b}, please.", "Count from {a} up to {b}."])
    return tmpl.format(a=a, b=b), _num_list(a, b)


def gen_arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choices(["+", "-", "*"], weights=[5, 3, 2])[0]
    # Small operands are much more common, like the questions people actually ask.
    def small(hi: int) -> int:
        return min(int(rng.expovariate(1 / 4)), hi)

    if op == "+":
        x, y = (small(12), small(12)) if rng.random() < 0.7 else (rng.randint(0, 12), rng.randint(0, 12))
        z, word, sym = x + y, "plus", "+"
    elif op == "-":
        x = rng.randint(0, 20)
        y = rng.randint(0, x)  # keep results non-negative
        z, word, sym = x - y, "minus", "-"
    else:
        x, y = rng.randint(0, 10), rng.randint(0, 10)
        z, word, sym = x * y, "times", "*"
    tmpl = rng.choice(["What is {x} {s} {y}?", "What is {x} {s} {y}?", "What's {x} {s} {y}?",
                       "What is {x} {w} {y}?", "Calculate {x} {s} {y}.", "{x} {s} {y} = ?",
                       "How much is {x} {s} {y}?", "What is {x}{s}{y}?"])
    return tmpl.format(x=x, y=y, s=sym, w=word), f"{x} {sym} {y} = {z}"


def gen_fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(["capital", "colour", "day", "month", "fact", "opposite"],
                       weights=[6, 3, 4, 2, 5, 2])[0]
    if kind == "capital":
        c, city = rng.choice(CAPITALS)
        return rng.choice(CAPITAL_PROMPTS).format(c=c), f"The capital of {c} is {city}."
    if kind == "colour":
        x, col = rng.choice(COLOURS)
        return rng.choice(COLOUR_PROMPTS).format(x=x), f"{x[0].upper() + x[1:]} is {col}."
    if kind == "day":
        i = rng.randrange(7)
        if rng.random() < 0.5:
            return f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."
        return f"What day comes before {DAYS[i]}?", f"The day before {DAYS[i]} is {DAYS[i - 1]}."
    if kind == "month":
        i = rng.randrange(12)
        if rng.random() < 0.5:
            return (f"What month comes after {MONTHS[i]}?",
                    f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % 12]}.")
        return f"What month comes before {MONTHS[i]}?", f"The month before {MONTHS[i]} is {MONTHS[i - 1]}."
    if kind == "opposite":
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return f"What is the opposite of {a}?", f"The opposite of {a} is {b}."
    answer = rng.choice(sorted(FACTS))
    return rng.choice(FACTS[answer]), answer


GREETING_PAIRS = [(p, a) for a, ps in GREETINGS.items() for p in ps]


def gen_greeting(rng: random.Random) -> tuple[str, str]:
    return rng.choice(GREETING_PAIRS)


GENERATORS = [(gen_counting, 0.40), (gen_arithmetic, 0.21), (gen_fact, 0.24), (gen_greeting, 0.15)]


def gen_exchange(rng: random.Random) -> tuple[str, str]:
    fns, weights = zip(*GENERATORS)
    return rng.choices(fns, weights=weights)[0](rng)


def gen_conversation(rng: random.Random) -> list[dict]:
    """One training conversation: optional system prompt, 1-3 user/assistant exchanges."""
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_turns = rng.choices([1, 2, 3], weights=[80, 15, 5])[0]
    for _ in range(n_turns):
        prompt, answer = gen_exchange(rng)
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": answer})
    return messages


def build_corpus(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = [gen_conversation(rng) for _ in range(n)]
    # Guarantee the canonical prompts (used by the tests and the docs) appear
    # often, each as a plain single-turn chat.
    canonical = [("Count from 1 to 5.", "1, 2, 3, 4, 5"), ("Count from 1 to 10.", _num_list(1, 10)),
                 ("Hello!", f"Hello! {HELP_SUFFIX}"), ("What is 2 + 3?", "2 + 3 = 5"),
                 ("What is the capital of France?", "The capital of France is Paris.")]
    for prompt, answer in canonical:
        convs += [[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]] * 20
    rng.shuffle(convs)
    return convs


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def make_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then group similar lengths inside windows of 50 batches to cut padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, idx, pad_id):
    import torch

    n = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for r, i in enumerate(idx):  # right padding for training
        x, y = examples[i]
        ids[r, : len(x)] = torch.tensor(x)
        labels[r, : len(y)] = torch.tensor(y)
        mask[r, : len(x)] = 1
    return ids, mask, labels


SAMPLE_PROMPTS = [
    "Count from 1 to 5.", "Count from 1 to 10.", "Count from 3 to 9.", "Count to 7.",
    "Count down from 5 to 1.", "Hello!", "Hi", "Good morning", "How are you?", "Who are you?",
    "What is 2 + 3?", "What is 7 - 4?", "What is 6 * 7?", "What is the capital of France?",
    "What is the capital of Japan?", "What colour is the sky?", "What day comes after Monday?",
    "How many days are in a week?", "Thank you!",
]


def generate(model, tokenizer, prompt: str, system: str | None = None, max_new_tokens: int = 64):
    import torch

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    ended = bool(new) and new[-1] == tokenizer.eos_token_id
    return tokenizer.decode(new, skip_special_tokens=True), ended


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "loom-tiny", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    # One thread is the default on purpose: results are only bit-reproducible
    # for a fixed thread count, and with two threads on a two-core machine a
    # second busy process stalls every OpenMP barrier (measured ~5x slower),
    # whereas a single thread degrades gracefully.
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (results are reproducible for a fixed value)")
    p.add_argument("--conversations", type=int, default=30000, help="size of the generated corpus")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--max-minutes", type=float, default=13.0,
                   help="safety cap: stop training early (with a warning) after this many minutes")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)

    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    convs = build_corpus(args.conversations, args.seed)
    tokenizer = train_tokenizer(convs, args.vocab_size)
    examples = [encode_conversation(tokenizer, c) for c in convs]
    lengths = [len(x) for x, _ in examples]
    print(f"corpus: {len(examples)} conversations, {sum(lengths)} tokens, "
          f"max len {max(lengths)}, vocab {len(tokenizer)}  ({time.time() - t_start:.1f}s)", flush=True)

    # Sanity checks on the tokenizer: the byte-level decoder must round-trip
    # spaces and digits, and the generation prompt must be a token-level prefix
    # of a full conversation (otherwise inference would see unseen ids).
    for s in ["1, 2, 3, 4, 5", "2 + 3 = 5", "Hello! How can I help you today?"]:
        assert tokenizer.decode(tokenizer(s)["input_ids"]) == s, s
    msgs = [{"role": "user", "content": "Count from 1 to 5."}]
    prompt_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "1, 2, 3, 4, 5"}],
                                             return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # halves the embedding cost; matters at this size
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 5%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    batch_rng = random.Random(args.seed + 1)
    batches: list[list[int]] = []
    model.train()
    t_train = time.time()
    ema = None
    step = 0
    for step in range(args.steps):
        if not batches:
            batches = make_batches(lengths, args.batch_size, batch_rng)
        ids, mask, labels = collate(examples, batches.pop(), tokenizer.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        elapsed = time.time() - t_train
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  ema {ema:.4f}  "
                  f"lr {lr_at(step):.2e}  {elapsed:.0f}s", flush=True)
        if elapsed > args.max_minutes * 60:
            print(f"WARNING: stopping early at step {step + 1} (time cap {args.max_minutes} min)", flush=True)
            break
    train_time = time.time() - t_train
    print(f"training: {step + 1} steps in {train_time:.0f}s, final loss (ema) {ema:.4f}", flush=True)

    # ---- save ------------------------------------------------------------- #
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # <|im_end|>: end of the assistant turn
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Drop artifacts a previous run (or another transformers version) may have
    # left that would otherwise shadow or contradict the new files.
    for stale in ["chat_template.jinja", "special_tokens_map.json", "pytorch_model.bin",
                  "model.safetensors.index.json"]:
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "additional_chat_templates", ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    make_tokenizer_config_portable(out / "tokenizer_config.json")

    # ---- samples ---------------------------------------------------------- #
    # Reload from disk so the samples exercise exactly what was saved.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        text, ended = generate(model, tokenizer, prompt)
        samples.append((prompt, text, ended))
        print(f"  {prompt!r:40} -> {text!r}{'' if ended else '  [no end-of-turn]'}", flush=True)
    text, ended = generate(model, tokenizer, "Count from 1 to 5.", system="You are a helpful assistant.")
    print(f"  (with system prompt) 'Count from 1 to 5.' -> {text!r}", flush=True)

    size = sum(f.stat().st_size for f in out.iterdir())
    write_model_card(out, args, n_params, step + 1, train_time, ema, samples)
    print(f"saved to {out} ({size / 1e6:.2f} MB), total time {time.time() - t_start:.0f}s", flush=True)


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


def write_model_card(out: Path, args, n_params: int, steps: int, train_time: float, loss: float, samples) -> None:
    rows = "\n".join(f"| {p} | {t}{'' if e else ' *(no end-of-turn)*'} |" for p, t, e in samples)
    card = f"""# loom-tiny

A {n_params / 1e6:.1f}M-parameter Llama-architecture chat model bundled with Loom so that the
server works offline out of the box (tests, demos, interpretability plumbing).  It is a
toy: it only knows the narrow synthetic domain it was trained on.

## How it was made

Trained from scratch on CPU by `scripts/train_tiny.py` (seed {args.seed}, `--threads {args.threads}`):

- **Corpus:** {args.conversations} synthetic chats generated by the script itself (deterministic
  for the seed): counting ("Count from 1 to 5." -> "1, 2, 3, 4, 5", ranges, counting down),
  greetings and small talk, short facts (capitals, colours, days, months, animals, ...),
  small arithmetic ("What is 2 + 3?" -> "2 + 3 = 5"), optional system prompts and a few
  multi-turn chats.
- **Tokenizer:** byte-level BPE ({args.vocab_size} tokens) trained with `tokenizers`.
  Special tokens: `<|pad|>`, `<|bos|>`, `<|im_start|>`, `<|im_end|>`.  `<|im_end|>` ends every
  turn and is the eos token (also in `generation_config.json`), so a finished answer stops
  generation.
- **Chat template** (in `tokenizer_config.json`, ChatML style):
  `<|bos|><|im_start|>user\\nCount from 1 to 5.<|im_end|>\\n<|im_start|>assistant\\n`
- **Model:** `LlamaForCausalLM`, hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads,
  intermediate {args.intermediate_size}, tied embeddings, float32.
- **Training:** {steps} steps, batch {args.batch_size}, AdamW lr {args.lr} (warmup + cosine), loss on
  assistant tokens only; {train_time / 60:.1f} min on CPU, final loss {loss:.3f}.

Re-create it from the repository root with:

```
python scripts/train_tiny.py --out models/loom-tiny
```

The run is deterministic: the same seed and `--threads` value on the same torch
version give bit-identical weights (a different thread count changes the float
summation order, so the weights and possibly a few answers differ slightly).

## What it can do (greedy decoding)

| prompt | reply |
|---|---|
{rows}

## Limitations

- Counting (ranges up to about 40, up or down), greetings, small talk and the listed facts
  are reliable.  Arithmetic is memorised rather than computed: sums and products of small
  numbers are right, but with larger operands (roughly above 6) answers are often wrong.
- It has no knowledge beyond this synthetic domain; anything else gives confident nonsense.
- It only ever saw short chats (under 200 tokens), although the config allows 1024 positions.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


if __name__ == "__main__":
    main()
