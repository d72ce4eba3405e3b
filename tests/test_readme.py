"""Every example in README.md runs as written: each `lm_eval` command that names a shipped
`*_local` task carries `--include_path` (stock lm-eval does not find them otherwise), and each
concrete `surgery` command parses with the CLI's own parser (flags exist, values have their
types and choices). Running them all is too slow for the suite; the demo and the tests run the
commands themselves."""

from __future__ import annotations

import re
import shlex

import pytest
import typer

from conftest import REPO
from surgery.cli import app

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
INLINE = re.findall(r"`((?:\$ )?(?:lm_eval|surgery) [^`]+)`", README)


def _commands(program: str) -> list[str]:
    """Commands of `program` in code blocks (continuation lines joined, `$ ` prompts and trailing
    comments removed, `&&` chains split) and in inline code."""
    found = []
    for block in BLOCKS:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip().removeprefix("$ "))
            found += [part.strip() for part in line.split("&&") if part.strip().startswith(program + " ")]
    found += [c.removeprefix("$ ") for c in INLINE if c.removeprefix("$ ").startswith(program + " ")]
    return found


def _concrete(command: str) -> bool:
    """A runnable example, not a syntax summary (`[--opt]`, `a|b`, `...`)."""
    return not re.search(r"[\[|\n]|\.\.\.|…", command) and len(command.split()) > 3


LM_EVAL = _commands("lm_eval")
SURGERY = [c for c in _commands("surgery") if _concrete(c)]


def test_the_readme_has_examples_to_check():
    assert len(LM_EVAL) >= 3 and len(SURGERY) >= 8


@pytest.mark.parametrize("command", LM_EVAL)
def test_lm_eval_examples_that_use_shipped_tasks_give_include_path(command):
    if "--tasks" in command and "_local" in command.split("--tasks", 1)[1]:
        assert "--include_path" in command, f"stock lm_eval cannot find the shipped tasks without it: {command}"


@pytest.mark.parametrize("command", SURGERY)
def test_surgery_examples_parse_with_the_cli(command):
    group = typer.main.get_command(app)
    args = shlex.split(command)[1:]
    ctx = group.make_context("surgery", list(args), resilient_parsing=False)
    name, cmd, rest = group.resolve_command(ctx, args)
    while hasattr(cmd, "resolve_command") and rest and rest[0] in cmd.commands:  # `surgery ila compare`
        name, cmd, rest = cmd.resolve_command(ctx, rest)
    cmd.make_context(name, list(rest), parent=ctx)  # raises on an unknown flag or a bad value
