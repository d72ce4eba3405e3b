"""What is in a checkpoint (`surgery inspect`): blocks, parameters, dtypes, size and the config
fields that count layers, read from tensor headers only (no weight is decoded)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from lm_eval_layers.checkpoint.sources import GGUFFile, Source, source_layout
from lm_eval_layers.checkpoint.writer import block_prefix


def describe(source: Source) -> dict[str, Any]:
    """The report as a JSON-ready dict. `dtypes` and `bytes` are what loading gives (a GGUF file
    is dequantised to float32); for GGUF, `stored_types` and `stored_bytes` say what the file holds."""
    layout = source_layout(source)
    names = list(source.infos)
    prefix = block_prefix(names, layout)
    blocks: dict[int, list[str]] = {}
    other: list[str] = []
    for name in names:
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        head = rest.split(".", 1)[0]
        (blocks.setdefault(int(head), []) if head.isdigit() else other).append(name)

    def numel(n: str) -> int:
        return math.prod(source.infos[n].shape)

    def dtypes(group: list[str]) -> list[str]:
        return sorted({str(source.infos[n].dtype).removeprefix("torch.") for n in group})

    config = source.config
    text = config.get("text_config", config)
    report = {
        "model": source.name,
        "architecture": (config.get("architectures") or [type(source.hf_config).__name__])[0],
        "model_type": config.get("model_type"),
        "num_blocks": len(blocks),
        "blocks": [
            {"index": i, "parameters": sum(numel(n) for n in group), "tensors": len(group), "dtypes": dtypes(group)}
            for i, group in sorted(blocks.items())
        ],
        "other_parameters": sum(numel(n) for n in other),
        "other_tensors": len(other),
        "other_dtypes": dtypes(other),
        "parameters": sum(numel(n) for n in names),
        "bytes": sum(source.infos[n].nbytes for n in names),
        "tied_embeddings": bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        and not any(n.endswith("lm_head.weight") for n in names),
        "layer_config": {k: text[k] for k in layout.layer_keys if k in text},
    }
    if isinstance(source, GGUFFile):
        kinds = Counter(kind for kind, _ in source.stored.values())
        report["stored_types"] = dict(kinds.most_common())
        report["stored_bytes"] = sum(size for _, size in source.stored.values())
        report.update(_gguf_layers(source.path))
    return report


def _gguf_layers(path: Any) -> dict[str, Any]:
    """A GGUF file's per-layer metadata (every `{arch}.*` array as long as its block count) and
    the plan this tool wrote into it, if any (`gguf_out.PLAN_KEY`)."""
    import json

    from lm_eval_layers.checkpoint.gguf_header import ARRAY, read_header
    from lm_eval_layers.checkpoint.gguf_out import PLAN_KEY
    from lm_eval_layers.plan import LayerPlan

    header = read_header(path)
    arch = header.get("general.architecture")
    depth = header.get(f"{arch}.block_count")
    per_layer = {key: f.value() for key, f in header.fields.items()
                 if f.kind == ARRAY and key.startswith(f"{arch}.") and f.count == depth and f.element != 8}
    plan = LayerPlan.from_dict(json.loads(header.get(PLAN_KEY))).describe() if PLAN_KEY in header.fields else None
    return {"gguf_per_layer": per_layer, "gguf_plan": plan}
