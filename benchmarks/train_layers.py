"""Which layers to train: `surgery train` recipes on SmolLM2 (fp32, CPU), one result file per row.

    .venv/bin/python benchmarks/train_layers.py --work /tmp/train_layers            # every row, hours
    .venv/bin/python benchmarks/train_layers.py --rows lora_all --steps 2 --limit 20 --results /tmp/smoke

Every row trains on the same data (`sft/nq_open.jsonl`, 90/10 split by the same seed) for the
same number of optimizer steps, then reports the held-out loss (response tokens, token-weighted
mean), arc_easy test[:LIMIT] accuracy (forgetting), trainable parameters, wall time and tokens/s.
A row whose `results/train_layers/ROW.json` exists is skipped, so a killed run resumes where it
stopped; models and inputs are prepared once in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
from common import BIN, HERE, RESULTS  # noqa: E402

REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
SFT = DATA / "sft" / "nq_open.jsonl"
DEPTH = 30  # SmolLM2-135M
SHARE = 0.3
ILA = RESULTS / "ila_runs" / "nq_open_seed0.json"  # written by benchmarks/ila_runs.py


@dataclass
class Row:
    """A model to start from (made by a `surgery` command), and how it trains (None: not at all)."""

    model: Callable[[Path], Path]
    train: dict[str, Any] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def surgery(*args: str) -> None:
    subprocess.run([str(BIN / "surgery"), *args], check=True)


def prepared(work: Path, name: str, *args: str) -> Path:
    """A `surgery prune|expand` output of the fp32 base, made once."""
    out = work / "models" / name
    if not out.is_dir():
        surgery(*args[:1], str(base(work)), *args[1:], "--out", str(out))
    return out


def base(work: Path) -> Path:
    out = work / "models" / "smollm2"
    if not out.is_dir():
        surgery("prune", "smollm2", "--keep", f"0-{DEPTH - 1}", "--out", str(out))  # GGUF -> fp32 safetensors
    return out


def least_important_by_ablation(k: int) -> list[int]:
    """The k blocks whose removal costs least on arc_easy validation[:200] (benchmarks/loo_sweep.py)."""
    sweep = json.loads((RESULTS / "loo_sweep.json").read_text())["c_fast"]
    return sorted(sorted(sweep, key=lambda b: -sweep[b]["acc"])[:k], key=int)


def slayer_inserts() -> str:
    return ",".join(f"{i}:avg-zero" for i in range(1, DEPTH // 2, 2))  # what preset=slayer inserts


def reranked(ila: Path, work: Path, name: str, order: Callable[[list], list]) -> Path:
    """The ila.json with its units re-ranked (random, reversed), so a row takes the same unit
    kind and count through the same `--layers-from ... --top 30%` path as the top row."""
    document = json.loads(ila.read_text())
    ranked = order(sorted(document["units"], key=lambda u: u["rank"]))
    for position, unit in enumerate(ranked):
        unit["rank"] = position + 1
    out = work / "ila" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document))
    return out


def shuffled(seed: int) -> Callable[[list], list]:
    return lambda units: random.Random(seed).sample(units, len(units))


def rows(ila: Path | None, work: Path) -> dict[str, Row]:
    lora = {"lora": 8}
    top = {"top": f"{round(SHARE * 100)}%"}
    drop4 = lambda w: prepared(w, "drop4", "prune", "--drop", f"{DEPTH - 4}-{DEPTH - 1}")  # noqa: E731
    slayer = lambda w: prepared(w, "slayer", "expand", "--preset", "slayer")  # noqa: E731
    slayer_least = lambda w: prepared(w, "slayer_ablation", "expand", "--insert", slayer_inserts(),  # noqa: E731
                                      "--drop", ",".join(map(str, least_important_by_ablation(2))))
    table = {
        "base": Row(base),
        "lora_all": Row(base, lora),
        "slayer_no_train": Row(slayer),
        "slayer_new_blocks": Row(slayer, {"new_blocks": True, "layers": "-1"}, "S strategy: new blocks + the new last block"),
        "slayer_inserts_drop_least_important_no_train": Row(slayer_least, extra={"dropped": least_important_by_ablation(2)}),
        "slayer_inserts_drop_least_important": Row(
            slayer_least, {"new_blocks": True}, "slayer's inserts, dropping the two blocks ablation on arc_easy validation ranks lowest",
            {"dropped": least_important_by_ablation(2)},
        ),
        "llama_pro4_new_blocks": Row(lambda w: prepared(w, "llama_pro4", "expand", "--preset", "llama-pro:4"), {"new_blocks": True}),
        "drop4_no_heal": Row(drop4),
        "drop4_heal": Row(drop4, {"heal": True}),
        "drop4_distill": Row(drop4, {"lora": 8, "distill_from": "BASE"}, "LoRA r=8, KL to the unpruned model"),
        "drop4_distill_mix": Row(drop4, {"lora": 8, "distill_from": "BASE", "distill_weight": 0.5},
                                 "LoRA r=8, half KL to the unpruned model, half LM loss"),
        "drop4_last3_head": Row(drop4, {"layers": "-3--1", "head": True},
                                "full weights of the last 3 remaining blocks + lm_head (Reassessing Layer Pruning's partial-layer fine-tuning)"),
    }
    if ila is not None:  # the random and bottom rows take ILA's units too
        table["lora_ila_top30"] = Row(base, {**lora, **top, "layers_from": ila}, f"top 30% units of {ila.name}")
        for seed in range(3):
            table[f"lora_random30_seed{seed}"] = Row(
                base, {**lora, **top, "layers_from": reranked(ila, work, f"random{seed}", shuffled(seed))},
                f"a random 30% of {ila.name}'s units")
        table["lora_bottom30"] = Row(base, {**lora, **top, "layers_from": reranked(ila, work, "bottom", lambda u: u[::-1])},
                                     f"the bottom 30% units of {ila.name}")
    return table


def heldout(args: argparse.Namespace) -> list:
    """The same 10% of nq_open every row is scored on (the split `surgery train --eval-fraction 0.1` makes)."""
    import transformers

    from lm_eval_layers.training import examples as D

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base(args.work)))
    return D.split(D.prepare(str(SFT), tokenizer, args.max_length).examples, 0.1, args.seed)[1]


def heldout_loss(folder: Path, examples: list, pad_id: int) -> float:
    """Token-weighted mean cross-entropy on the response tokens of the held-out examples."""
    import torch
    import transformers

    from lm_eval_layers.training import examples as D

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    collate = D.Collator(pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            batch = collate(examples[i : i + 16])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            target = batch["labels"][:, 1:]
            keep = target != D.IGNORE
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def arc_easy(folder: Path, limit: int) -> float:
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("LM_EVAL_LAYERS_DATA", str(DATA))
    result = lm_eval.simple_evaluate(model="layered", model_args={"pretrained": str(folder), "dtype": "float32"},
                                     tasks=["arc_easy_local"], limit=limit, batch_size=32, device="cpu",
                                     task_manager=TaskManager(include_path=str(REPO / "tasks")))
    return result["results"]["arc_easy_local"]["acc,none"]


def run_row(name: str, row: Row, args: argparse.Namespace, examples: list, pad_id: int) -> dict[str, Any]:
    from rich.console import Console

    from lm_eval_layers.training.fine_tune import fine_tune
    from surgery.training_bar import console_reporter
    from lm_eval_layers.training.train_settings import TrainSettings

    start = time.perf_counter()
    model = row.model(args.work)
    result: dict[str, Any] = {"row": name, "model": str(model.relative_to(args.work)), "note": row.note, **row.extra,
                              "steps": 0, "trainable_parameters": 0, "train_seconds": 0.0, "tokens_per_second": None}
    folder = model
    if row.train is not None:
        options = {k: (str(base(args.work)) if v == "BASE" else v) for k, v in row.train.items()}
        folder = args.work / "trained" / name
        log = fine_tune(TrainSettings(model=str(model), data=str(SFT), out=folder, max_steps=args.steps, batch_size=args.batch_size,
                                      max_length=args.max_length, seed=args.seed, eval_fraction=0.1, force=True, **options),
                        console_reporter(Console(stderr=True)))
        result.update(options={k: str(v) for k, v in row.train.items()}, steps=log["steps"], trainable_parameters=log["trainable_parameters"],
                      train_seconds=log["wall_seconds"], tokens_per_second=log["tokens_per_second"],
                      seconds_per_step=log["seconds_per_step"], selection=log["selection"])
    result["heldout_loss"] = heldout_loss(folder, examples, pad_id)
    result["arc_easy_acc"] = arc_easy(folder, args.limit)
    result["arc_easy_limit"] = args.limit
    result["wall_seconds"] = time.perf_counter() - start
    return result


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Plain PEFT + Trainer, LoRA r=8 on every linear module of every block, on the same examples
    and steps as row lora_all: the wall time of `trainer.train()` alone, for the 1.1x check."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from lm_eval_layers.training import examples as D

    folder = base(args.work)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    train_set = D.split(D.prepare(str(SFT), tokenizer, args.max_length).examples, 0.1, args.seed)[0]
    transformers.set_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = transformers.Trainer(
        model=model, train_dataset=train_set, data_collator=D.Collator(D.pad_id(tokenizer)),
        args=transformers.TrainingArguments(output_dir=str(args.work / "plain"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                            learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                                            remove_unused_columns=False, seed=args.seed, data_seed=args.seed, disable_tqdm=True),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    ours = json.loads((args.results / "lora_all.json").read_text()) if (args.results / "lora_all.json").is_file() else None
    return {"row": "overhead_plain_peft_trainer", "steps": args.steps, "train_seconds": seconds,
            "surgery_train_seconds": ours and ours["train_seconds"],
            "ratio": ours and ours["train_seconds"] / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_layers"), help="models and trained folders")
    parser.add_argument("--results", type=Path, default=RESULTS / "train_layers", help="one JSON per row")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all, then overhead)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every row (ILA's stage 1 reaches its plateau on nq_open at 80-100)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit", type=int, default=200, help="arc_easy test documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ila", type=Path, default=ILA if ILA.is_file() else None,
                        help="ila.json of `surgery ila` on SmolLM2 + nq_open for the top / random / bottom 30%% rows")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    table = rows(args.ila, args.work)
    names = [n for n in args.rows.split(",") if n] or [*table, "overhead"]
    unknown = [n for n in names if n not in table and n != "overhead"]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join([*table, 'overhead'])}")
    examples = None
    for name in names:
        path = args.results / f"{name}.json"
        if path.is_file():
            print(f"{name}: done already ({path})")
            continue
        if name == "overhead":
            result = overhead(args)
        else:
            if examples is None:
                import transformers

                from lm_eval_layers.training import examples as D

                examples = heldout(args)
                pad_id = D.pad_id(transformers.AutoTokenizer.from_pretrained(str(base(args.work))))
            result = run_row(name, table[name], args, examples, pad_id)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
