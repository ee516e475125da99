"""Who a ZeroMQ identity on the broker's backend belongs to.

A worker has two connections: the socket thread's (registration, heartbeats,
model lists) under the worker's own identity, and its engine thread's
(workers/data_socket.py: request frames) under that identity plus
DATA_IDENTITY_SUFFIX. The broker counts both as the one worker.
"""
from __future__ import annotations

DATA_IDENTITY_SUFFIX = b"/data"


def worker_identity(identity: bytes) -> bytes:
    """The worker a broker-side identity belongs to: its data connection counts as the worker."""
    return identity[:-len(DATA_IDENTITY_SUFFIX)] if identity.endswith(DATA_IDENTITY_SUFFIX) else identity
