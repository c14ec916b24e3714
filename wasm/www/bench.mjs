// In-browser latency per image (headless Chromium, ONNX Runtime Web's wasm backend, one thread):
// decode + preprocess (Rust wasm) + image encoder + scoring, median of N runs after 2 warm-ups.
//
//   node wasm/www/bench.mjs [BUNDLE_PATH_FROM_REPO_ROOT ...]     (default: models/default)
import { spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const bundles = process.argv.slice(2).length ? process.argv.slice(2) : ["models/default"];
const image = path.join(root, "fixtures/images/rgb_640x480.jpg");
const port = 8900 + (process.pid % 90);
const server = spawn("/usr/bin/python3", ["-m", "http.server", String(port), "--bind", "127.0.0.1", "--directory", root], { stdio: "ignore" });
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox", "--disable-gpu"] });
try {
  for (const b of bundles) {
    const page = await browser.newPage();
    for (let i = 0; ; i++) {
      try { await page.goto(`http://127.0.0.1:${port}/wasm/www/index.html?bundle=../../${b}/`); break; }
      catch (e) { if (i > 50) throw e; await new Promise((r) => setTimeout(r, 100)); }
    }
    await page.waitForFunction(() => window.xrayClip?.ready || window.xrayClip?.error, null, { timeout: 300000 });
    const times = [];
    for (let i = 0; i < 7; i++) {
      await page.evaluate(() => { window.xrayClip.last = null; });
      await page.setInputFiles("#file", []);
      await page.setInputFiles("#file", image);
      await page.waitForFunction(() => window.xrayClip.last || window.xrayClip.error, null, { timeout: 300000 });
      const r = await page.evaluate(() => window.xrayClip.last?.ms ?? -1);
      if (i >= 2) times.push(r);
    }
    times.sort((a, c) => a - c);
    console.log(JSON.stringify({ bundle: b, median_ms: times[Math.floor(times.length / 2)], runs: times }));
    await page.close();
  }
} finally {
  await browser.close();
  server.kill();
}
