#!/usr/bin/env python3
"""Would more test-time augmentation help? Scores bundles on the images of a `runtime eval`
report (its predictions.csv: e.g. a model's own validation rows, `--split val`) with each image
also zoomed, rotated or shifted, the normalised embeddings of the variants averaged (as the
exported encoder already does with the mirror image), and prints the hits and the mean negative
log-likelihood of each set of variants per bundle. Needs a bundle with `preprocessing.crop` none
(the UNIFESP recipe's); run with the tools venv (scripts/setup.sh --dev):

usage: ~/.cache/xray-clip/py/bin/python scripts/probe_tta.py PREDICTIONS.csv BUNDLE [BUNDLE...]
"""
import csv
import json
import pathlib
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def zoom(img, s):
    """s > 1: the central 1/s of each side; s < 1: the image centred on a black canvas 1/s wide."""
    w, h = img.size
    if s >= 1:
        cw, ch = w / s, h / s
        return img.crop(((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))
    big = Image.new(img.mode, (round(w / s), round(h / s)), 0)
    big.paste(img, ((big.width - w) // 2, (big.height - h) // 2))
    return big


def rotate(img, degrees):
    return img.rotate(degrees, resample=Image.BILINEAR, fillcolor=0)


def shift(img, fx, fy):
    w, h = img.size
    return img.transform(img.size, Image.AFFINE, (1, 0, -fx * w, 0, 1, -fy * h),
                         resample=Image.BILINEAR, fillcolor=0)


VARIANTS = {
    "plain": lambda im: im,
    "zoom 1.1": lambda im: zoom(im, 1.1), "zoom 0.9": lambda im: zoom(im, 0.9),
    "zoom 1.2": lambda im: zoom(im, 1.2), "zoom 0.8": lambda im: zoom(im, 0.8),
    "rotate +5": lambda im: rotate(im, 5), "rotate -5": lambda im: rotate(im, -5),
    "rotate +10": lambda im: rotate(im, 10), "rotate -10": lambda im: rotate(im, -10),
    "shift x+": lambda im: shift(im, 0.05, 0), "shift x-": lambda im: shift(im, -0.05, 0),
    "shift y+": lambda im: shift(im, 0, 0.05), "shift y-": lambda im: shift(im, 0, -0.05),
}
SETS = {
    "plain (the bundle)": ["plain"],
    "zoom x1.1, x0.9": ["plain", "zoom 1.1", "zoom 0.9"],
    "zoom x1.2, x0.8": ["plain", "zoom 1.2", "zoom 0.8"],
    "zoom x1.1": ["plain", "zoom 1.1"],
    "rotate +-5": ["plain", "rotate +5", "rotate -5"],
    "rotate +-10": ["plain", "rotate +10", "rotate -10"],
    "shift +-5%": ["plain", "shift x+", "shift x-", "shift y+", "shift y-"],
    "zoom x1.1, x0.9, rotate +-5": ["plain", "zoom 1.1", "zoom 0.9", "rotate +5", "rotate -5"],
    "all 13": list(VARIANTS),
}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rows = list(csv.DictReader(open(sys.argv[1])))
    images = [Image.open(r["path"]) for r in rows]
    bundles = [pathlib.Path(b) for b in sys.argv[2:]]
    results = {}
    for bundle in bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        pre = manifest["preprocessing"]
        if pre.get("crop") != "none":
            sys.exit(f"{bundle}: preprocessing.crop is {pre.get('crop')}, this probe prepares whole images only")
        size, mean, std = pre["image_size"], np.float32(pre["mean"]), np.float32(pre["std"])
        names = [label["name"] for label in manifest["labels"]]
        truth = np.array([names.index(r["labels"].split(";")[0]) for r in rows])
        labels = np.load(bundle / "label_embeddings.npy")
        labels /= np.linalg.norm(labels, axis=1, keepdims=True)
        session = ort.InferenceSession(str(bundle / "image_encoder.onnx"),
                                       providers=["CPUExecutionProvider"])
        embeddings = {}
        for name, variant in VARIANTS.items():
            x = np.stack([
                ((np.asarray(variant(im).convert("RGB").resize((size, size), Image.BICUBIC),
                             np.float32) / 255 - mean) / std).transpose(2, 0, 1)
                for im in images])
            e = np.concatenate([session.run(None, {"pixel_values": x[i:i + 32]})[0]
                                for i in range(0, len(x), 32)])
            embeddings[name] = e / np.linalg.norm(e, axis=1, keepdims=True)
        results[bundle] = (embeddings, labels, truth, manifest["logit_scale"])
    print(f"{len(rows)} images; per bundle: hits (mean NLL)")
    print("| variants averaged | " + " | ".join(str(b) for b in bundles) + " | hits in all | mean NLL |")
    print("| --- |" + " ---: |" * (len(bundles) + 2))
    for set_name, variants in SETS.items():
        cells, hits, nlls = [], 0, []
        for embeddings, labels, truth, scale in results.values():
            e = sum(embeddings[v] for v in variants)
            logits = scale * (e / np.linalg.norm(e, axis=1, keepdims=True)) @ labels.T
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            h = int((logits.argmax(1) == truth).sum())
            nll = float(-logp[np.arange(len(truth)), truth].mean())
            cells.append(f"{h} ({nll:.3f})")
            hits += h
            nlls.append(nll)
        print(f"| {set_name} | " + " | ".join(cells) + f" | {hits} | {np.mean(nlls):.4f} |")


if __name__ == "__main__":
    main()
