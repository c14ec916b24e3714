#!/usr/bin/env python3
"""The strongest Python export of a CLIP image encoder, for scripts/bench_export.sh to race against
the trainer's own export: HF transformers' CLIPModel -> torch.onnx (TorchScript exporter, opset 17,
dynamic batch) -> ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer`, model
types `vit` and `clip`: fused attention, LayerNorm, GELU, bias adds).

The exported graph returns L2-normalised image embeddings, as the trainer's `image_encoder.onnx`
does, so the two files compute the same function of the same weights; the script checks that on a
random batch (cosine of the outputs) and prints one JSON object with the files it wrote.

usage: hf_export_optimized.py HF_CHECKPOINT_DIR OUT_DIR [--reference TRAINER_IMAGE_ENCODER.onnx]
"""
import argparse
import json
import pathlib

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.transformers import optimizer
from transformers import CLIPModel


class ImageEmbedding(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        e = self.clip.get_image_features(pixel_values=pixel_values)
        return e / e.norm(dim=-1, keepdim=True)


def run(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def unit(e):
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def op_counts(path):
    import onnx

    kinds = {}
    for n in onnx.load(str(path)).graph.node:
        kinds[n.op_type] = kinds.get(n.op_type, 0) + 1
    return dict(sorted(kinds.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--reference")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = CLIPModel.from_pretrained(a.checkpoint, attn_implementation="eager").eval()
    vc = clip.config.vision_config
    model = ImageEmbedding(clip).eval()
    size = vc.image_size
    raw = out / "hf_torch_onnx.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(raw), input_names=["pixel_values"],
                          output_names=["image_embeds"], opset_version=17, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
    files = {"hf_torch_onnx": str(raw)}
    fused = {}
    for kind in ("vit", "clip"):
        path = out / f"hf_ort_optimized_{kind}.onnx"
        opt = optimizer.optimize_model(str(raw), model_type=kind, num_heads=vc.num_attention_heads,
                                       hidden_size=vc.hidden_size, opt_level=0, use_gpu=False)
        # opt_level 0: the Python fusions only; ONNX Runtime applies its own graph optimisations
        # when the session loads, as it does for the trainer's file (no hardware-specific file).
        opt.save_model_to_file(str(path))
        files[f"hf_ort_optimized_{kind}"] = str(path)
        fused[f"hf_ort_optimized_{kind}"] = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    x = np.random.default_rng(0).normal(0, 1, (4, 3, size, size)).astype(np.float32)
    ref = unit(run(a.reference, x)) if a.reference else None
    report = {"files": files, "fused": fused, "ops": {}, "max_abs_vs_torch": {}, "min_cosine_vs_trainer_export": {},
              "max_abs_vs_trainer_export": {}}
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for name, path in files.items():
        got = run(path, x)
        report["ops"][name] = op_counts(path)
        report["max_abs_vs_torch"][name] = float(np.abs(got - expected).max())
        if ref is not None:
            report["min_cosine_vs_trainer_export"][name] = float((unit(got) * ref).sum(-1).min())
            report["max_abs_vs_trainer_export"][name] = float(np.abs(unit(got) - ref).max())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
