"""The floating dtypes a command may compute or store in, named once for every command."""

from __future__ import annotations

from enum import Enum
from typing import Any


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.value)
