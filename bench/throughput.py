#!/usr/bin/env python
"""Loom throughput and latency benchmark (project issue 4).

Starts the real stack (`loom serve` in its own process group on free loopback
ports) on generated random-weight Llamas, measures it from the client's side
and compares it with an in-process baseline (a plain KV-cache decode loop with
transformers on the same model and torch thread count, run in a subprocess so
it shares nothing with the client or the server). See bench/README.md.

    python bench/throughput.py --quick          # ~2-3 minutes smoke run
    python bench/throughput.py                  # full run (~10-15 minutes on 2 cores)
    python bench/throughput.py --skip-big       # only the ~4M-parameter model

The figures are benchmark results, not assertions: the process exits 0 unless
the stack could not start (exit 2) or the models could not be made (exit 3).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH = REPO / "bench"
DEFAULT_CACHE = BENCH / ".cache"
DEFAULT_OUT = BENCH / "results" / "latest.json"

MESSAGES = [{"role": "user", "content": "Hello! How are you today? The capital of France is Paris. "
                                        "Count from 1 to 5, then tell me a long story."}]

# name -> make_llama arguments. vocab is the BPE size asked for; "corpus": "big"
# trains the tokenizer on a synthetic corpus large enough to reach it (the stock
# make_tokenizer corpus stops at ~450 tokens whatever vocab_size says).
MODELS: dict[str, dict[str, Any]] = {
    "llama-90m": dict(hidden_size=768, layers=12, heads=12, intermediate=2048, vocab_size=8192,
                      max_positions=4096, corpus="big"),
    "llama-4m": dict(hidden_size=256, layers=4, heads=4, intermediate=1024, vocab_size=512,
                     max_positions=4096, corpus="stock"),
}
BIG, SMALL = "llama-90m", "llama-4m"


# --- small helpers ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    """Percentile (nearest-rank with linear interpolation); None for no data."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def rnd(x: Any, nd: int = 3) -> Any:
    return round(x, nd) if isinstance(x, float) else x


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    model_name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except Exception:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model_name, "memory_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit}


# --- models (run in a subprocess: the client process never imports torch) --------------

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


# --- the baseline: a manual KV-cache decode loop, in its own process -------------------

def baseline_main(path: str, threads: int) -> None:
    """A persistent baseline process: loads the model once, then runs on request.

    Reads lines from stdin: "run N" generates N tokens greedily and prints one
    JSON line; "probe" prints the contention probe; EOF exits. Kept alive so
    the bench can alternate baseline and server runs under the same load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    config = model.config
    import inspect

    # The worker's choice (workers/model_store.py): transformers 5 renamed past_key_values to cache.
    ckw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def one(n: int) -> dict[str, Any]:
        cache = DynamicCache(config=config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{ckw: cache})
        nxt = int(out.logits[0, -1].argmax())
        times = [time.perf_counter()]
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, logits_to_keep=1, **{ckw: cache})
            nxt = int(out.logits[0, -1].argmax())
            times.append(time.perf_counter())
        steps = [b - a for a, b in zip(times, times[1:])]
        return {"ttft_s": times[0] - t0, "decode_tps": (n - 1) / (times[-1] - times[0]) if n > 1 else None,
                "step_ms_p50": pct(steps, 50) * 1e3 if steps else None,
                "step_ms_p99": pct(steps, 99) * 1e3 if steps else None}

    one(16)  # warm-up
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "prompt_tokens": int(ids.shape[1])}),
          flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            print(json.dumps(one(int(cmd[1]))), flush=True)
        elif cmd[0] == "probe":
            print(json.dumps(contention_probe(torch, threads)), flush=True)
            torch.set_num_threads(threads)


class Baseline:
    """Handle on a persistent baseline subprocess (see baseline_main)."""

    def __init__(self, path: str, threads: int):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_baseline", path,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline process exited ({self.proc.poll()})")
        return json.loads(line)

    def run(self, tokens: int) -> dict[str, Any]:
        self.proc.stdin.write(f"run {tokens}\n")
        self.proc.stdin.flush()
        return self._read()

    def probe(self) -> dict[str, Any]:
        self.proc.stdin.write("probe\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def contention_probe(torch, threads: int) -> dict[str, float]:
    """A 768x2048 matrix-vector product with 1 and with `threads` threads, in microseconds.

    On an idle machine more threads are no slower; when other processes hold
    the cores, OpenMP threads wait on each other and the multi-thread figure
    balloons. Read every other figure in the light of this one.
    """
    a, w = torch.randn(1, 768), torch.randn(768, 2048)
    out = {}
    for n in (1, threads):
        torch.set_num_threads(n)
        for _ in range(20):
            a @ w
        t0 = time.perf_counter()
        for _ in range(300):
            a @ w
        out[f"gemv_us_{n}_threads"] = round((time.perf_counter() - t0) / 300 * 1e6, 1)
    return out


def run_json_subprocess(argv: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- /health poller, in its own process so the client's event loop does not skew it ---

def health_poll_main(url: str, interval: float) -> None:
    import httpx

    stop = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()  # EOF: the parent is done
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    lat: list[float] = []
    errors = 0
    with httpx.Client(timeout=5) as c:
        c.get(f"{url}/health")  # connect
        print("ready", flush=True)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.get(f"{url}/health")
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)
            except Exception:
                errors += 1
            rest = interval - (time.perf_counter() - t0)
            if rest > 0:
                stop.wait(rest)
    print(json.dumps({"latencies_s": lat, "errors": errors}), flush=True)


class HealthPoller:
    def __init__(self, url: str, interval: float = 0.02):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_health-poll", url,
                                      "--_interval", str(interval)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"health poller did not start: {line!r}")

    def finish(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=30)
        data = json.loads(out.strip().splitlines()[-1])
        lat = data["latencies_s"]
        return {"n": len(lat), "errors": data["errors"], "p50_ms": rnd(pct(lat, 50) * 1e3 if lat else None),
                "p99_ms": rnd(pct(lat, 99) * 1e3 if lat else None), "max_ms": rnd(max(lat) * 1e3 if lat else None)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- the stack ----------------------------------------------------------------------------

class Stack:
    def __init__(self, models: list[str], log_dir: Path, workers: int = 1, threads: int | None = None):
        import psutil

        self.port = free_port()
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"serve-{self.port}.log"
        # One model preloaded; the others are loaded over HTTP after it (see wait_ready).
        argv = [sys.executable, "-m", "loom", "serve", "--port", str(self.port), "--broker-frontend", self.frontend,
                "--workers", str(workers), "--model", models[0]]
        if threads:
            argv += ["--threads", str(threads)]  # the baseline's count, so both compute alike
        for d in sorted({str(Path(m).parent) for m in models}):
            argv += ["--model-dir", d]
        self.model_ids = [Path(m).name for m in models]
        self.n_workers = workers
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "LOOM_LOG_LEVEL": "INFO"})
        self.psutil = psutil
        self.children: dict[str, Any] = {}
        self.workers: list[Any] = []

    def wait_ready(self, timeout: float = 240) -> dict[str, Any]:
        import httpx

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loom serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                h = httpx.get(f"{self.url}/health", timeout=2).json()
                ready = [w for w in h.get("workers", []) if any(m["model_id"] == self.model_ids[0]
                                                                 for m in w.get("models", []))]
                if len(ready) >= self.n_workers:
                    break
                last = h
            except Exception as exc:
                last = exc
            time.sleep(0.25)
        else:
            raise TimeoutError(f"stack not ready after {timeout}s (last: {last}):\n{self.log_tail()}")
        # Loaded one at a time: two preloads at once race in the worker (see README, "findings").
        for model_id in self.model_ids[1:]:
            r = httpx.post(f"{self.url}/models/load", json={"model": model_id}, timeout=max(10.0, deadline - time.monotonic()))
            if r.status_code != 200:
                raise RuntimeError(f"loading {model_id} failed: HTTP {r.status_code} {r.text[:500]}")
        self._find_children()
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def _find_children(self) -> None:
        root = self.psutil.Process(self.proc.pid)
        for child in root.children(recursive=True):
            try:
                cmd = child.cmdline()
            except self.psutil.Error:
                continue
            if "-m" in cmd and "loom" in cmd:
                role = cmd[cmd.index("loom") + 1] if cmd.index("loom") + 1 < len(cmd) else "?"
                if role == "worker":
                    self.workers.append(child)
                self.children.setdefault(role, child)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def workers_rss(self) -> int:
        return sum(w.memory_info().rss for w in self.workers)

    def rss_mb(self, role: str) -> float:
        return self.children[role].memory_info().rss / 2**20

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left: no orphans."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for child in [*self.children.values(), *self.workers]:  # belt and braces: anything that left the group
            try:
                if child.is_running():
                    child.kill()
            except self.psutil.Error:
                pass
        self._log.close()


# --- HTTP streaming client (asyncio, one event loop for every stream) --------------------

async def _sse_stream(client, model: str, max_tokens: int, *, t0_ref: list[float] | None = None,
                      close_after: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **(extra or {})}
    arrivals: list[float] = []  # time.time() of each content_block_delta
    final = None
    t_send = time.time()
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}", "t_send": t_send}
        buf = b""
        name = None
        done = False
        async for chunk in r.aiter_raw():
            now = time.time()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                name, data = None, b""
                for line in event.split(b"\n"):
                    if line.startswith(b"event:"):
                        name = line[6:].strip()
                    elif line.startswith(b"data:"):
                        data = line[5:].strip()
                if name == b"content_block_delta":
                    arrivals.append(now)
                elif name in (b"message_delta", b"error"):
                    final = json.loads(data)
                    final["_event"] = name.decode()
                    done = True
            if close_after is not None and len(arrivals) >= close_after:
                break  # leaving the context manager closes the connection
            if done:
                break
    return {"t_send": t_send, "arrivals": arrivals, "final": final, "t_closed": time.time()}


async def _many(url: str, model: str, n: int, max_tokens: int, extra: dict[str, Any] | None = None):
    import httpx

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300, connect=10), limits=limits) as c:
        t_start = time.time()
        results = await asyncio.gather(*[_sse_stream(c, model, max_tokens, extra=extra) for _ in range(n)])
        return t_start, time.time(), results


def http_streams(url: str, model: str, n: int, max_tokens: int, extra: dict[str, Any] | None = None):
    return asyncio.run(_many(url, model, n, max_tokens, extra))


def stream_stats(res: dict[str, Any]) -> dict[str, Any]:
    arr, final = res.get("arrivals") or [], res.get("final") or {}
    n_tok = (final.get("usage") or {}).get("completion_tokens") or len(arr)
    out = {"error": res.get("error") or (final.get("error") if final.get("_event") == "error" else None),
           "deltas": len(arr), "completion_tokens": n_tok,
           "ttft_s": (arr[0] - res["t_send"]) if arr else None,
           "worker_tps": (final.get("metadata") or {}).get("tokens_per_second"),
           "end_s": ((arr[-1] if arr else res.get("t_closed", res["t_send"])) - res["t_send"])}
    if len(arr) >= 2 and n_tok >= 2:
        out["decode_tps"] = (n_tok - 1) / (arr[-1] - arr[0])
        out["gaps_s"] = [b - a for a, b in zip(arr, arr[1:])]
    return out


# --- direct ZeroMQ client (talks to the broker frontend with loom.protocol) -------------

class ZClient:
    def __init__(self, address: str):
        import zmq

        from loom import protocol as P

        self.zmq, self.P = zmq, P
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"bench-{uuid.uuid4().hex[:8]}".encode())
        self.sock.connect(address)

    def generate(self, model: str, max_tokens: int) -> str:
        rid = uuid.uuid4().hex
        msg = self.P.Generate(rid=rid, model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0.0,
                              top_p=1.0)
        self.sock.send_multipart(self.P.encode(msg))
        return rid

    def cancel(self, rid: str) -> None:
        self.sock.send_multipart(self.P.encode(self.P.Cancel(rid=rid)))

    def recv(self, timeout_s: float):
        if not self.sock.poll(timeout_s * 1000):
            return None, 0.0
        frames = self.sock.recv_multipart()
        now = time.time()
        msg, _ = self.P.decode(frames)
        return msg, now

    def run(self, model: str, n_streams: int, max_tokens: int, cancel_after: int | None = None,
            on_cancel=None, timeout_s: float = 120) -> dict[str, Any]:
        """Run n_streams concurrent generations; per stream: (t_emit, t_recv, index) of each Token."""
        t_send = time.time()
        rids = [self.generate(model, max_tokens) for _ in range(n_streams)]
        streams = {rid: {"tokens": [], "final": None, "error": None} for rid in rids}
        open_ = set(rids)
        cancelled_at = None
        deadline = time.monotonic() + timeout_s
        while open_ and time.monotonic() < deadline:
            msg, now = self.recv(min(2.0, max(0.01, deadline - time.monotonic())))
            if msg is None:
                continue
            s = streams.get(getattr(msg, "rid", None))
            if s is None:
                continue
            if isinstance(msg, self.P.Token):
                s["tokens"].append((msg.t_emit, now, msg.index))
                if cancel_after is not None and cancelled_at is None and len(s["tokens"]) >= cancel_after:
                    cancelled_at = time.time()
                    self.cancel(msg.rid)
                    if on_cancel is not None:
                        return {"t_send": t_send, "streams": streams, "cancelled_at": cancelled_at,
                                "after_cancel": on_cancel(cancelled_at)}
            elif isinstance(msg, self.P.Final):
                s["final"] = msg
                open_.discard(msg.rid)
            elif isinstance(msg, self.P.Error):
                s["error"] = f"{msg.type}: {msg.message}"
                open_.discard(msg.rid)
        return {"t_send": t_send, "streams": streams, "cancelled_at": cancelled_at}

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# --- worker CPU activity (for "when did the worker stop computing") --------------------

def proc_cpu_ns(pids: list[int]) -> int:
    """On-CPU time of every thread of `pids` in ns, from /proc/PID/task/*/schedstat (ns resolution)."""
    total = 0
    for pid in pids:
        total += _one_cpu_ns(pid)
    return total


def _one_cpu_ns(pid: int) -> int:
    total = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def watch_cpu(pid: list[int], since: float, duration: float, idle_window: float, interval: float = 0.001) -> dict[str, Any]:
    """Sample the worker's CPU time after `since`; find when it went idle for good.

    The stop time is the start of the first stretch of at least `idle_window`
    seconds in which every ~1 ms sample shows the worker under 25% of a core
    (short blips such as a heartbeat do not count as computing, but they do end
    an idle stretch, so the window is kept a few decode steps long).
    """
    samples = []
    end = time.time() + duration
    prev_t, prev_c = since, proc_cpu_ns(pid)
    while time.time() < end:
        time.sleep(interval)
        t, c = time.time(), proc_cpu_ns(pid)
        samples.append((prev_t, t, (c - prev_c) / 1e9 / max(1e-6, t - prev_t)))
        prev_t, prev_c = t, c
    stop = None
    i = 0
    while i < len(samples):
        if samples[i][2] >= 0.25:
            i += 1
            continue
        j = i
        while j < len(samples) and samples[j][2] < 0.25:
            j += 1
        if samples[j - 1][1] - samples[i][0] >= idle_window:
            stop = samples[i][0]
            break
        i = j
    return {"stopped_after_s": None if stop is None else stop - since, "samples": len(samples),
            "sample_interval_ms": rnd(statistics.mean([b - a for a, b, _ in samples]) * 1e3 if samples else None),
            "busy_fraction_before_stop": rnd(statistics.mean([u for a, b, u in samples if stop is None or b <= stop] or [0]))}


# --- the measurements ---------------------------------------------------------------------

def bench_single(stack: Stack, baseline: Baseline, model: str, tokens: int, reps: int) -> dict[str, Any]:
    """Alternate baseline and server runs so both see the same background load."""
    http_streams(stack.url, model, 1, 16)  # warm-up
    probe_before = baseline.probe()
    runs, base = [], []
    for _ in range(reps):
        base.append(baseline.run(tokens))
        _, _, res = http_streams(stack.url, model, 1, tokens)
        runs.append(stream_stats(res[0]))
    probe_after = baseline.probe()
    errors = [r["error"] for r in runs if r["error"]]
    gaps = [g for r in runs for g in r.get("gaps_s", [])]
    pairs = [(r, b) for r, b in zip(runs, base) if r.get("decode_tps") and b.get("decode_tps")]
    return {"runs": [{k: rnd(v, 4) for k, v in r.items() if k != "gaps_s"} for r in runs],
            "baseline_runs": [{k: rnd(v, 4) for k, v in b.items()} for b in base], "errors": errors,
            "decode_tps": med([r["decode_tps"] for r in runs if "decode_tps" in r]),
            "ttft_s": med([r["ttft_s"] for r in runs if r["ttft_s"] is not None]),
            "worker_tps": med([r["worker_tps"] for r in runs if r["worker_tps"]]),
            "baseline_decode_tps": med([b["decode_tps"] for b in base if b.get("decode_tps")]),
            "baseline_ttft_s": med([b["ttft_s"] for b in base]),
            "baseline_step_ms_p50": med([b["step_ms_p50"] for b in base if b.get("step_ms_p50")]),
            "ratio_paired_median": med([r["decode_tps"] / b["decode_tps"] for r, b in pairs]),
            "ttft_overhead_ms_paired_median": med([(r["ttft_s"] - b["ttft_s"]) * 1e3 for r, b in zip(runs, base)
                                                   if r["ttft_s"] is not None]),
            "contention_probe_before": probe_before, "contention_probe_after": probe_after,
            "deltas_per_run": [r["deltas"] for r in runs],
            "gap_ms_p50": rnd(pct(gaps, 50) * 1e3 if gaps else None), "gap_ms_p99": rnd(pct(gaps, 99) * 1e3 if gaps else None),
            "gap_ms_max": rnd(max(gaps) * 1e3 if gaps else None)}


def bench_relay(stack: Stack, model: str, tokens: int, reps: int, streams: int = 1) -> dict[str, Any]:
    z = ZClient(stack.frontend)
    try:
        z.run(model, 1, 8)  # warm-up
        relay, steps, ttfts, errors = [], [], [], []
        for _ in range(reps):
            out = z.run(model, streams, tokens)
            for s in out["streams"].values():
                if s["error"]:
                    errors.append(s["error"])
                toks = s["tokens"]
                relay += [recv - emit for emit, recv, _ in toks]
                steps += [b[0] - a[0] for a, b in zip(toks, toks[1:])]
                if toks:
                    ttfts.append(toks[0][1] - out["t_send"])
        return {"streams": streams, "tokens": len(relay), "errors": errors,
                "relay_ms_p50": rnd(pct(relay, 50) * 1e3 if relay else None, 4),
                "relay_ms_p99": rnd(pct(relay, 99) * 1e3 if relay else None, 4),
                "relay_ms_max": rnd(max(relay) * 1e3 if relay else None, 4),
                "worker_step_ms_p50": rnd(pct(steps, 50) * 1e3 if steps else None),
                "worker_step_ms_p99": rnd(pct(steps, 99) * 1e3 if steps else None),
                "ttft_s": rnd(med(ttfts), 4)}
    finally:
        z.close()


def bench_http_twin(stack: Stack, model: str, tokens: int) -> dict[str, Any]:
    """Per-token latency over the full HTTP path.

    SSE events carry no t_emit, so run a direct ZeroMQ stream and an HTTP stream
    in the same decode batch: both rows get their token in the same step, within
    microseconds, so the emit time of an HTTP token is the ZeroMQ twin's latest
    t_emit before the HTTP arrival (valid while the latency is under one step).
    """
    z = ZClient(stack.frontend)
    box: dict[str, Any] = {}

    rid = z.generate(model, 4000)
    emits: list[float] = []
    done = threading.Event()

    def zmq_side() -> None:
        while not done.is_set():
            msg, _ = z.recv(0.05)
            if msg is not None and isinstance(msg, z.P.Token):
                emits.append(msg.t_emit)
            elif msg is not None and isinstance(msg, (z.P.Final, z.P.Error)):
                break

    try:
        th = threading.Thread(target=zmq_side)
        th.start()
        t_wait = time.time() + 10
        while not emits and time.time() < t_wait:
            time.sleep(0.01)
        _, _, res = http_streams(stack.url, model, 1, tokens)
        time.sleep(0.05)
        done.set()
        th.join(timeout=30)
        z.cancel(rid)
        emits.sort()
        import bisect

        lat = []
        for a in res[0].get("arrivals", []):
            i = bisect.bisect_right(emits, a) - 1
            if i >= 0:
                if i < len(emits) - 1 or a - emits[i] < 0.2:  # an arrival after the twin ended is not matched
                    lat.append(a - emits[i])
        steps = [b - a for a, b in zip(emits, emits[1:])]
        step = pct(steps, 50) or 0
        return {"tokens": len(lat), "http_ms_p50": rnd(pct(lat, 50) * 1e3 if lat else None, 4),
                "http_ms_p99": rnd(pct(lat, 99) * 1e3 if lat else None, 4),
                "http_ms_max": rnd(max(lat) * 1e3 if lat else None, 4),
                "twin_step_ms_p50": rnd(step * 1e3),
                "valid": bool(lat) and (pct(lat, 99) or 0) < 0.8 * step and stack.n_workers == 1,
                "note": "" if stack.n_workers == 1 else "with several workers the twin may run on another worker"}
    finally:
        z.close()


def bench_concurrency(stack: Stack, model: str, n: int, tokens: int, single_tps: float | None,
                      health: bool = False, rss: bool = False) -> dict[str, Any]:
    poller = HealthPoller(stack.url) if health else None
    rss_peak: dict[str, float] = {}
    rss_before = {}
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            for role in ("api", "broker"):
                try:
                    rss_peak[role] = max(rss_peak.get(role, 0.0), stack.rss_mb(role))
                except Exception:
                    pass
            stop.wait(0.05)

    sampler = None
    if rss:
        rss_before = {role: stack.rss_mb(role) for role in ("api", "broker")}
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
    try:
        t_start, t_end, results = http_streams(stack.url, model, n, tokens)
    finally:
        stop.set()
        if sampler:
            sampler.join()
        hres = None
        if poller:
            try:
                hres = poller.finish()
            except Exception as exc:
                hres = {"error": str(exc)}
                poller.kill()
    stats = [stream_stats(r) for r in results]
    errors = [s["error"] for s in stats if s["error"]]
    total = sum(s["completion_tokens"] or 0 for s in stats if not s["error"])
    last = max((r["t_send"] + s["end_s"] for r, s in zip(results, stats)), default=t_start) - t_start
    agg = total / last if last > 0 else None
    ttfts = [s["ttft_s"] for s in stats if s["ttft_s"] is not None]
    out = {"streams": n, "tokens_each": tokens, "errors": errors, "total_tokens": total, "wall_s": rnd(last),
           "aggregate_tps": rnd(agg, 2), "speedup_vs_single": rnd(agg / single_tps if agg and single_tps else None),
           "ttft_s_max": rnd(max(ttfts) if ttfts else None, 4), "ttft_s_p50": rnd(pct(ttfts, 50), 4),
           "per_stream_decode_tps_p50": rnd(pct([s["decode_tps"] for s in stats if "decode_tps" in s], 50), 2)}
    if hres is not None:
        out["health_during"] = hres
    if rss:
        out["rss_mb_before"] = {k: rnd(v, 1) for k, v in rss_before.items()}
        out["rss_mb_peak"] = {k: rnd(v, 1) for k, v in rss_peak.items()}
    return out


def health_idle(stack: Stack, n: int = 50) -> dict[str, Any]:
    import httpx

    lat = []
    with httpx.Client(timeout=5) as c:
        c.get(f"{stack.url}/health")
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"{stack.url}/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
    return {"n": n, "p50_ms": rnd(pct(lat, 50) * 1e3), "p99_ms": rnd(pct(lat, 99) * 1e3)}


def bench_cancel(stack: Stack, model: str, step_ms: float | None, trials: int) -> dict[str, Any]:
    """How long the worker keeps computing for a request after it is abandoned.

    The broker drops a request's route when it gets the Cancel, so no frame
    after that reaches any client: the worker's own CPU time (per-thread
    /proc schedstat, ns resolution, sampled every ~1 ms) tells when it stopped.
    """
    import httpx

    wpid = stack.worker_pids()
    step_s = (step_ms or 10) / 1e3
    window = max(0.02, 3 * step_s)
    out: dict[str, Any] = {"decode_step_ms": rnd(step_ms), "idle_window_ms": rnd(window * 1e3)}
    zmq_stops, http_stops, late_frames = [], [], 0
    z = ZClient(stack.frontend)
    try:
        for _ in range(trials):  # (a) direct ZeroMQ Cancel after 12 tokens
            res = z.run(model, 1, 3000, cancel_after=12, on_cancel=lambda t: watch_cpu(wpid, t, 1.0, window))
            zmq_stops.append((res.get("after_cancel") or {}).get("stopped_after_s"))
            while True:  # anything relayed after the Cancel (there should be nothing)
                msg, _ = z.recv(0.1)
                if msg is None:
                    break
                late_frames += 1
            time.sleep(0.3)
    finally:
        z.close()

    async def http_side() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as c:
            return await _sse_stream(c, model, 3000, close_after=12)

    for _ in range(trials):  # (b) HTTP client disconnect after 12 tokens
        res = asyncio.run(http_side())
        http_stops.append(watch_cpu(wpid, res["t_closed"], 1.0, window).get("stopped_after_s"))
        time.sleep(0.3)
    # (c) what /health shows after a disconnect: active_requests (the broker's
    # routes) and generating (the worker's count, sent with its 0.5 s heartbeat)
    res = asyncio.run(http_side())
    t_close, t_broker, t_gen = res["t_closed"], None, None
    with httpx.Client(timeout=5) as c:
        deadline = time.time() + 5
        while time.time() < deadline and (t_broker is None or t_gen is None):
            try:
                ws = c.get(f"{stack.url}/health").json().get("workers", [])
            except Exception:
                ws = None
            now = time.time()
            if ws is not None:
                if t_broker is None and all(w.get("active_requests", 0) == 0 for w in ws):
                    t_broker = now
                if t_gen is None and all(w.get("generating", 0) == 0 for w in ws):
                    t_gen = now
            time.sleep(0.01)

    def ms(v: list[float | None]) -> dict[str, Any]:
        got = [x for x in v if x is not None]
        return {"trials_ms": [rnd(x * 1e3) if x is not None else None for x in v],
                "median_ms": rnd(med(got) * 1e3 if got else None), "max_ms": rnd(max(got) * 1e3 if got else None),
                "median_steps": rnd(med(got) / step_s if got and step_ms else None)}

    out["zmq_cancel"] = {**ms(zmq_stops), "frames_after_cancel": late_frames}
    out["http_disconnect"] = ms(http_stops)
    out["health_after_disconnect"] = {
        "active_requests_zero_ms": rnd((t_broker - t_close) * 1e3 if t_broker else None),
        "generating_zero_ms": rnd((t_gen - t_close) * 1e3 if t_gen else None),
        "resolution_ms": 500, "note": "`generating` is the worker's count from its heartbeat, sent every 0.5 s"}
    return out


def bench_hidden_rss(stack: Stack, model: str, tokens: int, info: dict[str, Any]) -> dict[str, Any]:
    before = stack.workers_rss()
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, stack.workers_rss())
            except Exception:
                pass
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        _, _, res = http_streams(stack.url, model, 1, tokens,
                                 extra={"return_hidden_states": True, "hidden_state_layers": "all"})
    finally:
        stop.set()
        th.join()
    time.sleep(0.3)
    after = stack.workers_rss()
    s = stream_stats(res[0])
    kv = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * (tokens + 40) * 4
    final = res[0].get("final") or {}
    return {"tokens": s["completion_tokens"], "error": s["error"], "hidden_state_returned": "hidden_state" in final,
            "worker_rss_mb_before": rnd(before / 2**20, 1), "worker_rss_mb_peak": rnd(peak / 2**20, 1),
            "worker_rss_mb_after": rnd(after / 2**20, 1), "growth_mb_peak": rnd((peak - before) / 2**20, 1),
            "growth_mb_after": rnd((after - before) / 2**20, 1), "kv_cache_mb": rnd(kv / 2**20, 2)}


# --- the report ----------------------------------------------------------------------------

def build_table(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: Any, target: str, met: bool | None, unit: str = "") -> None:
        shown = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        rows.append({"figure": figure, "value": value, "shown": f"{shown}{unit}", "target": target,
                     "met": None if value is None else met})

    targets = {BIG: 0.97, SMALL: 0.85}
    for name, m in r["models"].items():
        s = m.get("single")
        if s:
            ratio = s.get("ratio_paired_median")
            add(f"{name} 1 stream tok/s (client) / baseline", ratio, f">= {targets.get(name, 0.9)}",
                ratio is not None and ratio >= targets.get(name, 0.9))
            add(f"{name}   server tok/s: client | worker metadata",
                None if not s.get("decode_tps") else f"{s['decode_tps']:.1f} | {s.get('worker_tps')}", "info", None)
            add(f"{name}   baseline tok/s", s.get("baseline_decode_tps"), "info", None)
            ttft = s.get("ttft_overhead_ms_paired_median")
            add(f"{name} TTFT overhead (server - baseline)", ttft, "<= 10 ms", ttft is not None and ttft <= 10, " ms")
            add(f"{name}   TTFT server | baseline", None if s.get("ttft_s") is None else
                f"{s['ttft_s'] * 1e3:.1f} | {(s.get('baseline_ttft_s') or 0) * 1e3:.1f} ms", "info", None)
        for key, n, tgt in (("conc8", 8, 4), ("conc32", 32, 8)):
            c = m.get(key)
            if c:
                add(f"{name} {n} streams aggregate / single", c.get("speedup_vs_single"), f">= {tgt}x",
                    (c.get("speedup_vs_single") or 0) >= tgt, "x")
                if n == 8:
                    add(f"{name} slowest TTFT at 8 streams", c.get("ttft_s_max"), "<= 0.5 s",
                        (c.get("ttft_s_max") or 9) <= 0.5, " s")
                    h = c.get("health_during") or {}
                    if "p99_ms" in h:
                        add(f"{name} /health p50 during 8 streams", h.get("p50_ms"), "info", None, " ms")
                        add(f"{name} /health p99 during 8 streams", h.get("p99_ms"), "<= 20 ms",
                            (h.get("p99_ms") or 1e9) <= 20, " ms")
                if n == 32:
                    add(f"{name} slowest TTFT at 32 streams", c.get("ttft_s_max"), "info", None, " s")
                    for role, v in (c.get("rss_mb_peak") or {}).items():
                        add(f"{name} peak RSS {role} under 32 streams", v, "info", None, " MB")
        z = m.get("relay")
        if z:
            add(f"{name} relay worker->client p50 (ZMQ, 1 stream)", z.get("relay_ms_p50"), "info", None, " ms")
            add(f"{name} relay worker->client p99 (ZMQ, 1 stream)", z.get("relay_ms_p99"), "<= 2 ms",
                (z.get("relay_ms_p99") or 1e9) <= 2, " ms")
        z8 = m.get("relay8")
        if z8:
            add(f"{name} relay p99 (ZMQ, 8 streams)", z8.get("relay_ms_p99"), "info", None, " ms")
        t = m.get("http_twin")
        if t:
            add(f"{name} emit->SSE arrival p50 (HTTP, twin)", t.get("http_ms_p50"), "info", None, " ms")
            add(f"{name} emit->SSE arrival p99 (HTTP, twin)", t.get("http_ms_p99"), "info" + ("" if t.get("valid") else " (invalid)"), None, " ms")
        if s and z:
            add(f"{name} SSE inter-arrival p99 | worker step p99", f"{s.get('gap_ms_p99')} | {z.get('worker_step_ms_p99')} ms",
                "info", None)
        cx = m.get("cancel")
        if cx:
            step = cx.get("decode_step_ms") or 0
            for key, what in (("zmq_cancel", "ZMQ Cancel"), ("http_disconnect", "HTTP disconnect")):
                v = (cx.get(key) or {}).get("median_ms")
                add(f"{name} worker computes on after {what} (median)", v, f"<= 1 step ({step:.1f} ms)",
                    v is not None and v <= step, " ms")
            hh = cx.get("health_after_disconnect") or {}
            add(f"{name} /health active_requests==0 after disconnect", hh.get("active_requests_zero_ms"), "info", None, " ms")
            add(f"{name} /health generating==0 after disconnect", hh.get("generating_zero_ms"),
                "info (0.5 s resolution)", None, " ms")
        hr = m.get("hidden_rss")
        if hr:
            add(f"{name} worker RSS growth, {hr['tokens']}-tok stream + hidden (peak)", hr.get("growth_mb_peak"),
                f"info (KV {hr['kv_cache_mb']} MB)", None, " MB")
            add(f"{name} worker RSS growth after the stream", hr.get("growth_mb_after"), "info", None, " MB")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    w1 = max(len(r["figure"]) for r in rows)
    w2 = max(len(r["shown"]) for r in rows)
    w3 = max(len(r["target"]) for r in rows)
    print(f"{'figure':<{w1}}  {'value':>{w2}}  {'target':<{w3}}  met")
    print("-" * (w1 + w2 + w3 + 9))
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        print(f"{r['figure']:<{w1}}  {r['shown']:>{w2}}  {r['target']:<{w3}}  {met}")


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Loom throughput/latency benchmark against an in-process transformers "
                                            "baseline. Figures, not assertions: exits 0 unless the stack cannot start.")
    p.add_argument("--quick", action="store_true", help="short smoke run (~2-3 minutes): fewer repetitions, shorter streams")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path (default %(default)s)")
    p.add_argument("--skip-big", action="store_true", help="skip the ~90M-parameter model (only the ~4M one)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="generated models and logs (default %(default)s)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of the single-stream runs (default 5, quick 2)")
    p.add_argument("--workers", type=int, default=1, help="worker processes for `loom serve` (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for each worker and for the baseline (default: loom serve's own rule, "
                        "(cpu_count - 1) // workers, at least 1)")
    p.add_argument("--hidden-tokens", type=int, default=None, help="length of the hidden-state RSS stream (default 2000, quick 400)")
    # internal modes (this file re-runs itself for the baseline, model making and /health polling)
    p.add_argument("--_baseline", help=argparse.SUPPRESS)
    p.add_argument("--_make-models", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--_health-poll", help=argparse.SUPPRESS)
    p.add_argument("--_interval", type=float, default=0.02, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._baseline:
        baseline_main(args._baseline, args.threads or os.cpu_count() or 1)
        return 0
    if args._make_models:
        make_models_main(args.cache_dir, args._make_models)
        return 0
    if args._health_poll:
        health_poll_main(args._health_poll, args._interval)
        return 0

    quick = args.quick
    reps = args.reps or (2 if quick else 5)
    # loom/launcher.py's default: the cores less one for the API and broker, shared by the workers.
    worker_threads = args.threads or max(1, ((os.cpu_count() or 1) - 1) // max(1, args.workers))
    threads = worker_threads
    hidden_tokens = args.hidden_tokens or (400 if quick else 2000)
    names = [SMALL] if args.skip_big else [BIG, SMALL]
    t_begin = time.time()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": quick, "reps": reps,
                               "machine": machine_info(), "loadavg_start": loadavg(), "models": {}}

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    log(f"making models {names} under {args.cache_dir} (cached after the first run)")
    try:
        made = run_json_subprocess(["--_make-models", *names, "--cache-dir", str(args.cache_dir)], timeout=900)
    except Exception as exc:
        log(f"could not make the models: {exc}")
        return 3
    infos = made["models"]
    results["machine"].update({"torch": made["torch"], "baseline_threads": threads,
                               "worker_threads": worker_threads, "workers": args.workers})

    for name in names:
        results["models"][name] = {"info": infos[name]}

    results["stacks"] = {}
    for name in names:
        m = results["models"][name]
        stack = Stack([infos[name]["path"]], args.cache_dir / "logs", workers=args.workers, threads=worker_threads)
        try:
            log(f"{name}: starting loom serve on {stack.url} (broker frontend {stack.frontend}); log {stack.log_path}")
            try:
                h = stack.wait_ready()
            except Exception as exc:
                log(f"the stack did not start: {exc}")
                results["error"] = f"stack did not start: {exc}"
                write_json(args.out, results)
                return 2
            results["stacks"][name] = {
                "workers": [{k: w.get(k) for k in ("device", "capacity", "pid")} for w in h["workers"]],
                "pids": {**{role: p.pid for role, p in stack.children.items()}, "workers": stack.worker_pids()},
                "health_idle": health_idle(stack, 20 if quick else 60)}
            run_model(stack, name, m, infos[name], args, quick, reps, threads, hidden_tokens)
            results["stacks"][name]["log_warnings"] = [l for l in stack.log_tail(20000).splitlines()
                                                       if " WARNING " in l or " ERROR " in l][-20:]
        except KeyboardInterrupt:
            log("interrupted; stopping the stack")
            results["interrupted"] = True
            break
        finally:
            stack.stop()
    results["loadavg_end"] = loadavg()
    results["elapsed_s"] = round(time.time() - t_begin, 1)
    rows = build_table(results)
    results["table"] = [{k: v for k, v in r.items() if k != "shown"} for r in rows]
    print()
    print(f"Loom benchmark ({'quick' if quick else 'full'}), {results['machine']['cpu_count']} CPUs "
          f"({results['machine']['cpu_model']}), torch {results['machine']['torch']}, {threads} threads; "
          f"load average {results['loadavg_start']} -> {results['loadavg_end']}; {results['elapsed_s']} s")
    if rows:
        print_table(rows)
    write_json(args.out, results)
    print(f"\nJSON: {args.out}")
    return 0


def run_model(stack: Stack, name: str, m: dict[str, Any], info: dict[str, Any], args: argparse.Namespace,
              quick: bool, reps: int, threads: int, hidden_tokens: int) -> None:
    step = lambda what: log(f"{name}: {what}")  # noqa: E731
    log(f"{name}: starting the baseline process ({info['parameters_m']}M params, {threads} threads)")
    try:
        baseline = Baseline(info["path"], threads)
    except Exception as exc:
        m.setdefault("failures", {})["baseline"] = str(exc)
        log(f"  baseline failed: {exc}")
        return
    try:
        m["baseline"] = baseline.info
        guard(m, "single", step, f"single stream, 128 tokens x {reps}, alternating with the baseline",
              lambda: bench_single(stack, baseline, name, 128, reps))
    finally:
        baseline.close()
    guard(m, "relay", step, "relay latency, 1 stream (direct ZeroMQ)", lambda: bench_relay(stack, name, 128, reps))
    guard(m, "relay8", step, "relay latency, 8 streams (direct ZeroMQ)",
          lambda: bench_relay(stack, name, 64, 1, streams=8))
    guard(m, "http_twin", step, "HTTP per-token latency (twin ZeroMQ stream)",
          lambda: bench_http_twin(stack, name, 128 if not quick else 64))
    single_tps = (m.get("single") or {}).get("decode_tps")
    guard(m, "conc8", step, "8 streams x 64 tokens + /health polling",
          lambda: bench_concurrency(stack, name, 8, 64, single_tps, health=True))
    guard(m, "conc32", step, "32 streams x 64 tokens + API/broker RSS",
          lambda: bench_concurrency(stack, name, 32, 64, single_tps, rss=True))
    if name == BIG or args.skip_big:
        step_ms = (m.get("relay") or {}).get("worker_step_ms_p50")
        guard(m, "cancel", step, "cancel / disconnect -> worker stops",
              lambda: bench_cancel(stack, name, step_ms, 2 if quick else 5))
    if name == SMALL:
        guard(m, "hidden_rss", step, f"worker RSS over a {hidden_tokens}-token stream with hidden states",
              lambda: bench_hidden_rss(stack, name, hidden_tokens, info))


def guard(m: dict[str, Any], key: str, step, what: str, fn) -> None:
    """Run one measurement; a failure is recorded, not raised (these are figures, not tests)."""
    step(what)
    t0 = time.time()
    try:
        m[key] = fn()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        import traceback

        m[key] = None
        m.setdefault("failures", {})[key] = f"{exc.__class__.__name__}: {exc}"
        log(f"  {key} failed: {exc}\n{traceback.format_exc()[-1500:]}")
    log(f"  {key} done in {time.time() - t0:.1f}s")


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
