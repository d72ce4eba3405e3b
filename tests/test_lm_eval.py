"""The `layered` model inside real lm-eval: the stock console script, `simple_evaluate`, parity
with `hf`, and plan errors raised before any weight is read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import transformers as T
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import REPO, TASKS
from lm_eval_layers.errors import LayersError, UsageError
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanError, PlanSpec

LIMIT = 6


def evaluate(model, model_args=None, tasks=("arc_easy_local",), limit: int = LIMIT,
             manager: TaskManager | None = None) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), limit=limit, batch_size=4, device="cpu",
        task_manager=manager or TaskManager(include_path=str(TASKS)), log_samples=True,
    )


def sample_scores(results: dict, task: str) -> list:
    return [(s["doc_id"], s["resps"]) for s in results["samples"][task]]


@pytest.mark.slow
def test_empty_plan_matches_hf(tiny_llama_dir, local_data):
    """Shared contexts give hf's log-likelihoods to float rounding and the same metrics;
    fast=False is hf's own loop, bit for bit."""
    args = {"pretrained": str(tiny_llama_dir), "dtype": "float32"}
    hf = evaluate("hf", args, tasks=("arc_easy_local", "copa_local"))
    fast = evaluate("layered", args, tasks=("arc_easy_local", "copa_local"))
    slow = evaluate("layered", {**args, "fast": False}, tasks=("arc_easy_local", "copa_local"))
    for task in ("arc_easy_local", "copa_local"):
        assert sample_scores(slow, task) == sample_scores(hf, task)
        ref, got = sample_scores(hf, task), sample_scores(fast, task)
        assert [d for d, _ in got] == [d for d, _ in ref]
        for (_, a), (_, b) in zip(ref, got):
            (ll_a, greedy_a), (ll_b, greedy_b) = zip(*(x[0] for x in a)), zip(*(x[0] for x in b))
            assert [float(v) for v in ll_b] == pytest.approx([float(v) for v in ll_a], abs=1e-4)
            assert greedy_b == greedy_a
        for metric in ("acc,none", "acc_norm,none"):
            if metric in hf["results"][task]:
                assert fast["results"][task][metric] == hf["results"][task][metric]
    assert slow["results"] == hf["results"]


@pytest.mark.slow
def test_simple_evaluate_with_a_plan_changes_scores(tiny_llama_dir, local_data):
    base = evaluate("layered", {"pretrained": str(tiny_llama_dir), "dtype": "float32"})
    pruned = evaluate("layered", f"pretrained={tiny_llama_dir},dtype=float32,drop=1;3")
    assert sample_scores(pruned, "arc_easy_local") != sample_scores(base, "arc_easy_local")
    assert "drop=1;3" in str(pruned["config"]["model_args"])


def test_plugin_variant_equals_a_model_assembled_from_the_same_weights(tiny_llama_dir):
    lm = LayeredLM(pretrained=str(tiny_llama_dir), drop="-1", insert="0:copy", dtype="float32", device="cpu")
    assert [s.describe() for s in lm.plan.slots] == ["0", "copy(0)", "1", "2", "3", "4"]
    sources = [0, 0, 1, 2, 3, 4]
    ref = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    state = {}
    for name, tensor in ref.state_dict().items():
        if name.startswith("model.layers."):
            continue
        state[name] = tensor
    for k, i in enumerate(sources):
        for name, tensor in ref.model.layers[i].state_dict().items():
            state[f"model.layers.{k}.{name}"] = tensor.clone()
    ref.load_state_dict(state, strict=True)  # 6 slots again, block 0 twice, block 5 gone
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, ref(ids).logits)


def test_pretrained_model_object_gets_the_plan_on_a_clone(tiny_llama_dir):
    model = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_llama_dir)
    before = [id(b) for b in model.model.layers]
    lm = LayeredLM(pretrained=model, tokenizer=tokenizer, drop="2-3", device="cpu")
    assert len(lm.model.model.layers) == 4 and lm.model.config.num_hidden_layers == 4
    assert [id(b) for b in model.model.layers] == before and model.config.num_hidden_layers == 6
    assert lm.model.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def broken_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny model with unreadable weights: any check that passes here ran before loading."""
    broken = tmp_path_factory.mktemp("broken")
    shutil.copytree(tiny_llama_dir, broken, dirs_exist_ok=True)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # loading it would fail
    return broken


MISTAKES = [
    (dict(drop="6"), PlanError, "drop: block 6 is out of range for a model with 6 blocks; use 0..5 or -6..-1"),
    (dict(insert="1:mean"), PlanError, "unknown init"),
    (dict(dorp="2-3"), UsageError, "dorp: unknown argument of the layered model; did you mean drop?"),
    (dict(drop_atn=1), UsageError, "did you mean drop_attn?"),
    (dict(attn_implmentation="eager"), UsageError, "did you mean attn_implementation?"),
    (dict(batchsize=8), UsageError, "did you mean batch_size?"),
    (dict(frobnicate=1), UsageError, "frobnicate: unknown argument of the layered model; give a plan argument (drop, keep"),
    (dict(dtype="float8"), UsageError, "dtype=float8: not a torch dtype; use auto, float32, bfloat16 or float16"),
    (dict(softmax_dtype="fp32"), UsageError, "softmax_dtype=fp32: not a torch dtype"),
    (dict(fast="maybe"), UsageError, "fast='maybe' is not a switch; use fast=True or fast=False"),
]


@pytest.mark.parametrize("kwargs,error,message", MISTAKES, ids=[str(k) for k, _, _ in MISTAKES])
def test_mistakes_fail_before_weights_are_read(broken_dir, kwargs, error, message):
    """A bad plan, a misspelt or unknown key (named with the nearest plan or hf argument) and an
    invalid dtype are the plugin's own one-line errors, not transformers' TypeError or torch's
    AttributeError after start-up."""
    with pytest.raises(error) as err:
        LayeredLM(pretrained=str(broken_dir), device="cpu", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_transformers_options_and_config_overrides_still_pass(tiny_llama_dir):
    """Keys `hf` forwards to `from_pretrained` (a loading option, a config field) are not refused."""
    lm = LayeredLM(pretrained=str(tiny_llama_dir), device="cpu", attn_implementation="eager", rms_norm_eps=1e-3,
                   fast=0, drop=1)
    assert lm.model.config._attn_implementation == "eager" and lm.model.config.rms_norm_eps == 1e-3
    assert lm.prepared is False and len(lm.model.model.layers) == 5


def test_python_callers_get_the_exception(broken_dir):
    """Only lm-eval's console script turns a mistake into `error:` and exit 2; `simple_evaluate`
    raises the `LayersError` (a ValueError) to its caller."""
    with pytest.raises(LayersError, match="drop: block 40 is out of range"):  # the model is built before the tasks
        lm_eval.simple_evaluate(model="layered", model_args=f"pretrained={broken_dir},drop=40", tasks=["copa_local"],
                                device="cpu")


@pytest.mark.slow
def test_stock_console_script_prints_one_error_line(broken_dir, tmp_path):
    script = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [str(script), "--model", "layered", "--model_args", f"pretrained={broken_dir},drop=40",
         "--tasks", "copa_local", "--include_path", str(TASKS), "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: drop: block 40 is out of range for a model with 6 blocks; use 0..5 or -6..-1")


def loglikelihoods(samples) -> dict[int, list[float]]:
    """doc_id -> the log-likelihood of each choice, from lm-eval's samples (in memory or as
    written by `--log_samples`: the same (ll, is_greedy) pairs, lists in JSON)."""
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}


STOCK_PLAN = {"drop": "1", "insert": "2:avg-zero"}
STOCK_TASKS = ("arc_easy_local", "copa_local")


@pytest.mark.slow
def test_stock_lm_eval_console_script_applies_the_plan(tiny_llama_dir, local_data, tmp_path):
    """The stock `lm_eval` command runs `layered` with the plan given in --model_args: each
    document's log-likelihoods equal those of `hf` on the checkpoint `surgery expand` writes for
    that plan (to 1e-4: another process and the shared-context path) and differ from the full
    model's, so a plan dropped on the way through lm-eval's argument parsing fails."""
    script = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / "results"
    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(local_data)}
    plan = ",".join(f"{k}={v}" for k, v in STOCK_PLAN.items())
    proc = subprocess.run(
        [
            str(script), "--model", "layered", "--model_args", f"pretrained={tiny_llama_dir},{plan},dtype=float32",
            "--tasks", ",".join(STOCK_TASKS), "--include_path", str(TASKS),
            "--limit", "4", "--device", "cpu", "--output_path", str(out), "--log_samples",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arc_easy_local" in proc.stdout and "copa_local" in proc.stdout
    assert "layered plan: 6 -> 6 blocks: " in proc.stderr  # the resolved plan is said, as a plan file names no blocks
    (result_file,) = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())
    assert results["config"]["model"] == "layered"

    from typer.testing import CliRunner

    from surgery.cli import app

    written = tmp_path / "variant"
    expand = CliRunner().invoke(app, ["expand", str(tiny_llama_dir), "--drop", STOCK_PLAN["drop"],
                                      "--insert", STOCK_PLAN["insert"], "--out", str(written)])
    assert expand.exit_code == 0, expand.output
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)  # lm-eval's own index takes seconds
    args = {"dtype": "float32"}
    variant = evaluate("hf", {**args, "pretrained": str(written)}, STOCK_TASKS, limit=4, manager=manager)
    full = evaluate("hf", {**args, "pretrained": str(tiny_llama_dir)}, STOCK_TASKS, limit=4, manager=manager)
    for task in STOCK_TASKS:
        (samples_file,) = out.rglob(f"samples_{task}_*.jsonl")
        got = loglikelihoods(json.loads(line) for line in samples_file.read_text().splitlines())
        expected, unplanned = loglikelihoods(variant["samples"][task]), loglikelihoods(full["samples"][task])
        assert sorted(got) == sorted(expected) == list(range(4))
        for doc in got:
            assert got[doc] == pytest.approx(expected[doc], abs=1e-4), (task, doc)
            assert max(abs(a - b) for a, b in zip(got[doc], unplanned[doc])) > 1e-2, (task, doc)  # the plan acts
        assert results["results"][task]["acc,none"] == variant["results"][task]["acc,none"]
    assert results["results"]["copa_local"]["alias"] == "copa_local"


def test_unrelated_python_processes_do_not_import_lm_eval_or_torch():
    code = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'torch', 'transformers')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"
    hook = subprocess.run([sys.executable, "-c", "import sys; print('lm_eval_layers._hook' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert hook.stdout.strip() == "True"  # the .pth is installed and active


def test_registry_resolves_layered_lazily():
    proc = subprocess.run(
        [sys.executable, "-c", "from lm_eval.api.registry import get_model; print(get_model('layered').__name__, get_model('hf').__name__)"],
        capture_output=True, text=True, check=True,
    )
    assert proc.stdout.split()[-2:] == ["LayeredLM", "HFLM"]
    assert issubclass(LayeredLM, HFLM)


OFFLOAD_PLANS = [{"drop": "1;3"}, {"drop_attn": 3, "drop_mlp": 4}, {"insert": "2:copy-zero"},
                 {"preset": "llama-pro:2"}, {"insert": "2:avg", "drop": 5}]


@pytest.mark.slow
def test_parallelize_with_offloaded_blocks_keeps_plans_exact(tiny_llama_dir, tmp_path):
    """`parallelize=True` puts the model under an accelerate device map; with too little memory
    most blocks are offloaded to disk and run through accelerate's hooks. Every kind of slot —
    including synthesised ones, whose weights must not be reloaded from their source — gives
    the logits of the same plan on a plainly loaded model, and switching back restores it."""
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    plain = LayeredLM(pretrained=str(tiny_llama_dir), dtype="float32", device="cpu")
    mapped = LayeredLM(pretrained=str(tiny_llama_dir), dtype="float32", parallelize=True, max_cpu_memory="6400KB",
                       offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(mapped.model.hf_device_map.values())
    with torch.no_grad():
        base = plain.model(ids).logits
        assert torch.equal(mapped.model(ids).logits, base)
        for kwargs in OFFLOAD_PLANS:
            for lm in (plain, mapped):
                lm.use_plan(PlanSpec.from_args(**kwargs))
            expected = plain.model(ids).logits
            assert torch.equal(mapped.model(ids).logits, expected), kwargs
        mapped.use_plan(PlanSpec())
        assert torch.equal(mapped.model(ids).logits, base)
