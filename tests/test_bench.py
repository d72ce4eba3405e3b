"""`surgery bench`: parameter counts equal the weights file's, FLOPs equal the hand formula, the
Pareto front, the in-memory worker model computes the plan's variant with the dropped blocks
freed, bad input is one line and nothing written, one real run writes bench.json, and a
generation task from --include-path reports each plan's exact match."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_layers.errors import UsageError
import torch
import transformers as T
from safetensors import safe_open
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from typer.testing import CliRunner

from conftest import DEPTH, make_model
from lm_eval_layers.arch import layout_for
from lm_eval_layers.checkpoint.sources import open_model
from lm_eval_layers.cost.count import size
from lm_eval_layers.cost.flops import generation_flops, prompt_flops
from lm_eval_layers.cost.pareto import front
from lm_eval_layers.cost.bench_rows import median_iqr
from lm_eval_layers.cost.settings import BenchSettings, plan_from_text
from lm_eval_layers.cost.worker import Job, load
from lm_eval_layers.plan import PlanSpec
from lm_eval_layers.variant import apply_plan
from surgery.cli import app

pytestmark = pytest.mark.usefixtures("no_grad")
runner = CliRunner()


def saved(tmp_path: Path, arch: str, **overrides) -> Path:
    folder = tmp_path / arch
    make_model(arch, **overrides).save_pretrained(folder)
    return folder


def file_count(folder: Path, skip_blocks: set[int], prefix: str) -> tuple[int, int]:
    """(parameters, bytes) straight from model.safetensors, without the blocks `skip_blocks`."""
    params = nbytes = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():
            if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) in skip_blocks:
                continue
            t = f.get_tensor(name)
            params, nbytes = params + t.numel(), nbytes + t.numel() * t.element_size()
    return params, nbytes


@pytest.mark.parametrize("arch,prefix,tied", [("llama", "model.layers.", False), ("llama", "model.layers.", True),
                                              ("gpt2", "transformer.h.", True)])
def test_params_and_bytes_equal_the_weights_file_for_the_full_model_and_a_drop(tmp_path, arch, prefix, tied):
    folder = saved(tmp_path, arch, tie_word_embeddings=tied)
    source = open_model(str(folder))
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.tie_word_embeddings == tied
    for drop in ((), (2, 3)):
        plan = PlanSpec.from_args(drop=list(drop) or None).resolve(DEPTH)
        counted = size(source, plan)
        assert (counted.params, counted.bytes) == file_count(folder, set(drop), prefix)
        blocks = layout_for(model).find_blocks(model)
        gone = sum(p.numel() for i in drop for p in blocks[i].parameters())
        assert counted.params == sum(p.numel() for p in model.parameters()) - gone  # tied tensors once
    assert size(source, plan, torch.bfloat16).bytes * 2 == counted.bytes


# Hand formulas on the tiny configs (hidden 32, 4 heads of 8, vocab 128; conftest.py):
LLAMA_BLOCK = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k and v (2 KV heads), o, gate/up/down
LLAMA_ATTN = 32 * 32 + 2 * 32 * 16 + 32 * 32
GPT2_BLOCK = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # fused c_attn, c_proj, c_fc, mlp.c_proj
MIXTRAL_BLOCK = LLAMA_ATTN + 4 * 32 + 4 * 3 * 32 * 64 * 2 / 4  # router, top-2 of 4 experts
HEAD = 128 * 32


@pytest.mark.parametrize("arch,block,attn", [("llama", LLAMA_BLOCK, LLAMA_ATTN), ("gpt2", GPT2_BLOCK, None),
                                             ("mixtral", MIXTRAL_BLOCK, LLAMA_ATTN)])
def test_flops_equal_the_hand_formula(tmp_path, arch, block, attn):
    source = open_model(str(saved(tmp_path, arch)))
    P = 10
    full = size(source, PlanSpec().resolve(DEPTH)).shape
    assert prompt_flops(full, P) == 2 * (DEPTH * block + HEAD) + DEPTH * 32 * 2 * (P + 1)
    assert generation_flops(full, P) == 2 * (DEPTH * block + HEAD) + DEPTH * 32 * 4 * (P + 1)
    dropped = size(source, PlanSpec.from_args(drop="2-3").resolve(DEPTH)).shape
    assert prompt_flops(dropped, P) == 2 * (4 * block + HEAD) + 4 * 32 * 2 * (P + 1)
    if attn is not None:  # a removed attention branch: neither its weights nor its quadratic term
        half = size(source, PlanSpec.from_args(drop="2-3", drop_attn=0).resolve(DEPTH)).shape
        assert prompt_flops(half, P) == 2 * (4 * block - attn + HEAD) + 3 * 32 * 2 * (P + 1)


def test_pareto_front_on_hand_made_points():
    points = [(10.0, 0.50), (20.0, 0.40), (15.0, 0.45), (12.0, 0.44), None, (20.0, 0.40), (9.0, 0.50), (25.0, 0.10)]
    # (12, .44) is beaten by (15, .45); (9, .50) by (10, .50); equal points do not beat each other
    assert front(points) == [True, True, True, False, None, True, False, True]


def test_median_and_interquartile_range():
    assert median_iqr([4.0, 1.0, 3.0, 2.0]) == (2.5, 1.5)
    assert median_iqr([7.0]) == (7.0, 0.0)


def test_plans_in_the_plugin_syntax_and_a_scores_series(tmp_path):
    assert plan_from_text("") == PlanSpec()
    assert plan_from_text("drop=3,5-7,drop_attn=0") == PlanSpec.from_args(drop="3,5-7", drop_attn="0")
    assert plan_from_text("insert=1:avg,3:copy") == PlanSpec.from_args(insert="1:avg;3:copy")
    assert plan_from_text("preset=llama-pro:4,drop=-1") == PlanSpec.from_args(preset="llama-pro:4", drop=-1)
    scores = tmp_path / "scores.json"
    values = [0.3, 0.05, 0.2, 0.01, 0.1, 0.4]
    scores.write_text(json.dumps({"unit": "block", "num_layers": 6, "model_type": "llama",
                                  "units": [{"index": i, "value": v} for i, v in enumerate(values)]}))
    specs = BenchSettings(model="m", out=tmp_path / "b.json", from_file=scores, drop_lowest="0,2").specs()
    assert [label for label, _ in specs] == ["full", "drop_lowest=2"]
    assert specs[1][1].resolve(6, "llama").dropped == (1, 3)
    default = BenchSettings(model="m", out=tmp_path / "b.json", from_file=scores).specs()
    assert [label for label, _ in default] == ["full", "drop_lowest=1", "drop_lowest=2", "drop_lowest=3"]


def test_a_search_file_gives_the_plan_after_each_step(tmp_path):
    from lm_eval_layers.search.removable import plan_without

    steps = [{"removed": [4], "plan": plan_without(6, [4]).to_dict()},
             {"removed": [4, "attn.2"], "plan": plan_without(6, [4, "attn.2"]).to_dict()}]
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"command": "search", "model_type": "llama", "steps": steps}))
    specs = BenchSettings(model="m", out=tmp_path / "b.json", from_file=search).specs()
    assert [label for label, _ in specs] == ["full", "1 removed (4)", "2 removed (attn.2)"]
    assert specs[2][1].resolve(6, "llama") == plan_without(6, [4, "attn.2"])
    with pytest.raises(UsageError, match="brings its own steps"):
        BenchSettings(model="m", out=tmp_path / "b.json", from_file=search, drop_lowest="2")


def _live_decoder_layers() -> int:
    gc.collect()
    return sum(type(o) is LlamaDecoderLayer for o in gc.get_objects())


def test_the_worker_model_is_the_variant_and_the_dropped_blocks_are_freed(tmp_path):
    folder = saved(tmp_path, "llama")
    plan = PlanSpec.from_args(drop="1,4").resolve(DEPTH)
    before = _live_decoder_layers()
    model = load(Job(str(folder), None, plan.to_dict(), "float32", "cpu", 0, 1, 8, 2, 1))
    assert _live_decoder_layers() - before == 4  # blocks 1 and 4 are gone
    assert sum(p.numel() for p in model.parameters()) == size(open_model(str(folder)), plan).params
    reference = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with apply_plan(reference, plan):
        assert torch.equal(model(ids).logits, reference(ids).logits)


def bench(*args: str):
    return runner.invoke(app, ["bench", *map(str, args)])


BAD = [
    ("plan that fails to parse", ["--plans", "drop=a-b"], "cannot read 'a-b'"),
    ("unknown plan argument", ["--plans", "dorp=3"], "unknown argument 'dorp'"),
    ("plan out of range", ["--plans", "drop=6"], "out of range"),
    ("no plan", [], "give plans to bench"),
    ("repeats 0", ["--plans", "", "--repeats", "0"], "--repeats 0: must be at least 1"),
    ("prompt above the context", ["--plans", "", "--prompt-tokens", "200"], "exceed the model's context of 128"),
    ("plot without tasks", ["--plans", "", "--plot", "{tmp}/p.png"], "--plot draws accuracy"),
    ("series without scores", ["--plans", "", "--drop-lowest", "2"], "--from scores.json"),
    ("existing out", ["--plans", "", "--out", "{tmp}/old.json"], "exists; choose another name or pass --force"),
    ("unknown task", ["--plans", "", "--tasks", "arc_easyy_local"], "is not known"),
    ("include path without tasks", ["--plans", "", "--include-path", "{tmp}"], "give --tasks"),
    ("missing include path", ["--plans", "", "--tasks", "gen_probe", "--include-path", "{tmp}/none"],
     "task folder"),
]


@pytest.mark.parametrize("name,args,message", [  # lm-eval's task index takes seconds to build: slow
    pytest.param(*b, id=b[0], marks=pytest.mark.slow if b[0] == "unknown task" else ()) for b in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, name, args, message):
    folder = saved(tmp_path, "llama")
    (tmp_path / "old.json").write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "bench.json")]
    if "--prompt-tokens" not in argv:
        argv += ["--prompt-tokens", "16", "--new-tokens", "4"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = bench(folder, *argv)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_device_cuda_without_cuda_is_refused(tmp_path):
    result = bench(tmp_path / "nope", "--plans", "", "--device", "cuda", "--out", tmp_path / "b.json")
    assert result.exit_code == 2 and result.stderr.strip() == "error: --device cuda: torch sees no CUDA device here; use --device cpu"
    assert not any(tmp_path.iterdir())


ROW_KEYS = {"plan", "kind", "description", "blocks", "params", "bytes", "flops_pp_per_token", "flops_tg_per_token",
            "pp_tokens_per_s", "pp_tokens_per_s_iqr", "tg_tokens_per_s", "tg_tokens_per_s_iqr", "ttft_s", "ttft_s_iqr",
            "peak_memory_mb", "load_peak_memory_mb", "predicted_speedup_pp", "measured_speedup_pp",
            "predicted_speedup_tg", "measured_speedup_tg", "accuracy", "acc", "pareto_pp", "pareto_tg", "samples",
            "layer_plan"}


@pytest.mark.slow
def test_a_real_bench_run_writes_bench_json(tmp_path):
    folder = saved(tmp_path, "llama")
    out = tmp_path / "bench.json"
    proc = subprocess.run([str(Path(sys.executable).with_name("surgery")), "bench", str(folder), "--plans", "drop=2-3",
                           "--checkpoints", "--repeats", "2", "--prompt-tokens", "16", "--new-tokens", "4",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    rows = doc["plans"]
    # the full model is added first (speed-ups need it); the checkpoint row follows its plan's row
    assert [(r["plan"], r["kind"]) for r in rows] == [("full", "in-memory"), ("drop=2-3", "in-memory"),
                                                      ("drop=2-3", "checkpoint")]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert all(len(v) == 2 and all(x > 0 for x in v) for v in r["samples"].values())
        assert r["peak_memory_mb"] > 0 and r["acc"] is None and r["pareto_tg"] is None
    assert rows[0]["predicted_speedup_pp"] == rows[0]["measured_speedup_pp"] == 1
    assert rows[1]["params"] == rows[2]["params"] == file_count(folder, {2, 3}, "model.layers.")[0]
    assert rows[1]["predicted_speedup_pp"] == rows[0]["flops_pp_per_token"] / rows[1]["flops_pp_per_token"] > 1
    assert doc["settings"]["threads"] == 1 and doc["settings"]["repeats"] == 2
    assert "drop=2-3" in proc.stdout and "written" in proc.stderr


@pytest.mark.slow  # lm-eval's task index: seconds
def test_the_accuracy_of_a_task_is_its_first_higher_is_better_metric(local_data):
    """nq_open_local (generation) reports `exact_match` under its own filter, not `acc` (bench
    failed with KeyError 'acc' after timing every plan); a perplexity task is refused up front."""
    from lm_eval_layers.cost.run import accuracy_metrics
    from lm_eval_layers.task_suite import task_manager

    manager = task_manager()
    assert accuracy_metrics(manager, ["nq_open_local", "arc_easy_local", "lambada_openai_local"]) == {
        "nq_open_local": ("exact_match", "exact_match,remove_whitespace"), "arc_easy_local": ("acc", "acc"),
        "lambada_openai_local": ("acc", "acc")}  # lambada's first metric, perplexity, is lower-is-better
    with pytest.raises(UsageError, match="wikitext_local has no higher-is-better metric"):
        accuracy_metrics(manager, ["wikitext_local"])


QUESTIONS = ["who wrote the declaration of independence", "what is the capital of peru", "when did the titanic sink"]
GEN_PLAN = "drop=1-3"

# A generation task shaped like nq_open_local (prompt, greedy stop strings, whitespace filter,
# exact match) over a local JSON file, with 4 new tokens at most so the test takes seconds.
GEN_TASK = """task: gen_probe
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: generate_until
validation_split: validation
doc_to_text: "Q: {{{{question}}}}?\\nA:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n", ".", ","]
  do_sample: false
  max_gen_toks: 4
filter_list:
  - name: remove_whitespace
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def gen_task(folder: Path, answers: list[str]) -> Path:
    """A folder holding the gen_probe YAML over QUESTIONS with `answers` (a folder per answer
    set: the datasets cache keys on the data file)."""
    folder.mkdir()
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers)))
    (folder / "gen_probe.yaml").write_text(GEN_TASK.format(data=data))
    return folder


def generations(pretrained: Path, yamls: Path) -> list[str]:
    """What stock `hf` generates for gen_probe's documents, after the task's filter."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(pretrained), dtype="float32", device="cpu", batch_size=3)
    manager = TaskManager(include_path=str(yamls), include_defaults=False)  # lm-eval's own index takes seconds
    out = lm_eval.simple_evaluate(model=lm, tasks=["gen_probe"], task_manager=manager, log_samples=True, bootstrap_iters=0)
    return [s["filtered_resps"][0] for s in sorted(out["samples"]["gen_probe"], key=lambda s: s["doc_id"])]


@pytest.mark.slow  # one worker process per plan
def test_bench_reports_the_exact_match_of_a_generation_task_from_include_path(tiny_llama_dir, tmp_path):
    """The answers are built from what stock `hf` generates on the full model (documents 0 and 1)
    and on the checkpoint `surgery prune` writes for the plan (document 2), so bench must report
    exact matches 2/3 and 1/3: the task's own metric for each plan, not a failure after timing."""
    config = T.AutoConfig.from_pretrained(tiny_llama_dir)
    config.initializer_range = 0.2  # prompt-dependent generations (see tests/test_generation.py)
    torch.manual_seed(0)
    folder = tmp_path / "model"
    T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    pruned = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(folder), "--drop", GEN_PLAN.split("=")[1], "--out", str(pruned)])
    assert result.exit_code == 0, result.output
    probe = gen_task(tmp_path / "probe", ["?"] * 3)
    full, dropped = generations(folder, probe), generations(pruned, probe)
    assert all(full) and all(dropped) and all(f != d for f, d in zip(full, dropped)), (full, dropped)
    yamls = gen_task(tmp_path / "yamls", [full[0], full[1], dropped[2]])

    out = tmp_path / "bench.json"
    result = bench(folder, "--plans", "", "--plans", GEN_PLAN, "--tasks", "gen_probe", "--include-path", yamls,
                   "--eval-batch-size", "3", "--repeats", "1", "--prompt-tokens", "8", "--new-tokens", "2",
                   "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["accuracy_metrics"] == {"gen_probe": "exact_match,remove_whitespace"}
    assert doc["settings"]["include_path"] == str(yamls)
    assert [(r["plan"], r["accuracy"]) for r in doc["plans"]] == [
        ("full", {"gen_probe": pytest.approx(2 / 3)}), (GEN_PLAN, {"gen_probe": pytest.approx(1 / 3)})]
    assert [r["acc"] for r in doc["plans"]] == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
