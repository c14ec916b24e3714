#!/usr/bin/env bash
# Sets up (idempotent) and runs every check: formatting, clippy, and all tests of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --torch --wasm
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked 2>&1 | tee /tmp/xray-clip-test.log
# The browser demo: build the wasm module, then the page in headless Chromium against the native classify.
scripts/build_wasm.sh >/dev/null
CLASSIFY="$PWD/target/debug/classify" node --test wasm/www/demo.test.mjs
