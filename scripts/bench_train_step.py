#!/usr/bin/env python3
"""The trainer's fine-tuning step in PyTorch eager (HF transformers CLIPModel, torch.optim.Adam with the
reference settings), same configuration, batch, inputs and thread count as trainer/benches/train_step.rs.

usage: bench_train_step.py [--config vit-b-32|tiny|small] [--threads 2] [--steps 5] [--device cpu|cuda] [--amp]
Prints one JSON object.
"""
import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

PRESETS = {
    "vit-b-32": {},
    "tiny": dict(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 projection_dim=16),
    "small": dict(text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2),
                  vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3),
                  projection_dim=128),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="vit-b-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    p = PRESETS[a.config]
    cfg = CLIPConfig(text_config=dict(hidden_act="quick_gelu", **p.get("text_config", {})),
                     vision_config=dict(hidden_act="quick_gelu", **p.get("vision_config", {})),
                     **{k: v for k, v in p.items() if k not in ("text_config", "vision_config")})
    cfg._attn_implementation = "sdpa"
    dev = torch.device(a.device)
    model = CLIPModel(cfg).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.001)
    scaler = torch.amp.GradScaler(enabled=a.amp)
    pixels = torch.randn(a.batch, 3, 224, 224, device=dev)
    ids = torch.zeros(a.batch, 16, dtype=torch.long)
    for r in range(a.batch):
        n = 9 + r % 4
        ids[r, 0] = 49406
        for j in range(n - 1):
            ids[r, 1 + j] = 320 + (r * 31 + j * 7) % 20000
        ids[r, n] = 49407
    ids = ids.to(dev)
    targets = torch.arange(a.batch, device=dev)
    times = []
    for step in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type=dev.type, enabled=a.amp):
            out = model(input_ids=ids, pixel_values=pixels)
            logits = out.logits_per_image.float()
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    res = {"engine": "pytorch-eager " + torch.__version__, "config": a.config, "device": a.device, "amp": a.amp,
           "threads": a.threads, "batch": a.batch, "ms_per_step": med * 1e3, "images_per_s": a.batch / med,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": float(loss)}
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


if __name__ == "__main__":
    main()
