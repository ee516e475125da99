"""The HTTP port of `loom serve`: one listening socket per API process, held by the launcher.

Each API process gets its own SO_REUSEPORT socket on the one port (the kernel
spreads new connections over them by address hash) as an inherited file
descriptor (`loom api --fd`). The launcher keeps every socket open for its
whole life: when an API process dies, connections the kernel hands to its
socket wait in that socket's backlog until the restarted process accepts them,
instead of being refused or reset.
"""
from __future__ import annotations

import socket

BACKLOG = 2048


def open_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets bound to host:port (port 0: one free port for all).

    Raises OSError (EADDRINUSE) when anything else holds the port, another
    `loom serve` included: SO_REUSEPORT alone would let a second server of the
    same user share the port and take half of the first one's connections.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    # A plain bind first: it fails if any socket holds the port, SO_REUSEPORT or not;
    # once ours are bound, the same check fails for anyone after us.
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(address)
        address = probe.getsockname()  # the port it got, when 0 was asked
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def inherited(fd: int) -> socket.socket:
    """The listening socket a launcher passed down as file descriptor `fd`."""
    return socket.socket(fileno=fd)
