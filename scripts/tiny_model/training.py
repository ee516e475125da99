"""loom-tiny's model and training loop: a small `LlamaForCausalLM`, AdamW with
warmup and cosine decay, loss on assistant tokens only; and saving it in
standard Hugging Face format."""
from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

from tiny_model.tokenizer import make_tokenizer_config_portable


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


def make_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

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
    return LlamaForCausalLM(config)


def train(model, examples: list[tuple[list[int], list[int]]], pad_id: int, args) -> tuple[int, float, float]:
    """Train in place; the number of steps run, the seconds they took, and the final loss (EMA)."""
    import torch

    lengths = [len(x) for x, _ in examples]

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
        ids, mask, labels = collate(examples, batches.pop(), pad_id)
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
    return step + 1, train_time, ema


def save(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # <|im_end|>: end of the assistant turn
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
    )
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
