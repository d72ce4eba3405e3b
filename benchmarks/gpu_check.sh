#!/usr/bin/env bash
# The suite's CUDA-dependent checks in one go, for when a GPU machine is available (not run in CI,
# which has no GPU). From the repository root, with the project installed in .venv (a CUDA torch):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./gpu-check
#
# 1. bf16 plans on CUDA: the in-memory variant (apply_plan) and the `surgery prune --dtype bfloat16`
#    folder of the same plan give the same logits; `--device cuda` is accepted.
# 2. `surgery bench --device cuda` (CUDA events, torch.cuda.max_memory_allocated), bf16 and fp32,
#    with --checkpoints: the in-memory rows against the written folders.
# 3. A short `surgery train --dtype bfloat16` (bf16 autocast, float32 trained tensors) and
#    `--dtype float16` (loss scaling, GPU only) on SmolLM2.
# 4. The tests whose behaviour depends on CUDA (float16 refusals become runs, --device cuda).
# Every step prints PASS or FAIL; the script exits non-zero if any failed. Results go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
PY=.venv/bin/python
SURGERY=.venv/bin/surgery
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LM_EVAL_LAYERS_DATA="${LM_EVAL_LAYERS_DATA:-$PWD/../shared/data}"
FAILED=0

step() {  # step NAME COMMAND...: run with a 10-minute limit, log to OUT_DIR/NAME.log
  local name="$1"; shift
  if timeout 600 "$@" >"$OUT_DIR/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (see $OUT_DIR/$name.log)"; FAILED=1; fi
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  || { echo "FAIL: torch sees no CUDA device"; exit 2; }
step make-model "$SURGERY" prune smollm2 --keep 0-29 --out "$WORK/smollm2" --force
step prune-bf16 "$SURGERY" prune "$WORK/smollm2" --drop 20-27 --dtype bfloat16 --out "$WORK/pruned-bf16" --verify

step bf16-plans "$PY" - "$WORK/smollm2" "$WORK/pruned-bf16" <<'PY'
import sys, torch, transformers as T
from lm_eval_layers.plan import PlanSpec
from lm_eval_layers.variant import apply_plan
full, pruned = sys.argv[1:3]
model = T.AutoModelForCausalLM.from_pretrained(full, dtype=torch.bfloat16).cuda().eval()
folder = T.AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.bfloat16).cuda().eval()
ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
with torch.no_grad():
    for spec in (dict(drop="20-27"), dict(preset="llama-pro:4"), dict(drop_attn="3", drop_mlp="5"), dict(insert="3:avg")):
        with apply_plan(model, PlanSpec.from_args(**spec).resolve(30, "llama")):
            logits = model(ids).logits
        assert torch.isfinite(logits).all(), spec
        print(spec, "ok")
    with apply_plan(model, PlanSpec.from_args(drop="20-27").resolve(30, "llama")):
        diff = (model(ids).logits.float() - folder(ids).logits.float()).abs().max().item()
print("in-memory vs folder, drop=20-27 bf16 on CUDA: max |Δ logit| =", diff)  # expected 0: same bf16 weights, same kernels
assert diff <= 0.05, diff
PY

for dtype in bfloat16 float32; do
  step "bench-cuda-$dtype" "$SURGERY" bench "$WORK/smollm2" --plans "" --plans drop=26-29 --plans drop=20-27 \
    --plans drop=10-27 --plans preset=llama-pro:4 --checkpoints --device cuda --dtype "$dtype" --repeats 10 \
    --out "$OUT_DIR/bench_cuda_$dtype.json" --force
done
step bench-cuda-batch8 "$SURGERY" bench "$WORK/smollm2" --plans "" --plans drop=20-27 --batch 8 --device cuda \
  --dtype bfloat16 --repeats 10 --out "$OUT_DIR/bench_cuda_batch8.json" --force

$PY - "$WORK/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(64):
        f.write(json.dumps({"prompt": f"What is {i} plus {i}? ", "completion": f"{2 * i}."}) + "\n")
PY
step train-bf16 "$SURGERY" train "$WORK/smollm2" --data "$WORK/data.jsonl" --layers 0-3 --dtype bfloat16 --max-steps 5 \
  --batch-size 8 --max-length 64 --out "$WORK/trained-bf16"
step train-fp16-lora "$SURGERY" train "$WORK/smollm2" --data "$WORK/data.jsonl" --lora 4 --dtype float16 --max-steps 5 \
  --batch-size 8 --max-length 64 --out "$WORK/trained-fp16"
[ -f "$WORK/trained-bf16/train_log.json" ] && cp "$WORK/trained-bf16/train_log.json" "$OUT_DIR/train_log_bf16.json"

step cuda-tests "$PY" -m pytest -q tests/test_bench.py tests/test_training.py -k "bfloat16 or float16 or dtype or cuda or bench"

exit $FAILED
