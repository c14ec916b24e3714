#!/usr/bin/env bash
# Sets up, builds, and classifies a real radiograph: the PA chest DICOM (RG1) of the PyPI package
# pydicom-data, as `classify` does for any PNG, JPEG or DICOM.
#
# The model is the one `classify` uses without --model: $XRAY_CLIP_MODEL if set (a bundle folder;
# a wrong one is an error), else the demonstration bundle built into the binary (models/default:
# a small CLIP trained by this project on MedNIST's six classes). Other files: scripts/demo.sh FILE...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
cargo build -q --release -p runtime
DICOM=$(echo "$CACHE"/testpy/lib/python3*/site-packages/data_store/data/RG1_UNCI.dcm)
target/release/classify "${@:-$DICOM}"
