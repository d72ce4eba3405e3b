"""Where the `*_local` tasks get their documents: a local folder, or the Hugging Face hub.

When `LM_EVAL_LAYERS_DATA` names a folder, `<folder>/<name>/<split>.jsonl` is read (MMLU as
`mmlu/<subject>/<split>.jsonl`); rows are in the hub schema of the dataset named in the task's
YAML. Otherwise the task loads exactly what lm-eval's built-in task loads from the hub. Small
adapters turn a local schema into the built-in task's schema where the two differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import datasets

from lm_eval_layers.errors import DataError

ENV = "LM_EVAL_LAYERS_DATA"


def _boolq_as_super_glue(row: dict[str, Any], idx: int) -> dict[str, Any]:
    """google/boolq rows -> aps/super_glue boolq rows (what lm-eval's boolq reads)."""
    return {"question": row["question"], "passage": row["passage"], "idx": idx, "label": int(row["answer"])}


ADAPTERS: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "boolq": _boolq_as_super_glue,
}


def wikitext_pages(raw: str) -> list[dict[str, str]]:
    """Split a raw WikiText file into articles, as EleutherAI/wikitext_document_level does:
    a line ` = Title = ` (a first-level heading) starts a page; lines are joined with newlines."""
    pages: list[dict[str, str]] = []
    lines: list[str] = []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append({"page": page})
            lines = []
        lines.append(line)
    page = "\n".join(lines)
    if page.strip():
        pages.append({"page": page})
    return pages


def _read_local(folder: Path, name: str) -> datasets.DatasetDict:
    splits: dict[str, datasets.Dataset] = {}
    adapter = ADAPTERS.get(name.split("/")[0])
    for path in sorted(folder.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if adapter:
            rows = [adapter(row, i) for i, row in enumerate(rows)]
        splits[path.stem] = datasets.Dataset.from_list(rows)
    for path in sorted(folder.glob("wiki.*.raw")):
        splits[path.name.split(".")[1]] = datasets.Dataset.from_list(wikitext_pages(path.read_text(encoding="utf-8")))
    if not splits:
        raise DataError(f"{folder} has no <split>.jsonl files; check {ENV} or unset it to load from the hub")
    return datasets.DatasetDict(splits)


_OFF = ("1", "true", "yes", "on")


def check_sources(local_names: list[str]) -> None:
    """Where each shipped task's documents will come from, checked before any model is loaded:
    the local folder exists, or the hub is not switched off. A missing folder otherwise fails after
    the model has loaded, and an offline hub after lm-eval's retries (minutes)."""
    root = os.environ.get(ENV)
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").lower() in _OFF]
    for name in local_names:
        if root and not (Path(root) / name).is_dir():
            raise DataError(f"{ENV}={root} has no folder {name!r}; add it (<name>/<split>.jsonl) or unset {ENV} to load from the hub")
        if not root and offline:
            raise DataError(f"the {name} data needs {ENV} (a folder of <name>/<split>.jsonl, e.g. the repository's "
                            f"../shared/data) or the hub, which {offline[0]}=1 switches off; set {ENV}")


def load(local_name: str, hub_path: str, hub_name: str | None = None, **_metadata: Any) -> datasets.DatasetDict:
    """`custom_dataset` of every `*_local` task: the local copy when configured, else the hub."""
    root = os.environ.get(ENV)
    if root:
        folder = Path(root) / local_name
        if not folder.is_dir():
            raise DataError(f"{ENV}={root} has no folder {local_name!r}; add it or unset {ENV} to load from the hub")
        return _read_local(folder, local_name)
    try:
        return datasets.load_dataset(hub_path, hub_name)
    except ConnectionError:  # offline, or the hub is unreachable
        raise DataError(f"cannot reach the hub for {hub_path}; set {ENV} to a folder of local data "
                        f"(<name>/<split>.jsonl) or connect to the network") from None
