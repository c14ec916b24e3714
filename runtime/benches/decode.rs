//! Decode + preprocess cost per file, one thread, split by stage (read, decode to 8-bit, resize and
//! crop, normalise), median of rounds. No encoder: what the decoder workers cost per file. Beside
//! it, interleaved file by file, the general decoding path every PNG took before grayscale PNGs got
//! their row-by-row path (the `image` crate's decoder, then 16 -> 8 bits over the whole image).
//!
//! cargo bench -p runtime --bench decode -- --folder "$PWD/bench-out/large-png" --rounds 5
//!
//! Prints one JSON object (milliseconds of one core per file).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use runtime::image::decode::decode_bytes;
use runtime::image::preprocess::{normalize_into, resize_crop, PreprocessConfig};

#[derive(Parser)]
struct Args {
    /// Folder of images (PNG, JPEG or DICOM).
    #[arg(long)]
    folder: PathBuf,
    /// Rounds over the folder (after one warm-up round); medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// cargo bench passes --bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The decoding every PNG took before (commit fa52816): the `image` crate's decoder, then each
/// 16-bit sample rounded to 8 bits (v / 257) over the whole decoded image.
fn general_path(bytes: &[u8]) -> Result<Vec<u8>, image::ImageError> {
    let img = image::load_from_memory(bytes)?;
    Ok(match img {
        image::DynamicImage::ImageLuma16(b) => b
            .into_raw()
            .into_iter()
            .map(|v| ((v as u32 * 255 + 32_767) / 65_535) as u8)
            .collect(),
        other => other.into_luma8().into_raw(),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let files = runtime::image::files::collect_images(&args.folder)?;
    if files.is_empty() {
        return Err(format!("no images in {}", args.folder.display()).into());
    }
    let cfg = PreprocessConfig::default();
    let mut out = vec![0f32; cfg.tensor_len()];
    let (mut read, mut decode, mut resize, mut normalize) = (vec![], vec![], vec![], vec![]);
    let mut general = vec![];
    for round in 0..=args.rounds {
        let (mut r, mut d, mut z, mut n, mut g) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for f in &files {
            let t = Instant::now();
            let bytes = std::fs::read(f)?;
            let tg = Instant::now();
            std::hint::black_box(general_path(&bytes)?);
            g += tg.elapsed().as_secs_f64();
            r += (tg - t).as_secs_f64();
            let t1 = Instant::now();
            let img = decode_bytes(&bytes, f)?;
            let t2 = Instant::now();
            let crop = resize_crop(&img, &cfg)?;
            let t3 = Instant::now();
            normalize_into(&crop, &cfg, &mut out);
            let t4 = Instant::now();
            d += (t2 - t1).as_secs_f64();
            z += (t3 - t2).as_secs_f64();
            n += (t4 - t3).as_secs_f64();
        }
        if round > 0 {
            let per_file = |s: f64| s * 1e3 / files.len() as f64;
            read.push(per_file(r));
            decode.push(per_file(d));
            resize.push(per_file(z));
            normalize.push(per_file(n));
            general.push(per_file(g));
        }
    }
    let (read, decode, resize, normalize) = (
        median(read),
        median(decode),
        median(resize),
        median(normalize),
    );
    let report = serde_json::json!({
        "folder": args.folder,
        "files": files.len(),
        "rounds": args.rounds,
        "read_ms": read,
        "decode_ms": decode,
        "resize_crop_ms": resize,
        "normalize_ms": normalize,
        "total_ms_per_file": read + decode + resize + normalize,
        "decode_ms_general_path": median(general),
    });
    println!("{report}");
    Ok(())
}
