"""Training records -> tokenised examples whose labels cover the response tokens only.

Four record formats are recognised by their fields (the formats trl's SFT tooling and
Alpaca-style repositories use):

- `messages`: a conversation, a list of `{"role", "content"}` turns, rendered with the
  tokenizer's chat template; every assistant turn (with the template's end-of-turn text) is a
  response. A tokenizer without a chat template gets `PLAIN_CHAT_TEMPLATE`
  (`User: ...` / `Assistant: ...<eos>` lines), which is saved with the trained model so
  evaluation renders conversations the same way.
- `prompt` + `completion`: the completion (plus the end-of-sequence token) is the response;
  conversational prompt/completion (lists of turns) is treated as `messages`.
- Alpaca `instruction` + `input` (optional) + `output`: rendered with the Stanford Alpaca
  prompt (`ALPACA_PROMPT`, `ALPACA_PROMPT_NO_INPUT`); the output (plus end-of-sequence) is the
  response.
- `text`: plain text, every token is trained.

Tokens are labelled by character spans: the whole example is rendered to one string and
tokenised once (so tokens merge across the prompt/response boundary exactly as they do at
inference), and a token is a response token when its first character lies in a response span.
Labels of other tokens are -100 (ignored by the loss).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import torch

from lm_eval_layers.errors import DataError

IGNORE = -100

PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}Assistant:{% endif -%}"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class RecordFormat(str, Enum):
    messages = "messages"
    prompt_completion = "prompt/completion"
    alpaca = "alpaca"
    text = "text"


_FIELDS = {
    RecordFormat.messages: ("messages",),
    RecordFormat.prompt_completion: ("prompt", "completion"),
    RecordFormat.alpaca: ("instruction", "output"),
    RecordFormat.text: ("text",),
}


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def load_records(data: str) -> list[dict[str, Any]]:
    """A local .jsonl / .json / .parquet file, or a hub dataset id (its `train` split)."""
    path = Path(data).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"no data file at {path}; give a .jsonl, .json or .parquet file or a hub dataset id")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            return _read_json(path)
        if path.suffix == ".parquet":
            import datasets

            return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json or .parquet")
    if data.count("/") != 1:
        raise DataError(f"no data file at {data} and it is not a hub dataset id (owner/name); check the path")
    import datasets

    try:
        return list(datasets.load_dataset(data, split="train"))
    except Exception as e:  # offline, unknown id, no train split: one clear line
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DataError(f"cannot load dataset {data} ({first}); check the id and your network, or give a local file") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not JSON ({e.msg}); one JSON object per line") from None
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a list of records (or {{\"data\": [...]}}); use .jsonl for one record per line")
    return data


def detect_format(records: Sequence[Any]) -> RecordFormat:
    """The format of the first record; every record is then checked for the same fields."""
    if not records:
        raise DataError("the data has no records; give a file with at least one record")
    first = records[0]
    if not isinstance(first, dict):
        raise DataError(f"record 0 is a {type(first).__name__}, not an object; records are JSON objects")
    for fmt, fields in _FIELDS.items():
        if all(f in first for f in fields):
            break
    else:
        raise DataError(
            f"unknown record format: record 0 has fields {', '.join(sorted(first)) or '(none)'}; give 'messages', "
            "'prompt'+'completion', 'instruction'+'input'+'output' (Alpaca) or 'text'"
        )
    for i, record in enumerate(records):
        missing = [f for f in fields if not isinstance(record, dict) or record.get(f) is None]
        if missing:
            raise DataError(
                f"record {i} has no {missing[0]!r} field, but record 0 is {fmt.value}; every record needs "
                f"{' and '.join(repr(f) for f in fields)}"
            )
    return fmt


def uses_chat_template(records: Sequence[dict[str, Any]], fmt: RecordFormat) -> bool:
    """Conversations do, and prompt/completion records whose prompt is a list of turns."""
    return fmt is RecordFormat.messages or (
        fmt is RecordFormat.prompt_completion and any(isinstance(r.get("prompt"), list) for r in records))


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the plain one; True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return True


def render(record: dict[str, Any], fmt: RecordFormat, tokenizer: Any, index: int = 0) -> tuple[str, list[tuple[int, int]], bool]:
    """The example as one string, its response character spans, and whether to add special
    tokens when tokenising it (chat templates write their own)."""
    eos = tokenizer.eos_token or ""
    if fmt is RecordFormat.text:
        text = _string(record, "text", index)
        return text, [(0, len(text))], True
    if fmt is RecordFormat.alpaca:
        instruction, output = _string(record, "instruction", index), _string(record, "output", index)
        extra = record.get("input") or ""
        prompt = (ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=extra)
        return prompt + output + eos, [(len(prompt), len(prompt) + len(output) + len(eos))], True
    if fmt is RecordFormat.prompt_completion and isinstance(record["prompt"], list):
        return _render_chat([*record["prompt"], *_turns(record["completion"], index)], tokenizer, index)
    if fmt is RecordFormat.prompt_completion:
        prompt, completion = _string(record, "prompt", index), _string(record, "completion", index)
        return prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))], True
    return _render_chat(_turns(record["messages"], index), tokenizer, index)


def _string(record: dict[str, Any], field: str, index: int) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"record {index}: {field!r} is a {type(value).__name__}, not text")
    return value


def _turns(value: Any, index: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) and "role" in t and "content" in t for t in value):
        raise DataError(f"record {index}: a conversation must be a list of {{\"role\", \"content\"}} turns")
    return value


def _render_chat(turns: list[dict[str, str]], tokenizer: Any, index: int) -> tuple[str, list[tuple[int, int]], bool]:
    """Assistant turns' spans: the text a turn adds after the generation prompt that precedes
    it (so the end-of-turn marker is trained too). Templates that render earlier turns
    differently once later ones exist fall back to the assistant content itself."""
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"record {index} has no assistant turn; add one (its content is what the model learns)")

    def chat(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    full = chat(turns)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, upto = chat(turns[:i], generation_prompt=True) if i else "", chat(turns[: i + 1])
        if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            start = full.find(turn["content"], cursor)
            if start < 0:
                raise DataError(f"record {index}: the chat template drops assistant turn {i}; train on the last turn only")
            end = start + len(turn["content"])
        spans.append((start, end))
        cursor = end
    return full, spans, False


@dataclass(frozen=True)
class Prepared:
    """A data source read, recognised and tokenised for a model: what `surgery train` and
    `surgery ila` both start from."""

    records: list[dict[str, Any]]
    format: RecordFormat
    examples: list[Example]
    added_template: bool  # the tokenizer had no chat template; PLAIN_CHAT_TEMPLATE was given to it

    def describe(self) -> str:
        return (f"{len(self.records):,} records, format {self.format.value}"
                + (" (no chat template: the plain User:/Assistant: template is used and saved)" if self.added_template else ""))


def prepare(data: str, tokenizer: Any, max_length: int) -> Prepared:
    """Load DATA, detect its record format and tokenise it with response-only labels."""
    records = load_records(data)
    fmt = detect_format(records)
    added = uses_chat_template(records, fmt) and ensure_chat_template(tokenizer)
    return Prepared(records, fmt, tokenize(records, fmt, tokenizer, max_length), added)


def tokenize(records: Sequence[dict[str, Any]], fmt: RecordFormat, tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenised examples, truncated to `max_length` tokens, with response-only labels."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("response-only labels need a fast (Rust) tokenizer with offset mapping; this model's tokenizer is a slow one")
    if uses_chat_template(records, fmt):
        ensure_chat_template(tokenizer)
    rendered = [render(r, fmt, tokenizer, i) for i, r in enumerate(records)]
    indexed: list[tuple[int, Example]] = []
    empty: list[int] = []
    for special in (True, False):
        group = [(i, text, spans) for i, (text, spans, s) in enumerate(rendered) if s is special]
        if not group:
            continue
        encoded = tokenizer(
            [text for _, text, _ in group], add_special_tokens=special, return_offsets_mapping=True,
            truncation=True, max_length=max_length,
        )
        for (i, _, spans), ids, offsets in zip(group, encoded["input_ids"], encoded["offset_mapping"]):
            labels = [tok if _inside(start, end, spans) else IGNORE for tok, (start, end) in zip(ids, offsets)]
            if all(label == IGNORE for label in labels[1:]):  # position 0 is never predicted
                empty.append(i)
            indexed.append((i, Example(list(ids), labels)))
    if empty:
        raise DataError(
            f"{len(empty)} of {len(records)} records have no response token left after truncation to --max-length "
            f"{max_length} (first: record {min(empty)}); raise --max-length or shorten those prompts"
        )
    return [example for _, example in sorted(indexed, key=lambda pair: pair[0])]


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    if end <= start:  # a token without characters (e.g. an added BOS) belongs to no span
        return False
    return any(a <= start < b for a, b in spans)


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out part (at least one example when the fraction is positive)."""
    if eval_fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"--eval-fraction {eval_fraction} leaves no training example out of {len(examples)}; lower it")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class Collator:
    """Right-pads a batch: input ids with the pad id, labels with -100, and an attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_id(tokenizer: Any) -> int:
    """Padding never reaches the loss or attention, so any id works; prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
