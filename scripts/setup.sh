#!/usr/bin/env bash
# Installs what xray-clip needs, from the package registries only (PyPI, Debian, crates.io, npm).
# Idempotent: whatever is already in place is reused. Everything lands under $XRAY_CLIP_CACHE
# (default ~/.cache/xray-clip), so fresh clones on the same machine share it.
#
#   scripts/setup.sh            ONNX Runtime library + the small Python venv the tests use (pydicom, ...),
#                               Debian's orthanc (a PACS) and dcmtk (storescu, echoscu) for the DICOM node's tests
#   scripts/setup.sh --dev      also the tools venv (torch, transformers, onnx) for fixtures and benchmarks,
#                               and the export venv (below)
#   scripts/setup.sh --export-tools   the venv of the exporters users have (HF optimum + optimum-onnx, which
#                               pin transformers < 4.58): makes fixtures/import (scripts/make_import_fixtures.py)
#   scripts/setup.sh --torch    also libtorch for the trainer (PyPI torch 2.11.0 --no-deps + CUDA runtime)
#   scripts/setup.sh --wasm     also the wasm32 toolchain (Debian's rustc-web, Rust 1.96 with its std source),
#                               wasm-bindgen-cli at the version in Cargo.lock, Debian's chromium, and the demo
#                               page's npm packages (onnxruntime-web, playwright-core)
set -euo pipefail

CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
ORT_VERSION=1.31.1          # matches ort =2.0.0-rc.15 (api-31)
TORCH_VERSION=2.11.0        # matches tch =0.24.0
PYTHON="${PYTHON:-python3}"
mkdir -p "$CACHE"

want_dev=0; want_torch=0; want_wasm=0; want_export=0
for a in "$@"; do
  case "$a" in
    --dev) want_dev=1; want_export=1 ;;
    --export-tools) want_export=1 ;;
    --torch) want_torch=1 ;;
    --wasm) want_wasm=1 ;;
    *) echo "usage: $0 [--dev] [--export-tools] [--torch] [--wasm]" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*" >&2; }

# --- ONNX Runtime shared library (from the PyPI wheel) -------------------------------------------
install_onnxruntime() {
  local dir="$CACHE/onnxruntime"
  if [ -e "$dir/libonnxruntime.so.$ORT_VERSION" ]; then return; fi
  log "ONNX Runtime $ORT_VERSION (PyPI wheel)"
  local tmp; tmp=$(mktemp -d)
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --python-version 3.11 -d "$tmp" "onnxruntime==$ORT_VERSION"
  mkdir -p "$dir.part"
  "$PYTHON" - "$tmp"/onnxruntime-*.whl "$dir.part" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/libonnxruntime"):
            with open(os.path.join(out, os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$dir.part/libonnxruntime.so.1"
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$dir.part/libonnxruntime.so"
  rm -rf "$dir" && mv "$dir.part" "$dir" && rm -rf "$tmp"
}

# --- Python venvs -------------------------------------------------------------------------------
# A venv is complete once its marker file (the requirement list) exists.
make_venv() {
  local dir="$1"; shift
  local marker="$dir/.xray-clip-requirements"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$*" ]; then return; fi
  log "Python venv $dir: $*"
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "$@"
  echo "$*" > "$marker"
}

install_onnxruntime
# Test helpers: pydicom as the DICOM reference, pydicom-data for real radiographs, numpy for .npy.
make_venv "$CACHE/testpy" numpy==2.3.5 pydicom==3.0.2 pydicom-data==1.0.0 pylibjpeg==2.1.0 \
  pylibjpeg-openjpeg==2.6.0 pylibjpeg-libjpeg==2.3.0 pillow==12.0.0 onnx==1.23.2 "onnxruntime==$ORT_VERSION"

# The DICOM node's end-to-end tests: a real PACS (Orthanc) and dcmtk's storescu/echoscu.
if ! command -v Orthanc >/dev/null || ! command -v storescu >/dev/null || ! command -v echoscu >/dev/null; then
  log "Debian orthanc and dcmtk"
  # (The tests start their own Orthanc on free loopback ports, whatever the package's service does.)
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc dcmtk >/dev/null
fi

if [ "$want_dev" = 1 ]; then
  make_venv "$CACHE/py" "torch==$TORCH_VERSION" "transformers==5.24.0" onnx==1.23.2 "onnxruntime==$ORT_VERSION" \
    onnxscript pillow==13.0.0 numpy open-clip-torch openai-clip==1.0.1 ftfy regex pydicom pydicom-data pylibjpeg pylibjpeg-openjpeg \
    scikit-learn safetensors
fi

if [ "$want_export" = 1 ]; then
  make_venv "$CACHE/py-export" "torch==$TORCH_VERSION" "transformers==4.57.3" optimum==2.1.0 optimum-onnx==0.1.0 \
    onnx==1.23.2 "onnxruntime==$ORT_VERSION" onnxscript pillow numpy
fi

if [ "$want_torch" = 1 ]; then
  # Slim libtorch for tch: the CUDA wheel without its dependencies, plus the two CUDA runtime libraries
  # libtorch_cpu.so links against.
  dir="$CACHE/libtorch-venv"
  marker="$dir/.xray-clip-requirements"
  if [ ! -f "$marker" ]; then
    log "libtorch $TORCH_VERSION (PyPI torch --no-deps)"
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION"
    "$dir/bin/pip" install -q --disable-pip-version-check "cuda-toolkit[cudart,cupti]==13.0.2"
    echo "torch==$TORCH_VERSION" > "$marker"
  fi
  # .cargo/config.toml points LIBTORCH at this link (the build needs an absolute place per machine).
  ln -sfn "$(echo "$dir"/lib/python3*/site-packages/torch)" "$(dirname "$0")/../.libtorch"
fi
if [ "$want_wasm" = 1 ]; then
  # rustup's toolchains have no wasm32 std here; Debian's rustc-web ships a matching std source.
  pkgs="rustc-web cargo-web rust-web-src rust-web-llvm lld-22 chromium"
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    log "Debian wasm toolchain: $pkgs"
    apt-get update -q >/dev/null && apt-get install -y -q $pkgs >/dev/null
  fi
  version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$(dirname "$0")/../Cargo.lock")
  if ! wasm-bindgen --version 2>/dev/null | grep -q " $version\b"; then
    log "wasm-bindgen-cli $version (cargo install, about 13 minutes cold)"
    cargo install -q wasm-bindgen-cli --version "$version"
  fi
  www="$(dirname "$0")/../wasm/www"
  if [ ! -d "$www/node_modules/onnxruntime-web" ] || [ ! -d "$www/node_modules/playwright-core" ]; then
    log "npm packages of the demo page"
    (cd "$www" && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi
log "ready: $CACHE"
