#!/usr/bin/env python3
"""Checks exported ONNX files with the reference tools: onnx.checker (full check, with shape
inference) and a run in Python onnxruntime on random input.

usage: check_onnx.py IMAGE_ENCODER.onnx TEXT_ENCODER.onnx
Prints one JSON object with the output shapes.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    image_path, text_path = sys.argv[1], sys.argv[2]
    out = {}
    for path in (image_path, text_path):
        onnx.checker.check_model(onnx.load(path), full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    img = ort.InferenceSession(image_path, so, providers=["CPUExecutionProvider"])
    size = img.get_inputs()[0].shape[2]
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    out["image_embeds"] = list(img.run(None, {img.get_inputs()[0].name: x})[0].shape)
    txt = ort.InferenceSession(text_path, so, providers=["CPUExecutionProvider"])
    ids = np.zeros((3, 7), dtype=np.int64)
    ids[:, 0] = 49406
    ids[:, 1:4] = 320
    ids[:, 4] = 49407
    out["text_embeds"] = list(txt.run(None, {txt.get_inputs()[0].name: ids})[0].shape)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
