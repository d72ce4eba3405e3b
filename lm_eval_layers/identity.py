"""What a stored answer depends on: fingerprints of model weights and digests of settings.

Caches and stores (lm-eval's `--use_cache` file, the `surgery score` store) must answer only for
the model, variant and settings that produced an answer. A path or hub id alone is not enough: a
folder retrained or re-pruned in place keeps its name, so local files are fingerprinted by name,
size and modification time (cheap, no weight is read).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Files whose change changes a model's outputs (weights, configs, tokenizers, adapters).
_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".pt", ".pth", ".tiktoken")


def files_fingerprint(path: str | Path) -> list[tuple[str, int, int]] | None:
    """(name, size, mtime_ns) of the model files at a local folder or file; None for a hub id."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
    else:
        return None
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def model_identity(pretrained: str, revision: str | None = None, subfolder: str | None = None,
                   gguf_file: str | None = None) -> dict[str, Any]:
    """The model a value was computed with: local path (resolved) + file fingerprint, or hub id +
    revision."""
    local = Path(pretrained).expanduser()
    folder = local / subfolder if subfolder else local
    if local.exists():
        pretrained = str(local.resolve())
    target = folder / gguf_file if gguf_file else folder
    return {"pretrained": pretrained, "revision": revision, "subfolder": subfolder, "gguf_file": gguf_file,
            "files": files_fingerprint(target)}


def digest(value: Any) -> str:
    """A short stable hash of a JSON-serialisable value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]
