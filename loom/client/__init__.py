"""A Python client for Loom servers.

Depends only on httpx, pydantic and the standard library, so that it can be
used (and `loom chat` can start) where torch and the server are not installed.
"""
from loom.client.client import DEFAULT_URL, AsyncLoomClient, LoomClient
from loom.client.errors import LoomConnectionError, LoomError, LoomHTTPError, LoomProtocolError, LoomStreamError
from loom.client.models import (
    ChatResult,
    ErrorEvent,
    GenerateResult,
    Health,
    HiddenState,
    LoadedModel,
    LoadResult,
    MessageDelta,
    ModelsList,
    HiddenStates,
    LogitLens,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
    parse_stream_event,
)
from loom.client.patching import PatchedRun, PatchResult, PatchRun
from loom.client.research import BatchError, GenerateBatchResult
from loom.client.sse import ServerSentEvent, SSEDecoder, aiter_sse, iter_sse
from loom.client.streams import AsyncEventStream, EventStream

__all__ = [
    "DEFAULT_URL",
    "AsyncEventStream",
    "AsyncLoomClient",
    "ChatResult",
    "ErrorEvent",
    "EventStream",
    "GenerateResult",
    "Health",
    "HiddenState",
    "LoadResult",
    "LoadedModel",
    "LoomClient",
    "LoomConnectionError",
    "LoomError",
    "LoomHTTPError",
    "LoomProtocolError",
    "LoomStreamError",
    "MessageDelta",
    "ModelsList",
    "HiddenStates",
    "LogitLens",
    "TokenLogprob",
    "TopLogprob",
    "BatchError",
    "GenerateBatchResult",
    "PatchResult",
    "PatchRun",
    "PatchedRun",
    "SSEDecoder",
    "ServerSentEvent",
    "StreamEvent",
    "TextDelta",
    "Usage",
    "aiter_sse",
    "iter_sse",
    "parse_stream_event",
]
