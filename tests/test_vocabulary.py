"""One vocabulary across commands: one reading of a share for every option that takes one
(lm_eval_layers/shares.py), one written form of a unit in scores.json and search.json."""

from __future__ import annotations

import pytest

from lm_eval_layers.errors import SelectionError, UsageError
from lm_eval_layers.search.settings import SearchSettings
from lm_eval_layers.shares import parse_share
from lm_eval_layers.training.selection import bottom_count


@pytest.mark.parametrize("text", ["75%", "0.75", " 75 % ".replace(" ", ""), "0.750"])
def test_a_percent_and_a_fraction_are_the_same_share(text):
    assert parse_share("--params", text) == pytest.approx(0.75)


@pytest.mark.parametrize("text, message", [
    ("75", "a bare number is a fraction (0.3 = 30%); write 75% for 75 percent"),
    ("0", "outside (0, 100%]"),
    ("150%", "outside (0, 100%]"),
    ("lots", "is not a share"),
])
def test_shares_that_are_refused_say_how_to_write_one(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        parse_share("--params", text)


def test_every_option_reads_the_same_text_as_the_same_share():
    """`--params 0.75` keeps 75 % of the parameters (it was once read as 0.75 %); `--top` and
    `--freeze-bottom` read the same text the same way."""
    settings = SearchSettings.__new__(SearchSettings)
    object.__setattr__(settings, "params", "0.75")
    assert settings.keep_share == pytest.approx(0.75)
    assert bottom_count("0.25", 8) == bottom_count("25%", 8) == 2
    with pytest.raises(SelectionError, match="--freeze-bottom 125% is outside"):
        bottom_count("125%", 8)


def test_scores_and_search_name_units_alike():
    """scores.json (importance) and search.json (search) write a unit the same way: `3`, `attn.3`."""
    from lm_eval_layers.importance.settings import Unit
    from lm_eval_layers.search.removable import all_units

    assert Unit.halves.names(4) == [str(u) for u in all_units(4, halves=True)] == [
        "attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2", "attn.3", "mlp.3"]
    assert Unit.block.names(4) == [str(u) for u in all_units(4, halves=False)] == ["0", "1", "2", "3"]
