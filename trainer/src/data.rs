//! Training data in memory: each image decoded once and kept as the 8-bit picture the model sees
//! (224x224, about 50-150 KB), normalised per batch. Decoding and preprocessing are the runtime's.

use std::path::PathBuf;

use runtime::eval::datasets::Sample;
use runtime::image::preprocess::{normalize_into, resize_crop, PreprocessConfig};
use runtime::image::Image;
use tch::{Device, Tensor};

use crate::error::{Error, Result};

/// What to do with an image that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BadImages {
    /// Leave it out, count it and list it.
    Skip,
    /// Stop with an error naming it.
    Fail,
}

pub struct ImageSet {
    pub crops: Vec<Image>,
    /// Training label (first label) of each image.
    pub labels: Vec<usize>,
    /// All labels of each image (multi-label rows).
    pub all_labels: Vec<Vec<usize>>,
    pub skipped: Vec<(PathBuf, String)>,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.crops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.crops.is_empty()
    }

    /// Decodes every sample on `threads` threads, with a progress bar.
    pub fn load(
        samples: &[Sample],
        cfg: &PreprocessConfig,
        bad: BadImages,
        threads: usize,
        what: &str,
    ) -> Result<ImageSet> {
        let bar = runtime::progress::bar(samples.len() as u64, &format!("loading {what}"));
        let threads = threads.max(1);
        let chunk = samples.len().div_ceil(threads).max(1);
        let results: Vec<Vec<(usize, std::result::Result<Image, String>)>> =
            std::thread::scope(|s| {
                let handles: Vec<_> = samples
                    .chunks(chunk)
                    .enumerate()
                    .map(|(c, part)| {
                        let bar = bar.clone();
                        s.spawn(move || {
                            part.iter()
                                .enumerate()
                                .map(|(i, sample)| {
                                    // A decoder panic on a hostile file fails that file only.
                                    let r = std::panic::catch_unwind(|| {
                                        runtime::image::decode::decode_file(&sample.path)
                                            .and_then(|img| resize_crop(&img, cfg))
                                            .map_err(|e| e.to_string())
                                    })
                                    .unwrap_or_else(|_| Err("the decoder failed".to_string()));
                                    bar.inc(1);
                                    (c * chunk + i, r)
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("decoder thread"))
                    .collect()
            });
        bar.finish_and_clear();
        let mut set = ImageSet {
            crops: Vec::new(),
            labels: Vec::new(),
            all_labels: Vec::new(),
            skipped: Vec::new(),
        };
        for (i, r) in results.into_iter().flatten() {
            match r {
                Ok(img) => {
                    set.crops.push(img);
                    set.labels.push(samples[i].primary());
                    set.all_labels.push(samples[i].labels.clone());
                }
                Err(e) => match bad {
                    BadImages::Fail => {
                        return Err(Error::Dataset(format!(
                            "{e} (use --bad-images skip to leave such files out)"
                        )))
                    }
                    BadImages::Skip => set.skipped.push((samples[i].path.clone(), e)),
                },
            }
        }
        if set.is_empty() {
            return Err(Error::Dataset(format!(
                "the {what} split has no readable images"
            )));
        }
        Ok(set)
    }

    /// `[n, 3, S, S]` normalised pixels of the given images.
    pub fn pixels(&self, idx: &[usize], cfg: &PreprocessConfig, device: Device) -> Tensor {
        self.pixels_augmented(idx, cfg, device, None)
    }

    /// As [`pixels`](Self::pixels), with `Some(seed)` a seeded random contrast and brightness change
    /// per image (radiographs differ widely in windowing; a model trained on one archive's contrast
    /// should not depend on it). The same seed gives the same pixels, so resumed runs stay exact.
    pub fn pixels_augmented(
        &self,
        idx: &[usize],
        cfg: &PreprocessConfig,
        device: Device,
        seed: Option<u64>,
    ) -> Tensor {
        let len = cfg.tensor_len();
        let mut buf = vec![0f32; idx.len() * len];
        for (n, (slot, &i)) in buf.chunks_exact_mut(len).zip(idx).enumerate() {
            match seed {
                None => normalize_into(&self.crops[i], cfg, slot),
                Some(seed) => normalize_into(
                    &jitter(
                        &self.crops[i],
                        seed.wrapping_mul(0x9E37_79B9).wrapping_add(n as u64),
                    ),
                    cfg,
                    slot,
                ),
            }
        }
        let s = cfg.image_size as i64;
        Tensor::from_slice(&buf)
            .view([idx.len() as i64, 3, s, s])
            .to_device(device)
    }
}

/// Contrast x0.35..1.0 around the mean and brightness -30..+50, with probability 3/4.
fn jitter(img: &Image, seed: u64) -> Image {
    let mut rng = runtime::eval::datasets::SplitMix64::new(seed ^ 0xD1B5_4A32_D192_ED03);
    let mut uniform = || rng.next_f64();
    if uniform() < 0.25 {
        return img.clone();
    }
    let contrast = 0.35 + 0.65 * uniform();
    let brightness = -30.0 + 80.0 * uniform();
    let data = match &img.pixels {
        runtime::image::Pixels::Gray(p) | runtime::image::Pixels::Rgb(p) => p,
    };
    let mean = data.iter().map(|&v| v as f64).sum::<f64>() / data.len().max(1) as f64;
    let map = |v: &u8| {
        (mean + contrast * (*v as f64 - mean) + brightness)
            .round()
            .clamp(0.0, 255.0) as u8
    };
    let pixels = match &img.pixels {
        runtime::image::Pixels::Gray(p) => {
            runtime::image::Pixels::Gray(p.iter().map(map).collect())
        }
        runtime::image::Pixels::Rgb(p) => runtime::image::Pixels::Rgb(p.iter().map(map).collect()),
    };
    Image {
        width: img.width,
        height: img.height,
        pixels,
    }
}
