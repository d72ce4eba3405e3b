"""transformers' GGUF loading helpers (`modeling_gguf_pytorch_utils`, tested with 5.24–5.25):
which GGUF tensor becomes which parameter, and the per-architecture processors that undo
llama.cpp's layout (e.g. the Q/K row permutation of Llama attention), so that a GGUF read tensor
by tensor gives exactly what `from_pretrained(gguf_file=...)` loads."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn


class GGUFNames:
    """GGUF tensor names to the parameter names of `meta` (the model transformers builds from
    the GGUF's config), and each tensor's values as transformers lays them out."""

    def __init__(self, config: Any, meta: nn.Module, architecture: str) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        self.mapping: dict[str, str] = get_gguf_hf_weights_map(meta, self.processor)

    def hf_name(self, gguf_name: str) -> str | None:
        """The parameter `gguf_name` loads into, or None for a tensor transformers does not load."""
        return self.mapping.get(gguf_name)

    def values(self, weights: np.ndarray, gguf_name: str) -> np.ndarray:
        """Dequantised `weights` of `gguf_name` in transformers' layout."""
        return self.processor.process(weights=weights, name=gguf_name).weights
