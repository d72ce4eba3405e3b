"""Command settings, declared once: a frozen dataclass per command whose fields carry the
default, the command-line flag and the help text. The library validates and uses the object;
the CLI builds its options from the same fields (`surgery.options.command`), so no option or
default is written twice, and a Python user passes the same object the command builds.

    @dataclass(frozen=True)
    class PruneSettings:
        model: str = argument("local folder, .gguf file, hub id or 'smollm2'")
        out: Path = required("--out", "output folder")
        force: bool = option(False, "--force", "replace a non-empty --out")
"""

from __future__ import annotations

import dataclasses
from typing import Any

MODEL_HELP = "local folder, .gguf file, hub id, or 'smollm2' (the embedded default)"  # every command's MODEL


def option(default: Any, flag: str, help: str = "") -> Any:
    """A field with a default, given on the command line as `flag`."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help})


def required(flag: str, help: str = "") -> Any:
    """A field without a default: the option must be given."""
    return dataclasses.field(metadata={"flag": flag, "help": help})


def argument(help: str = "", default: Any = dataclasses.MISSING) -> Any:
    """A positional command-line argument."""
    return dataclasses.field(default=default, metadata={"argument": True, "help": help})


def flag_of(settings: Any, name: str) -> str:
    """The flag of field `name`, for messages that name it (`--lora-dropout 1.5: ...`)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(settings)}[name]
    return meta.get("flag") or name.upper()
