"""A tiny ModifiedResNet CLIP in open_clip (PyPI open-clip-torch, the independent reference for the
ResNet tower), random weights and random batch-norm statistics, saved as open_clip saves its
weights (`open_clip_model.safetensors`), with the embeddings open_clip computes in eval mode.

Writes fixtures/openclip-rn/; run with the export-tools venv plus open_clip:
    ~/.cache/xray-clip/py-export/bin/pip install --no-deps open-clip-torch torchvision==0.26.0 ftfy wcwidth
    ~/.cache/xray-clip/py-export/bin/python scripts/make_resnet_fixtures.py
"""
import json
import pathlib

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

out = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "openclip-rn"
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
# RN50's shape at a toy size: stem width 8, one block per stage, 64 px; text width 16 (one head,
# as OpenAI's max(1, width // 64)), two layers; QuickGELU as OpenAI's models. Weights are rounded
# to fp16 and stored so (a small file); the embeddings are computed in fp32 from those values.
model = CLIP(
    embed_dim=16,
    vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=64),
    text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=16, heads=1, layers=2),
    quick_gelu=True,
)
with torch.no_grad():
    for name, t in model.state_dict().items():
        if t.dtype != torch.float32:
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand_like(t) * 1.5 + 0.25)
        elif name.endswith("logit_scale"):
            t.fill_(np.log(1 / 0.07))
        elif "attn_mask" in name:
            continue
        else:
            t.copy_(torch.randn_like(t) * (0.5 if name.endswith(("running_mean", "bias")) else 0.2))
        if t.dtype == torch.float32 and "attn_mask" not in name:
            t.copy_(t.half().float())
model.eval()
state = {
    k: (v.half() if v.dtype == torch.float32 else v).contiguous()
    for k, v in model.state_dict().items()
}
save_file(state, str(out / "open_clip_model.safetensors"))

pixels = torch.randn(3, 3, 64, 64)
prompts = ["a X-Ray image of Chest part", "hand", "a X-Ray image of Lumbar Spine part"]
ids = open_clip.tokenize(prompts)  # [3, 77], open_clip's own BPE
with torch.no_grad():
    image = model.encode_image(pixels)
    text = model.encode_text(ids)
np.save(out / "pixels.npy", pixels.numpy().astype(np.float32))
np.save(out / "input_ids.npy", ids.numpy().astype(np.float32))
np.save(out / "image_embeds.npy", image.numpy().astype(np.float32))
np.save(out / "text_embeds.npy", text.numpy().astype(np.float32))
(out / "reference.json").write_text(json.dumps({
    "open_clip": open_clip.__version__, "torch": torch.__version__, "prompts": prompts,
    "tensors": sorted(state), "logit_scale": float(model.logit_scale.detach().exp()),
}, indent=1) + "\n")
print(out, sum(v.numel() for v in state.values()), "values")
