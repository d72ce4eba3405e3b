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


def coerce_enums(settings: Any) -> None:
    """In `__post_init__`: accept an enum field's value as its plain string too (`unit="halves"`
    from Python, as the command line gives it), refusing unknown values in one line."""
    import enum
    import typing

    from lm_eval_layers.errors import UsageError

    for name, hint in typing.get_type_hints(type(settings)).items():
        kinds = [t for t in (typing.get_args(hint) or (hint,)) if isinstance(t, type) and issubclass(t, enum.Enum)]
        value = getattr(settings, name, None)
        if kinds and value is not None and not isinstance(value, kinds[0]):
            try:
                object.__setattr__(settings, name, kinds[0](value))
            except ValueError:
                choices = ", ".join(str(m.value) for m in kinds[0])
                raise UsageError(f"{flag_of(settings, name)} {value!r}: use one of {choices}") from None
