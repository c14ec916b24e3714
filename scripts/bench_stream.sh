#!/usr/bin/env bash
# Peak memory of `classify` against the number of files it streams (/usr/bin/time -v):
#  - 10 000 vs 1 000 000 paths from --files-from that do not exist: each goes through the listing,
#    the decoder threads, the in-order output and its error line, without the encoder's time;
#  - 96 vs 960 real images (a list naming the 96 images of scripts/bench_classify.sh 1 or 10
#    times), through the encoder (the demonstration bundle, built in).
# Prints a table; bench-out/stream.json keeps the figures.
#
#   scripts/bench_stream.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --locked -p runtime --bins
BIN="$PWD/target/release"
OUT="$PWD/bench-out/stream"
mkdir -p "$OUT"
peak() { # PEAK_KIB SECONDS of: classify ARGS... (exit status 1 expected for missing files)
  /usr/bin/time -v -o "$OUT/time.txt" "$BIN/classify" "$@" > /dev/null 2> "$OUT/stderr.txt" || true
  awk -F': ' '/Maximum resident/ {k=$2} /Elapsed \(wall/ {w=$2} END {print k, w}' "$OUT/time.txt"
}
python3 - "$OUT" <<'PY'
import sys, pathlib
out = pathlib.Path(sys.argv[1])
for n in (10_000, 1_000_000):
    with open(out / f"missing-{n}.txt", "w") as f:
        for i in range(n):
            f.write(f"/nonexistent/archive/{i % 997:03d}/study-{i:07d}/image-{i:07d}.dcm\n")
PY
IMAGES="$PWD/bench-out/images-96"
[ -d "$IMAGES" ] || scripts/bench_classify.sh 1 >/dev/null
ls "$IMAGES"/* > "$OUT/real-96.txt"
for _ in $(seq 10); do cat "$OUT/real-96.txt"; done > "$OUT/real-960.txt"
rows=()
for list in missing-10000 missing-1000000 real-96 real-960; do
  read -r kib wall < <(peak --json --device cpu --threads 2 --files-from "$OUT/$list.txt")
  n=$(wc -l < "$OUT/$list.txt")
  rows+=("$list $n $kib $wall")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import sys, json
rows = [l.split() for l in sys.stdin if l.strip()]
print("| paths | kind | peak RSS | wall time |")
print("| ---: | --- | ---: | ---: |")
out = []
for name, n, kib, wall in rows:
    kind = "missing files (no encoder)" if name.startswith("missing") else "real images (demo bundle)"
    print(f"| {int(n):,} | {kind} | {int(kib) / 1024:.0f} MiB | {wall} |")
    out.append({"list": name, "paths": int(n), "peak_rss_kib": int(kib), "wall": wall})
json.dump(out, open(sys.argv[1], "w"), indent=1)
' "$OUT/../stream.json"
