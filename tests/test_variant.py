"""In-memory variants on tiny random models of several architecture families: exactness against
independently built references, function-preserving inserts, KV-cache generation, weight
sharing and undo."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from conftest import DEPTH, make_model
from lm_eval_layers.arch import UnsupportedArchitecture, layout_for, text_config
from lm_eval_layers.plan import LayerPlan, PlanError, PlanSpec
from lm_eval_layers.variant import apply_plan

pytestmark = pytest.mark.usefixtures("no_grad")

INPUT = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(1))


def plan_of(**kwargs) -> LayerPlan:
    return PlanSpec.from_args(**kwargs).resolve(DEPTH)


def logits(model, ids=INPUT) -> torch.Tensor:
    return model(ids).logits


def reference_without(model, drop: list[int]) -> T.PreTrainedModel:
    """A model built from scratch with fewer layers and the kept weights loaded."""
    layout = layout_for(model)
    kept = [i for i in range(DEPTH) if i not in drop]
    config = type(model.config).from_dict(model.config.to_dict())
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [model.config.layer_types[i] for i in kept]
    ref = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prefix = layout.blocks + "."
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            idx, rest = name[len(prefix):].split(".", 1)
            if int(idx) not in kept:
                continue
            name = f"{prefix}{kept.index(int(idx))}.{rest}"
        state[name] = tensor
    ref.load_state_dict(state, strict=True)
    return ref


def with_zeroed_outputs(model, blocks: list[int], which: str) -> T.PreTrainedModel:
    """A copy of `model` whose `which` (attn|mlp) branch output projection is zero in `blocks`."""
    layout = layout_for(model)
    ref = T.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    ref.load_state_dict(model.state_dict())
    for i in blocks:
        for name, p in ref.get_submodule(f"{layout.blocks}.{i}").named_parameters():
            if layout.is_output(name, attn=which == "attn", mlp=which == "mlp"):
                p.zero_()
    return ref


def buildable(model, plan: LayerPlan) -> bool:
    """False for a plan the family refuses (averaging mixture-of-experts blocks), once the refusal
    is checked to be a PlanError that leaves the model as it was."""
    layout = layout_for(model)
    if not layout.experts or all(len(slot.sources) == 1 for slot in plan.slots):
        return True
    blocks = layout.find_blocks(model)
    with pytest.raises(PlanError, match="mixture-of-experts blocks"):
        apply_plan(model, plan)
    assert layout.find_blocks(model) is blocks
    return False


@pytest.mark.parametrize("drop", [[2], [0, 5], [1, 2, 3]])
def test_drop_equals_a_model_built_without_those_blocks(arch, drop):
    model = make_model(arch)
    expected = logits(reference_without(model, drop))
    with apply_plan(model, plan_of(drop=drop)):
        got = logits(model)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("insert", ["0:copy-zero", "2:avg-zero;4:copy-zero", "-1:copy-zero", "1:avg-zero;1:avg-zero"])
def test_zeroed_inserts_preserve_the_function(arch, insert):
    model = make_model(arch)
    base = logits(model)
    plan = plan_of(insert=insert)
    if not buildable(model, plan):
        return
    with apply_plan(model, plan) as variant:
        assert len(variant.blocks) > DEPTH
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)


def test_llama_pro_preset_preserves_the_function(arch):
    model = make_model(arch)
    base = logits(model)
    with apply_plan(model, plan_of(preset="llama-pro:3")):
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)


def test_slayer_preset_equals_base_without_its_deep_blocks(arch):
    model = make_model(arch)
    plan = plan_of(preset="slayer")
    if not buildable(model, plan):
        return
    expected = logits(reference_without(model, list(plan.dropped)))
    with apply_plan(model, plan):
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_plain_copy_and_avg_inserts_change_the_function(arch):
    model = make_model(arch)
    base = logits(model)
    for plan in filter(lambda p: buildable(model, p), (plan_of(insert="2:copy"), plan_of(insert="2:avg"))):
        with apply_plan(model, plan):
            assert not torch.allclose(logits(model), base, atol=1e-4)


@pytest.mark.parametrize("which", ["attn", "mlp"])
def test_dropping_a_branch_equals_zeroing_its_output_projection(arch, which):
    model = make_model(arch)
    blocks = [0, 3]
    expected = logits(with_zeroed_outputs(model, blocks, which))
    with apply_plan(model, plan_of(**{f"drop_{which}": blocks})):
        torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=0)


GENERATION_PLANS = [
    dict(drop="1,4"),
    dict(drop="0"),
    dict(insert="1:copy;3:avg"),
    dict(preset="llama-pro:2"),
    dict(preset="slayer"),
    dict(drop_attn="0,3"),
    dict(drop_mlp="2", drop="5", insert="0:copy"),
]


@pytest.mark.parametrize("kwargs", GENERATION_PLANS, ids=[str(p) for p in GENERATION_PLANS])
def test_greedy_generation_with_cache_equals_without(arch, kwargs):
    model = make_model(arch)
    prompt = INPUT[:1, :8]
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=12)
    plan = plan_of(**kwargs)
    if not buildable(model, plan):
        return
    with apply_plan(model, plan):
        cached = model.generate(prompt, use_cache=True, **gen)
        uncached = model.generate(prompt, use_cache=False, **gen)
    assert cached.shape[1] == 20
    assert torch.equal(cached, uncached)


def test_removed_first_attention_keeps_the_cache_length(arch):
    """transformers reads the past length from cache layer 0, so a skipped attention records it."""
    model = make_model(arch)
    with apply_plan(model, plan_of(drop_attn="0")):
        cache = model(INPUT, use_cache=True).cache
    assert cache.get_seq_length() == INPUT.shape[1]


def test_variant_shares_original_weights_and_copies_are_separate_modules(arch):
    model = make_model(arch)
    layout = layout_for(model)
    original = layout.find_blocks(model)
    plan = plan_of(drop="1", insert="3:copy;4:copy-zero;2:avg")
    if not buildable(model, plan):
        plan = plan_of(drop="1", insert="3:copy;4:copy-zero")
    with apply_plan(model, plan) as variant:
        by_slot = dict(enumerate(variant.plan.slots))
        for k, block in enumerate(variant.blocks):
            slot = by_slot[k]
            source = original[slot.source]
            assert block is not source  # every slot its own module object (own layer_idx)
            if slot.init == "avg":
                continue
            for (name, p), (_, q) in zip(block.named_parameters(), source.named_parameters()):
                if slot.zero_out and layout.is_output(name):
                    assert not p.any()
                else:
                    assert p.data_ptr() == q.data_ptr(), name  # shared, not copied
        idx = [m.layer_idx for b in variant.blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        assert sorted(set(idx)) == list(range(len(variant.blocks)))


def test_config_is_consistent_with_the_variant():
    model = make_model("qwen2")
    types = list(model.config.layer_types)
    with apply_plan(model, plan_of(drop="0", insert="4:copy")) as variant:
        assert model.config.num_hidden_layers == len(variant.blocks) == 6
        assert model.config.layer_types == [types[i] for i in (1, 2, 3, 4, 4, 5)]
        assert model.config.max_window_layers == 2
    assert model.config.layer_types == types and model.config.num_hidden_layers == DEPTH


def test_apply_and_restore_repeatedly_restores_the_original_exactly(arch):
    model = make_model(arch)
    base = logits(model)
    config = model.config.to_dict()
    modules = [id(m) for m in model.modules()]
    params = {n: (id(p), p.data_ptr(), p.clone()) for n, p in model.named_parameters()}
    plans = [plan_of(drop="2"), plan_of(preset="slayer"), plan_of(drop_attn="1", drop_mlp="0-2"), plan_of(insert="0:avg")]
    plans = [plan for plan in plans if buildable(model, plan)]
    for _ in range(2):
        for plan in plans:
            variant = apply_plan(model, plan)
            assert not torch.equal(logits(model), base) or plan.slots[0].zero_out
            variant.restore()
    assert model.config.to_dict() == config
    assert [id(m) for m in model.modules()] == modules
    for n, p in model.named_parameters():
        pid, ptr, value = params[n]
        assert id(p) == pid and p.data_ptr() == ptr and torch.equal(p, value)
    assert torch.equal(logits(model), base)


def test_applying_twice_without_restore_is_refused():
    model = make_model("llama")
    variant = apply_plan(model, plan_of(drop="1"))
    with pytest.raises(PlanError, match="already has a layer plan"):
        apply_plan(model, plan_of(drop="2"))
    variant.restore()


def test_plan_for_another_depth_is_refused():
    model = make_model("llama")
    with pytest.raises(PlanError, match="plan is for 8 blocks but the model has 6"):
        apply_plan(model, PlanSpec.from_args(drop="1").resolve(8))


def test_drop_mlp_is_refused_where_the_mlp_is_not_a_module():
    config = T.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=DEPTH, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=64)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(PlanError, match="drop_mlp: block 1 has no separate MLP module"):
        apply_plan(model, plan_of(drop_mlp="1"))
    with apply_plan(model, plan_of(drop="1")):  # whole blocks work
        assert len(layout_for(model).find_blocks(model)) == DEPTH - 1


def test_a_family_without_a_table_line_is_found_from_its_module_tree():
    """Mamba has no line in ARCHITECTURES: its blocks, mixer and output projection are found."""
    config = T.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)
    layout = layout_for(T.AutoModelForCausalLM.from_config(config))
    assert (layout.blocks, layout.attn, layout.mlp, layout.attn_out) == ("backbone.layers", "mixer", None, ("mixer.out_proj",))


def test_a_model_without_a_block_list_of_its_depth_is_refused_naming_itself():
    config = T.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)
    model = T.AutoModelForCausalLM.from_config(config)
    model.config.num_hidden_layers = 5
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba' \(MambaForCausalLM\) is not supported: no list of decoder blocks"):
        layout_for(model)


def test_text_config_of_plain_models_is_the_config():
    model = make_model("llama")
    assert text_config(model.config) is model.config


def test_unlisted_llama_style_family_is_found_by_inference():
    """Arcee is not in ARCHITECTURES; its module tree matches the Llama layout."""
    from lm_eval_layers.arch import ARCHITECTURES, LLAMA_LIKE

    config = T.ArceeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    layout = layout_for(model)
    assert "arcee" not in ARCHITECTURES
    assert (layout.blocks, layout.attn, layout.mlp, layout.attn_out, layout.mlp_out) == (
        LLAMA_LIKE.blocks, LLAMA_LIKE.attn, LLAMA_LIKE.mlp, LLAMA_LIKE.attn_out, LLAMA_LIKE.mlp_out)
    base = logits(model)
    with apply_plan(model, plan_of(insert="2:avg-zero", drop_attn="4")):
        assert not torch.equal(logits(model), base)
    with apply_plan(model, plan_of(insert="2:avg-zero")):
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)
