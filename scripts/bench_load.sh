#!/usr/bin/env bash
# `runtime serve` under a real HTTP load generator (Debian's `hey`), loopback, bounded in time:
#   1. `classify` on a folder of the same images: images/s, the figure to match;
#   then one client at a time (the unloaded latency), and
#   2. saturation: closed loop, 32 clients: requests/s answered 200;
#   3. half that rate, open loop: latency p50 / p99;
#   4. twice the saturation rate: what is added is 503s only, peak RSS;
#   5. half the rate again: recovered (all 200, latency as in 3);
#   6. 1000 malformed requests (text bodies): all 422, and it still serves.
# Same bundle, 2 ONNX Runtime threads, release build, this machine. Results in bench-out/load.json.
#
#   scripts/bench_load.sh [MODEL_DIR] [SECONDS_PER_PHASE]
# MODEL_DIR: a bundle (default: the built-in demonstration bundle). The image: the first UNIFESP PNG
# when ../shared/data/unifesp is there (about 512 px), else a generated 512x512 PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-}"
SECONDS_PER_PHASE="${2:-20}"
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
scripts/setup.sh >&2
if ! command -v hey >/dev/null; then
  echo "[bench_load] Debian hey (HTTP load generator)" >&2
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q hey >/dev/null
fi
cargo build -q --release --locked -p runtime --bin runtime --bin classify
mkdir -p bench-out
"$CACHE/testpy/bin/python" - "$PWD/target/release" "$MODEL" "$SECONDS_PER_PHASE" <<'PY'
import csv, io, json, os, pathlib, resource, shutil, statistics, subprocess, sys, tempfile, threading, time, urllib.request
import numpy as np
from PIL import Image

bin_dir, model, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model_args = ["--model", model] if model else []
work = pathlib.Path(tempfile.mkdtemp(prefix="xray-clip-load-"))
src = sorted(pathlib.Path("../shared/data/unifesp/images/train").glob("*.png"))[:1]
if src:
    image = src[0].read_bytes()
    source = f"UNIFESP {src[0].name}"
else:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(buf, "PNG")
    image, source = buf.getvalue(), "a generated 512x512 PNG"
(work / "image.png").write_bytes(image)
(work / "bad.txt").write_text("this is not an image\n")
folder = work / "folder"
folder.mkdir()
for i in range(96):
    (folder / f"{i:03}.png").write_bytes(image)

# 1. classify on the folder, whole process, batches of 16, 2 threads.
t = time.perf_counter()
subprocess.run([bin_dir / "classify", "--device", "cpu", "--threads", "2", "--batch-size", "16", "--json", *model_args,
                folder], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
classify_ips = 96 / (time.perf_counter() - t)
print(f"classify on 96 files: {classify_ips:.1f} images/s", flush=True)

server = subprocess.Popen([bin_dir / "runtime", "serve", "--http", "127.0.0.1:0", "--device", "cpu", "--threads", "2",
                           "--max-batch", "16", "--max-wait-ms", "5", "--queue", "32", *model_args],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
addr = server.stdout.readline().strip().removeprefix("listening on http://")
url = f"http://{addr}/v1/classify"
while True:
    try:
        if urllib.request.urlopen(f"http://{addr}/readyz", timeout=5).status == 200:
            break
    except OSError:
        time.sleep(0.1)

def rss_mib():
    for line in open(f"/proc/{server.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def server_cpu_s():
    fields = open(f"/proc/{server.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

def run_hey(groups, body="image.png", ctype="image/png"):
    """Runs hey processes (`groups`: one argument list each, started `stagger` seconds apart),
    sampling the server's RSS meanwhile: the per-request rows of all of them, the peak RSS, and the
    CPU seconds the server and hey used (both on this machine's cores)."""
    cpu0, hey0 = server_cpu_s(), children_cpu_s()
    peak, done = [rss_mib()], threading.Event()
    def sample():
        while not done.wait(0.2):
            peak.append(rss_mib())
    th = threading.Thread(target=sample)
    th.start()
    procs = []
    for args, delay in groups:
        time.sleep(delay)
        procs.append(subprocess.Popen(["hey", *args, "-m", "POST", "-T", ctype, "-D", str(work / body), "-t", "30",
                                       "-o", "csv", url], stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    done.set()
    th.join()
    rows = [r for out in outs for r in csv.DictReader(io.StringIO(out)) if r.get("status-code")]
    return rows, (max(peak), server_cpu_s() - cpu0, children_cpu_s() - hey0)

def hey(args, **kw):
    return run_hey([(args, 0)], **kw)

def open_loop(rate, workers):
    """`rate` requests/s from `workers` clients, spread evenly: hey's rate-limited workers of one
    process fire together, so 16 processes of workers/16 each, started a 16th of a period apart."""
    procs = 16
    per_worker = rate / workers
    period = 1 / per_worker
    args = ["-z", f"{seconds}s", "-c", str(workers // procs), "-q", f"{per_worker:.4f}"]
    return run_hey([(args, 0 if i == 0 else period / procs) for i in range(procs)])

def summary(name, rows, wall, usage):
    peak, server_cpu, hey_cpu = usage
    statuses = {}
    for r in rows:
        statuses[r["status-code"]] = statuses.get(r["status-code"], 0) + 1
    ok = [float(r["response-time"]) for r in rows if r["status-code"] == "200"]
    q = lambda p: float(np.percentile(ok, p)) * 1000 if ok else None
    s = {"phase": name, "requests": len(rows), "statuses": statuses, "ok_per_s": len(ok) / wall,
         "p50_ms": q(50), "p99_ms": q(99), "peak_rss_mib": peak,
         "server_cores": server_cpu / wall, "hey_cores": hey_cpu / wall}
    print(f"{name}: {len(rows)} requests, statuses {statuses}, {s['ok_per_s']:.1f} answered 200/s, "
          f"p50 {s['p50_ms'] or 0:.0f} ms, p99 {s['p99_ms'] or 0:.0f} ms, peak RSS {peak:.0f} MiB, "
          f"cores used: server {s['server_cores']:.2f}, hey {s['hey_cores']:.2f}", flush=True)
    return s

phases = []
rows, peak = hey(["-z", f"{seconds // 2}s", "-c", "1"])
phases.append(summary("one client at a time", rows, seconds // 2, peak))
rows, peak = hey(["-z", f"{seconds}s", "-c", "32"])
sat = summary("saturation (32 clients, closed loop)", rows, seconds, peak)
phases.append(sat)
rate = sat["ok_per_s"]
half, double = rate / 2, rate * 2
rows, peak = open_loop(half, 16)
phases.append(summary(f"half load ({half:.0f}/s, 16 clients)", rows, seconds, peak))
rows, peak = open_loop(double, 128)
phases.append(summary(f"2x overload ({double:.0f}/s, 128 clients)", rows, seconds, peak))
rows, peak = open_loop(half, 16)
phases.append(summary(f"half load again ({half:.0f}/s)", rows, seconds, peak))
t = time.perf_counter()
rows, peak = hey(["-n", "1000", "-c", "10"], body="bad.txt", ctype="text/plain")
phases.append(summary("1000 malformed requests", rows, time.perf_counter() - t, peak))
after = urllib.request.urlopen(urllib.request.Request(url, data=image, method="POST"), timeout=30).status
print(f"a valid request after them: {after}", flush=True)
server.terminate()
server.wait(timeout=60)
shutil.rmtree(work)
result = {"source": source, "model": model or "built-in demonstration bundle", "classify_images_per_s": classify_ips,
          "serve_vs_classify": rate / classify_ips, "phases": phases, "valid_after_malformed": after,
          "seconds_per_phase": seconds}
pathlib.Path("bench-out/load.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"saturation / classify: {rate / classify_ips:.2f}x")
PY
