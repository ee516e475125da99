#!/usr/bin/env python
"""What relaying a token must cost on this machine, whatever Loom's code does.

Issue 13 asks for at most 20 µs of API + broker CPU per relayed token at 64
streams. Two costs of that path are set by the machine, not by Loom:

- the API's write: the SSE contract sends each token the moment it exists,
  so at 64 streams a step means 64 writes on 64 client sockets. Measured
  here as uvloop's `transport.write` of a token's chunk on 64 loopback
  connections, one per connection per step, with a separate process reading
  them (the loopback receive work is charged to the writer, as in Loom).
- the broker's hop: each step's message wakes the broker's thread and
  ZeroMQ's I/O thread. Measured here as a bare Python ROUTER-to-ROUTER
  forwarder (no decoding, no routing table) relaying one 64-entry message a
  step, divided by 64.

The sum is a floor for the target's figure on this machine; compare it with
efficiency.py's (b). Figures, not assertions.

    python bench/floors.py                 # 64 streams, 300 steps at 40 a second
    python bench/floors.py --step-ms 5
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import free_port, loadavg  # noqa: E402

# A token's chunk as Loom writes it: HTTP chunk framing around one SSE delta event.
CHUNK = b'3f\r\nevent: delta\ndata: {"type":"delta","delta":{"text":" the"}}\n\n\r\n'


def _read_all(port: int, streams: int) -> None:
    """The clients: `streams` connections read until each is closed."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    left = streams
    while left:
        for key, _ in sel.select():
            if not key.fileobj.recv(65536):
                sel.unregister(key.fileobj)
                left -= 1


def write_floor(streams: int, steps: int, step_s: float) -> float:
    """CPU µs (user + system) of one transport.write per token, over `steps` steps of `streams` writes."""
    import uvloop

    async def main() -> float:
        transports: list[asyncio.Transport] = []
        ready = asyncio.Event()

        class Conn(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transports.append(transport)  # type: ignore[arg-type]
                if len(transports) == streams:
                    ready.set()

        server = await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        readers = subprocess.Popen([sys.executable, __file__, "--_read", str(port), "--streams", str(streams)])
        await ready.wait()
        await asyncio.sleep(0.2)
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(steps):
            for t in transports:
                t.write(CHUNK)
            await asyncio.sleep(step_s)
        after = resource.getrusage(resource.RUSAGE_SELF)
        for t in transports:
            t.close()
        server.close()
        await asyncio.sleep(0.2)  # the closes go out before the readers are waited for
        await asyncio.get_running_loop().run_in_executor(None, readers.wait)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return cpu / (steps * streams) * 1e6

    return uvloop.run(main())


def _forward(front: str, back: str) -> None:
    """A bare relay: whatever the back socket's peer sends goes to the front socket's peer, frames untouched."""
    import zmq

    ctx = zmq.Context()
    fs, bs = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    fs.bind(front)
    bs.bind(back)
    api = fs.recv_multipart()[0]  # the API says hello first
    while True:
        frames = bs.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"end":
            break
        fs.send_multipart([api, *frames[1:]], copy=False)
    fs.send_multipart([api, b"end"])


def relay_floor(streams: int, steps: int, step_s: float) -> float:
    """CPU µs per token of a bare forwarding process relaying one `streams`-entry message a step."""
    import psutil
    import zmq

    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    relay = subprocess.Popen([sys.executable, __file__, "--_forward", front, back])
    ctx = zmq.Context()
    api, worker = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    api.connect(front)
    worker.connect(back)
    time.sleep(0.5)
    api.send(b"hello")
    # A step's message: a msgpack-sized header naming `streams` request ids and their texts.
    message = os.urandom(streams * 40)
    for _ in range(20):  # warm-up
        worker.send(message)
        api.recv()
    proc = psutil.Process(relay.pid)
    before = sum(proc.cpu_times()[:2])
    for _ in range(steps):
        worker.send(message)
        api.recv()
        time.sleep(step_s)
    after = sum(proc.cpu_times()[:2])
    worker.send(b"end")
    api.recv()
    relay.wait(10)
    api.close(0)
    worker.close(0)
    ctx.term()
    return (after - before) / steps / streams * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step-ms", type=float, default=25.0, help="time between steps (40 a second by default)")
    ap.add_argument("--_read", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_forward", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._read:
        _read_all(args._read, args.streams)
        return
    if args._forward:
        _forward(*args._forward)
        return
    step_s = args.step_ms / 1000
    print(f"{args.streams} streams, {args.steps} steps, a step every {args.step_ms:g} ms; load {loadavg()}")
    write = write_floor(args.streams, args.steps, step_s)
    print(f"API: one loopback write per token (uvloop transport.write): {write:.1f} µs of CPU")
    relay = relay_floor(args.streams, args.steps, step_s)
    print(f"broker: a bare forwarder's CPU per relayed message / {args.streams}: {relay:.1f} µs a token")
    print(f"floor for API + broker per relayed token on this machine: {write + relay:.1f} µs "
          f"(target 20; Loom's own figure: efficiency.py's (b))")


if __name__ == "__main__":
    main()
