"""Prepared requests (the repeated-evaluation path) give lm-eval's numbers: per-request log-likelihoods within
1e-4 of the `hf` path and identical acc / acc_norm, for the full model and several variants, on
every log-likelihood task of the suite; and it reuses the full model's prefix."""

from __future__ import annotations

import random

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import DATA, TASKS, make_model
from lm_eval_layers.evaluate import Evaluator
from lm_eval_layers.loglikelihood import Request, make_batches
from lm_eval_layers.model import LayeredLM
from lm_eval_layers.plan import PlanSpec

SUITE = ["arc_easy_local", "arc_challenge_local", "piqa_local", "boolq_local", "winogrande_local",
         "openbookqa_local", "sciq_local", "copa_local", "lambada_openai_local"]
PLANS = [{}, {"drop": "1;3"}, {"drop": 0}, {"insert": "2:avg", "drop_attn": 0}, {"drop_mlp": 5, "preset": "llama-pro:2"}]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    lm = LayeredLM(pretrained=str(tiny_llama_dir), dtype="float32", device="cpu", batch_size=16, fast=False)  # hf's loop
    return lm, TaskManager(include_path=str(TASKS))


@pytest.fixture(scope="module")
def prepared(setup):
    lm, manager = setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LM_EVAL_LAYERS_DATA", str(DATA))
        yield Evaluator(lm, SUITE, manager, limit=4)


@pytest.fixture(scope="module")
def slow(setup):
    """lm-eval's own loop per variant: the reference."""
    lm, manager = setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LM_EVAL_LAYERS_DATA", str(DATA))
        yield Evaluator(lm, SUITE, manager, limit=4, prepared=False)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", PLANS, ids=[str(p) for p in PLANS])
def test_prepared_requests_match_lm_eval(prepared, slow, kwargs, local_data):
    plan = PlanSpec.from_args(**kwargs).resolve(6)
    assert prepared.engine is not None and prepared.fallback is None
    result = prepared.evaluate(plan)
    metrics, examples = result.metrics, result.examples
    reference = slow.evaluate(plan, log_samples=True)
    prepared_ll = {key: ll for key, (ll, _) in zip(prepared.engine.prepared.keys, prepared.engine.loglikelihoods(plan))}
    for task in SUITE:
        samples = sorted(reference.samples[task], key=lambda s: s["doc_id"])
        for s in samples:
            for idx, resp in enumerate(s["filtered_resps"]):
                assert prepared_ll[(task, s["doc_id"], idx)] == pytest.approx(float(resp[0]), abs=1e-4)
        for metric in ("acc", "acc_norm"):
            if metric in samples[0]:
                assert examples[task][metric] == [s[metric] for s in samples], (task, metric)
        assert examples[task].keys() == reference.examples[task].keys()  # one set of columns
        for column, values in examples[task].items():
            assert values == pytest.approx(reference.examples[task][column], abs=1e-4), (task, column)
        assert metrics[task].keys() == reference.metrics[task].keys()  # lm-eval's names, e.g. lambada's perplexity
        for metric, value in metrics[task].items():
            assert value == pytest.approx(reference.metrics[task][metric], rel=1e-4), (task, metric)


def test_prefix_reuse_runs_only_the_blocks_after_the_first_change(prepared):
    prepared.evaluate(PlanSpec.from_args(drop=4))
    assert prepared.engine.blocks_run == 1  # block 5 only: blocks 0-3 come from the cached boundary
    prepared.evaluate(PlanSpec.from_args(drop=0))
    assert prepared.engine.blocks_run == 5
    prepared.evaluate(PlanSpec.from_args(insert="3:copy"))
    assert prepared.engine.blocks_run == 3  # copy(3), 4, 5
    prepared.evaluate(PlanSpec())
    assert prepared.engine.blocks_run == 0  # the full model's results are kept


@pytest.mark.slow
def test_rolling_tasks_fall_back_to_lm_eval_and_say_why(setup, local_data):
    lm, manager = setup
    evaluator = Evaluator(lm, ["wikitext_local"], manager, limit=1)
    assert evaluator.engine is None and "wikitext_local is loglikelihood_rolling" in evaluator.fallback
    result = evaluator.evaluate(PlanSpec.from_args(drop=1))
    assert result.metrics["wikitext_local"]["word_perplexity"] > 1
    assert len(result.examples["wikitext_local"]["loglik"]) == 1
    assert lm.plan.is_identity  # the model is left in its full form


def _token_requests(seed: int, count: int = 40) -> list:
    """Multiple-choice-like requests: contexts of many lengths (some beyond the sliding window
    of 5, some of one token), 1-4 choices of 1-6 tokens each."""
    rng = random.Random(seed)
    out = []
    for _ in range(count // 3):
        ctx = [rng.randrange(3, 128) for _ in range(rng.choice([1, 2, 3, 4, 7, 12, 20, 33]))]
        for _ in range(rng.randint(1, 4)):
            cont = [rng.randrange(3, 128) for _ in range(rng.randint(1, 6))]
            out.append(((f"{ctx}", f"{cont}"), ctx, cont))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("plan", [{}, {"drop_attn": 0, "drop": 3}, {"insert": "1:copy"}], ids=["full", "drop_attn0+drop3", "copy1"])
def test_shared_context_loglikelihoods_equal_hf_on_every_family(arch, plan, tokenizer_dir):
    """`layered`'s prepared loglikelihood requests (padded context batches, explicit positions, one context
    pass per document) against lm-eval's own `hf` loop on the same model, for each family —
    sliding-window ones included (their windows must cut padded and unpadded rows alike)."""
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    lm = LayeredLM(pretrained=make_model(arch), tokenizer=tokenizer, device="cpu", batch_size=7, **plan)
    requests = _token_requests(seed=len(arch))
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    reference = HFLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in reference]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in reference], abs=1e-4)


def test_batches_share_contexts_and_respect_sliding_windows():
    reqs = [Request((1, 2, 3), (4,)), Request((1, 2, 3), (5, 6)), Request((7, 8), (9,)), Request((7,), (9,))]
    (batch,) = make_batches(reqs, batch_size=8)
    assert batch.contexts == [(1, 2, 3), (7, 8), (7,)] and batch.group == [0, 0, 1, 2]
    t = batch.tensors
    assert t["ctx"].tolist() == [[1, 2], [7, 0], [0, 0]]  # each context but its last token, right-padded
    assert t["ids"].tolist() == [[3, 0], [3, 5], [8, 0], [7, 0]]  # last context token + continuation[:-1]
    assert t["positions"].tolist() == [[2, 3], [2, 3], [1, 2], [0, 1]]
    assert t["mask"].tolist()[2] == [1, 0, 1, 1]
    windowed = make_batches(reqs, batch_size=8, window=4)  # 3 + 2 tokens reach the window: not mixed
    assert [b.contexts for b in windowed] == [[(1, 2, 3)], [(7, 8), (7,)]]
    assert windowed[0].tensors["mask"] is None and windowed[0].tensors["positions"] is None
    assert [len(b.rows) for b in make_batches(reqs, batch_size=2)] == [2, 2]


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_output_transforms_survive_the_gathered_head(family, tokenizer_dir):
    """Logits are computed only at real continuation tokens by calling the model's own head on
    gathered hidden states; each family's transform after the head (Granite's logits_scaling,
    Cohere's logit_scale, Gemma 2's soft-capping) must still apply: compared with `hf`."""
    import transformers as T

    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = {"granite": lambda: T.GraniteConfig(**small, logits_scaling=4.0),
              "cohere": lambda: T.CohereConfig(**small, logit_scale=0.25),
              "gemma2": lambda: T.Gemma2Config(**small, head_dim=8, final_logit_softcapping=2.0)}[family]()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm = LayeredLM(pretrained=model, tokenizer=T.AutoTokenizer.from_pretrained(tokenizer_dir), device="cpu", batch_size=7)
    requests = _token_requests(seed=3)
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    reference = HFLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in reference]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in reference], abs=1e-4)
