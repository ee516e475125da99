"""The broker's relay cost in isolation: CPU per relayed step message and per token.

A real `loom broker` process between a fake worker DEALER and a fake API
DEALER (both in this process). The API asks for N streams (Generate), the
worker answers each step with one Tokens message of N entries, at a fixed
step rate, and a Final per stream at the end. The broker's CPU (all its
threads, from /proc) over the steady phase, divided by the messages and
tokens it relayed, is a figure the other processes on the machine barely move.

    python bench/relay.py                      # 64 streams, 300 steps at 40 steps/s
    python bench/relay.py --strace             # also syscalls per message (strace -c -f on the broker;
                                               # strace inflates that run's CPU: compare CPU without it)
    python bench/relay.py --rate 0             # steps back to back (throughput-bound)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import REPO, free_port, rnd

import zmq

from loom import protocol as P


def start_broker(frontend: str, backend: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loom", "broker", "--frontend", frontend, "--backend", backend,
                             "--log-level", "warning"], cwd=REPO)


def recv(sock: zmq.Socket, timeout_s: float = 10.0) -> P.Message:
    if not sock.poll(timeout_s * 1000):
        raise TimeoutError("nothing from the broker")
    msg, _ = P.decode(sock.recv_multipart())
    return msg


def connect(ctx: zmq.Context, address: str, identity: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def cpu_s(pid: int) -> float:
    """CPU seconds of every thread of a process, from schedstat (nanoseconds; psutil's ticks are 10 ms)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended
    return total / 1e9


def run_once(args: argparse.Namespace, ctx: zmq.Context) -> dict:
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = start_broker(frontend, backend)
    strace = None
    try:
        worker = connect(ctx, backend, f"relay-worker/{uuid.uuid4().hex[:6]}")
        api = connect(ctx, frontend, f"relay-api/{uuid.uuid4().hex[:6]}")
        model = {"model_id": "relay-model", "source": "none"}
        # The broker may still be binding: register until a Heartbeat comes back.
        deadline = time.monotonic() + 30
        while True:
            worker.send_multipart(P.encode(P.Register(worker_id="relay-worker", device="cpu", host="bench", pid=0,
                                                      capacity=args.streams, models=[model])))
            if worker.poll(500):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the broker did not answer")
        rids = [uuid.uuid4().hex for _ in range(args.streams)]
        for rid in rids:
            api.send_multipart(P.encode(P.Generate(rid=rid, model="relay-model", prompt="x", max_tokens=args.steps)))
        api_identity = b""
        got = 0
        while got < len(rids):
            msg = recv(worker)
            if isinstance(msg, P.Generate):
                got += 1
                api_identity = msg.api
        texts = [" tok" for _ in rids]
        warm = 20
        received = tokens = 0
        period = 1.0 / args.rate if args.rate > 0 else 0.0
        c0 = t0 = None
        t_next = time.monotonic()
        for step in range(warm + args.steps):
            if step == warm:
                while api.poll(0):  # the warm-up's messages
                    api.recv_multipart()
                if args.strace:
                    strace_out = Path(tempfile.mkdtemp()) / "broker.strace"
                    strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(broker.pid), "-o", str(strace_out)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                c0, t0 = cpu_s(broker.pid), time.monotonic()
            msg = P.Tokens(api=api_identity, rids=rids, texts=texts, indexes=[step] * len(rids), t_emit=time.time())
            worker.send_multipart(P.encode(msg))
            if step >= warm:
                # The API side reads as it arrives, as the real one does.
                while api.poll(0 if period else 10_000):
                    m, _ = P.decode(api.recv_multipart())
                    if isinstance(m, P.Tokens):
                        received += 1
                        tokens += len(m.rids)
                    if period or received >= step - warm + 1:
                        break
            if period:
                t_next += period
                pause = t_next - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        while received < args.steps:
            m = recv(api)
            if isinstance(m, P.Tokens):
                received += 1
                tokens += len(m.rids)
        cpu, wall = cpu_s(broker.pid) - c0, time.monotonic() - t0
        for rid in rids:
            worker.send_multipart(P.encode(P.Final(rid=rid, stop_reason="max_tokens", prompt_tokens=1,
                                                   completion_tokens=args.steps, generate_s=0.0, model="relay-model",
                                                   dtype="float32")))
        finals = 0
        while finals < len(rids):  # the end of a stream still works
            if isinstance(recv(api), P.Final):
                finals += 1
        out = {"steps": received, "tokens": tokens, "wall_s": rnd(wall), "broker_cpu_s": rnd(cpu),
               "us_per_step_message": rnd(cpu / received * 1e6), "us_per_token": rnd(cpu / tokens * 1e6)}
        if strace is not None:
            strace.send_signal(2)
            strace.wait(timeout=30)
            out["syscalls"] = parse_strace(strace_out)
            out["syscalls_per_step_message"] = rnd(out["syscalls"].get("total", 0) / received)
        worker.close(0)
        api.close(0)
        return out
    finally:
        if strace is not None and strace.poll() is None:
            strace.kill()
        broker.terminate()
        try:
            broker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


def parse_strace(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1].replace("_", "").isalnum() and parts[3].isdigit():
            out[parts[-1]] = int(parts[3])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=64, help="entries per Tokens message (default %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="measured step messages per run (default %(default)s)")
    p.add_argument("--rate", type=float, default=40.0,
                   help="step messages per second; 0 sends them back to back (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="runs, each with a fresh broker; the median is printed")
    p.add_argument("--strace", action="store_true", help="count the broker's syscalls (strace -c -f) in each run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    ctx = zmq.Context()
    runs = []
    for rep in range(args.reps):
        r = run_once(args, ctx)
        runs.append(r)
        print(f"run {rep}: {r['us_per_step_message']} us/message, {r['us_per_token']} us/token"
              + (f", {r['syscalls_per_step_message']} syscalls/message" if args.strace else "")
              + f" ({r['steps']} messages, {r['tokens']} tokens, load {os.getloadavg()[0]:.2f})", flush=True)
    med = sorted(runs, key=lambda r: r["us_per_token"])[len(runs) // 2]
    print(f"broker relay, {args.streams} entries/message at {args.rate:g} messages/s: "
          f"median {med['us_per_step_message']} us CPU per message, {med['us_per_token']} us per token")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=1))
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
