// End-to-end test of the demo page in headless Chromium (Debian's chromium, driven by playwright-core):
// the page classifies real files as the native `classify` does (same top-1, probabilities within 1e-3),
// a bad file gives a visible error without killing the page, and a calibrated bundle's "unknown"
// verdict is native classify's.
//
//   node --test wasm/www/demo.test.mjs     (after scripts/build_wasm.sh; CLASSIFY=path/to/classify)
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import fs, { mkdtempSync, writeFileSync, readdirSync } from "node:fs";
import crypto from "node:crypto";
import { tmpdir, homedir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const classifyBin = process.env.CLASSIFY ?? path.join(root, "target/debug/classify");
const runtimeBin = path.join(path.dirname(classifyBin), "runtime");
const cache = process.env.XRAY_CLIP_CACHE ?? path.join(homedir(), ".cache/xray-clip");
const lib = path.join(cache, "testpy/lib");
const py = readdirSync(lib).find((d) => d.startsWith("python3"));
const dicom = path.join(lib, py, "site-packages/data_store/data/RG1_UNCI.dcm");
const png = path.join(root, "fixtures/images/gray_300x217.png");
const port = 8700 + (process.pid % 200);
let server, browser, page;

before(async () => {
  server = spawn("/usr/bin/python3", ["-m", "http.server", String(port), "--bind", "127.0.0.1", "--directory", root], {
    stdio: "ignore",
  });
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  page = await browser.newPage();
  for (let i = 0; ; i++) {
    try {
      await page.goto(`http://127.0.0.1:${port}/wasm/www/index.html`);
      break;
    } catch (e) {
      if (i > 50) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  await page.waitForFunction(() => window.xrayClip?.ready || window.xrayClip?.error, null, { timeout: 60000 });
  const error = await page.evaluate(() => window.xrayClip.error);
  assert.equal(error, null, `page failed to load: ${error}`);
});

after(async () => {
  await browser?.close();
  server?.kill();
});

function native(file) {
  const out = execFileSync(classifyBin, ["--device", "cpu", "--json", "-k", "100", file], { encoding: "utf8" });
  const line = JSON.parse(out.trim());
  return Object.fromEntries(line.top.map((t) => [t.label, t.probability]));
}

// Classifies a file on page `p` (the default bundle's page unless given): { last, error }.
async function inPage(file, p = page) {
  await p.evaluate(() => { window.xrayClip.last = null; window.xrayClip.error = null; });
  await p.setInputFiles("#file", file);
  await p.waitForFunction(() => window.xrayClip.last || window.xrayClip.error, null, { timeout: 60000 });
  return p.evaluate(() => ({ last: window.xrayClip.last, error: window.xrayClip.error }));
}

// A new page on the bundle folder target/NAME, loaded (or failed).
async function bundlePage(name) {
  const p = await browser.newPage();
  await p.goto(`http://127.0.0.1:${port}/wasm/www/index.html?bundle=../../target/${name}/`);
  await p.waitForFunction(() => window.xrayClip?.ready || window.xrayClip?.error, null, { timeout: 60000 });
  return p;
}

for (const [name, file] of [["real chest DICOM (pydicom-data RG1)", dicom], ["PNG fixture", png]]) {
  test(`page equals native classify: ${name}`, async () => {
    const { last, error } = await inPage(file);
    assert.equal(error, null);
    const expected = native(file);
    const best = Object.entries(expected).sort((a, b) => b[1] - a[1])[0][0];
    assert.equal(last.top1, best);
    let worst = 0;
    last.labels.forEach((label, i) => {
      worst = Math.max(worst, Math.abs(last.probabilities[i] - expected[label]));
    });
    assert.ok(worst <= 1e-3, `max probability difference ${worst}`);
    console.log(`${name}: top-1 ${last.top1}, max |diff| vs native ${worst.toExponential(2)}, ${last.ms.toFixed(1)} ms in the page`);
  });
}

test("the built-in bundle's self-check passes in the page", async () => {
  const check = await page.evaluate(() => window.xrayClip.selfCheck);
  assert.ok(check?.passed && check.difference <= 2e-3, JSON.stringify(check));
  console.log(`built-in bundle: self-check in the page, largest difference ${check.difference.toExponential(2)}`);
});

test("a bad file shows an error and the page keeps working", async () => {
  const dir = mkdtempSync(path.join(tmpdir(), "xray-clip-bad-"));
  const bad = path.join(dir, "not-an-image.png");
  writeFileSync(bad, "this is text, not a PNG\n");
  const { last, error } = await inPage(bad);
  assert.equal(last, null);
  assert.match(error, /not a PNG, JPEG or DICOM/);
  assert.ok(await page.isVisible("#error"));
  assert.match(await page.textContent("#error"), /not-an-image\.png/);
  const again = await inPage(png);
  assert.equal(again.error, null);
  assert.ok(again.last.top1);
});

test("custom labels through the bundle's text encoder equal native classify --labels", async () => {
  // A bundle with a text encoder (the tiny HF CLIP of the fixtures), inside the served folder.
  const bundle = path.join(root, "target/browser-test-bundle");
  execFileSync(runtimeBin, ["assemble", "--device", "cpu", "--labels", "unifesp", "--logit-scale", "100",
    "--template", "a X-ray of a {}", "--template", "a image of {}",
    "--image-encoder", path.join(root, "fixtures/tiny/image_encoder.onnx"),
    "--text-encoder", path.join(root, "fixtures/tiny/text_encoder.onnx"),
    "--tokenizer", path.join(root, "models/tokenizer/tokenizer.json"), "--out", bundle, "--force"]);
  const labels = "chest x-ray, hand x-ray, knee";
  const p = await bundlePage("browser-test-bundle");
  assert.ok(await p.isVisible("#custom"), "the custom-label box shows for a bundle with a text encoder");
  // An image is on display with the bundle's own labels ...
  await p.setInputFiles("#file", png);
  await p.waitForFunction(() => window.xrayClip.last || window.xrayClip.error, null, { timeout: 60000 });
  assert.equal((await p.evaluate(() => window.xrayClip.last)).labels.length, 22);
  // ... and applying custom labels scores that same image again, with no new file.
  await p.evaluate(() => { window.xrayClip.last = null; });
  await p.fill("#custom-labels", labels);
  await p.click("#custom-apply");
  await p.waitForFunction(() => window.xrayClip.customReady || window.xrayClip.error, null, { timeout: 60000 });
  await p.waitForFunction(() => window.xrayClip.last || window.xrayClip.error, null, { timeout: 60000 });
  const last = await p.evaluate(() => window.xrayClip.last);
  assert.deepEqual(last.labels, ["chest x-ray", "hand x-ray", "knee"]);
  const out = execFileSync(classifyBin, ["--device", "cpu", "--json", "-k", "3", "--model", bundle, "--labels", labels, png], { encoding: "utf8" });
  const expected = Object.fromEntries(JSON.parse(out.trim()).top.map((t) => [t.label, t.probability]));
  let worst = 0;
  last.labels.forEach((label, i) => { worst = Math.max(worst, Math.abs(last.probabilities[i] - expected[label])); });
  assert.ok(worst <= 1e-3, `max probability difference ${worst}`);
  console.log(`custom labels: top-1 ${last.top1}, max |diff| vs native ${worst.toExponential(2)}`);
  // The default bundle has no text encoder: no box.
  assert.equal(await page.isVisible("#custom"), false);
  await p.close();
});

test("an int8 bundle (runtime quantize) runs in the page as natively", async () => {
  const bundle = path.join(root, "target/browser-test-int8");
  execFileSync(runtimeBin, ["quantize", path.join(root, "models/default"), "--out", bundle, "--force"]);
  const p = await bundlePage("browser-test-int8");
  assert.equal(await p.evaluate(() => window.xrayClip.error), null);
  // Its self-check (written by runtime quantize on the native CPU) is reproduced by ONNX Runtime Web.
  const check = await p.evaluate(() => window.xrayClip.selfCheck);
  assert.ok(check?.passed && check.difference <= 2e-3, JSON.stringify(check));
  console.log(`int8 bundle: self-check in the page, largest difference ${check.difference.toExponential(2)}`);
  for (const file of [png, dicom]) {
    const { last, error } = await inPage(file, p);
    assert.equal(error, null);
    const out = execFileSync(classifyBin, ["--device", "cpu", "--json", "-k", "100", "--model", bundle, file], { encoding: "utf8" });
    const expected = Object.fromEntries(JSON.parse(out.trim()).top.map((t) => [t.label, t.probability]));
    const best = Object.entries(expected).sort((a, b) => b[1] - a[1])[0][0];
    assert.equal(last.top1, best);
    let worst = 0;
    last.labels.forEach((label, i) => { worst = Math.max(worst, Math.abs(last.probabilities[i] - expected[label])); });
    assert.ok(worst <= 1e-3, `max probability difference ${worst}`);
    console.log(`int8 bundle: top-1 ${last.top1}, max |diff| vs native ${worst.toExponential(2)}, ${last.ms.toFixed(1)} ms in the page`);
  }
  await p.close();
});

test("a bundle that does not reproduce its self-check is refused by the page", async () => {
  // The tiny bundle of the custom-label test with other recorded embeddings (what another engine
  // giving other numbers would look like), its hash updated so only the self-check can notice.
  const src = path.join(root, "target/browser-test-bundle");
  const bundle = path.join(root, "target/browser-test-badcheck");
  fs.rmSync(bundle, { recursive: true, force: true });
  fs.cpSync(src, bundle, { recursive: true });
  const npy = fs.readFileSync(path.join(bundle, "self_check.npy"));
  const start = 10 + npy.readUInt16LE(8);
  npy.writeFloatLE(npy.readFloatLE(start) + 1.0, start);
  fs.writeFileSync(path.join(bundle, "self_check.npy"), npy);
  const manifest = JSON.parse(fs.readFileSync(path.join(bundle, "manifest.json"), "utf8"));
  manifest.files.self_check.sha256 = crypto.createHash("sha256").update(npy).digest("hex");
  fs.writeFileSync(path.join(bundle, "manifest.json"), JSON.stringify(manifest, null, 2));
  const p = await bundlePage("browser-test-badcheck");
  const error = await p.evaluate(() => window.xrayClip.error);
  assert.ok(error && error.includes("self-check failed"), error);
  await p.close();
});

test("a calibrated bundle's unknown rule gives the page native classify's verdict", async () => {
  // The demonstration bundle calibrated on copies of the fixture images (each label a different
  // pair), its threshold chosen on the PNG fixture itself with no false accepts: that file must be
  // answered "unknown", by the page as natively.
  const work = mkdtempSync(path.join(tmpdir(), "xray-clip-calibrated-"));
  const fixtures = ["gray_300x217.png", "gray16_150x400.png", "rgb_640x480.jpg", "small_64x64.png", "rgb_640x480_pil.png"];
  ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"].forEach((label, i) => {
    fs.mkdirSync(path.join(work, "labelled", label), { recursive: true });
    for (const f of [fixtures[i % 5], fixtures[(i + 2) % 5]]) {
      fs.copyFileSync(path.join(root, "fixtures/images", f), path.join(work, "labelled", label, f));
    }
  });
  const bundle = path.join(root, "target/browser-test-calibrated");
  execFileSync(runtimeBin, ["calibrate", path.join(root, "models/default"), "--dataset", "folder",
    "--data", path.join(work, "labelled"), "--split", "all", "--ood", png, "--target-false-accept", "0",
    "--device", "cpu", "--out", bundle, "--force"]);
  const p = await bundlePage("browser-test-calibrated");
  assert.equal(await p.evaluate(() => window.xrayClip.error), null);
  for (const file of [png, dicom]) {
    const { last, error } = await inPage(file, p);
    assert.equal(error, null);
    const out = execFileSync(classifyBin, ["--device", "cpu", "--json", "-k", "100", "--model", bundle, file], { encoding: "utf8" });
    const line = JSON.parse(out.trim());
    assert.equal(last.unknown, line.unknown, `${file}: page ${last.unknown}, native ${line.unknown}`);
    assert.ok(Math.abs(last.rejectScore - line.reject_score) <= 1e-3, `${last.rejectScore} vs ${line.reject_score}`);
    // The calibrated probabilities (temperature applied) as natively.
    const expected = Object.fromEntries(line.top.map((t) => [t.label, t.probability]));
    let worst = 0;
    last.labels.forEach((label, i) => { worst = Math.max(worst, Math.abs(last.probabilities[i] - expected[label])); });
    assert.ok(worst <= 1e-3, `max probability difference ${worst}`);
    const shown = await p.textContent("#verdict");
    assert.equal(shown.startsWith("unknown"), line.unknown, shown);
    console.log(`calibrated bundle: ${path.basename(file)} unknown=${line.unknown}, score ${last.rejectScore.toFixed(4)} (native ${line.reject_score.toFixed(4)})`);
  }
  const pngLine = JSON.parse(execFileSync(classifyBin, ["--device", "cpu", "--json", "--model", bundle, png], { encoding: "utf8" }).trim());
  assert.equal(pngLine.unknown, true, "the file the threshold was set on is unknown");
  await p.close();
});
