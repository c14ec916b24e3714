#!/usr/bin/env bash
# Builds the `wasm` crate (runtime's decoding, preprocessing and scoring without ONNX Runtime) for
# wasm32-unknown-unknown with Debian's Rust 1.96 and its std source (std is built once per target
# folder, about 4 minutes), then generates the JS bindings into wasm/pkg when wasm-bindgen is there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --wasm
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=target/wasm
/usr/bin/cargo build --release -p wasm --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort
wasm-bindgen --target web --out-dir wasm/pkg target/wasm/wasm32-unknown-unknown/release/wasm.wasm
ls -la wasm/pkg
