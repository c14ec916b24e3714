#!/usr/bin/env bash
# Radiograph-sized 16-bit grayscale PNGs for the decoding benchmarks (scripts/bench.sh,
# runtime/benches/decode.rs): 32 files from the two real CR DICOMs of pydicom-data (RG1_UNCI,
# 1841x1955, and RG3_UNCI, 1760x1760), samples scaled to the full 16 bits, each rolled sideways by a
# different amount so no two files are equal. Idempotent: an existing folder is left as it is.
#
#   scripts/make_large_png.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: $0 DIR}"
[ -d "$OUT" ] && exit 0
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
[ -x "$CACHE/testpy/bin/python" ] || scripts/setup.sh >&2
TMP="$OUT.partial"
rm -rf "$TMP"
mkdir -p "$TMP"
"$CACHE/testpy/bin/python" - "$TMP" <<'PY'
import sys, numpy as np, pydicom
from pathlib import Path
from PIL import Image
import data_store  # pydicom-data
base = Path(data_store.__file__).parent / "data"
out = Path(sys.argv[1])
for i in range(32):
    ds = pydicom.dcmread(base / ("RG1_UNCI.dcm" if i % 2 == 0 else "RG3_UNCI.dcm"))
    a = ds.pixel_array.astype(np.uint32) << (16 - ds.BitsStored)
    Image.fromarray(np.roll(a, i * 7, axis=1).astype(np.uint16)).save(out / f"cr_{i:02d}.png")
PY
mv "$TMP" "$OUT"
