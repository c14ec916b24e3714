//! Image-encoder throughput (batch 1 and 16) and end-to-end folder throughput.
//!
//! cargo bench -p runtime --bench throughput -- --encoder bench-out/vit_b32_image_encoder.onnx \
//!     --folder ../shared/data/mednist/test/CXR --threads 2
//!
//! Prints one JSON object; scripts/bench.sh runs it beside Python onnxruntime on the same file.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use runtime::bundle::assemble::{assemble, AssembleSpec};
use runtime::engine::{encoder_from_file, Device, Engine, EngineOptions};
use runtime::image::preprocess::PreprocessConfig;
use runtime::pipeline::{self, PipelineOptions};
use runtime::text::labels;

#[derive(Parser)]
struct Args {
    /// Image encoder ONNX file ([batch, 3, 224, 224] -> [batch, D]).
    #[arg(long)]
    encoder: PathBuf,
    /// Folder of images for the end-to-end run.
    #[arg(long)]
    folder: Option<PathBuf>,
    /// At most this many files of the folder.
    #[arg(long, default_value_t = 64)]
    max_files: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed repetitions at batch 1 (after 2 warm-ups).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// cargo bench passes --bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let opts = EngineOptions {
        device: Device::Cpu,
        threads: args.threads,
    };
    let mut enc = encoder_from_file(&args.encoder, &opts)?;
    let image = vec![0.1f32; 3 * 224 * 224];
    let mut timed = |batch: usize, reps: usize| -> anyhow::Result<f64> {
        let data: Vec<f32> = image
            .iter()
            .copied()
            .cycle()
            .take(batch * image.len())
            .collect();
        for _ in 0..2 {
            enc.embed_pixels(&[batch, 3, 224, 224], &data)?;
        }
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            enc.embed_pixels(&[batch, 3, 224, 224], &data)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(median(times))
    };
    let b1 = timed(1, args.reps)?;
    let b16 = timed(16, (args.reps / 3).max(3))?;
    let mut report = serde_json::json!({
        "engine": "rust-ort",
        "threads": args.threads,
        "batch1_ms_per_image": b1 * 1e3,
        "batch16_images_per_s": 16.0 / b16,
    });
    if let Some(folder) = &args.folder {
        let mut files = pipeline::collect_files(std::slice::from_ref(folder)).0;
        files.truncate(args.max_files);
        let dir_tmp = tempfile::tempdir()?;
        let dir = dir_tmp.path().join("bundle");
        let dim = enc.embed_pixels(&[1, 3, 224, 224], &image)?.1;
        let spec = AssembleSpec {
            name: "bench".into(),
            description: String::new(),
            image_encoder: args.encoder.clone(),
            text_encoder: None,
            tokenizer: None,
            labels: labels::unifesp(),
            templates: runtime::text::prompts::default_templates(),
            label_embeddings: Some((0..22 * dim).map(|i| (i % 7) as f32).collect()),
            logit_scale: 100.0,
            preprocessing: PreprocessConfig::default(),
            provenance: Default::default(),
        };
        let bundle = assemble(spec, &dir, true, &opts)?;
        let mut engine = Engine::load(bundle, opts.clone())?;
        let popts = PipelineOptions {
            batch_size: 16,
            workers: 1,
            progress: false,
        };
        pipeline::embed_files(&mut engine, &files[..files.len().min(16)], &popts); // warm-up
        let t = Instant::now();
        let results = pipeline::embed_files(&mut engine, &files, &popts);
        let secs = t.elapsed().as_secs_f64();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        // Decode + preprocess alone, one thread: what the encoder has to hide.
        let cfg = PreprocessConfig::default();
        let t = Instant::now();
        for f in &files {
            let _ = pipeline::load_tensor(f, &cfg);
        }
        report["decode_preprocess_ms_per_file"] =
            (t.elapsed().as_secs_f64() * 1e3 / files.len() as f64).into();
        report["folder_files"] = ok.into();
        report["folder_files_per_s"] = (ok as f64 / secs).into();
    }
    println!("{report}");
    Ok(())
}
