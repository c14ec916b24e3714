"""Fixtures for `runtime import`: one tiny random CLIP exported the ways users have CLIP as ONNX.

    ~/.cache/xray-clip/py-export/bin/python scripts/make_import_fixtures.py fixtures/import

(the venv comes from `scripts/setup.sh --export-tools`: torch, transformers 4.57, optimum + optimum-onnx,
onnxruntime). Writes, for one random-weight model with non-default preprocessing (112 px) and logit scale
(exp = 50):

- `optimum/`: `optimum.exporters.onnx.main_export(task="zero-shot-image-classification")`: one model.onnx
  with both towers, tokenizer and preprocessor_config.json beside it;
- `torch-onnx/`: HF `CLIPVisionModelWithProjection` / `CLIPTextModelWithProjection` through `torch.onnx`,
  the text encoder with `input_ids` and `attention_mask`;
- `transformers-js/`: the transformers.js layout (onnx/vision_model.onnx, onnx/text_model.onnx and their
  `_quantized` versions made by onnxruntime's `quantize_dynamic`, as its conversion script does;
  tokenizer.json, preprocessor_config.json, config.json at the top);
- `reference.json`: the exporting framework's own outputs (HF `CLIPModel` in torch, fp32; its embeddings are L2-normalised) for the
  fixture images and prompts: what the imported bundles must reproduce.
"""

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["gray_300x217.png", "small_64x64.png"]
PROMPTS = ["a X-Ray image of chest part", "a X-Ray image of hand part", "knee"]


def main(out: Path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=112, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=8,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    tok = CLIPTokenizerFast(tokenizer_file=str(ROOT / "models/tokenizer/tokenizer.json"),
                            bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    proc = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        proc.save_pretrained(hf)

        # 1. optimum: the one-file export of CLIPModel.
        from optimum.exporters.onnx import main_export
        main_export(str(hf), output=str(out / "optimum"), task="zero-shot-image-classification", opset=17,
                    device="cpu", no_post_process=True)
        for extra in ["vocab.json", "merges.txt", "special_tokens_map.json"]:
            (out / "optimum" / extra).unlink(missing_ok=True)

    # The two towers with their projections, as CLIPVisionModelWithProjection / CLIPTextModelWithProjection.
    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m.get_image_features(pixel_values=pixel_values)

    class Text(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m.get_text_features(input_ids=input_ids, attention_mask=attention_mask)

    vision, text = model, model

    x = torch.zeros(1, 3, 112, 112)
    enc = tok(["a X-ray of a chest", "knee"], padding=True, return_tensors="pt")

    def export_pair(vision_path: Path, text_path: Path):
        vision_path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(Vision(vision), (x,), str(vision_path), input_names=["pixel_values"],
                          output_names=["image_embeds"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
                          opset_version=17, dynamo=False)
        torch.onnx.export(Text(text), (enc["input_ids"], enc["attention_mask"]), str(text_path),
                          input_names=["input_ids", "attention_mask"], output_names=["text_embeds"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "text_embeds": {0: "batch"}},
                          opset_version=17, dynamo=False)

    # 2. torch.onnx, the two encoders of a user's own script.
    export_pair(out / "torch-onnx/vision_model.onnx", out / "torch-onnx/text_model.onnx")
    tok.backend_tokenizer.save(str(out / "torch-onnx/tokenizer.json"))
    proc.to_json_file(str(out / "torch-onnx/preprocessor_config.json"))

    # 3. transformers.js: onnx/ + quantized copies, tokenizer and configs at the top.
    js = out / "transformers-js"
    export_pair(js / "onnx/vision_model.onnx", js / "onnx/text_model.onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    for name in ["vision_model", "text_model"]:
        quantize_dynamic(str(js / f"onnx/{name}.onnx"), str(js / f"onnx/{name}_quantized.onnx"),
                         weight_type=QuantType.QUInt8)
    tok.backend_tokenizer.save(str(js / "tokenizer.json"))
    proc.to_json_file(str(js / "preprocessor_config.json"))
    cfg.to_json_file(str(js / "config.json"))

    # 4. What the framework itself computes.
    pixel = np.concatenate([proc(images=Image.open(ROOT / "fixtures/images" / n).convert("RGB"),
                                 return_tensors="np")["pixel_values"] for n in IMAGES])
    ids = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out_model = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                          pixel_values=torch.from_numpy(pixel))
    reference = {
        "images": IMAGES,
        "prompts": PROMPTS,
        "image_size": 112,
        "logit_scale": float(model.logit_scale.exp()),
        "image_embeds": out_model.image_embeds.tolist(),
        "text_embeds": out_model.text_embeds.tolist(),
        "input_ids": [[int(t) for t, m in zip(row, mask) if m] for row, mask in
                      zip(ids["input_ids"].tolist(), ids["attention_mask"].tolist())],
    }
    # Every tokenizer.json written above is OpenAI's vocabulary as models/tokenizer/tokenizer.json (the
    # backend copies add a padding setting): 3.6 MB each, so they are not kept; tests put that file back.
    for t in out.rglob("tokenizer*.json"):
        a, b = json.loads(t.read_text()), json.loads((ROOT / "models/tokenizer/tokenizer.json").read_text())
        if t.name == "tokenizer.json":
            a.pop("padding", None), b.pop("padding", None)
            assert a == b, f"{t}: not OpenAI's vocabulary"
        t.unlink()
    reference["tokenizer"] = "models/tokenizer/tokenizer.json (removed from each layout; tests copy it back)"
    (out / "reference.json").write_text(json.dumps(reference, indent=1))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>10}  {p.relative_to(out)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "fixtures/import"))
