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
    """`count` listening sockets bound to host:port (port 0: one free port for all)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
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
            address = sock.getsockname()  # the port the first one got, when 0 was asked
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
