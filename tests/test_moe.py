"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): zeroed inserts silence
every expert, written checkpoints (hub-style per-expert tensors or fused ones) reproduce the
in-memory variant, mixed dense/MoE stacks keep their dense blocks, averaging is refused.

Routing is discrete, so every comparison is fp32 in one process. Drops, removed branches,
generation and undo run for these families in test_variant.py with the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from conftest import DEPTH, make_model
from lm_eval_layers.arch import check_plan, layout_for
from lm_eval_layers.plan import PlanError, PlanSpec
from lm_eval_layers.variant import apply_plan
from surgery.cli import app
from lm_eval_layers.checkpoint.safetensors_io import read_header, read_tensor

pytestmark = pytest.mark.usefixtures("no_grad")

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
runner = CliRunner()


def surgery(*args):
    return runner.invoke(app, [str(a) for a in args])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "model.safetensors"
    return {name: read_tensor(path, name) for name in read_header(path)[0]}


def variant_logits(model, **plan) -> torch.Tensor:
    with apply_plan(model, PlanSpec.from_args(**plan).resolve(DEPTH)):
        return model(IDS).logits


@pytest.fixture(params=MOE)
def moe(request) -> str:
    return request.param


def test_zeroed_copy_silences_every_expert_and_the_shared_expert(moe):
    model = make_model(moe)
    base = model(IDS).logits
    with apply_plan(model, PlanSpec.from_args(insert="2:copy-zero").resolve(DEPTH)) as variant:
        layout = variant.layout
        new = variant.blocks[3]
        zeroed = {name for name, p in new.named_parameters() if layout.is_output(name, attn=False)}
        expected = {"mlp.experts.down_proj"} | ({"mlp.shared_expert.down_proj.weight"} if moe == "qwen2_moe" else set())
        assert zeroed == expected and all(not new.get_parameter(n).any() for n in zeroed)
        torch.testing.assert_close(model(IDS).logits, base, atol=1e-5, rtol=0)


def test_removing_the_moe_block_removes_the_shared_expert_too():
    model = make_model("qwen2_moe")
    zeroed = make_model("qwen2_moe")
    for name in ("mlp.experts.down_proj", "mlp.shared_expert.down_proj.weight"):
        zeroed.get_parameter(f"model.layers.2.{name}").zero_()
    assert torch.equal(variant_logits(model, drop_mlp="2"), zeroed(IDS).logits)


@pytest.mark.parametrize("plan", [dict(insert="1:avg"), dict(insert="3:avg-zero"), dict(preset="slayer")], ids=str)
def test_averaging_moe_blocks_is_refused_before_any_weight_is_touched(moe, plan):
    resolved = PlanSpec.from_args(**plan).resolve(DEPTH)
    with pytest.raises(PlanError, match=r"^insert \d:avg(-zero)? averages blocks \d and \d, but they are mixture-of-experts"):
        check_plan(resolved, make_model(moe).config)


def test_averaging_is_one_error_line_from_the_cli_and_nothing_is_written(tmp_path):
    make_model("mixtral").save_pretrained(tmp_path / "src")
    result = surgery("expand", tmp_path / "src", "--insert", "1:avg-zero", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: insert 1:avg-zero averages blocks 1 and 2, but they are mixture-of-experts blocks whose experts "
        "do not correspond; use copy or copy-zero"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_layered_refuses_averaging_before_loading_weights(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_layers.model import LayeredLM, _hf_arguments

    make_model("olmoe").save_pretrained(tmp_path / "src")
    _hf_arguments()  # read hf's signature before it is replaced below (the suite's order must not matter)
    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(PlanError, match="mixture-of-experts blocks"):
        LayeredLM(pretrained=str(tmp_path / "src"), insert="2:avg", device="cpu")


CASES = [
    ("prune", ["--drop", "1,4"]),
    ("prune", ["--keep", "0-3", "--drop-attn", "1", "--drop-mlp", "2"]),
    ("expand", ["--insert", "1:copy;2:copy-zero", "--drop", "5"]),
    ("expand", ["--preset", "llama-pro:3"]),
]


@pytest.mark.parametrize("hub_names", [True, False], ids=["per-expert", "fused"])
@pytest.mark.parametrize("command,args", CASES, ids=[" ".join(a) for _, a in CASES])
def test_written_checkpoint_equals_the_in_memory_variant(tmp_path, moe, command, args, hub_names):
    """save_pretrained writes one tensor per expert (Mixtral: block_sparse_moe.experts.N.w1/w2/w3)
    unless told to keep the fused in-memory names; both are read, rewritten and reloaded."""
    model = make_model(moe)
    model.save_pretrained(tmp_path / "src", save_original_format=hub_names)
    names = list(read_header(tmp_path / "src" / "model.safetensors")[0])
    assert any(".experts.0." in n for n in names) == hub_names
    result = surgery(command, tmp_path / "src", *args, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    keys = dict(zip(args[::2], args[1::2]))
    plan = {k.lstrip("-").replace("-", "_"): v for k, v in keys.items()}
    assert torch.equal(written(IDS).logits, variant_logits(model, **plan))


def test_zeroed_copy_on_disk_zeroes_every_expert_and_lists_loaded_parameter_names(tmp_path):
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "src")
    assert surgery("expand", tmp_path / "src", "--insert", "2:copy-zero", "--out", tmp_path / "out").exit_code == 0
    before, after = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    layout = layout_for(model)
    new = {n.removeprefix("model.layers.3."): t for n, t in after.items() if n.startswith("model.layers.3.")}
    zeroed = sorted(n for n in new if layout.is_output(n))
    experts = [f"mlp.experts.{e}.down_proj.weight" for e in range(4)]
    assert zeroed == sorted([*experts, "mlp.shared_expert.down_proj.weight", "self_attn.o_proj.weight"])
    for name, tensor in new.items():
        source = before[f"model.layers.2.{name}"]
        assert torch.equal(tensor, torch.zeros_like(source) if name in zeroed else source), name
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    listed = json.loads((tmp_path / "out" / "new_parameters.json").read_text())["parameter_names"]
    assert set(listed) == {n for n, _ in loaded.named_parameters() if n.startswith("model.layers.3.")}
    assert "model.layers.3.mlp.experts.down_proj" in listed


def test_mixed_dense_and_moe_stack_keeps_its_dense_blocks_on_disk(tmp_path):
    """Qwen2-MoE builds dense MLPs in mlp_only_layers and off the decoder_sparse_step; the written
    config lists the dense blocks of the new stack so transformers rebuilds the same modules."""
    model = make_model("qwen2_moe", mlp_only_layers=[1], decoder_sparse_step=2)  # MoE: blocks 3 and 5
    model.save_pretrained(tmp_path / "src")
    args = ["--insert", "0:copy;3:copy-zero", "--drop", "4"]  # slots: 0 0' 1 2 3 3' 5
    assert surgery("expand", tmp_path / "src", *args, "--out", tmp_path / "out", "--verify").exit_code == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mlp_only_layers"] == [0, 1, 2, 3] and config["decoder_sparse_step"] == 1
    written = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert [hasattr(block.mlp, "experts") for block in written.model.layers] == [False] * 4 + [True] * 3
    assert torch.equal(written(IDS).logits, variant_logits(model, insert="0:copy;3:copy-zero", drop="4"))


def test_inspect_reports_the_moe_layer_fields(tmp_path):
    make_model("qwen2_moe").save_pretrained(tmp_path / "src")
    report = json.loads(surgery("inspect", tmp_path / "src", "--json").stdout)
    assert report["num_blocks"] == DEPTH
    assert {"num_hidden_layers", "mlp_only_layers", "decoder_sparse_step", "max_window_layers"} <= set(report["layer_config"])
