// Image-encoder latency in headless Chromium: ONNX Runtime Web vs tract compiled into a wasm module.
// Build the tract side first:
//   cd wasm/tract-bench && RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS='--cfg getrandom_backend="wasm_js"' \
//     /usr/bin/cargo build --release --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort
//   wasm-bindgen --target web --out-dir ../../target/tract-bench-pkg target/wasm32-unknown-unknown/release/tract_bench.wasm
//   node wasm/www/bench_engines.mjs models/default/image_encoder.onnx bench-out/vit_b32_image_encoder.rust.onnx
import { spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const models = process.argv.slice(2);
const port = 8990;
const server = spawn("/usr/bin/python3", ["-m", "http.server", String(port), "--bind", "127.0.0.1", "--directory", root], { stdio: "ignore" });
await new Promise((r) => setTimeout(r, 800));
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox", "--disable-gpu"] });
try {
  for (const m of models) {
    const page = await browser.newPage();
    await page.goto(`http://127.0.0.1:${port}/wasm/www/engines.html?model=../../${m}`);
    await page.waitForFunction(() => window.engines, null, { timeout: 600000 });
    console.log(JSON.stringify(await page.evaluate(() => window.engines)));
    await page.close();
  }
} finally {
  await browser.close();
  server.kill();
}
