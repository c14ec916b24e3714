#!/usr/bin/env bash
# Builds the browser demo and serves it on http://127.0.0.1:${PORT:-8080}/wasm/www/ (the project folder
# is served as it is: the page loads models/default and ONNX Runtime Web from wasm/www/node_modules).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build_wasm.sh >/dev/null
PORT="${PORT:-8080}"
echo "open http://127.0.0.1:$PORT/wasm/www/  (?bundle=../../PATH/ serves another bundle folder of the project)"
exec /usr/bin/python3 -m http.server "$PORT" --bind 127.0.0.1
