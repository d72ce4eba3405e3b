"""`surgery ila`: gates on LoRA deltas for every family, the ε-stop, reproducible ila.json, a
planted ground truth, the comparisons and the command line."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, make_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.training.gates import Gates, UnitKind, lora_layers
from lm_eval_layers.training.selection import Selection, lora_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and other jobs share these cores (also: fixed
    float summation order, so repeated runs are bit-identical)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peft_model(arch: str, rank: int = 2):
    """A tiny model with LoRA on every linear module of every block, B drawn at random (PEFT
    starts B at zero, which would make every gate test pass trivially)."""
    from peft import get_peft_model

    model = make_model(arch)
    layout = layout_for(model)
    blocks = layout.find_blocks(model)
    config = lora_config(model, layout, Selection(tuple(range(len(blocks))), "all"), rank, 2.0 * rank, 0.0)
    peft = get_peft_model(model, config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for _, _, layer in lora_layers(peft, layout):
            layer.lora_B["default"].weight.normal_(0, 0.5)
    return peft, layout


IDS = torch.tensor([[5, 17, 33, 2, 90, 64, 7, 12, 101, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_scale_exactly_the_lora_delta_of_their_unit(arch):
    peft, layout = peft_model(arch)
    want_peft = logits(peft)
    with peft.disable_adapter():
        want_base = logits(peft)
    assert (want_peft - want_base).abs().max() > 1e-3, "the adapters must change the logits"
    layers = lora_layers(peft, layout)
    gates = Gates.attach(peft, layout, UnitKind.module, init=0.0)
    assert [u.name for u in gates.units] == [f"{i}.{rel}" for i, rel, _ in layers]
    n = len(gates.units)

    gates.set_values(torch.ones(n))
    assert torch.equal(logits(peft), want_peft)  # σ = 1: the PEFT model
    gates.set_values(torch.zeros(n))
    torch.testing.assert_close(logits(peft), want_base, rtol=0, atol=1e-6)  # σ = 0: the base model

    k = n // 2 + 1  # a unit in the middle of the stack
    _, _, layer = layers[k]
    values = torch.ones(n)
    values[k] = 0.0
    gates.set_values(values)
    off = logits(peft)
    values[k] = 0.5
    gates.set_values(values)
    half = logits(peft)

    gates.detach(peft)
    assert torch.equal(logits(peft), want_peft)
    layer.enable_adapters(False)
    torch.testing.assert_close(off, logits(peft), rtol=0, atol=1e-6)  # one gate off = that adapter disabled
    assert (off - want_peft).abs().max() > 1e-5
    layer.enable_adapters(True)
    layer.scaling["default"] *= 0.5
    torch.testing.assert_close(half, logits(peft), rtol=0, atol=1e-5)  # σ = 0.5 = that adapter's scaling halved


def test_block_unit_ties_a_blocks_matrices_to_one_gate():
    peft, layout = peft_model("gpt2")  # Conv1D: c_attn, c_proj, c_fc, mlp.c_proj
    depth = len(layout.find_blocks(peft.get_base_model()))
    gates = Gates.attach(peft, layout, UnitKind.block, init=0.0)
    assert [u.name for u in gates.units] == [str(i) for i in range(depth)]
    values = torch.ones(depth)
    values[2] = 0.0
    gates.set_values(values)
    off = logits(peft)
    gates.detach(peft)
    for i, _, layer in lora_layers(peft, layout):
        if i == 2:
            layer.enable_adapters(False)
    torch.testing.assert_close(off, logits(peft), rtol=0, atol=1e-6)
