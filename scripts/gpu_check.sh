#!/usr/bin/env bash
# CUDA checks of the trainer on a GPU machine that has PyTorch 2.11 (cu130) in its python3:
# one full ViT-B/32 fine-tuning step (batch 16) with fp16 mixed precision and in fp32, beside
# PyTorch eager; then a short `trainer finetune --device cuda` on a MedNIST subset, and the
# finetuned checkpoint's predictions on CUDA against the same on the CPU (same top-1, probabilities
# within 1e-3). Exits non-zero when any step fails or the comparison does not hold.
#
# Binaries are built elsewhere with the same libtorch (torch 2.11.0 wheel):
#   CARGO_TARGET_DIR=target/cuda cargo build --release -p trainer --features cuda --bin trainer
#   CARGO_TARGET_DIR=target/cuda cargo bench -p trainer --features cuda --bench train_step --no-run
# and copied with a data subset into BIN (default .devicebin) and DATA (default .devicedata).
set -uo pipefail
BIN="${BIN:-.devicebin}"
DATA="${DATA:-.devicedata}"
OUT="${OUT:-gpu-out}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=0
mkdir -p "$OUT"
TORCH_LIB="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"

# Peak GPU memory of a command: nvidia-smi polled every 100 ms (includes the CUDA context).
peak() {
  local name="$1"; shift
  : > "$WORK/$name.mem"
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$WORK/$name.mem"; sleep 0.1; done ) &
  local poll=$!
  "$@" > "$WORK/$name.json" 2> "$WORK/$name.err"
  local rc=$?
  kill $poll 2>/dev/null; wait $poll 2>/dev/null
  echo "$name rc=$rc peak_gpu_mb=$(sort -n "$WORK/$name.mem" | tail -1) $(cat "$WORK/$name.json")" | tee -a "$OUT/summary.txt"
  [ $rc = 0 ] || { tail -5 "$WORK/$name.err"; FAILED=1; }
}

peak rust_amp "$BIN/train_step" --config vit-b-32 --device cuda --amp --steps 20 --warmup 5 --threads 8
peak rust_fp32 "$BIN/train_step" --config vit-b-32 --device cuda --steps 20 --warmup 5 --threads 8
peak torch_amp python3 scripts/bench_train_step.py --config vit-b-32 --device cuda --amp --steps 20 --warmup 5 --threads 8
peak torch_fp32 python3 scripts/bench_train_step.py --config vit-b-32 --device cuda --steps 20 --warmup 5 --threads 8

[ -n "${SKIP_FINETUNE:-}" ] && exit $FAILED
"$BIN/trainer" init --config vit-b-32 --tokenizer models/tokenizer/tokenizer.json --out /tmp/xray-clip-init --force 2>&1 \
  | tee -a "$OUT/summary.txt" || FAILED=1
"$BIN/trainer" finetune --dataset folder --force --data "$DATA/train" --test-data "$DATA/test" --model /tmp/xray-clip-init \
  --out /tmp/xray-clip-run --epochs 4 --lr 2e-5 --device cuda 2>&1 | tee "$OUT/finetune.log" || FAILED=1
cp /tmp/xray-clip-run/metrics.csv "$OUT/finetune_metrics.csv" 2>/dev/null
cp /tmp/xray-clip-run/curves.png "$OUT/finetune_curves.png" 2>/dev/null

# The same checkpoint on CUDA and on the CPU.
LABELS="$(ls "$DATA/test" | paste -sd, -)"
mapfile -t IMAGES < <(find "$DATA/test" -type f | sort | head -32)
for dev in cpu cuda; do
  "$BIN/trainer" predict --json --device $dev --model /tmp/xray-clip-run --labels "$LABELS" -k 3 \
    "${IMAGES[@]}" > "$OUT/predict_$dev.jsonl" 2> "$WORK/predict_$dev.err" || { tail -5 "$WORK/predict_$dev.err"; FAILED=1; }
done
python3 - "$OUT/predict_cpu.jsonl" "$OUT/predict_cuda.jsonl" <<'PY' | tee -a "$OUT/summary.txt" || FAILED=1
import json, sys
cpu, cuda = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
assert cpu and len(cpu) == len(cuda), f"{len(cpu)} CPU lines, {len(cuda)} CUDA lines"
same_top1 = sum(a["top"][0]["id"] == b["top"][0]["id"] for a, b in zip(cpu, cuda))
diff = max(abs(x["probability"] - y["probability"])
           for a, b in zip(cpu, cuda) for x, y in zip(a["top"], b["top"]))
print(f"cuda vs cpu: {same_top1}/{len(cpu)} same top-1, max probability difference {diff:.2e}")
sys.exit(0 if same_top1 == len(cpu) and diff <= 1e-3 else 1)
PY
exit $FAILED
