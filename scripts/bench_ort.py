#!/usr/bin/env python3
"""Python onnxruntime on the same image encoder, same thread count, spinning off (the baseline of
runtime/benches/throughput.rs). Prints one JSON object.

usage: bench_ort.py ENCODER.onnx [--threads N] [--reps N]
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(a.encoder, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def timed(batch, reps):
        x = np.full((batch, 3, 224, 224), 0.1, dtype=np.float32)
        for _ in range(2):
            sess.run(None, {name: x})
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            sess.run(None, {name: x})
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    b1 = timed(1, a.reps)
    b16 = timed(16, max(a.reps // 3, 3))
    print(json.dumps({"engine": "python-ort " + ort.__version__, "threads": a.threads,
                      "batch1_ms_per_image": b1 * 1e3, "batch16_images_per_s": 16 / b16}))


if __name__ == "__main__":
    main()
