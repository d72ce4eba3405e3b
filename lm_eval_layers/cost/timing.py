"""One measurement of a loaded model: prompt processing, time to first token, generation, and
the process's peak memory. The device is synchronised around every timed region, so a CUDA
kernel still queued is never left out of a time.

    pp   = batch·P / (time of one forward over the P-token prompt, logits at every position)
    ttft = time of the prefill that generation starts with (KV cache filled, logits of the last
           position only) and the choice of the first token
    tg   = batch·N / (time of N more tokens, one at a time on the KV cache, greedy)
"""

from __future__ import annotations

import ctypes
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    pp_tokens_per_s: float
    tg_tokens_per_s: float
    ttft_s: float


class Clock:
    """Wall time between synchronisation points: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            torch.cuda.synchronize()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds_since(self, start: Any) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        return time.perf_counter() - start


def prompt_ids(vocab_size: int, batch: int, tokens: int) -> torch.Tensor:
    """The same pseudo-random prompt in every process (speed does not depend on which tokens)."""
    return torch.randint(0, vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def measure(model: Any, ids: torch.Tensor, new_tokens: int, clock: Clock) -> Sample:
    """One pp, ttft and tg measurement of `model` on prompt `ids` (already on the model's device)."""
    batch, prompt = ids.shape
    start = clock.start()
    model(ids, use_cache=False)
    pp = batch * prompt / clock.seconds_since(start)

    start = clock.start()
    out = model(ids, use_cache=True, logits_to_keep=1)  # as `generate` prefills
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    ttft = clock.seconds_since(start)
    cache = out.cache
    start = clock.start()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    tg = batch * new_tokens / clock.seconds_since(start)
    return Sample(pp, tg, ttft)


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps freed heap otherwise),
    so the resident set is what the process still holds."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak from what is resident now: Linux's VmHWM (written 5 to clear_refs), or
    torch's CUDA allocator peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """The peak since the last reset: process RSS high-water mark on a CPU (all the process
    holds: weights, activations, KV cache, the interpreter and libraries), memory allocated by
    torch on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return int(_HWM.search(Path("/proc/self/status").read_text()).group(1)) / 1024
