#!/usr/bin/env python3
"""The few lines of Python a user would write instead of `classify`: PIL + transformers'
CLIPImageProcessor + onnxruntime on a bundle's image encoder, batches of 16, the bundle's label
embeddings, top-3 as JSON lines (the peer of scripts/bench_classify.sh).

usage: py_classify.py BUNDLE FOLDER [--threads 2] [--batch-size 16] [--encoder FILE.onnx]
"""
import argparse
import json
import pathlib

import numpy as np
import onnxruntime as ort
from PIL import Image
from transformers import CLIPImageProcessor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=pathlib.Path)
    ap.add_argument("folder", type=pathlib.Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--encoder", type=pathlib.Path, help="another image encoder file")
    a = ap.parse_args()
    manifest = json.loads((a.bundle / "manifest.json").read_text())
    labels = [l["name"] for l in manifest["labels"]]
    emb = np.load(a.bundle / manifest["files"]["label_embeddings"]["path"])
    scale = manifest["logit_scale"]
    processor = CLIPImageProcessor.from_pretrained(a.bundle)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    encoder = a.encoder or a.bundle / manifest["files"]["image_encoder"]["path"]
    sess = ort.InferenceSession(str(encoder), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    files = sorted(p for p in a.folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for i in range(0, len(files), a.batch_size):
        batch = files[i : i + a.batch_size]
        images = [Image.open(f).convert("RGB") for f in batch]
        pixels = processor(images=images, return_tensors="np")["pixel_values"]
        e = sess.run(None, {name: pixels})[0]
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        logits = scale * e @ emb.T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        for f, row in zip(batch, p):
            top = np.argsort(-row)[:3]
            print(json.dumps({"file": str(f), "top": [{"label": labels[j], "probability": float(row[j])} for j in top]}))


if __name__ == "__main__":
    main()
