"""`surgery`: written checkpoints load with transformers and compute exactly what the in-memory
variant computes; kept tensors are byte-identical; shards; atomic output; clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from conftest import DEPTH, make_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.plan import PlanSpec
from lm_eval_layers.variant import apply_plan
from lm_eval_layers.checkpoint.writer import atomic_output, plan_tensors, write_weights
from surgery.cli import app
from lm_eval_layers.checkpoint.safetensors_io import read_header
from lm_eval_layers.checkpoint.sources import SafetensorsFolder

pytestmark = pytest.mark.usefixtures("no_grad")

runner = CliRunner()
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def surgery(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def raw_tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor's bytes, straight from the safetensors files."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        header, start = read_header(path)
        data = path.read_bytes()
        for name, entry in header.items():
            a, b = entry["data_offsets"]
            out[name] = data[start + a:start + b]
    return out


CASES = [
    ("prune", ["--drop", "1,4"]),
    ("prune", ["--keep", "0-3", "--drop-attn", "1", "--drop-mlp", "2"]),
    ("expand", ["--insert", "1:avg;2:copy", "--drop", "5"]),
    ("expand", ["--preset", "slayer"]),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "bloom", "starcoder2"])
@pytest.mark.parametrize("command,args", CASES, ids=[" ".join(a) for _, a in CASES])
def test_written_checkpoint_equals_the_in_memory_variant(tmp_path, arch, command, args):
    model = make_model(arch)
    src = save(model, tmp_path / "src")
    result = surgery(command, src, *args, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    keys = dict(zip(args[::2], args[1::2]))
    spec = PlanSpec.from_args(**{k.lstrip("-").replace("-", "_"): v for k, v in keys.items()})
    with apply_plan(model, spec.resolve(DEPTH)) as variant:
        expected = model(IDS).logits
        assert written.config.num_hidden_layers == len(variant.blocks)
        if getattr(model.config, "layer_types", None):
            assert written.config.layer_types == model.config.layer_types
    assert torch.equal(written(IDS).logits, expected)


def test_kept_tensors_are_byte_identical_and_new_blocks_are_listed(tmp_path):
    model = make_model("llama")
    src = save(model, tmp_path / "src")
    assert surgery("expand", src, "--insert", "2:avg-zero,4:copy-zero", "--drop", "0", "--out", tmp_path / "out").exit_code == 0
    before, after = raw_tensors(src), raw_tensors(tmp_path / "out")
    # slots: 1, 2, avg-zero(2,3), 3, 4, copy-zero(4), 5
    mapping = {0: 1, 1: 2, 3: 3, 4: 4, 6: 5}
    for k, i in mapping.items():
        for name in [n for n in before if n.startswith(f"model.layers.{i}.")]:
            assert after[name.replace(f"layers.{i}.", f"layers.{k}.", 1)] == before[name]
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert after[name] == before[name]
    assert after["model.layers.5.self_attn.q_proj.weight"] == before["model.layers.4.self_attn.q_proj.weight"]
    assert set(after["model.layers.5.mlp.down_proj.weight"]) == {0}
    new = json.loads((tmp_path / "out" / "new_parameters.json").read_text())
    assert new["layers_to_transform"] == [2, 5] and new["layers_pattern"] == "layers"
    assert set(new["parameter_names"]) == {n for n in after if n.startswith(("model.layers.2.", "model.layers.5."))}
    plan = json.loads((tmp_path / "out" / "layer_plan.json").read_text())
    assert plan["command"] == "expand" and len(plan["plan"]["slots"]) == 7
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "expanded" in card and "insert avg-zero after 2" in card


@pytest.mark.parametrize("preset", ["llama-pro:3", "slayer"])
def test_function_preserving_expansion_reproduces_base_logits_from_disk(tmp_path, preset):
    model = make_model("qwen2")
    src = save(model, tmp_path / "src")
    assert surgery("expand", src, "--preset", preset, "--out", tmp_path / "out").exit_code == 0
    written = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    if preset == "slayer":  # also drops the last block: compare with that pruned model
        assert surgery("prune", src, "--drop", "-1", "--out", tmp_path / "ref").exit_code == 0
        model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
    torch.testing.assert_close(written(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_sharded_input_and_sharded_output(tmp_path):
    model = make_model("llama")
    src = save(model, tmp_path / "src", max_shard_size="30KB")
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").exists()
    result = surgery("prune", src, "--drop", "2", "--max-shard-size", "40KB", "--out", tmp_path / "out", "--verify")
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 40_000 + 2_000 for p in shards if len(read_header(p)[0]) > 1)
    written = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with apply_plan(model, PlanSpec.from_args(drop=2).resolve(DEPTH)):
        assert torch.equal(written(IDS).logits, model(IDS).logits)


def test_dtype_conversion_and_verify(tmp_path):
    src = save(make_model("gemma2"), tmp_path / "src")
    result = surgery("expand", src, "--insert", "1:avg", "--dtype", "bfloat16", "--out", tmp_path / "out", "--verify")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == DEPTH + 1
    header, _ = read_header(tmp_path / "out" / "model.safetensors")
    assert {e["dtype"] for e in header.values()} == {"BF16"}


def test_force_replaces_and_without_it_nothing_changes(tmp_path):
    src = save(make_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = surgery("prune", src, "--drop", "1", "--out", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert surgery("prune", src, "--drop", "1", "--out", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no leftovers


def test_interrupted_write_leaves_nothing(tmp_path):
    src = save(make_model("llama"), tmp_path / "src")

    class Interrupting(SafetensorsFolder):
        calls = 0

        def raw(self, name):
            Interrupting.calls += 1
            if Interrupting.calls == 5:
                raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a write
            return super().raw(name)

    source = Interrupting(src)
    model = make_model("llama")
    plan = PlanSpec.from_args(drop=1).resolve(DEPTH)
    tensors = plan_tensors(source, plan, layout_for(model), None)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "out", source, False, 0) as tmp:
            write_weights(tmp, source, layout_for(model), tensors, 1 << 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_inspect_table_and_json(tmp_path):
    model = make_model("gpt2")
    src = save(model, tmp_path / "src")
    result = surgery("inspect", src, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_blocks"] == DEPTH and report["model_type"] == "gpt2"
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["tied_embeddings"] is True and report["layer_config"]["n_layer"] == DEPTH
    assert sum(b["parameters"] for b in report["blocks"]) + report["other_parameters"] == report["parameters"]
    table = surgery("inspect", src)
    assert table.exit_code == 0 and "GPT2LMHeadModel" in table.stdout and "n_layer=6" in table.stdout


def _folder_with(tmp_path: Path, change) -> Path:
    folder = save(make_model("llama"), tmp_path / "m")
    change(folder)
    return folder


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)


def _as_pickle(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _bad_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _unknown_arch(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_model", "architectures": ["X"]}))


def _missing_shard(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


BAD = [
    ("missing model", None, ["prune", "{tmp}/nope", "--drop", "1"], "no model folder"),
    ("hub id offline", None, ["prune", "someone/no-such-model", "--drop", "1"], "cannot get someone/no-such-model"),
    ("missing gguf", None, ["prune", "{tmp}/x.gguf", "--drop", "1"], "no GGUF file"),
    ("garbage gguf", "gguf", ["prune", "{tmp}/bad.gguf", "--drop", "1"], "not a readable GGUF file"),
    ("a plain file", "file", ["prune", "{tmp}/plain.txt", "--drop", "1"], "is a file, not a model folder"),
    ("no config", _no_config, ["prune", "{m}", "--drop", "1"], "has no config.json"),
    ("config not json", _bad_json, ["prune", "{m}", "--drop", "1"], "is not valid JSON"),
    ("pickle only", _as_pickle, ["prune", "{m}", "--drop", "1"], "pickle"),
    ("truncated safetensors", _truncate, ["prune", "{m}", "--drop", "1"], "is truncated"),
    ("garbage safetensors", _garbage, ["prune", "{m}", "--drop", "1"], "not a readable safetensors file"),
    ("missing shard", _missing_shard, ["prune", "{m}", "--drop", "1"], "missing shard"),
    ("unknown architecture", _unknown_arch, ["prune", "{m}", "--drop", "1"], "unknown architecture 'no_such_model'"),
    ("bad spec", None, ["prune", "{m}", "--drop", "a-b"], "cannot read 'a-b'"),
    ("out of range", None, ["prune", "{m}", "--drop", "6"], "out of range"),
    ("everything dropped", None, ["prune", "{m}", "--drop", "0-5"], "drops all 6 blocks"),
    ("drop and keep", None, ["prune", "{m}", "--drop", "1", "--keep", "2"], "exclusive"),
    ("prune without a plan", None, ["prune", "{m}"], "prune needs --drop"),
    ("expand without a plan", None, ["expand", "{m}"], "expand needs --insert or --preset"),
    ("avg after last", None, ["expand", "{m}", "--insert", "5:avg"], "is the last one"),
    ("unknown preset", None, ["expand", "{m}", "--preset", "bigger"], "unknown preset"),
    ("bad shard size", None, ["prune", "{m}", "--drop", "1", "--max-shard-size", "5XB"], "is not a size"),
    ("out inside input", None, ["prune", "{m}", "--drop", "1", "--out", "{m}/sub"], "inside the input model folder"),
    ("out is the input", None, ["prune", "{m}", "--drop", "1", "--out", "{m}"], "inside the input model folder"),
    ("out is a file", "file", ["prune", "{m}", "--drop", "1", "--out", "{tmp}/plain.txt"], "is an existing file"),
    ("no write permission", None, ["prune", "{m}", "--drop", "1", "--out", "/proc/surgery-out"], "cannot write in /proc"),
    # checked before the model is opened: the missing model is not what is reported
    ("out not empty, before opening", "out", ["prune", "{tmp}/nope", "--drop", "1", "--out", "{tmp}/out"], "exists and is not empty"),
]


@pytest.mark.parametrize("name,change,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, name, change, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save(make_model("llama"), tmp_path / "m")
    if callable(change):
        change(folder)
    elif change == "gguf":
        (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    elif change == "file":
        (tmp_path / "plain.txt").write_text("x")
    elif change == "out":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, m=folder) for a in args]
    if "--out" not in argv and argv[0] in ("prune", "expand"):
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = surgery(*argv)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing left


def test_bad_dtype_is_a_usage_error():
    result = surgery("prune", "smollm2", "--drop", "1", "--dtype", "int4", "--out", "x")
    assert result.exit_code == 2 and "int4" in result.output


@pytest.mark.slow
def test_console_script_and_module_entry_points(tmp_path):
    script = Path(sys.executable).with_name("surgery")
    for cmd in ([str(script)], [sys.executable, "-m", "surgery"]):
        proc = subprocess.run([*cmd, "prune", str(tmp_path / "nope"), "--drop", "1", "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2 and proc.stderr.startswith("error: no model folder") and "Traceback" not in proc.stderr
        proc = subprocess.run([*cmd, "prune", "smollm2", "--drop", "1", "--dtype", "fp16", "--out", str(tmp_path / "o")],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error: Invalid value for '--dtype'"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "surgery prune --help" in proc.stderr
    src = save(make_model("llama"), tmp_path / "src")
    proc = subprocess.run([str(script), "prune", str(src), "--drop", "1", "--out", str(tmp_path / "pruned")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # stderr is not a terminal: progress comes as plain lines, not a silent bar
    assert "writing 6 -> 5 blocks: drop blocks 1:" in proc.stderr and "wrote " in proc.stderr
    assert "_name_or_path" not in json.loads((tmp_path / "pruned" / "config.json").read_text())


def test_prune_and_expand_are_library_calls_with_the_clis_result(tmp_path):
    """A Python user writes exactly what the CLI writes (`checkpoint.commands`), and is told
    what happens through the progress callback."""
    from lm_eval_layers.checkpoint.commands import expand, prune
    from lm_eval_layers.checkpoint.settings import ExpandSettings, PruneSettings

    src = save(make_model("llama"), tmp_path / "src")
    seen: list[tuple[str, int, int | None]] = []
    result = prune(PruneSettings(model=str(src), out=tmp_path / "lib", drop="1-2"), lambda *a: seen.append(a))
    assert result.written.plan.num_layers == DEPTH and len(result.written.plan.slots) == DEPTH - 2
    assert seen[0][0] == f"opening {src}" and seen[-1][0].startswith("writing") and seen[-1][1] == seen[-1][2]
    assert surgery("prune", src, "--drop", "1-2", "--out", tmp_path / "cli").exit_code == 0
    assert raw_tensors(tmp_path / "lib") == raw_tensors(tmp_path / "cli")
    grown = expand(ExpandSettings(model=str(src), out=tmp_path / "grown", insert="2:copy-zero"))
    assert json.loads((grown.written.out / "config.json").read_text())["num_hidden_layers"] == DEPTH + 1


def test_a_plan_out_of_range_of_a_gguf_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    """The GGUF's block count comes from its metadata; opening it (seconds) never happens."""
    from lm_eval_layers.checkpoint import sources
    from lm_eval_layers.checkpoint.commands import prune
    from lm_eval_layers.checkpoint.settings import PruneSettings
    from lm_eval_layers.errors import PlanError

    def never(model):
        raise AssertionError(f"{model} was opened before the plan was checked")

    monkeypatch.setattr(sources, "open_model", never)
    assert sources.header_depth("smollm2") == 30
    with pytest.raises(PlanError, match="block 30 is out of range for a model with 30 blocks"):
        prune(PruneSettings(model="smollm2", out=tmp_path / "out", drop="30"))
    assert not (tmp_path / "out").exists()
