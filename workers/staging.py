"""Host <-> device copies of a step's small tensors, without a host sync per token.

On a GPU every `.cpu()`, `.tolist()` or `torch.tensor(list, device="cuda")`
waits for the device. A step's inputs (token ids, positions, sampling's
uniform numbers) go up from pinned memory without waiting, and the hidden
states that stream to clients come down as one copy per step through a
pinned buffer, then leave as per-row views of one host array. On the CPU
the same calls are plain tensor operations.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger("loom.worker")


# torch.tensor(list) converts element by element (~8 us for 53 ints, several times that cold, after a
# forward pass); numpy's conversion is ~2 us and torch.from_numpy shares its memory.
_NUMPY_DTYPES = {torch.long: np.int64, torch.float32: np.float32, torch.float64: np.float64}


def to_device(values: list[Any], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(values) on `device`; on CUDA through pinned memory, without waiting for the copy."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    t = torch.tensor(values, dtype=dtype) if np_dtype is None else torch.from_numpy(np.array(values, dtype=np_dtype))
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array of its bytes' type (bfloat16 as int16 words)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bits travel as they are
    return t.numpy()


class HostStaging:
    """Rows of device tensors to host bytes, one device-to-host copy per call."""

    def __init__(self, device: torch.device | str, what: str = ""):
        self.cuda = torch.device(device).type == "cuda"
        self._pinned: torch.Tensor | None = None
        if self.cuda:
            log.info("%s on %s: one host sync per decode step (the sampled tokens); streamed hidden states "
                     "copied to the host once per step through pinned memory; step inputs sent from pinned "
                     "memory without waiting", what or "model", device)

    def rows(self, vectors: list[torch.Tensor]) -> list[memoryview]:
        """Each [H] vector's bytes (vectors of one dtype and size: a step's streamed states)."""
        stacked = torch.stack(vectors)
        if not self.cuda:
            host = host_array(stacked.detach().to("cpu"))
        else:
            n = stacked.numel()
            if self._pinned is None or self._pinned.dtype != stacked.dtype or self._pinned.numel() < n:
                self._pinned = torch.empty(max(n, 2 * (0 if self._pinned is None else self._pinned.numel())),
                                           dtype=stacked.dtype, pin_memory=True)
            staged = self._pinned[:n].view(stacked.shape)
            staged.copy_(stacked, non_blocking=True)
            torch.cuda.current_stream(stacked.device).synchronize()
            # A copy of its own: the frames may still be on their way when the next step reuses the buffer.
            host = host_array(staged).copy()
        return [host[j].data for j in range(host.shape[0])]
