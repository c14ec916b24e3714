#!/usr/bin/env python3
"""Reference DICOM decoding with pydicom, for the runtime's parity test.

For each input file writes OUT_DIR/<name>.npy: grayscale images as float32 [H, W] in [0, 1] after
pydicom's apply_modality_lut + apply_voi_lut (window output range mapped to [0, 1]; min-max when there
is no window) and MONOCHROME1 inversion; colour images as float32 [H, W, 3] = RGB / 255. First frame only.

usage: dicom_reference.py OUT_DIR FILE...
"""
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut


def window_range(ds):
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0, 2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    elif ds.PixelRepresentation == 0:
        lo, hi = 0, 2 ** ds.BitsStored - 1
    else:
        lo, hi = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        lo = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hi = hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return lo, hi


def reference(path):
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if ds.SamplesPerPixel == 3:
        return arr.astype(np.float32) / 255.0
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        out = apply_voi_lut(arr, ds)
        lo, hi = window_range(ds)
        out = (out - lo) / (hi - lo)
    else:
        lo, hi = arr.min(), arr.max()
        out = (arr - lo) / (hi - lo if hi > lo else 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for f in sys.argv[2:]:
        np.save(out / (Path(f).stem + ".npy"), reference(f))


if __name__ == "__main__":
    main()
