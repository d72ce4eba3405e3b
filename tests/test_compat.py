"""The upstream internals fenced in lm_eval_layers/compat.py: each test fails when an upgrade
changes what the fence relies on."""

from __future__ import annotations

from lm_eval_layers.compat import loaded_name


def test_stored_names_map_to_the_loaded_models_parameter_names():
    # transformers' conversion mapping: renamings (regex) and converters (per-expert `*` -> fused)
    assert loaded_name("granitemoe", "block_sparse_moe.output_linear.weight") == "block_sparse_moe.experts.down_proj"
    assert loaded_name("hy_v3", "mlp.shared_mlp.down_proj.weight") == "mlp.shared_experts.down_proj.weight"
    assert loaded_name("mixtral", "block_sparse_moe.experts.3.w2.weight") == "mlp.experts.down_proj"
    assert loaded_name("qwen2_moe", "mlp.experts.7.down_proj.weight") == "mlp.experts.down_proj"


def test_families_without_a_mapping_keep_their_names():
    assert loaded_name("llama", "mlp.down_proj.weight") == "mlp.down_proj.weight"
    assert loaded_name("no_such_family", "self_attn.o_proj.weight") == "self_attn.o_proj.weight"
