#!/usr/bin/env bash
# CUDA checks of the trainer on a GPU machine that has PyTorch 2.11 (cu130) in its python3:
# one full ViT-B/32 fine-tuning step (batch 16) with fp16 mixed precision and in fp32, beside
# PyTorch eager; then a short `trainer finetune --device cuda` on a MedNIST subset.
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
  [ $rc = 0 ] || tail -5 "$WORK/$name.err"
}

peak rust_amp "$BIN/train_step" --config vit-b-32 --device cuda --amp --steps 20 --warmup 5 --threads 8
peak rust_fp32 "$BIN/train_step" --config vit-b-32 --device cuda --steps 20 --warmup 5 --threads 8
peak torch_amp python3 scripts/bench_train_step.py --config vit-b-32 --device cuda --amp --steps 20 --warmup 5 --threads 8
peak torch_fp32 python3 scripts/bench_train_step.py --config vit-b-32 --device cuda --steps 20 --warmup 5 --threads 8

[ -n "${SKIP_FINETUNE:-}" ] && exit 0
"$BIN/trainer" init --config vit-b-32 --tokenizer models/tokenizer/tokenizer.json --out /tmp/xray-clip-init --force 2>&1 | tee -a "$OUT/summary.txt"
"$BIN/trainer" finetune --dataset folder --force --data "$DATA/train" --test-data "$DATA/test" --init /tmp/xray-clip-init \
  --out /tmp/xray-clip-run --epochs 4 --lr 2e-5 --device cuda 2>&1 | tee "$OUT/finetune.log"
cp /tmp/xray-clip-run/metrics.csv "$OUT/finetune_metrics.csv" 2>/dev/null
cp /tmp/xray-clip-run/curves.png "$OUT/finetune_curves.png" 2>/dev/null
exit 0
