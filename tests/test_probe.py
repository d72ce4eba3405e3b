"""The identity probe and the written-config checks on families whose structure no table names:
a claim that does not hold is refused in one line naming the module, in memory and before writing."""

from __future__ import annotations

import pytest
import torch

from families import tiny_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.errors import PlanError
from lm_eval_layers.plan import PlanSpec
from lm_eval_layers.variant import apply_plan
from test_surgery import surgery

pytestmark = pytest.mark.usefixtures("no_grad")


def plan(**kwargs):
    return PlanSpec.from_args(**kwargs).resolve(4)


def test_a_zeroed_copy_with_an_unnamed_residual_writer_is_refused_naming_it():
    """Ergo blocks add gated residual updates; zeroing the output projections leaves the gate writing."""
    model = tiny_model("ergo")
    before = list(layout_for(model).find_blocks(model))
    with pytest.raises(PlanError, match=r"ergo block 2 \(copy-zero\(1\)\) is not the identity .*residual_gate still writes"):
        apply_plan(model, plan(insert="1:copy-zero"))
    assert list(layout_for(model).find_blocks(model)) == before and model.config.num_hidden_layers == 4


def test_shared_experts_under_another_name_are_found_and_zeroed():
    """GLM-4-MoE's shared experts (`mlp.shared_experts`) are not in any table line: found, zeroed, exact."""
    model = tiny_model("glm4_moe")
    assert "mlp.shared_experts.down_proj" in layout_for(model).mlp_out
    ids = torch.tensor([[5, 17, 33, 9]])
    base = model(ids).logits
    with apply_plan(model, plan(insert="1:copy-zero")):
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=1e-5)


def test_a_pattern_computed_from_the_index_follows_the_plan_in_memory_and_on_disk(tmp_path):
    """Jamba computes its layer kinds from an attention period: pinned in memory, period rewritten on disk."""
    model = tiny_model("jamba")
    model.save_pretrained(tmp_path / "src")
    with apply_plan(model, plan(drop="1", insert="2:copy")):
        assert model.config.layers_block_type == ["mamba", "mamba", "mamba", "attention"]
    assert model.config.layers_block_type == ["mamba", "attention", "mamba", "attention"]
    result = surgery("expand", tmp_path / "src", "--drop", "1", "--insert", "2:copy", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    import transformers as T

    reloaded = T.AutoConfig.from_pretrained(tmp_path / "out")
    assert reloaded.layers_block_type == ["mamba", "mamba", "mamba", "attention"]


def test_a_constant_computed_from_the_position_is_refused_on_disk_in_one_line(tmp_path):
    """DiffLlama's λ_init depends on the block's index: exact in memory, refused on disk, nothing written."""
    tiny_model("diffllama").save_pretrained(tmp_path / "src")
    result = surgery("prune", tmp_path / "src", "--drop", "1", "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "diffllama computes self_attn.lambda_init of each block from its position" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_refused_identity_is_refused_before_writing_too(tmp_path):
    """The writer never loads the weights: it proves the claim on a narrow random twin."""
    tiny_model("ergo").save_pretrained(tmp_path / "src")
    result = surgery("expand", tmp_path / "src", "--insert", "1:copy-zero", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "not the identity" in result.stderr and not (tmp_path / "out").exists()


def test_blocks_bound_to_their_position_are_refused_before_loading():
    from lm_eval_layers.arch import check_plan
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING["gemma4_text"]()
    with pytest.raises(PlanError, match="per-layer input embedding"):
        check_plan(plan(drop="1"), config)


def test_the_plugin_refuses_a_claim_that_fails_before_loading_any_weight(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_layers.model import LayeredLM, _hf_arguments

    tiny_model("ergo").save_pretrained(tmp_path / "src")
    _hf_arguments()  # read hf's signature before it is replaced below
    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(PlanError, match=r"not the identity .* \(proven on a narrow random twin of the model\)"):
        LayeredLM(pretrained=str(tmp_path / "src"), insert="1:copy-zero", device="cpu")
