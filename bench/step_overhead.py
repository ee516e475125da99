#!/usr/bin/env python
"""The worker's engine-thread CPU per token outside the model's forward pass, in process.

    python bench/step_overhead.py                      # 4M model: batch 64 sampled, then 1 greedy row
    python bench/step_overhead.py --model bench/.cache/models/llama-90m --batch 0
    python bench/step_overhead.py --code /tmp/old      # the workers/ of another tree (A/B in one window)

Runs the real ModelRunner and StepBatch (each step's message encoded and
written to a Unix socket with sendmsg, as a direct reply is:
workers/direct_replies.py; a thread reads it off) and, in the same process on the same model, a bare decode loop
(batch prefilled together, torch.multinomial or argmax, the tokens looked
at with one tolist a step). CPU is `time.thread_time` of this thread: what
other processes on a shared machine do shows up only as cache effects, not
as time. "outside" is a step's CPU minus the CPU inside the model's forward
(its `forward` method wrapped). Only steps with no prefill are counted.

A second, instrumented run splits the outside time by piece (exclusive
time: a piece nested in another counts once, in the inner one); each timed
call costs a little itself, estimated and subtracted.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def _setup_path(code: str | None) -> None:
    for p in ([code] if code else []) + [str(REPO)]:
        if p not in sys.path:
            sys.path.insert(0 if p == code else 1, p)


class Pieces:
    """Exclusive thread-CPU per labelled call (nested calls subtract from their caller)."""

    def __init__(self) -> None:
        self.total: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[int]] = []  # [start, child time]
        self._undo: list[Callable[[], None]] = []
        self._kept_total: dict[str, int] = {}
        self._kept_calls: dict[str, int] = {}

    def wrap(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)
        clock, stack, total, calls = time.thread_time_ns, self._stack, self.total, self.calls
        total.setdefault(label, 0)
        calls.setdefault(label, 0)

        def timed(*a: Any, **kw: Any) -> Any:
            frame = [clock(), 0]
            stack.append(frame)
            try:
                return fn(*a, **kw)
            finally:
                stack.pop()
                spent = clock() - frame[0]
                total[label] += spent - frame[1]
                calls[label] += 1
                if stack:
                    stack[-1][1] += spent

        had = name in vars(owner) if hasattr(owner, "__dict__") else True
        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, fn) if had else delattr(owner, name))

    def reset(self) -> None:
        """Forget what was timed since the last commit."""
        self.total.update(self._kept_total)
        self.calls.update(self._kept_calls)

    def commit(self) -> None:
        self._kept_total, self._kept_calls = dict(self.total), dict(self.calls)

    def undo(self) -> None:
        for u in reversed(self._undo):
            u()
        self._undo.clear()


def _wrapper_cost_ns() -> float:
    """Thread CPU a timed call adds (two clock reads and the bookkeeping)."""
    p = Pieces()

    class Box:
        @staticmethod
        def f() -> None:
            return None

    p.wrap(Box, "f", "x")
    n = 20000
    t = time.thread_time_ns()
    for _ in range(n):
        Box.f()
    with_ = (time.thread_time_ns() - t) / n
    p.undo()
    t = time.thread_time_ns()
    for _ in range(n):
        Box.f()
    return with_ - (time.thread_time_ns() - t) / n


def load(path: str, threads: int):
    import torch

    from workers.model_store import load_model

    torch.set_num_threads(threads)
    try:  # as the worker process does at start (LOOM_KEEP_FREED_MEMORY=0: glibc's defaults)
        from workers.allocator import keep_freed_memory
    except ImportError:  # a tree from before it
        pass
    else:
        keep_freed_memory()
    return load_model(Path(path).name, path, "float32", "cpu")


def requests(n: int, tokens: int, temperature: float, top_p: float, model: str):
    from bench.common import MESSAGES
    from loom import protocol as P

    return [P.Generate(rid=f"r{i}", model=model, messages=MESSAGES, max_tokens=tokens, temperature=temperature,
                       top_p=top_p, seed=i if temperature > 0 else None, api=b"api-0") for i in range(n)]


def run_server(lm, reqs, pieces: Pieces | None = None) -> dict[str, Any]:
    """The engine's part of each step: runner.step() then the step batch's flush, frames encoded."""
    from loom import protocol as P
    from workers.request_log import RequestLog
    from workers.runner import ModelRunner
    from workers.step_batch import StepBatch

    frames = _ReplyPipe()
    frame_count = [0]

    def put(msg, buffers):  # the engine's own write of a step's message
        frames.write(P.encode(msg, buffers))
        frame_count[0] += 1

    batch = StepBatch(put)
    log = RequestLog()

    def send(msg, buffers=None):
        log.emitted(msg)
        batch.put(msg, buffers or [])

    try:
        runner = ModelRunner(lm, send, batch.flush, getattr(batch, "put_texts", None) or batch.put_text)
    except (TypeError, AttributeError):  # a tree from before emit_text
        runner = ModelRunner(lm, send, batch.flush)
    fwd = _time_forward(lm.model)
    if pieces is not None:
        _instrument(pieces, runner, batch)
        pieces.commit()
    for req in reqs:
        runner.admit(req)
        batch.route(req.rid, req.api)
    steps = []  # (tokens, step cpu ns, forward cpu ns)
    try:
        with inference_mode():  # as the engine's thread
            _steps(runner, batch, fwd, steps, pieces)
    finally:
        if pieces is not None:
            pieces.undo()
        fwd.undo()
        frames.close()
    return _summary(steps)


class _ReplyPipe:
    """A direct reply's socket: framed messages written with one sendmsg each, read by another
    process (`cat`), as the API process reads them: no thread here takes the GIL to read.

    A tree from before direct replies (no loom/stream_frames.py) only encodes, as its worker did.
    """

    def __init__(self) -> None:
        try:
            from loom.stream_frames import framed
        except ImportError:
            framed = None
        self._framed = framed
        self._out, theirs = socket.socketpair()
        self._reader = subprocess.Popen(["cat"], stdin=theirs, stdout=subprocess.DEVNULL)
        theirs.close()

    def write(self, parts: list[Any]) -> None:
        if self._framed is not None:
            self._out.sendmsg(self._framed(parts)[0])

    def close(self) -> None:
        self._out.close()
        self._reader.wait(10)


def inference_mode():
    import torch

    return torch.inference_mode()


def _steps(runner, batch, fwd, steps, pieces) -> None:
    while runner.active:
        prefill = bool(runner.pending)
        rows = len(runner.rows)
        f0 = fwd.ns
        t0 = time.thread_time_ns()
        runner.step()
        batch.flush()
        t1 = time.thread_time_ns()
        if not prefill and rows:
            steps.append((rows, t1 - t0, fwd.ns - f0))
        elif pieces is not None:  # only decode steps count, as in the totals
            pieces.reset()
        if pieces is not None:
            pieces.commit()


class _time_forward:
    def __init__(self, model) -> None:
        self.model, self.ns = model, 0
        inner = model.forward
        clock = time.thread_time_ns

        def forward(*a, **kw):
            t = clock()
            try:
                return inner(*a, **kw)
            finally:
                self.ns += clock() - t

        model.forward = forward

    def undo(self) -> None:
        del self.model.forward


def _instrument(p: Pieces, runner, batch) -> None:
    import workers.detokenizer as D
    import workers.runner as R
    from workers.kv_cache import BatchCache

    p.wrap(R, "choose_tokens", "sampling")
    p.wrap(R, "to_device", "step inputs (to_device)")
    for kind in ("IncrementalDetokenizer", "ByteDetokenizer"):  # the second only in trees that have it
        if hasattr(D, kind):
            p.wrap(getattr(D, kind), "push", "detokenize")
    p.wrap(runner, "_advance", "stop checks/advance")
    if hasattr(runner, "_advance_plain"):
        p.wrap(runner, "_advance_plain", "stop checks/advance")
    p.wrap(runner, "_emit_token", "emit (Token objects)")
    p.wrap(runner, "_finish", "finish (Final)")
    p.wrap(runner, "_outputs", "outputs (extras)")
    p.wrap(runner.outputs, "plan", "capture plan")
    p.wrap(runner.hooks, "begin", "hooks begin/end")
    p.wrap(runner.hooks, "end", "hooks begin/end")
    p.wrap(BatchCache, "next_mask", "kv bookkeeping")
    p.wrap(BatchCache, "keep_rows", "kv bookkeeping")
    p.wrap(batch, "put", "step batch put")
    for name in ("put_text", "put_texts"):  # either, in trees that have it
        if hasattr(batch, name):
            p.wrap(batch, name, "step batch put")
    p.wrap(batch, "flush", "step batch flush+encode")
    p.wrap(runner.loaded.model, "forward", "forward")


def _summary(steps: list[tuple[int, int, int]]) -> dict[str, Any]:
    tokens = sum(s[0] for s in steps)
    total = sum(s[1] for s in steps)
    fwd = sum(s[2] for s in steps)
    return {"steps": len(steps), "tokens": tokens, "step_us": total / len(steps) / 1e3,
            "forward_us_per_step": fwd / len(steps) / 1e3,
            "outside_us_per_step": (total - fwd) / len(steps) / 1e3,
            "outside_us_per_token": (total - fwd) / tokens / 1e3,
            "median_outside_us_per_step": statistics.median(s[1] - s[2] for s in steps) / 1e3}


def run_bare(lm, batch: int, tokens: int, temperature: float, seed: int = 0) -> dict[str, Any]:
    """A plain transformers decode loop on the same model: prefill together, sample, look at the tokens."""
    import torch
    from transformers import DynamicCache

    from bench.common import MESSAGES

    tok, model = lm.tokenizer, lm.model
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    kw = {lm.cache_kwarg: DynamicCache(config=model.config), "use_cache": True}
    if lm.accepts_logits_to_keep:
        kw["logits_to_keep"] = 1

    def sample(logits):
        if temperature <= 0:
            return logits.argmax(dim=-1)
        return torch.multinomial((logits.float() / temperature).softmax(dim=-1), 1, generator=gen)[:, 0]

    fwd = _time_forward(model)
    steps = []
    try:
        with torch.inference_mode():
            nxt = sample(model(input_ids=prompt.expand(batch, -1), **kw).logits[:, -1])
            nxt.tolist()
            for _ in range(tokens - 1):
                f0 = fwd.ns
                t0 = time.thread_time_ns()
                nxt = sample(model(input_ids=nxt[:, None], **kw).logits[:, -1])
                nxt.tolist()
                t1 = time.thread_time_ns()
                steps.append((batch, t1 - t0, fwd.ns - f0))
    finally:
        fwd.undo()
    return _summary(steps)


def _fmt(name: str, r: dict[str, Any]) -> str:
    return (f"  {name:<8} steps {r['steps']:4.0f}  forward {r['forward_us_per_step']:8.1f} us/step  "
            f"outside {r['outside_us_per_step']:7.1f} us/step (median {r['median_outside_us_per_step']:6.1f})  "
            f"= {r['outside_us_per_token']:6.2f} us/token")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "bench/.cache/models/llama-4m"))
    ap.add_argument("--batch", type=int, default=64, help="sampled rows (0: skip the batch figure)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--single-tokens", type=int, default=200, help="greedy single-row tokens (0: skip)")
    ap.add_argument("--reps", type=int, default=3, help="alternating server/bare repetitions (medians printed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the worker's on 2 cores)")
    ap.add_argument("--no-pieces", action="store_true", help="skip the instrumented per-piece run")
    ap.add_argument("--code", help="import workers/ and loom/ from this tree instead (A/B)")
    ap.add_argument("--json", type=Path, help="also write each case's medians here (bench/efficiency.py reads them)")
    args = ap.parse_args(argv)
    _setup_path(args.code)
    import workers.runner

    print(f"code: {Path(workers.runner.__file__).resolve().parents[1]}  model: {args.model}  "
          f"threads {args.threads}  load average {os.getloadavg()[0]:.2f}", flush=True)
    lm = load(args.model, args.threads)
    name = lm.model_id
    cases = []
    if args.batch:
        cases.append((f"batch {args.batch}, T={args.temperature}", args.batch, args.tokens, args.temperature))
    if args.single_tokens:
        cases.append(("1 row, greedy", 1, args.single_tokens, 0.0))
    results: dict[str, Any] = {}
    for title, n, tokens, temp in cases:
        run_server(lm, requests(min(n, 4), 8, temp, args.top_p, name))  # warm-up
        run_bare(lm, min(n, 4), 8, temp)
        server, bare = [], []
        for _ in range(args.reps):
            server.append(run_server(lm, requests(n, tokens, temp, args.top_p, name)))
            bare.append(run_bare(lm, n, tokens, temp))
        med = {k: statistics.median(r[k] for r in server) for k in server[0]}
        bmed = {k: statistics.median(r[k] for r in bare) for k in bare[0]}
        results[title] = {"server": med, "bare": bmed}
        if args.json:
            args.json.write_text(json.dumps(results))
        print(f"{title}: medians of {args.reps} alternating runs (thread CPU)")
        print(_fmt("server", med))
        print(_fmt("bare", bmed))
        print(f"  server outside - bare outside: {med['outside_us_per_step'] - bmed['outside_us_per_step']:.1f} us/step"
              f" = {med['outside_us_per_token'] - bmed['outside_us_per_token']:.2f} us/token;"
              f" bare step / server step CPU: {bmed['step_us'] / med['step_us']:.3f}", flush=True)
        if not args.no_pieces:
            pieces = Pieces()
            cost = _wrapper_cost_ns()
            r = run_server(lm, requests(n, tokens, temp, args.top_p, name), pieces)
            print(f"  pieces (instrumented run, {cost:.0f} ns per timed call subtracted), us/token:")
            rest = r["step_us"] * r["steps"] * 1e3
            for label in sorted(pieces.total, key=lambda k: -pieces.total[k]):
                ns = pieces.total[label] - cost * pieces.calls[label]
                rest -= pieces.total[label]
                print(f"    {label:<26} {ns / r['tokens'] / 1e3:7.2f}  ({pieces.calls[label] / r['steps']:.1f} calls/step)")
            print(f"    {'rest of step()':<26} {rest / r['tokens'] / 1e3:7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
