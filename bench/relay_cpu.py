#!/usr/bin/env python
"""The API process's CPU per relayed token, isolated: a scripted broker instead of broker and workers.

    python bench/relay_cpu.py                          # 64 streams x 200 tokens, 3 rounds
    python bench/relay_cpu.py --trees /tmp/old,.       # A/B: each tree's `loom api`, rounds alternated

A scripted broker (its own process) answers the API's pings and, every
--step-ms, sends each API process one Tokens message holding a token for
every stream it has open (as a worker's step does), then the Final of each
stream that reached max_tokens. N raw-socket clients (its own process too,
cheap, so the machine's two cores are not spent on httpx) read the SSE
answers to the end. The figure is the `loom api` process's CPU (its threads'
run time, bench/profiling.py) over a round / tokens relayed; with several trees, rounds
alternate between their API processes and the medians are printed side by
side, with each tree's answer bodies compared (latency_ms masked).
Figures, not assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import free_port, loadavg, med  # noqa: E402

# Texts the scripted worker cycles through: plain words, JSON escapes, multi-byte characters.
TEXTS = [" the", " quick", ' "brown"', " fox\n", " jumps", " ü", "ber", " 猫", " \\lazy", " dog.", "\t", " 🙂"]


# --- the scripted broker --------------------------------------------------------------------

def broker_main(address: str, step_s: float) -> None:
    import zmq

    from loom import protocol as P

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    broker_id = uuid.uuid4().hex[:8]
    streams: dict[bytes, dict[str, list]] = {}  # api identity -> rid -> [made, max_tokens]
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    next_step = time.monotonic() + step_s
    while True:
        timeout = max(0.0, next_step - time.monotonic())
        if poller.poll(timeout * 1000):
            while True:
                try:
                    ident, *frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg, _ = P.decode(frames)
                if isinstance(msg, P.Ping):
                    sock.send_multipart([ident, *P.encode(P.Pong(broker_id=broker_id))])
                elif isinstance(msg, P.Generate):
                    streams.setdefault(ident, {})[msg.rid] = [0, msg.max_tokens]
                elif isinstance(msg, P.Cancel):
                    streams.get(ident, {}).pop(msg.rid, None)
                elif isinstance(msg, P.StatusRequest):
                    sock.send_multipart([ident, *P.encode(P.Status(rid=msg.rid, broker_id=broker_id, workers=[]))])
            continue
        next_step += step_s
        for ident, open_ in streams.items():
            if not open_:
                continue
            rids, texts, indexes, done = [], [], [], []
            for rid, state in open_.items():
                rids.append(rid)
                texts.append(TEXTS[state[0] % len(TEXTS)])
                indexes.append(state[0])
                state[0] += 1
                if state[0] >= state[1]:
                    done.append(rid)
            sock.send_multipart([ident, *P.encode(P.Tokens(api=ident, rids=rids, texts=texts, indexes=indexes,
                                                           t_emit=time.time()))])
            for rid in done:
                made = open_.pop(rid)[0]
                sock.send_multipart([ident, *P.encode(P.Final(rid=rid, stop_reason="max_tokens", prompt_tokens=7,
                                                              completion_tokens=made, generate_s=1.0,
                                                              model="scripted", dtype="float32"))])


# --- the clients -----------------------------------------------------------------------------

def _dechunk(raw: bytes) -> bytes:
    head, _, rest = raw.partition(b"\r\n\r\n")
    out = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return head.split(b"\r\n", 1)[0] + b"\n" + b"".join(out)


async def _one(port: int, body: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    raw = await reader.read()
    writer.close()
    return _dechunk(raw)


def clients_main(port: int, streams: int, tokens: int) -> None:
    body = json.dumps({"model": "scripted", "max_tokens": tokens, "stream": True,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()

    async def go() -> list[bytes]:
        return await asyncio.gather(*[_one(port, body) for _ in range(streams)])

    answers = asyncio.run(go())
    masked = sorted(re.sub(rb'"latency_ms":[0-9.e-]+', b'"latency_ms":0', a) for a in answers)
    print(json.dumps({"deltas": sum(a.count(b"event: content_block_delta") for a in answers),
                      "ends": sum(a.count(b"event: message_delta") for a in answers),
                      "bodies": [m.decode() for m in masked[:1]], "distinct": len(set(masked))}))


# --- the run ---------------------------------------------------------------------------------

class Api:
    def __init__(self, tree: Path, step_s: float, log_dir: Path) -> None:
        import psutil

        self.tree = tree
        self.port = free_port()
        address = f"tcp://127.0.0.1:{free_port()}"
        self.broker = subprocess.Popen([sys.executable, __file__, "--_broker", address, "--step-ms",
                                        str(step_s * 1000)], cwd=REPO)
        log = open(log_dir / f"api-{self.port}.log", "wb")
        env = {**os.environ, "LOOM_LOG_LEVEL": "INFO",
               "PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = subprocess.Popen([sys.executable, "-m", "loom", "api", "--port", str(self.port), "--broker",
                                      address, "--wait-for-broker", "10"], cwd=tree, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"loom api in {tree} did not start")

    def cpu(self) -> float:
        from bench.profiling import cpu_seconds

        return cpu_seconds({"api": [self.ps]})["api"]  # nanosecond run times where /proc has them

    def round(self, streams: int, tokens: int) -> tuple[float, dict]:
        before = self.cpu()
        out = subprocess.run([sys.executable, __file__, "--_clients", str(self.port), "--streams", str(streams),
                              "--tokens", str(tokens)], cwd=REPO, capture_output=True, text=True, check=True)
        used = self.cpu() - before
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return used / max(1, result["deltas"]) * 1e6, result

    def stop(self) -> None:
        for p in (self.proc, self.broker):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default=str(REPO), help="comma-separated source trees to compare (default: this one)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=20.0, help="the scripted worker's step interval")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/loom-relay-cpu"))
    ap.add_argument("--_broker", help=argparse.SUPPRESS)
    ap.add_argument("--_clients", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._broker:
        broker_main(args._broker, args.step_ms / 1000)
        return 0
    if args._clients:
        clients_main(args._clients, args.streams, args.tokens)
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    apis = [Api(Path(t).resolve(), args.step_ms / 1000, args.log_dir) for t in args.trees.split(",")]
    figures: dict[str, list[float]] = {str(a.tree): [] for a in apis}
    bodies: dict[str, str] = {}
    try:
        for api in apis:
            api.round(8, 16)  # warm-up
        for r in range(args.rounds):
            for api in apis:
                us, result = api.round(args.streams, args.tokens)
                figures[str(api.tree)].append(us)
                bodies[str(api.tree)] = result["bodies"][0]
                print(f"round {r} {api.tree}: {us:.1f} us/token ({result['deltas']} deltas, {result['ends']} ends, "
                      f"{result['distinct']} distinct bodies) load {loadavg()}", flush=True)
    finally:
        for api in apis:
            api.stop()
    for tree, values in figures.items():
        print(f"{tree}: median {med(values):.1f} us/token (rounds {[round(v, 1) for v in values]})")
    if len(set(bodies.values())) > 1:
        print("ANSWER BODIES DIFFER between trees")
    elif len(bodies) > 1:
        print("answer bodies identical across trees (latency_ms masked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
