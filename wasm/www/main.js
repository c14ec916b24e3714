// The demo page: the wasm module (decoding, preprocessing, manifest checks, scoring) and ONNX Runtime
// Web (the image encoder). Everything is served from this project: no third-party hosts.
import init, { prepare, probabilities, DemoBundle, Prompts } from "../pkg/wasm.js";
import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";

ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;
ort.env.wasm.numThreads = 1; // no cross-origin isolation on a plain static server

const $ = (id) => document.getElementById(id);
const state = {
  bundle: null, session: null, manifestText: "", labels: [], encoder: null, read: null,
  custom: null, // { labels, embeddings } when custom labels are in use
  text: null,   // { session, encoder, tokenizer } once loaded
  shown: null,  // the file on display, scored again when the labels change
};
window.xrayClip = { ready: false, last: null, error: null };

function showError(message) {
  $("error").textContent = message;
  window.xrayClip.error = message;
}

async function loadBundle(read) {
  const manifestText = new TextDecoder().decode(await read("manifest.json"));
  const manifest = JSON.parse(manifestText);
  const emb = await read(manifest.files.label_embeddings.path);
  const bundle = new DemoBundle(manifestText, emb);
  const centroids = bundle.class_centroids_file();
  if (centroids) bundle.set_class_centroids(await read(centroids));
  const encoder = JSON.parse(bundle.image_encoder());
  const onnx = await read(encoder.path);
  bundle.verify("image_encoder", onnx);
  const session = await ort.InferenceSession.create(onnx, { executionProviders: ["wasm"] });
  await selfCheck(bundle, session, encoder, read);
  Object.assign(state, { bundle, session, manifestText, encoder, read, labels: JSON.parse(bundle.labels()), custom: null, text: null });
  $("bundle").textContent = bundle.name;
  showLabels();
  $("custom").hidden = !bundle.has_text_encoder();
}

// The bundle's fixed inputs through ONNX Runtime Web must give the embeddings recorded when it was
// written (the same comparison as `runtime serve` and `runtime info --check`); a bundle that does
// not is refused before it scores anything.
async function selfCheck(bundle, session, encoder, read) {
  window.xrayClip.selfCheck = null;
  $("selfcheck").textContent = "";
  const file = bundle.self_check_file();
  if (!file) {
    $("selfcheck").textContent = "no self-check in this bundle";
    return;
  }
  const inputs = bundle.self_check_inputs();
  const s = bundle.image_size;
  const count = inputs.length / (3 * s * s);
  const input = new ort.Tensor("float32", inputs, [count, 3, s, s]);
  const out = await session.run({ [encoder.input ?? session.inputNames[0]]: input });
  const emb = out[encoder.output ?? session.outputNames[0]].data;
  const difference = bundle.self_check(await read(file), emb); // throws when not reproduced
  window.xrayClip.selfCheck = { passed: true, difference };
  $("selfcheck").textContent = `self-check passed (largest difference ${difference.toExponential(1)})`;
}

function currentLabels() {
  return state.custom ? state.custom.labels : state.labels;
}

function showLabels() {
  $("labels").textContent = `(${currentLabels().join(", ")})`;
}

// Custom labels: the bundle's tokenizer (in wasm) and text encoder (ONNX Runtime Web), templates
// averaged as native `classify --labels`.
async function useCustomLabels(text) {
  if (!state.text) {
    const info = JSON.parse(state.bundle.text_encoder());
    const onnx = await state.read(info.path);
    state.bundle.verify("text_encoder", onnx);
    const tokenizer = await state.read(info.tokenizer);
    state.bundle.verify("tokenizer", tokenizer);
    const session = await ort.InferenceSession.create(onnx, { executionProviders: ["wasm"] });
    state.text = { session, info, tokenizer };
  }
  const prompts = new Prompts(state.text.tokenizer, text, state.bundle.templates());
  const ids = new ort.Tensor("int64", prompts.ids(), [prompts.rows, prompts.len]);
  const out = await state.text.session.run({ [state.text.info.input ?? state.text.session.inputNames[0]]: ids });
  const emb = out[state.text.info.output ?? state.text.session.outputNames[0]].data;
  state.custom = { labels: JSON.parse(prompts.labels()), embeddings: prompts.label_embeddings(emb) };
  showLabels();
}

async function classify(file) {
  state.shown = file;
  showError("");
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    const t0 = performance.now();
    const p = prepare(bytes, file.name, state.manifestText);
    const s = state.bundle.image_size;
    const input = new ort.Tensor("float32", p.tensor(), [1, 3, s, s]);
    const feeds = { [state.encoder.input ?? state.session.inputNames[0]]: input };
    const out = await state.session.run(feeds);
    const emb = out[state.encoder.output ?? state.session.outputNames[0]].data;
    const probs = Array.from(state.custom
      ? probabilities(emb, state.custom.embeddings, state.bundle.logit_scale)
      : state.bundle.classify(emb));
    // A calibrated bundle's "unknown" rule, on its own labels (as native classify).
    const verdict = state.custom ? null : JSON.parse(state.bundle.judge(emb, probs) || "null");
    const ms = performance.now() - t0;
    drawPreview(p);
    drawBars(probs);
    $("verdict").textContent = verdict?.unknown
      ? `unknown: ${verdict.rule} ${verdict.score.toFixed(4)} is below the bundle's threshold ${verdict.below.toFixed(4)} (the scores below are the labels it is least unlike)`
      : "";
    $("latency").textContent = `${ms.toFixed(1)} ms (decode, preprocess, encode, score)`;
    const order = probs.map((v, i) => i).sort((a, b) => probs[b] - probs[a]);
    const labels = currentLabels();
    window.xrayClip.last = {
      file: file.name, labels, probabilities: probs, top1: labels[order[0]], ms,
      unknown: verdict?.unknown ?? null, rejectScore: verdict?.score ?? null,
    };
    window.xrayClip.error = null;
  } catch (e) {
    window.xrayClip.last = null;
    showError(`${file.name}: ${e.message ?? e}`);
  }
}

function drawPreview(p) {
  const canvas = $("preview");
  canvas.width = p.width;
  canvas.height = p.height;
  canvas.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(p.rgba()), p.width, p.height), 0, 0);
}

function drawBars(probs) {
  const order = probs.map((v, i) => i).sort((a, b) => probs[b] - probs[a]).slice(0, 5);
  $("bars").innerHTML = "";
  for (const i of order) {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = `<span class="name"></span><div class="fill"></div><span class="p"></span>`;
    row.querySelector(".name").textContent = currentLabels()[i];
    row.querySelector(".fill").style.width = `${Math.max(1, probs[i] * 300)}px`;
    row.querySelector(".p").textContent = probs[i].toFixed(4);
    $("bars").appendChild(row);
  }
}

// The image on display is scored again whenever its labels change.
async function rescore() {
  if (state.shown) await classify(state.shown);
}

$("custom-apply").addEventListener("click", async () => {
  showError("");
  try {
    await useCustomLabels($("custom-labels").value);
    await rescore();
    window.xrayClip.customReady = true;
  } catch (e) {
    showError(`custom labels: ${e.message ?? e}`);
  }
});
$("custom-reset").addEventListener("click", async () => { state.custom = null; showLabels(); await rescore(); });
$("file").addEventListener("change", (e) => e.target.files[0] && classify(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]);
});
$("bundle-input").addEventListener("change", async (e) => {
  const files = new Map(Array.from(e.target.files).map((f) => [f.webkitRelativePath.split("/").slice(1).join("/"), f]));
  try {
    await loadBundle(async (name) => {
      const f = files.get(name);
      if (!f) throw new Error(`the folder has no ${name}`);
      return new Uint8Array(await f.arrayBuffer());
    });
    showError("");
    await rescore();
  } catch (err) {
    showError(`bundle: ${err.message ?? err}`);
  }
});

try {
  await init();
  // ?bundle=PATH (relative to the page) serves another bundle folder of the project, e.g. for benchmarks.
  const base = new URLSearchParams(location.search).get("bundle") ?? "../../models/default/";
  await loadBundle(async (name) => {
    const r = await fetch(new URL(`${base.replace(/\/?$/, "/")}${name}`, location.href));
    if (!r.ok) throw new Error(`${name}: HTTP ${r.status}`);
    return new Uint8Array(await r.arrayBuffer());
  });
  window.xrayClip.ready = true;
} catch (e) {
  showError(`could not load the default bundle: ${e.message ?? e}`);
}
