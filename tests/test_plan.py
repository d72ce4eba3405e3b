"""The layer plan: syntax, resolution against a depth, presets, and one clear error per mistake."""

from __future__ import annotations

import pytest

from lm_eval_layers.plan import LayerPlan, PlanError, PlanSpec, Slot, format_indices


def resolve(n: int = 30, **kwargs) -> LayerPlan:
    return PlanSpec.from_args(**kwargs).resolve(n)


def originals(plan: LayerPlan) -> list[int]:
    return [s.source for s in plan.slots if not s.synthesized]


@pytest.mark.parametrize(
    "value",
    ["24-27", "24,25,26,27", "24;25-27", "[24, 25, 26, 27]", [24, 25, 26, 27], ["24-25", 26, 27.0], "-6--3", "'24-27'"],
)
def test_drop_syntaxes_agree(value):
    plan = resolve(drop=value)
    assert plan.dropped == (24, 25, 26, 27)
    assert originals(plan) == [i for i in range(30) if i not in (24, 25, 26, 27)]


def test_single_negative_index_counts_from_the_end():
    assert resolve(drop=-2).dropped == (28,)
    assert resolve(drop=-2.0).dropped == (28,)  # lm-eval's CLI turns "-2" into a float


def test_keep_is_the_complement_of_drop():
    assert resolve(keep="0-3,-1").slots == resolve(drop="4-28").slots


def test_empty_plan_is_identity():
    spec = PlanSpec.from_args()
    assert spec.is_empty
    plan = spec.resolve(12)
    assert plan.is_identity and plan.dropped == () and plan.new_slots == ()
    assert "unchanged" in plan.describe()


def test_half_drops_mark_slots_without_removing_them():
    plan = resolve(6, drop_attn="0,2", drop_mlp=5)
    assert [s.drop_attn for s in plan.slots] == [True, False, True, False, False, False]
    assert [s.drop_mlp for s in plan.slots] == [False] * 5 + [True]
    assert "attention branch of blocks 0,2" in plan.describe()


def test_inserts_follow_their_block_in_order():
    plan = resolve(6, insert="1:avg-zero;1:copy,4:copy-zero,-1:copy")
    assert [s.describe() for s in plan.slots] == [
        "0", "1", "avg-zero(1,2)", "copy(1)", "2", "3", "4", "copy-zero(4)", "5", "copy(5)",
    ]
    assert plan.new_slots == (2, 3, 7, 9)


def test_insert_after_a_dropped_block_keeps_its_position():
    plan = resolve(6, drop=3, insert="3:copy")
    assert [s.describe() for s in plan.slots] == ["0", "1", "2", "copy(3)", "4", "5"]


def test_slayer_preset_reproduces_the_paper_on_32_blocks():
    plan = resolve(32, preset="slayer")
    assert len(plan.slots) == 38  # Llama SLayer-8B from Llama-2-7B
    assert plan.dropped == (30, 31)
    inserted_after = [plan.slots[k - 1].source for k in plan.new_slots]
    assert inserted_after == [1, 3, 5, 7, 9, 11, 13, 15]
    assert all(plan.slots[k].init == "avg-zero" for k in plan.new_slots)


def test_slayer_preset_scales_to_other_depths():
    plan = resolve(30, preset="slayer")
    assert plan.dropped == (28, 29)
    assert len(plan.new_slots) == 7


def test_llama_pro_spreads_copies_evenly():
    plan = resolve(32, preset="llama-pro:8")
    assert len(plan.slots) == 40
    assert [plan.slots[k].sources for k in plan.new_slots] == [(i,) for i in range(3, 32, 4)]
    assert all(plan.slots[k].init == "copy-zero" for k in plan.new_slots)


def test_preset_combines_with_user_drops():
    plan = resolve(32, preset="llama-pro:2", drop="0")
    assert plan.dropped == (0,) and len(plan.slots) == 33


def test_plan_round_trips_through_json_dict():
    plan = resolve(8, drop="1", drop_attn="2", insert="3:avg")
    assert LayerPlan.from_dict(plan.to_dict()) == plan


def test_format_indices_is_compact():
    assert format_indices([7, 1, 2, 3, 9, 10]) == "1-3,7,9-10"


def test_slot_describe():
    assert Slot((3,), drop_attn=True, drop_mlp=True).describe() == "3 without attn+mlp"


BAD_PLANS = [
    (dict(drop="30"), "out of range"),
    (dict(drop="-31"), "out of range"),
    (dict(drop="0-29"), "drops all 30 blocks"),
    (dict(keep="[]"), "keep is empty"),
    (dict(keep=""), "keep is empty"),
    (dict(drop=""), "drop is empty; give blocks"),
    (dict(drop=" [ ] "), "drop is empty"),
    (dict(drop=[]), "drop is empty"),
    (dict(drop_attn="''"), "drop_attn is empty"),
    (dict(drop="3;;5"), "has an empty item"),
    (dict(drop="3;"), "has an empty item"),
    (dict(drop=", 3"), "has an empty item"),
    (dict(drop=[3, ""]), "has an empty item"),
    (dict(insert=""), "insert is empty"),
    (dict(insert="1:copy;;3:copy"), "has an empty item"),
    (dict(preset=""), "preset is empty"),
    (dict(drop="3,3"), "listed twice"),
    (dict(drop="2-5,4"), "listed twice"),
    (dict(drop="3", keep="4"), "exclusive"),
    (dict(drop="5-3"), "start after end"),
    (dict(drop="-3--6"), "start after end"),
    (dict(drop="28--5"), "start after end"),  # 28 to 25 on 30 blocks
    (dict(drop="3-"), "cannot read"),
    (dict(drop="a-b"), "cannot read"),
    (dict(drop="1.5"), "cannot read"),
    (dict(drop=2.5), "not a whole block index"),
    (dict(drop=True), "not a block index"),
    (dict(drop={"a": 1}), "unsupported type"),
    (dict(insert="29:avg"), "is the last one"),
    (dict(insert="-1:avg-zero"), "is the last one"),
    (dict(insert="3:clone"), "unknown init"),
    (dict(insert="3"), "write POS:INIT"),
    (dict(insert="x:copy"), "write POS:INIT"),
    (dict(insert="30:copy"), "out of range"),
    (dict(preset="shortgpt"), "unknown preset"),
    (dict(preset="llama-pro:0"), "unknown preset"),
    (dict(preset="llama-pro:31"), "only 30"),
    (dict(drop="4", drop_attn="4"), "dropped whole already"),
    (dict(drop_mlp="2,2"), "listed twice"),
    (dict(drop_attn="99"), "out of range"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PLANS, ids=[str(k) for k, _ in BAD_PLANS])
def test_bad_plan_gives_one_clear_line(kwargs, message):
    with pytest.raises(PlanError) as err:
        resolve(30, **kwargs)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_slayer_refuses_too_shallow_models():
    with pytest.raises(PlanError, match="at least 4 blocks"):
        resolve(3, preset="slayer")


@pytest.mark.parametrize("kwargs,fix", [
    (dict(drop="5-3"), "drop=3-5"), (dict(drop_mlp="-1--2"), "drop_mlp=-2--1"), (dict(drop=""), "or leave drop out"),
    (dict(drop="3;;5"), "separate items with one ',' or ';'"), (dict(insert=""), "or leave insert out"),
])
def test_syntax_mistakes_are_refused_without_a_depth(kwargs, fix):
    """Backwards ranges whose ends share a sign, empty values and empty items fail at parsing,
    before any model is opened (resolving needs the depth; parsing does not)."""
    with pytest.raises(PlanError, match="; ") as err:
        PlanSpec.from_args(**kwargs)
    assert fix in str(err.value)


def test_a_range_with_ends_of_both_signs_is_checked_against_the_depth():
    spec = PlanSpec.from_args(drop="4--5")  # blocks 4..25 of 30, but 4..1 of 6
    assert spec.resolve(30).dropped == tuple(range(4, 26))
    with pytest.raises(PlanError, match="range 4--5 is empty .* e.g. drop=1-4"):
        spec.resolve(6)


def test_separators_with_spaces_still_read():
    assert resolve(drop="3 ; 5-6, 8").dropped == (3, 5, 6, 8)
    assert resolve(insert="[1:copy, 3:avg-zero]").new_slots == (2, 5)


@pytest.mark.parametrize("args,message", [
    (["prune", "--drop", ""], "drop is empty"),
    (["prune", "--drop", "3;;5"], "has an empty item"),
    (["prune", "--keep", "5-3"], "keep: range 5-3 is empty"),
    (["expand", "--insert", ""], "insert is empty"),
    (["expand", "--preset", ""], "preset is empty"),
    (["expand", "--insert", "1:copy", "--drop", ""], "drop is empty"),
])
def test_surgery_refuses_them_before_opening_the_model(tmp_path, args, message):
    """`surgery prune`/`expand` parse with the same module: one `error:` line, exit 2, nothing
    written, and the model is never opened (it does not even exist here)."""
    from typer.testing import CliRunner

    from surgery.cli import app

    command, *options = args
    result = CliRunner().invoke(app, [command, str(tmp_path / "no-such-model"), *options, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert list(tmp_path.iterdir()) == []


def test_a_plan_file_is_a_whole_plan_checked_against_the_model(tmp_path):
    import json

    plan = PlanSpec.from_args(drop="1-2", drop_attn=4).resolve(6)
    path = tmp_path / "search.json"
    path.write_text(json.dumps({"plan": plan.to_dict(), "model_type": "llama"}))
    assert PlanSpec.from_args(plan=str(path)).resolve(6, "llama") == plan
    for spec, depth, kind, message in [
        (dict(plan=str(path)), 8, "llama", "for a model with 6 blocks, this one has 8"),
        (dict(plan=str(path)), 6, "gpt2", "for a llama model, this one is gpt2"),
        (dict(plan=str(tmp_path / "none.json")), 6, None, "no such file"),
        (dict(plan=str(path), drop=3), 6, None, "does not combine with drop"),
    ]:
        with pytest.raises(PlanError, match=message):
            PlanSpec.from_args(**spec).resolve(depth, kind)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlanError, match="holds no plan"):
        PlanSpec.from_args(plan=str(tmp_path / "bad.json"))
