"""`LoomClient` and `AsyncLoomClient`: the HTTP contract as Python calls.

Kept so that `from loom.client.client import LoomClient` still works; the
clients are split by job into sibling modules:

    sync_client.py   LoomClient (blocking)
    async_client.py  AsyncLoomClient (asyncio)
    connection.py    the default address, timeouts, auth headers
    bodies.py        request bodies both clients send
    responses.py     typed answers and the server's error messages
"""
from loom.client.async_client import AsyncLoomClient
from loom.client.connection import DEFAULT_URL
from loom.client.sync_client import LoomClient

__all__ = ["DEFAULT_URL", "LoomClient", "AsyncLoomClient"]
