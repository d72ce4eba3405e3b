"""`surgery ila`: gates on LoRA deltas for every family, the ε-stop, reproducible ila.json, a
planted ground truth, the comparisons and the command line."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, make_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.training.gates import Gates, UnitKind, lora_layers
from lm_eval_layers.training.ila import EpsilonStop, EpsilonStopCallback, ILASettings, run_ila
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


# --------------------------------------------------------------------------------------------
# stage 1's ε-stop


def stop_step(losses, epsilon=0.02, patience=2, window=10) -> int | None:
    """The step (1-based) at which the callback ends training, fed as the Trainer would."""
    from transformers import TrainerControl, TrainerState

    callback = EpsilonStopCallback(EpsilonStop(epsilon, patience, window))
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate(losses, 1):
        state.global_step = step
        callback.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
        if control.should_training_stop:
            break
    return callback.stop_step


def test_flat_loss_stops_at_the_first_eligible_window():
    assert stop_step([2.0] * 100) == 30  # windows 1..3: two comparisons (patience 2), both calm
    assert stop_step([2.0] * 100, patience=1, window=5) == 10
    assert stop_step([2.0] * 29) is None


def test_falling_loss_does_not_stop_until_it_flattens():
    falling = [3.0 - 0.01 * t for t in range(200)]  # ≥ 5% lower every window of 10 steps
    assert stop_step(falling) is None
    # then flat at 1.0: the first flat window still differs from the last falling one by 5%,
    # the next two are calm, so the stop comes two windows later
    assert stop_step(falling + [1.0] * 100) == 230
    noisy = [2.0 + (0.3 if t % 2 else -0.3) * (t // 10 % 2) for t in range(100)]  # flat mean, alternating spread
    assert stop_step(noisy) == 30
    zigzag = [2.0 if t // 10 % 2 else 1.5 for t in range(200)]  # windows alternate 1.5 / 2.0: never stable
    assert stop_step(zigzag) is None


# --------------------------------------------------------------------------------------------
# planted ground truth


def planted_teacher(seed: int, sharpen: float = 20.0, scale: float = 2.0, samples: int = 1024, length: int = 32):
    """(base, the 3 planted unit names, examples sampled from the teacher, every unit name).

    The teacher is the base plus a rank-2 change of norm `scale`·‖W‖ in 3 units drawn at random
    among the matrices that write values (v/o/gate/up/down: a change to q or k passes through
    the attention softmax of this tiny random model's near-zero scores and barely moves the
    output). Both share an LM head sharpened ×`sharpen`: with this initialisation a ×8 head
    leaves the teacher's samples near-uniform (4.47 nats of at most 4.85) and base and teacher
    within 0.01–0.08 nats of each other, so the text would carry no planted signal.
    """
    import copy
    import random

    from lm_eval_layers.training.data import Example

    base = make_model("llama", seed=seed)
    with torch.no_grad():
        base.lm_head.weight.mul_(sharpen)
    teacher = copy.deepcopy(base)
    blocks = layout_for(teacher).find_blocks(teacher)
    units = [(i, rel) for i, block in enumerate(blocks) for rel, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    candidates = [u for u in units if not u[1].endswith(("q_proj", "k_proj"))]
    planted = random.Random(seed).sample(candidates, 3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, rel in planted:
            weight = blocks[i].get_submodule(rel).weight
            delta = torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(2, weight.shape[1], generator=generator)
            weight.add_(delta * scale * weight.norm() / delta.norm())
        torch.manual_seed(seed)
        start = torch.randint(3, teacher.config.vocab_size, (samples, 1))
        text = teacher.generate(start, do_sample=True, top_k=0, max_new_tokens=length - 1, min_new_tokens=length - 1, pad_token_id=0)
    examples = [Example(row.tolist(), row.tolist()) for row in text]
    return base, {f"{i}.{rel}" for i, rel in planted}, examples, [f"{i}.{rel}" for i, rel in units]


def test_planted_units_are_found_where_the_lora_update_norm_fails(capsys):
    from math import comb

    from rich.console import Console

    settings = dict(rank=4, lr=1e-2, epsilon=0.005, max_steps=400, batch_size=16, max_length=64)
    lines, hits = [], []
    for seed in range(3):
        base, planted, examples, names = planted_teacher(seed)
        result = run_ila(base, examples, 0, ILASettings(seed=seed, **settings), Console(quiet=True))
        assert [u.name for u in result.units] == names
        n = len(names)
        top = {names[i] for i in sorted(range(n), key=lambda i: -result.logits[i])[:3]}
        by_norm = {names[i] for i in sorted(range(n), key=lambda i: -result.delta_norms[i])[:3]}
        hits.append(len(top & planted))
        lines.append(f"seed {seed}: planted {sorted(planted)}; gates' top 3 {sorted(top)} ({len(top & planted)} of 3); "
                     f"‖BA‖ top 3 {sorted(by_norm)} ({len(by_norm & planted)} of 3); stage 1: "
                     + (f"ε-stop at step {result.stop_step}" if result.stop_step else f"{result.stage1_steps} steps (cap)"))
    chance = sum(comb(3, x) * comb(n - 3, 3 - x) for x in (2, 3)) / comb(n, 3)
    with capsys.disabled():
        print("\n" + "\n".join(lines) + f"\nchance of ≥2 of 3 in a random top 3 of {n}: {chance:.4f} (expected hits {9 / n:.2f})")
    assert all(h >= 2 for h in hits), hits
