#!/usr/bin/env python3
"""Golden fixtures from code no one in this project wrote.

Writes, under fixtures/ (committed; small):
  ../models/tokenizer/tokenizer.json   HF `tokenizers` file built from OpenAI's BPE merges (the openai-clip package)
  tokens.json                OpenAI's token ids (openai-clip's simple_tokenizer) for 200+ strings
  images/*.png|jpg           generated test images (seeded)
  preprocess/*.npy           transformers' CLIPImageProcessorPil output for each image
  preprocess_whole/*.npy     the same with size {height: 128, width: 128} and no centre crop
  tiny/                      a tiny random HF CLIPModel exported by torch.onnx (vision + text),
                             its config, and reference image/text embeddings and logit scale

With --full DIR: a full-size ViT-B/32 image encoder (random weights, HF default config) exported by
torch.onnx into DIR (about 350 MB, for the benchmarks; not committed).

Run with the tools venv of scripts/setup.sh --dev:  ~/.cache/xray-clip/py/bin/python scripts/make_fixtures.py
"""
import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"

UNIFESP = ["Abdomen", "Ankle", "Cervical Spine", "Chest", "Clavicles", "Elbow", "Feet", "Finger", "Forearm",
           "Hand", "Hip", "Knee", "Lower Leg", "Lumbar Spine", "Others", "Pelvis", "Shoulder", "Sinus", "Skull",
           "Thigh", "Thoracic Spine", "Wrist"]
IRMA15 = ["whole body", "cranium", "spine", "upper extremity/arm", "chest", "breast", "abdomen", "pelvis",
          "lower extremity", "chest/bones", "chest/lung", "chest/hilum", "chest/mediastinum", "chest/heart",
          "chest/diaphragm"]
TEMPLATES = ["a X-Ray image of {} part", "This is a X-ray image of {} part.", "a X-ray of a {}",
             "a X-ray image of {} of human", "a image of {}"]
EXTRA = [
    "", " ", "chest", "CHEST X-RAY", "  many   spaces\tand\nnewlines  ", "hello, world!", "what's this? it's a knee.",
    "don't, can't, we'll, they're, I've, I'm, he'd", "x-ray #123: 45.6% (p<0.05)", "3 views; 2 of them AP/PA",
    "1234567890", "L5-S1", "C7", "T12/L1 junction", "right hand, 2nd finger", "e-mail@example.com", "a_b-c.d/e\\f",
    "!!!???...", "«quoted» — dashes – and “curly” quotes", "Röntgenbild des Thorax", "radiografía de tórax",
    "radiographie du genou", "Ærøskøbing", "naïve café résumé", "東京の胸部X線", "рентген грудной клетки",
    "ακτινογραφία", "emoji 🦴🩻 x-ray", "👍", "tab\tseparated", "mixed CASE WoRdS", "a" * 100,
    " ".join(["word"] * 100), "supercalifragilisticexpialidocious " * 10, "1/2 3/4 5/6", "$100 & 50€", "C++ #include <x>",
    "ñ ç ü ö ä ß", "the end.<|endoftext|>", "Ǆ ǅ ǆ ﬁ ligature", "x" * 300, "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３",
    "fish &amp; chips &lt;3 &#65;&#x42;", "‘single’ and „low“ quotes", "line\r\nbreak\u2028sep", "zero\u200bwidth",
    "ctrl\x01char\x7f", "ﬁnal ﬂoor ﬀ", "Ĳssel", "naı̈ve (combining)", "e\u0301 vs é",
]


def texts():
    out = [t.format(label) for t in TEMPLATES for label in UNIFESP + IRMA15]
    return out + EXTRA


def openai_simple_tokenizer():
    """OpenAI's own tokenizer module from the `openai-clip` package, loaded without the package's
    __init__ (which needs torchvision)."""
    import importlib.util
    spec = importlib.util.find_spec("clip")
    path = Path(spec.submodule_search_locations[0]) / "simple_tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


def openai_tokenize(st, text, context_length=77):
    """clip.tokenize(text, truncate=True) without torch: start, BPE, end; truncated keeping the end."""
    sot, eot = st.encoder["<|startoftext|>"], st.encoder["<|endoftext|>"]
    ids = [sot] + st.encode(text) + [eot]
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = eot
    return ids


def build_tokenizer(out_dir: Path):
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    st = openai_simple_tokenizer()
    vocab = dict(st.encoder)
    merges = [tuple(pair) for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    # OpenAI's reference ids (clip.tokenize keeps the end token on truncation and pads with 0).
    rows = [{"text": t, "ids": openai_tokenize(st, t)} for t in texts()]
    (FIX / "tokens.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0))
    print(f"tokenizer + {len(rows)} token rows")


def make_images(out_dir: Path):
    rng = np.random.default_rng(7)
    out_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:217, 0:300]
    g = (np.sin(xx / 9.0) * 60 + yy * 0.5 + rng.normal(0, 12, yy.shape) + 80).clip(0, 255).astype(np.uint8)
    Image.fromarray(g, "L").save(out_dir / "gray_300x217.png")
    yy, xx = np.mgrid[0:480, 0:640]
    rgb = np.stack([(xx * 255 // 640), (yy * 255 // 480), ((xx + yy) % 256)], -1).astype(np.float64)
    rgb += rng.normal(0, 20, rgb.shape)
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(out_dir / "rgb_640x480.jpg", quality=90)
    # PIL's own decoding of that JPEG, stored losslessly: separates decoder differences from preprocessing.
    Image.open(out_dir / "rgb_640x480.jpg").convert("RGB").save(out_dir / "rgb_640x480_pil.png")
    small = (rng.random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(small, "L").save(out_dir / "small_64x64.png")
    yy, xx = np.mgrid[0:400, 0:150]
    g16 = ((xx * 400 + yy * 97) % 65536).astype(np.uint16)
    Image.fromarray(g16).save(out_dir / "gray16_150x400.png")
    # Tall enough that Pillow (13+) resizes it vertical pass first (height shrinks > 2x the width's pixels).
    yy, xx = np.mgrid[0:700, 0:260]
    tall = (np.cos(yy / 13.0) * 70 + xx * 0.3 + np.random.default_rng(11).normal(0, 15, yy.shape) + 90)
    Image.fromarray(tall.clip(0, 255).astype(np.uint8), "L").save(out_dir / "tall_260x700.png")
    print("images written")


def load_as_8bit(path: Path) -> Image.Image:
    """The project's documented input rule: 16-bit samples -> round(v / 257)."""
    im = Image.open(path)
    if im.mode in ("I;16", "I;16B", "I"):
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8), "L")
    return im


def preprocess_refs(img_dir: Path, out_dir: Path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil()
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(img_dir.iterdir()):
        px = proc(images=load_as_8bit(p), return_tensors="np")["pixel_values"].astype(np.float32)
        np.save(out_dir / (p.stem + ".npy"), np.ascontiguousarray(px))
    print("preprocess references written")


def preprocess_whole_refs(img_dir: Path, out_dir: Path, side: int = 128):
    """The same without the centre crop: the whole image resized to side x side (`crop: none`)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(img_dir.iterdir()):
        px = proc(images=load_as_8bit(p), return_tensors="np")["pixel_values"].astype(np.float32)
        assert px.shape == (1, 3, side, side), px.shape
        np.save(out_dir / (p.stem + ".npy"), np.ascontiguousarray(px))
    print("whole-image preprocess references written")


def tiny_model(out_dir: Path, img_dir: Path):
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)
    # The same weights in HF's layout, for the trainer's import and parity tests.
    model.save_pretrained(out_dir / "hf", safe_serialization=True)

    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m.get_image_features(pixel_values=pixel_values).pooler_output

    class Text(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m.get_text_features(input_ids=input_ids).pooler_output

    export_vision(Vision(model), out_dir / "image_encoder.onnx", 224)
    ids = torch.tensor([[49406, 320, 49407, 0, 0]], dtype=torch.long)
    torch.onnx.export(Text(model), (ids,), str(out_dir / "text_encoder.onnx"), input_names=["input_ids"],
                      output_names=["text_embeds"], dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                                                  "text_embeds": {0: "batch"}},
                      opset_version=17, dynamo=False)

    proc = CLIPImageProcessorPil()
    names = sorted(p.name for p in img_dir.iterdir())
    px = np.concatenate([proc(images=load_as_8bit(img_dir / n), return_tensors="np")["pixel_values"] for n in names])
    st = openai_simple_tokenizer()

    def tokenize(texts):
        return torch.tensor([ids + [0] * (77 - len(ids)) for ids in (openai_tokenize(st, t) for t in texts)])

    prompts = [t.format(l) for t in TEMPLATES[:2] for l in ["Chest", "Hand", "Knee", "Skull"]]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(px).float()).pooler_output.numpy()
        txt = model.get_text_features(input_ids=tokenize(prompts)).pooler_output.numpy()
        scale = float(model.logit_scale.exp())
        out = model(input_ids=tokenize(prompts), pixel_values=torch.from_numpy(px).float())
    np.save(out_dir / "image_embeds.npy", np.ascontiguousarray(img, dtype=np.float32))
    np.save(out_dir / "text_embeds.npy", np.ascontiguousarray(txt, dtype=np.float32))
    np.save(out_dir / "logits_per_image.npy", np.ascontiguousarray(out.logits_per_image.numpy().astype(np.float32)))
    (out_dir / "reference.json").write_text(json.dumps({"images": names, "prompts": prompts, "logit_scale": scale},
                                                       indent=1))
    print(f"tiny model: logit scale {scale}")


def openai_torchscript(out_dir: Path, img_dir: Path):
    """A tiny model built with OpenAI's own model code (PyPI openai-clip), scripted and saved as OpenAI's
    released .pt archives are, with its outputs on the fixture images and prompts."""
    import importlib.util
    import torch
    spec = importlib.util.find_spec("clip")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    mod_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    torch.manual_seed(1)
    # Widths of 64 give one head each, as OpenAI's build_model infers (width // 64).
    model = mod.CLIP(embed_dim=16, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=32,
                     context_length=77, vocab_size=1000, transformer_width=64, transformer_heads=1,
                     transformer_layers=2).eval()
    with torch.no_grad():  # random, not zero, projections and class token
        model.visual.proj.normal_(0, 0.1)
        model.text_projection.normal_(0, 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    proc = CLIPImageProcessorPil()
    names = sorted(p.name for p in img_dir.iterdir())
    px = np.concatenate([proc(images=load_as_8bit(img_dir / n), return_tensors="np")["pixel_values"] for n in names])
    ids = torch.zeros(3, 77, dtype=torch.long)
    for r, row in enumerate([[999, 5, 6, 7, 998], [999, 42, 998], [999, 1, 2, 3, 4, 5, 6, 998]]):
        ids[r, :len(row)] = torch.tensor(row)
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(px).float()).numpy()
        txt = model.encode_text(ids).numpy()
        # OpenAI's released archives are traced TorchScript of CLIP.forward(image, text).
        traced = torch.jit.trace(model, (torch.from_numpy(px[:1]).float(), ids[:1]))
    traced.save(str(out_dir / "openai_tiny.pt"))
    np.save(out_dir / "openai_image_embeds.npy", np.ascontiguousarray(img, dtype=np.float32))
    np.save(out_dir / "openai_text_embeds.npy", np.ascontiguousarray(txt, dtype=np.float32))
    (out_dir / "openai_reference.json").write_text(json.dumps({"images": names, "ids": ids.tolist()}))
    print("OpenAI TorchScript tiny model written")


def adam_reference(out_dir: Path):
    """torch.optim.Adam with the reference settings on a small tensor and fixed gradients."""
    import torch
    torch.manual_seed(2)
    p = torch.randn(64, dtype=torch.float64)
    grads = torch.randn(5, 64, dtype=torch.float64)
    param = torch.nn.Parameter(p.clone())
    opt = torch.optim.Adam([param], lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.001)
    after = []
    for g in grads:
        opt.zero_grad()
        (param * g).sum().backward()
        opt.step()
        after.append(param.detach().clone())
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "adam_initial.npy", p.numpy().astype(np.float32))
    np.save(out_dir / "adam_grads.npy", grads.numpy().astype(np.float32))
    np.save(out_dir / "adam_after.npy", torch.stack(after).numpy().astype(np.float32))
    print("Adam reference written")


def sklearn_metrics(out_dir: Path):
    """One confusion matrix and per-class figures computed by scikit-learn, for runtime's metrics."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 5, 60)
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 5, 60))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(5)), zero_division=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sklearn.json").write_text(json.dumps({
        "y_true": y_true.tolist(), "y_pred": y_pred.tolist(),
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(5))).tolist(),
        "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": s.tolist(),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float((y_true == y_pred).mean()),
    }))
    print("scikit-learn metrics written")


def export_vision(module, path: Path, size: int):
    import torch
    x = torch.zeros(1, 3, size, size)
    torch.onnx.export(module, (x,), str(path), input_names=["pixel_values"], output_names=["image_embeds"],
                      dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, opset_version=17,
                      dynamo=False)


def full_vit_b32(out_dir: Path):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).eval()  # HF defaults = ViT-B/32 geometry

    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m.get_image_features(pixel_values=pixel_values).pooler_output

    out_dir.mkdir(parents=True, exist_ok=True)
    export_vision(Vision(model), out_dir / "vit_b32_image_encoder.onnx", 224)
    # The same weights in HF layout with reference outputs, for the trainer's full-size parity check
    # (cargo test -p trainer --test parity -- --ignored).
    hf = out_dir / "vit-b32-hf"
    model.save_pretrained(hf, safe_serialization=True)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    proc = CLIPImageProcessorPil()
    names = sorted(p.name for p in (FIX / "images").iterdir())
    px = np.concatenate([proc(images=load_as_8bit(FIX / "images" / n), return_tensors="np")["pixel_values"] for n in names])
    st = openai_simple_tokenizer()
    prompts = [t.format(l) for t in TEMPLATES[:2] for l in ["Chest", "Hand", "Knee", "Skull"]]
    ids = torch.tensor([ids + [0] * (77 - len(ids)) for ids in (openai_tokenize(st, t) for t in prompts)])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.from_numpy(px).float())
    np.save(hf / "image_embeds.npy", np.ascontiguousarray(out.image_embeds.numpy(), dtype=np.float32))
    np.save(hf / "text_embeds.npy", np.ascontiguousarray(out.text_embeds.numpy(), dtype=np.float32))
    np.save(hf / "logits_per_image.npy", np.ascontiguousarray(out.logits_per_image.numpy(), dtype=np.float32))
    (hf / "reference.json").write_text(json.dumps({"images": names, "prompts": prompts}))
    print(f"full ViT-B/32 image encoder and HF weights written to {out_dir}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", type=Path, help="also export a full-size ViT-B/32 image encoder into this folder")
    ap.add_argument("--only-full", action="store_true")
    a = ap.parse_args()
    if not a.only_full:
        build_tokenizer(ROOT / "models" / "tokenizer")
        make_images(FIX / "images")
        preprocess_refs(FIX / "images", FIX / "preprocess")
        preprocess_whole_refs(FIX / "images", FIX / "preprocess_whole")
        tiny_model(FIX / "tiny", FIX / "images")
        openai_torchscript(FIX / "openai", FIX / "images")
        adam_reference(FIX / "adam")
        sklearn_metrics(FIX / "metrics")
    if a.full:
        full_vit_b32(a.full)


if __name__ == "__main__":
    main()
