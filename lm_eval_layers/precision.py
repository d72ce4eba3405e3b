"""The floating dtypes a command may compute or store in, named once for every command, and the
one policy for the commands that train (`surgery train`, `surgery ila`)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from lm_eval_layers.errors import UsageError


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.value)


def training_dtype(value: str, flag: str = "--dtype") -> DType:
    """The dtype a run trains in, refused before any weight is read when it cannot train here:
    float16 needs the Trainer's loss scaling, which runs on a GPU only (bfloat16 and float32
    train anywhere; torch is imported only to ask about float16)."""
    try:
        dtype = DType(value)
    except ValueError:
        raise UsageError(f"{flag} {value}: use float32, bfloat16 or float16") from None
    if dtype is DType.float16:
        float16_needs_a_gpu(flag, "trains with loss scaling on a GPU only")
    return dtype


def float16_needs_a_gpu(flag: str, why: str = "needs a GPU") -> None:
    """The one refusal of float16 on a machine without CUDA (torch imported only here)."""
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"{flag} float16 {why}; use float32 (or bfloat16) here")
