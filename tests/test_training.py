"""`surgery train`: response-only labels, block selections, full / LoRA / distillation runs,
GGUF input, resuming, two processes, and the output through lm-eval and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open
from transformers import TrainerCallback
from typer.testing import CliRunner

from conftest import DATA, TASKS
from lm_eval_layers.errors import DataError, SelectionError, UsageError
from lm_eval_layers.training import examples as D
from lm_eval_layers.training.distill import distill_loss_sum
from lm_eval_layers.training.fine_tune import fine_tune
from lm_eval_layers.training.selection import select_blocks
from lm_eval_layers.training.train_settings import TrainSettings
from surgery.cli import app

SFT = DATA / "sft"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and other jobs may share these cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return T.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    """48 conversations from the shared SFT data."""
    path = tmp_path_factory.mktemp("data") / "nq48.jsonl"
    lines = (SFT / "nq_open.jsonl").read_text().splitlines()[:48]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def expanded(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("expanded") / "pro"
    result = CliRunner().invoke(app, ["expand", str(tiny_llama_dir), "--preset", "llama-pro:2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def train(model, data, out, **options) -> dict:
    """`fine_tune` with short defaults (4 steps of 4 examples of at most 64 tokens)."""
    defaults = dict(max_steps=4, batch_size=4, max_length=64, save_steps=100)
    return fine_tune(TrainSettings(model=str(model), data=str(data), out=Path(out), **{**defaults, **options}))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


# --------------------------------------------------------------------------------------------
# data


def expected(tok, pieces: list[tuple[str, bool]], special: bool = False) -> tuple[list[int], list[int]]:
    """Ids and labels built by hand: each piece tokenised alone, labelled when it is a response."""
    ids: list[int] = list(tok("", add_special_tokens=True)["input_ids"]) if special else []
    labels: list[int] = [D.IGNORE] * len(ids)
    for text, response in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if response else [D.IGNORE] * len(piece)
    return ids, labels


def test_response_only_labels_equal_a_hand_built_mask_for_each_format(tok):
    eos = tok.eos_token
    cases = {
        "messages": (
            {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
                          {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome"}]},
            [(SMOL_SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", False),
             ("Paris<|im_end|>\n", True),
             ("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
             ("Rome<|im_end|>\n", True)],
        ),
        "prompt/completion": (
            {"prompt": "Question: Capital of France?\nAnswer:", "completion": " Paris"},
            [("Question: Capital of France?\nAnswer:", False), (" Paris" + eos, True)],
        ),
        "alpaca": (
            {"instruction": "Compute the result.", "input": "Calculate 2 + 3", "output": "5"},
            [(D.ALPACA_PROMPT.format(instruction="Compute the result.", input="Calculate 2 + 3"), False), ("5" + eos, True)],
        ),
        "text": ({"text": "The moon orbits the Earth."}, [("The moon orbits the Earth.", True)]),
    }
    for name, (record, pieces) in cases.items():
        fmt = D.detect_format([record])
        assert fmt.value == name
        (example,) = D.tokenize([record], fmt, tok, max_length=512)
        ids, labels = expected(tok, pieces, special=fmt in (D.RecordFormat.alpaca, D.RecordFormat.prompt_completion, D.RecordFormat.text))
        assert example.input_ids == ids, name
        assert example.labels == labels, name
        assert any(label != D.IGNORE for label in labels)
    no_input = {"instruction": "Say hi.", "input": "", "output": "hi"}
    (example,) = D.tokenize([no_input], D.RecordFormat.alpaca, tok, 512)
    assert (example.input_ids, example.labels) == expected(tok, [(D.ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), False), ("hi" + eos, True)], special=True)


def test_plain_template_when_the_tokenizer_has_none(tokenizer_dir):
    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    record = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]}
    (example,) = D.tokenize([record], D.RecordFormat.messages, tok, 512)
    assert tok.chat_template == D.PLAIN_CHAT_TEMPLATE
    assert (example.input_ids, example.labels) == expected(tok, [("User: Hi?\nAssistant:", False), (f" Hello{tok.eos_token}\n", True)])


def test_truncation_and_bad_data_are_refused_with_one_line(tok, tmp_path):
    record = {"prompt": "Question: " + "very " * 40 + "long?\nAnswer:", "completion": " yes"}
    (short,) = D.tokenize([{"prompt": "Q?", "completion": " yes"}], D.RecordFormat.prompt_completion, tok, 3)
    assert len(short.input_ids) == 3
    with pytest.raises(DataError, match="no response token left after truncation to --max-length 16.*raise --max-length"):
        D.tokenize([record], D.RecordFormat.prompt_completion, tok, 16)
    with pytest.raises(DataError, match="unknown record format: record 0 has fields answer, question"):
        D.detect_format([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="no records"):
        D.detect_format([])
    with pytest.raises(DataError, match="record 1 has no 'completion' field"):
        D.detect_format([{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match="record 0 has no assistant turn"):
        D.tokenize([{"messages": [{"role": "user", "content": "hi"}]}], D.RecordFormat.messages, tok, 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        D.detect_format(D.load_records(str(empty)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        D.load_records(str(bad))
    with pytest.raises(DataError, match="no data file"):
        D.load_records(str(tmp_path / "missing.jsonl"))
    assert [D.detect_format(D.load_records(str(SFT / f))).value for f in ("nq_open.jsonl", "trivia_qa.jsonl", "arithmetic.jsonl")] == [
        "messages", "prompt/completion", "alpaca"]


# --------------------------------------------------------------------------------------------
# selection


def test_selections_by_block_index(tmp_path):
    assert select_blocks(8).blocks == tuple(range(8))
    assert select_blocks(8, layers="3;5-6").blocks == (3, 5, 6)
    assert select_blocks(8, layers="-2--1").blocks == (6, 7)
    assert select_blocks(8, freeze_bottom="25%").blocks == tuple(range(2, 8))
    assert select_blocks(8, freeze_bottom="3").blocks == tuple(range(3, 8))
    (tmp_path / "new_parameters.json").write_text(json.dumps({"layers_to_transform": [2, 5]}))
    assert select_blocks(8, new_blocks=True, model_folder=tmp_path).blocks == (2, 5)
    assert select_blocks(8, layers="-1", new_blocks=True, model_folder=tmp_path).blocks == (2, 5, 7)  # S strategy
    with pytest.raises(SelectionError, match="--layers and --freeze-bottom are two selections"):
        select_blocks(8, layers="1", freeze_bottom="25%")
    with pytest.raises(SelectionError, match="block 8 is out of range for a model with 8 blocks"):
        select_blocks(8, layers="2,8")
    with pytest.raises(SelectionError, match="leave at least one block"):
        select_blocks(8, freeze_bottom="100%")
    with pytest.raises(SelectionError, match="needs new_parameters.json"):
        select_blocks(8, new_blocks=True, model_folder=tmp_path / "nowhere")


def test_option_mistakes_are_refused_before_anything_is_read(tmp_path):
    def check(**options):
        TrainSettings(model="m", data="d", out=tmp_path / "o", **options)

    with pytest.raises(UsageError, match="--heal trains LoRA on all blocks"):
        check(heal=True, layers="1")
    with pytest.raises(UsageError, match="--heal trains LoRA r=8; for rank 4 drop --heal: --lora 4 alone"):
        check(heal=True, lora=4)
    with pytest.raises(UsageError, match="--adapter-only writes a LoRA adapter; add --lora R"):
        check(adapter_only=True)
    with pytest.raises(UsageError, match="--head trains the output head's full weights"):
        check(head=True, heal=True)
    with pytest.raises(UsageError, match="--max-steps and --epochs are exclusive"):
        check(max_steps=3, epochs=1.0)
    with pytest.raises(UsageError, match="--eval-fraction 1.5"):
        check(eval_fraction=1.5)
    with pytest.raises(UsageError, match="--lora-dropout 1.0 must be in \\[0, 1\\)"):
        check(lora=4, lora_dropout=1.0)
    with pytest.raises(UsageError, match="--lora-alpha -1 must be positive"):
        check(lora=4, lora_alpha=-1)
    with pytest.raises(UsageError, match="--dtype float64: use float32, bfloat16 or float16"):
        check(dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--dtype float16 trains with loss scaling on a GPU only"):
            check(dtype="float16")
    given = TrainSettings(model="m", data="d", out=tmp_path / "o", heal=True)
    healed = given.resolved()
    assert (healed.lora, healed.lora_alpha, healed.lora_dropout, healed.lr) == (8, 16.0, 0.05, 2e-4)
    assert given.lora is None and healed.resolved() == healed  # a copy, and resolving twice changes nothing
    assert healed.out == (tmp_path / "o").resolve()
    lora = TrainSettings(model="m", data="d", out=tmp_path / "o", lora=4).resolved()
    assert (lora.lora_alpha, lora.lr) == (8.0, 2e-4)
    assert TrainSettings(model="m", data="d", out=tmp_path / "o").resolved().lr == 1e-4


@pytest.mark.slow
def test_a_run_that_cannot_fit_on_disk_is_refused_before_writing(tiny_llama_dir, qa_data, tmp_path, monkeypatch):
    import lm_eval_layers.checkpoint.sources

    monkeypatch.setattr(lm_eval_layers.checkpoint.sources, "free_bytes", lambda folder: 1000)
    with pytest.raises(UsageError, match="not enough free disk space in .*: this run needs about"):
        train(tiny_llama_dir, qa_data, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def ila_file(path: Path, unit: str, ranked: list[tuple[int, str]], depth: int = 6) -> Path:
    """A minimal ila.json (the fields `--layers-from` reads) ranking the given units first."""
    from lm_eval_layers.training.ila_file import SCHEMA

    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    every = [(b, "*") for b in range(depth)] if unit == "block" else [(b, m) for b in range(depth) for m in modules]
    order = ranked + [u for u in every if u not in ranked]
    units = [{"name": f"{b}.{m}", "block": b, "module": m, "rank": order.index((b, m)) + 1} for b, m in every]
    path.write_text(json.dumps({"schema": SCHEMA, "model_type": "llama", "num_layers": depth, "unit": unit, "units": units}))
    return path


def test_top_units_of_an_ila_file(tmp_path):
    matrices = ila_file(tmp_path / "m.json", "module", [(4, "mlp.down_proj"), (1, "self_attn.q_proj"), (4, "self_attn.v_proj"), (0, "mlp.up_proj")])
    picked = select_blocks(6, layers_from=matrices, top="10%", model_type="llama")  # K = round(0.1 * 42) = 4
    assert picked.matrices == ((0, "mlp.up_proj"), (1, "self_attn.q_proj"), (4, "mlp.down_proj"), (4, "self_attn.v_proj"))
    assert picked.blocks == (0, 1, 4)
    blocks = ila_file(tmp_path / "b.json", "block", [(5, "*"), (2, "*")])
    assert select_blocks(6, layers_from=blocks, top="0.34").blocks == (2, 5) and not select_blocks(6, layers_from=blocks, top="34%").matrices
    for top, message in (("0%", "outside \\(0, 100%\\]"), ("150%", "outside"), ("lots", "not a share")):
        with pytest.raises(SelectionError, match=message):
            select_blocks(6, layers_from=blocks, top=top)
    with pytest.raises(SelectionError, match="model with 6 blocks, this one is llama with 8; run `surgery ila` on this model"):
        select_blocks(8, layers_from=blocks, top="30%", model_type="llama")
    with pytest.raises(SelectionError, match="--layers-from and --top go together"):
        select_blocks(6, layers_from=blocks)
    with pytest.raises(SelectionError, match="--layers and --layers-from are two selections"):
        select_blocks(6, layers="1", layers_from=blocks, top="30%")


# --------------------------------------------------------------------------------------------
# training runs


@pytest.mark.slow
def test_new_blocks_train_alone(expanded, qa_data, tmp_path):
    """LLaMA-Pro: only the inserted blocks change; everything else keeps its exact bytes."""
    out = tmp_path / "trained"
    log = train(expanded, qa_data, out, new_blocks=True, max_steps=8, lr=1e-2, eval_fraction=0.25)
    new = set(json.loads((expanded / "new_parameters.json").read_text())["layers_to_transform"])
    before, after = tensors(expanded), tensors(out)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        # every tensor of a new block trained (o_proj/down_proj from zero), every other one kept its bytes
        assert same_bytes(tensor, after[name]) != (block_of(name) in new), name
    assert all(block_of(n) in new for n in log["trainable_names"])
    assert log["eval_loss"] < log["eval_loss_before"]
    curve = [e["loss"] for e in log["loss_curve"]]
    assert sum(curve[-3:]) < sum(curve[:3])
    assert {"train_log.json", "loss.png", "README.md", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not out.with_name(out.name + ".partial").exists()
    assert "new blocks 3,7" in (out / "README.md").read_text()


@pytest.mark.slow
def test_head_and_last_block_train_alone(tiny_llama_dir, qa_data, tmp_path):
    """Partial-layer healing (`--layers -1 --head`): the last block and the output head change,
    and since this model ties the head to the input embeddings, those too; nothing else."""
    out = tmp_path / "trained"
    log = train(tiny_llama_dir, qa_data, out, layers="-1", head=True, max_steps=4, lr=1e-2)
    last = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"] - 1
    before, after = tensors(tiny_llama_dir), tensors(out)
    assert before.keys() == after.keys()
    assert "model.embed_tokens.weight" in before
    for name, tensor in before.items():
        trained = block_of(name) == last or name in ("model.embed_tokens.weight", "lm_head.weight")
        assert same_bytes(tensor, after[name]) != trained, name
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(log["trainable_names"])
    assert log["head"] and log["selection"] == f"blocks {last} + the output head"


class DtypesAtStart(TrainerCallback):
    """What the Trainer starts with: (trainable, dtype) pairs of the parameters, and autocast."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.pairs = {(p.requires_grad, p.dtype) for p in model.parameters()}
        self.bf16 = args.bf16


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, 4])
def test_bfloat16_trains_float32_masters_and_keeps_frozen_bytes(tiny_llama_dir, qa_data, tmp_path, lora):
    """`--dtype bfloat16` on a float32 model (the GPU setting): bf16 autocast, frozen weights in
    bf16, trained tensors (full weights or LoRA adapters) in float32; the output is float32 like
    the input, every untrained tensor byte-identical, never rounded through bf16."""
    seen = DtypesAtStart()
    out = tmp_path / "bf16"
    train(tiny_llama_dir, qa_data, out, layers="2", lora=lora, dtype="bfloat16", lr=1e-2, max_steps=3, callbacks=[seen])
    assert seen.bf16 and seen.pairs == {(True, torch.float32), (False, torch.bfloat16)}
    before, after = tensors(tiny_llama_dir), tensors(out)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        trained = block_of(name) == 2 and (lora is None or name.endswith("_proj.weight"))  # LoRA: the linear modules
        assert same_bytes(tensor, after[name]) != trained, name


@pytest.mark.slow
def test_lora_on_blocks_2_3_merged_and_as_adapter(tiny_llama_dir, qa_data, tmp_path, local_data):
    """Merged LoRA leaves other blocks byte-identical; the adapter on the base scores like the merged folder."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    options = dict(layers="2-3", lora=4, lr=1e-2, lora_dropout=0.0)
    log = train(tiny_llama_dir, qa_data, merged, **options)
    train(tiny_llama_dir, qa_data, adapter, adapter_only=True, **options)
    before, after = tensors(tiny_llama_dir), tensors(merged)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if block_of(name) in (2, 3) and name.endswith("proj.weight"):
            assert not torch.equal(tensor, after[name]), name
        else:
            assert same_bytes(tensor, after[name]), name
    assert log["lora"]["layers_to_transform"] == [2, 3] and all("lora_" in n for n in log["trainable_names"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    def scores(model: str, args: dict) -> list:
        result = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["arc_easy_local"], limit=4, batch_size=4,
                                         device="cpu", task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
        return [float(r[0][0]) for s in result["samples"]["arc_easy_local"] for r in s["resps"]]

    via_adapter = scores("layered", {"pretrained": str(tiny_llama_dir), "peft": str(adapter), "dtype": "float32"})
    via_merged = scores("hf", {"pretrained": str(merged), "dtype": "float32"})
    plain = scores("hf", {"pretrained": str(tiny_llama_dir), "dtype": "float32"})
    assert via_adapter == pytest.approx(via_merged, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(plain, via_merged)) > 1e-3  # training changed the answers' scores
    # A plan on top of the adapter: the plan applies to the PEFT model's base blocks.
    pruned = tmp_path / "merged-drop5"
    assert CliRunner().invoke(app, ["prune", str(merged), "--drop", "5", "--out", str(pruned)]).exit_code == 0
    planned = scores("layered", {"pretrained": str(tiny_llama_dir), "peft": str(adapter), "drop": "5", "dtype": "float32"})
    assert planned == pytest.approx(scores("hf", {"pretrained": str(pruned), "dtype": "float32"}), abs=1e-4)


@pytest.mark.slow
def test_lora_on_gpt2_conv1d(tok, qa_data, tmp_path):
    """GPT-2 keeps its projections in transposed Conv1D modules; LoRA merges into them correctly."""
    from peft import PeftModel

    config = T.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=128,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    T.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tok.save_pretrained(base)
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    options = dict(layers="1", lora=2, lr=1e-2, lora_dropout=0.0, max_steps=3)
    log = train(base, qa_data, merged, **options)
    train(base, qa_data, adapter, adapter_only=True, **options)
    assert sorted(log["lora"]["target_modules"]) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    before, after = tensors(base), tensors(merged)
    changed = {n for n in before if not same_bytes(before[n], after[n])}
    assert changed and all(n.startswith("h.1.") or n.startswith("transformer.h.1.") for n in changed)
    ids = torch.tensor([tok("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        want = T.AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        peft = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
        got = peft(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_ila_matrices_train_alone(tiny_llama_dir, qa_data, tmp_path):
    """Matrix units: exactly those weight matrices change, with full weights and with merged LoRA."""
    ranked = [(1, "self_attn.q_proj"), (4, "mlp.down_proj"), (4, "self_attn.v_proj"), (0, "mlp.up_proj")]
    ila = ila_file(tmp_path / "ila.json", "module", ranked)
    wanted = {f"model.layers.{b}.{m}.weight" for b, m in ranked}
    before = tensors(tiny_llama_dir)
    for name, options in (("full", {}), ("lora", {"lora": 2, "lora_dropout": 0.0})):
        log = train(tiny_llama_dir, qa_data, tmp_path / name, layers_from=ila, top="10%", lr=1e-2, max_steps=3, **options)
        after = tensors(tmp_path / name)
        assert {n for n in before if not same_bytes(before[n], after[n])} == wanted, name
    assert log["lora"]["target_modules"] == sorted(f"model.layers.{b}.{m}" for b, m in ranked)


class StopAt(TrainerCallback):
    """Interrupts a run right after the checkpoint of step k is written, like a Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_reaches_the_weights_of_an_uninterrupted_run(tiny_llama_dir, qa_data, tmp_path):
    options = dict(lora=4, lora_dropout=0.1, layers="1-4", lr=5e-3, max_steps=6, save_steps=3, seed=3)
    whole = tmp_path / "whole"
    train(tiny_llama_dir, qa_data, whole, **options)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama_dir, qa_data, out, callbacks=[StopAt(3)], **options)
    assert not out.exists() and (tmp_path / "resumed.partial" / "checkpoints" / "checkpoint-3").is_dir()
    with pytest.raises(UsageError, match="holds an interrupted run; continue it with --resume"):
        train(tiny_llama_dir, qa_data, out, **options)
    with pytest.raises(UsageError, match="other options than the interrupted run \\(lr\\)"):
        train(tiny_llama_dir, qa_data, out, resume=True, **{**options, "lr": 1e-3})
    torn = tmp_path / "resumed.partial" / "checkpoints" / "checkpoint-5"  # killed while saving: no trainer_state.json
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"")
    log = train(tiny_llama_dir, qa_data, out, resume=True, **options)
    assert log["resumed_from_step"] == 3 and log["steps"] == 6
    a, b = tensors(whole), tensors(out)
    # Same data order, dropout masks (RNG state) and optimizer state: equal up to float rounding.
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    assert not (tmp_path / "resumed.partial").exists()


@pytest.mark.slow
def test_distillation_from_the_unpruned_model(tiny_llama_dir, qa_data, tmp_path):
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[D.IGNORE, D.IGNORE, 3, 4, 5], [D.IGNORE, 1, 2, D.IGNORE, D.IGNORE]])
    kl, count = distill_loss_sum(logits, logits.clone(), labels, 2.0, 1.0)
    assert count == 5 and kl.item() == pytest.approx(0.0, abs=1e-5)
    teacher_logits = 3 * torch.randn(2, 5, 11)
    kl, _ = distill_loss_sum(logits, teacher_logits, labels, 2.0, 1.0)
    keep = labels[:, 1:] != D.IGNORE
    p_t = torch.softmax(teacher_logits[:, :-1][keep] / 2, -1)
    p_s = torch.softmax(logits[:, :-1][keep] / 2, -1)
    expected = 4 * (p_t * (p_t.log() - p_s.log())).sum()  # T² · KL(teacher ‖ student), not the reverse
    reverse = 4 * (p_s * (p_s.log() - p_t.log())).sum()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5) and abs(expected - reverse) > 0.1
    ce, _ = distill_loss_sum(logits, torch.randn(2, 5, 11), labels, 2.0, 0.0)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="sum").item(), rel=1e-5)

    pruned = tmp_path / "pruned"
    assert CliRunner().invoke(app, ["prune", str(tiny_llama_dir), "--drop", "4-5", "--out", str(pruned)]).exit_code == 0
    out = tmp_path / "healed"
    log = train(pruned, qa_data, out, distill_from=str(tiny_llama_dir), lora=4, lr=1e-2, max_steps=6, temperature=2.0)
    assert log["method"] == "LoRA + distillation" and log["distill"]["teacher"] == str(tiny_llama_dir)
    curve = [e["loss"] for e in log["loss_curve"]]
    assert curve[-1] < curve[0]
    assert T.AutoConfig.from_pretrained(out).num_hidden_layers == 4
    # The card names the model the pruned folder came from (its layer_plan.json), not the folder.
    assert f"base_model: {tiny_llama_dir}\n" in (out / "README.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*out.iterdir(), *pruned.iterdir()] if p.suffix == ".safetensors"}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # as prune writes it, not transformers' private 0600


@pytest.mark.slow
def test_gguf_model_trains_after_dequantising(qa_data, tmp_path):
    """The embedded SmolLM2 (GGUF): dequantised to fp32 safetensors in the work folder, then trained."""
    out = tmp_path / "smol"
    log = train("smollm2", qa_data, out, layers="-1", lora=2, max_steps=2, batch_size=2, max_length=64)
    assert log["steps"] == 2 and log["blocks"] == [29]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["dtype"] == "float32"
    model = T.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert not out.with_name("smol.partial").exists()


# --------------------------------------------------------------------------------------------
# processes: the CLI, torchrun, the stock lm_eval script


def cli(*args: str, cwd: Path, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [*launcher, "-m", "surgery", "train", *args] if launcher else [str(Path(sys.executable).with_name("surgery")), "train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_bad_inputs_write_nothing(tiny_llama_dir, qa_data, tmp_path):
    unknown = tmp_path / "rows.jsonl"
    unknown.write_text('{"question": "q", "answer": "a"}\n')
    for args, message in (
        ([str(tiny_llama_dir), "--data", str(unknown)], "error: unknown record format: record 0 has fields answer, question"),
        ([str(tiny_llama_dir), "--data", str(qa_data), "--layers", "2,9"], "error: --layers: block 9 is out of range for a model with 6 blocks"),
    ):
        out = tmp_path / "out"
        proc = cli(*args, "--out", str(out), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
        assert proc.stderr.strip().startswith(message)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_each_bad_input_is_one_line_exit_2_and_nothing_written(tiny_llama_dir, qa_data, tmp_path):
    """The command's boundary, in process: every mistake the issue lists (and a few more) is one
    `error:` line, exit code 2, and no output or work folder."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "empty.jsonl").write_text("\n")
    (inputs / "missing.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    ila = ila_file(inputs / "ila.json", "block", [(1, "*")])
    unranked, empty_ila = inputs / "unranked.json", inputs / "empty_ila.json"
    document = json.loads(ila.read_text())
    del document["units"][1]["rank"]
    unranked.write_text(json.dumps(document))
    empty_ila.write_text(json.dumps({**document, "units": []}))
    teacher = inputs / "teacher"  # same weights, a tokenizer with one more token
    teacher.mkdir()
    for name in ("config.json", "model.safetensors"):
        (teacher / name).symlink_to(tiny_llama_dir / name)
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(teacher)
    busy = inputs / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    model, data = str(tiny_llama_dir), ["--data", str(qa_data)]
    cases = [
        ([model, "--data", str(inputs / "empty.jsonl")], "no records"),
        ([model, "--data", str(inputs / "missing.jsonl")], "record 1 has no 'completion' field"),
        ([model, *data, "--max-length", "4"], "no response token left after truncation to --max-length 4"),
        ([model, *data, "--new-blocks"], "needs new_parameters.json"),
        ([model, *data, "--layers", "1", "--freeze-bottom", "25%"], "--layers and --freeze-bottom are two selections"),
        ([model, *data, "--layers", "-7"], "block -7 is out of range"),
        ([model, *data, "--layers-from", str(ila), "--top", "150%"], "--top 150% is outside (0, 100%]"),
        ([model, *data, "--layers-from", str(ila), "--top", "0%"], "--top 0% is outside (0, 100%]"),
        ([model, *data, "--head", "--lora", "4"], "--head trains the output head's full weights"),
        ([model, *data, "--lora", "4", "--lora-dropout", "1.5"], "--lora-dropout 1.5 must be in [0, 1)"),
        ([model, *data, "--lora", "4", "--lora-alpha", "0"], "--lora-alpha 0.0 must be positive"),
        ([model, *data, "--heal", "--lora", "4"], "--heal trains LoRA r=8; for rank 4 drop --heal"),
        ([model, *data, "--layers-from", str(unranked), "--top", "30%"], f"{unranked} unit 1 has no 'rank'"),
        ([model, *data, "--layers-from", str(empty_ila), "--top", "30%"], f"{empty_ila} ranks no units"),
        *([([model, *data, "--dtype", "float16"], "--dtype float16 trains with loss scaling on a GPU only")]
          if not torch.cuda.is_available() else []),
        ([model, *data, "--lora", "4", "--distill-from", str(teacher)], "has another tokenizer than the model"),
        ([model, *data, "--out", str(busy)], "exists and is not empty; choose another folder or pass --force"),
    ]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        result = CliRunner().invoke(app, ["train", *args, *out, "--max-steps", "1"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"], args
        assert [p.name for p in busy.iterdir()] == ["keep.txt"]


LAUNCHERS = {
    "torchrun": (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
    # `--multi_gpu` is accelerate's torch.distributed launcher, which also serves CPU-only machines
    # (the Trainer's use_cpu=True forms a gloo group); its `--cpu` flag starts a single process.
    "accelerate": (str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_reach_the_single_process_weights(tiny_llama_dir, qa_data, tmp_path, launcher):
    """torchrun or accelerate launch, 2 CPU processes (gloo), batch 2 each = 1 process with batch 4: same weights."""
    common = ["--data", str(qa_data), "--layers", "1-4", "--max-steps", "3", "--max-length", "64", "--lr", "1e-2", "--seed", "1"]
    one = cli(str(tiny_llama_dir), *common, "--batch-size", "4", "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(str(tiny_llama_dir), *common, "--batch-size", "2", "--out", str(tmp_path / "two"), cwd=tmp_path,
              launcher=LAUNCHERS[launcher])
    assert two.returncode == 0, two.stderr[-3000:]
    log_one, log_two = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("one", "two"))
    assert (log_one["world_size"], log_two["world_size"]) == (1, 2)
    assert log_one["tokens"] == log_two["tokens"]  # the same examples, split between the processes
    assert two.stderr.count("surgery train →") == 1  # one summary table: only rank 0 reports and writes
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    original = tensors(tiny_llama_dir)
    changed = [n for n in a if not torch.equal(a[n], original[n])]
    assert changed
    # Gradients averaged over processes: equal up to the order of float sums (seen: 2.0e-6 on one
    # element after 3 Adam steps). Adam at lr 1e-2 moves every trained element by ~1e-2 a step,
    # so a wrong split (both processes on all data, an unaveraged gradient) is far outside 1e-5.
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.slow
def test_trained_folder_scores_the_same_in_stock_lm_eval_hf_and_layered(tiny_llama_dir, qa_data, tmp_path, local_data):
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "trained"
    train(tiny_llama_dir, qa_data, folder, layers="4-5", lr=1e-2)
    results = tmp_path / "results"
    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(local_data), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
         "--tasks", "arc_easy_local", "--include_path", str(TASKS), "--limit", "4", "--device", "cpu",
         "--output_path", str(results), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = results.rglob("samples_arc_easy_local_*.jsonl")
    stock = [float(r[0][0]) for line in samples.read_text().splitlines() for r in json.loads(line)["resps"]]
    memory = lm_eval.simple_evaluate(model="layered", model_args={"pretrained": str(folder), "dtype": "float32"},
                                     tasks=["arc_easy_local"], limit=4, batch_size=4, device="cpu",
                                     task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
    layered = [float(r[0][0]) for s in memory["samples"]["arc_easy_local"] for r in s["resps"]]
    assert layered == pytest.approx(stock, abs=1e-4)
