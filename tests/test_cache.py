"""Stored answers belong to the variant that produced them: lm-eval's `--use_cache` file under
`layered`, and the `surgery score` store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import transformers as T
from lm_eval.tasks import TaskManager

from conftest import DATA, TASKS

pytestmark = pytest.mark.slow  # real model / subprocesses: deselected by `make test-quick`

LIMIT = 5


def lm_eval_cli(model_args: str, cache: Path, out: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lm_eval")
    env = {**os.environ, "LM_EVAL_LAYERS_DATA": str(DATA)}
    proc = subprocess.run(
        [str(script), "--model", "layered", "--model_args", model_args, "--tasks", "arc_easy_local",
         "--include_path", str(TASKS), "--limit", str(LIMIT), "--device", "cpu", "--use_cache", str(cache),
         "--log_samples", "--output_path", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def logged(out: Path) -> dict[int, list[float]]:
    (samples,) = out.rglob("samples_arc_easy_local_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {r["doc_id"]: [float(resp[0][0]) for resp in r["resps"]] for r in rows}


def in_process(model_args: dict, use_cache: str | None = None) -> dict[int, list[float]]:
    out = lm_eval.simple_evaluate(model="layered", model_args=model_args, tasks=["arc_easy_local"], limit=LIMIT,
                                  device="cpu", task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
                                  use_cache=use_cache)
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"]["arc_easy_local"]}


def assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for doc, lls in got.items():
        assert lls == pytest.approx(expected[doc], abs=1e-5), doc


def assert_differ(a: dict, b: dict) -> None:
    assert any(abs(x - y) > 1e-3 for d in a for x, y in zip(a[d], b[d]))


def test_two_plans_sharing_one_cache_path_get_their_own_answers(tiny_llama_dir, tmp_path, local_data):
    """The stock console script: `drop=1` then `drop=2` with one `--use_cache` path. Each run's
    answers equal its uncached run; repeating `drop=2` is answered fully from the cache."""
    cache = tmp_path / "cache" / "lm"
    args = f"pretrained={tiny_llama_dir},dtype=float32"
    lm_eval_cli(f"{args},drop=1", cache, tmp_path / "a")
    first = logged(tmp_path / "a")
    second_run = lm_eval_cli(f"{args},drop=2", cache, tmp_path / "b")
    second = logged(tmp_path / "b")
    assert "Requests remaining: 0" not in second_run.stderr  # nothing of drop=1 was reused
    assert_close(first, in_process({"pretrained": str(tiny_llama_dir), "dtype": "float32", "drop": 1}))
    assert_close(second, in_process({"pretrained": str(tiny_llama_dir), "dtype": "float32", "drop": 2}))
    assert_differ(first, second)
    again = lm_eval_cli(f"{args},drop=2", cache, tmp_path / "c")
    assert f"Cached requests: {4 * LIMIT}, Requests remaining: 0" in again.stderr
    assert logged(tmp_path / "c") == second


def test_empty_plan_and_drop_share_a_cache_path(tiny_llama_dir, tmp_path, local_data):
    cache = str(tmp_path / "lm")
    base = {"pretrained": str(tiny_llama_dir), "dtype": "float32"}
    full = in_process(base, use_cache=cache)
    dropped = in_process({**base, "drop": "0"}, use_cache=cache)
    assert_differ(full, dropped)
    assert_close(dropped, in_process({**base, "drop": "0"}))
    assert_close(in_process(base, use_cache=cache), in_process(base))


def test_an_adapter_gets_its_own_answers(tiny_llama_dir, tmp_path, local_data):
    """`peft=` with and without an adapter (and with a plan) on one cache path."""
    peft = pytest.importorskip("peft")
    model = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    cache = str(tmp_path / "lm")
    base = {"pretrained": str(tiny_llama_dir), "dtype": "float32"}
    plain = in_process(base, use_cache=cache)
    adapted = in_process({**base, "peft": str(tmp_path / "adapter")}, use_cache=cache)
    adapted_drop = in_process({**base, "peft": str(tmp_path / "adapter"), "drop": "1"}, use_cache=cache)
    assert_differ(plain, adapted)
    assert_differ(adapted, adapted_drop)
    assert_close(adapted, in_process({**base, "peft": str(tmp_path / "adapter")}))
    assert_close(adapted_drop, in_process({**base, "peft": str(tmp_path / "adapter"), "drop": "1"}))
    assert_close(in_process(base, use_cache=cache), plain)
