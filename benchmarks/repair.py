"""Benchmark: training-free repair (a fitted map folded into the down projection) on SmolLM2.

Calibration windows come from the first half of the local WikiText-2 test text, held-out NLL from
windows of the second half (never seen by the fit). For each dropped run: plain dropping, lstsq
at growing calibration sizes with and without ridge (the curve the default `--tokens` and the
few-tokens warning come from), and cosine; the share of the NLL gap closed
(NLL_drop − NLL_repaired) / (NLL_drop − NLL_full); fit time against one forward pass of the full
model over the same tokens. The curve reuses one accumulation: the normal equations of the first
n tokens are snapshots of the running sums.

    python benchmarks/repair.py [--runs 20-23 20-27] [--sizes 8x128 16x256 32x256 64x256 128x256 256x256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS
from search import fp32_folder, split_text


def heldout_nll(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for ids in windows.split(8):
        logp = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        total -= float(logp[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/search-bench"))
    parser.add_argument("--runs", nargs="+", default=["20-23", "20-27"])
    parser.add_argument("--sizes", nargs="+", default=["8x128", "16x256", "32x256", "64x256", "128x256", "256x256"])
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--heldout", default="16x256")
    parser.add_argument("--json", type=Path, default=RESULTS / "repair.json")
    args = parser.parse_args()

    import transformers

    from lm_eval_layers.calibration import calibration_windows, parse_shape
    from lm_eval_layers.plan import PlanSpec
    from lm_eval_layers.repair import fit as F
    from lm_eval_layers.repair.fold import folded_tensors
    from lm_eval_layers.variant import apply_plan

    args.work.mkdir(parents=True, exist_ok=True)
    folder = fp32_folder(args.work)
    calibration, heldout_text = split_text(args.work)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    layout = F.layout_for(model)
    blocks = layout.find_blocks(model)
    n, t = parse_shape(args.heldout)
    heldout = calibration_windows(tok, heldout_text, n, t)
    shapes = [parse_shape(s) for s in args.sizes]
    text = calibration.read_text()
    full = heldout_nll(model, heldout)
    out = {"model": "SmolLM2-135M-Instruct (fp32)", "heldout": args.heldout, "heldout_nll_full": full, "runs": [],
           "threads": torch.get_num_threads()}
    for spec in args.runs:
        plan = PlanSpec.from_args(drop=spec).resolve(len(blocks))
        with apply_plan(model, plan):
            dropped = heldout_nll(model, heldout)
        a, b = plan.dropped[0], plan.dropped[-1]
        row = {"drop": spec, "heldout_nll_drop": dropped, "curve": []}
        for w, k in sorted(shapes, key=lambda s: s[0] * s[1]):
            windows = calibration_windows(tok, text, w, k)
            sums = F.Sums(model.config.hidden_size, keep=False)
            start = time.perf_counter()
            for batch in windows.split(8):
                sums.add(*F.activations(model, plan, None, a, b, ids=batch))
            accumulate = time.perf_counter() - start
            for ridge in args.ridges:
                tic = time.perf_counter()
                transform = sums.solve(ridge)
                solve = time.perf_counter() - tic
                repaired_plan = PlanSpec.from_args(drop=spec, repair="lstsq", calibration=str(calibration)).resolve(len(blocks))
                with apply_plan(model, repaired_plan, folded_tensors(blocks, layout, repaired_plan, {a - 1: transform})):
                    nll = heldout_nll(model, heldout)
                row["curve"].append({"windows": w, "tokens_per_window": k, "tokens": w * k, "ridge": ridge,
                                     "heldout_nll": nll, "gap_closed": (dropped - nll) / (dropped - full),
                                     "fit_seconds": accumulate + solve})
                print(spec, f"{w}x{k}", ridge, f"nll {nll:.4f} (drop {dropped:.4f}, full {full:.4f}) "
                      f"closed {row['curve'][-1]['gap_closed']:.1%}", flush=True)
        # the library's own fit (lstsq and cosine) at the default size, timed against a full forward pass
        from lm_eval_layers.repair.spec import DEFAULT_TOKENS

        w, k = parse_shape(DEFAULT_TOKENS)
        windows = calibration_windows(tok, text, w, k)
        tic = time.perf_counter()
        for batch in windows.split(8):
            model(input_ids=batch, use_cache=False)
        forward = time.perf_counter() - tic
        for method in ("lstsq", "cosine"):
            p = PlanSpec.from_args(drop=spec, repair=method, calibration=str(calibration), tokens=DEFAULT_TOKENS).resolve(len(blocks))
            tic = time.perf_counter()
            fit = F.fit_repair(model, tok, p)
            seconds = time.perf_counter() - tic
            with apply_plan(model, p, fit.tensors(model, p)):
                nll = heldout_nll(model, heldout)
            row[method] = {"tokens": DEFAULT_TOKENS, "heldout_nll": nll, "gap_closed": (dropped - nll) / (dropped - full),
                           "fit_seconds": seconds, "full_forward_seconds": forward, "fit_over_forward": seconds / forward,
                           "residual_vs_drop": fit.report[0]["residual_vs_drop"]}
            print(spec, method, row[method], flush=True)
        out["runs"].append(row)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
