#!/usr/bin/env bash
# Sets up, builds, and classifies a real radiograph: the PA chest DICOM (RG1) of the PyPI package
# pydicom-data, as `classify` does for any PNG, JPEG or DICOM.
#
# Until the trained default bundle lands in models/default, the bundle is the tiny random CLIP of the
# test fixtures (HF transformers, exported by torch.onnx): the command and the pipeline are real, the
# probabilities mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
cargo build -q --release -p runtime
MODEL="${XRAY_CLIP_MODEL:-models/default}"
if [ ! -f "$MODEL/manifest.json" ]; then
  MODEL=target/demo-bundle
  target/release/runtime assemble --device cpu --labels unifesp --logit-scale 100 --name tiny-random-demo \
    --base-weights "random init (fixtures/tiny, not a trained model)" \
    --image-encoder fixtures/tiny/image_encoder.onnx --text-encoder fixtures/tiny/text_encoder.onnx \
    --tokenizer models/tokenizer/tokenizer.json --out "$MODEL" >/dev/null
fi
DICOM=$(echo "$CACHE"/testpy/lib/python3*/site-packages/data_store/data/RG1_UNCI.dcm)
target/release/classify --model "$MODEL" "${@:-$DICOM}"
