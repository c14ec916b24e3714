#!/usr/bin/env bash
# `runtime serve` under load: REQUESTS requests from CONCURRENCY clients at once (Python threads,
# http.client, one image per request), with dynamic batching off (--max-batch 1) and on
# (--max-batch 16 --max-wait-ms 5), same model and threads. Prints requests/s and latency
# percentiles for each; results in bench-out/serve.json.
#
#   scripts/bench_serve.sh [MODEL_DIR] [REQUESTS] [CONCURRENCY]
# MODEL_DIR: a bundle (default: the built-in demonstration bundle). Images: the first 64 UNIFESP
# PNGs when ../shared/data/unifesp is there, else 64 generated 512x512 PNGs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-}"
REQUESTS="${2:-256}"
CONCURRENCY="${3:-16}"
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
scripts/setup.sh >&2
cargo build -q --release --locked -p runtime --bin runtime
PY="$CACHE/testpy/bin/python"
mkdir -p bench-out
"$PY" - "$PWD/target/release/runtime" "$MODEL" "$REQUESTS" "$CONCURRENCY" <<'PY'
import http.client, io, json, pathlib, statistics, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from PIL import Image

binary, model, requests, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
src = sorted(pathlib.Path("../shared/data/unifesp/images/train").glob("*.png"))[:64]
if len(src) == 64:
    images = [p.read_bytes() for p in src]
    source = "64 UNIFESP PNGs"
else:
    rng = np.random.default_rng(0)
    images = []
    for i in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    source = "64 generated 512x512 PNGs"

def run(extra):
    args = [binary, "serve", "--http", "127.0.0.1:0", "--device", "cpu", "--threads", "2"] + extra
    if model:
        args += ["--model", model]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    host, port = proc.stdout.readline().strip().removeprefix("listening on http://").split(":")
    def get(path):
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    while True:
        try:
            if get("/readyz")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    def one(i):
        c = http.client.HTTPConnection(host, int(port), timeout=120)
        t = time.perf_counter()
        c.request("POST", "/v1/classify", body=images[i % len(images)])
        r = c.getresponse()
        r.read()
        return r.status, time.perf_counter() - t
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up
        t = time.perf_counter()
        results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t
    metrics = get("/metrics")[1].decode()
    proc.terminate()
    proc.wait(timeout=60)
    ok = [lat for status, lat in results if status == 200]
    lat = sorted(ok)
    val = lambda name: float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith(name + " ")))
    return {"options": " ".join(extra), "ok": len(ok), "failed": len(results) - len(ok),
            "requests_per_s": len(ok) / wall,
            "latency_ms_p50": 1e3 * lat[len(lat) // 2], "latency_ms_p95": 1e3 * lat[int(len(lat) * 0.95)],
            "mean_batch": val("xray_clip_encoder_batch_size_sum") / val("xray_clip_encoder_batch_size_count")}

rows = [run(["--max-batch", "1"]), run(["--max-batch", "16", "--max-wait-ms", "5"])]
report = {"requests": requests, "concurrency": concurrency, "images": source, "model": model or "built-in", "runs": rows}
json.dump(report, open("bench-out/serve.json", "w"), indent=1)
print(json.dumps(report, indent=1))
PY
