//! CLIP preprocessing, bit-exact with the reference (PIL / `CLIPImageProcessor`): resize the shorter
//! side to 224 with PIL's bicubic filter (antialiased when shrinking, 8-bit fixed point), centre crop
//! 224x224, RGB, scale to [0, 1], normalise with CLIP's mean and std. Output is CHW float32.
//! Bundles may instead ask for the whole image resized to the square ([`Crop::None`], HF's
//! `size: {height, width}` without a centre crop): radiographs keep the joints at both ends.

use serde::{Deserialize, Serialize};

use super::resample::resample_bicubic;
use super::{Image, Pixels, MAX_ASPECT_RATIO};
use crate::error::{Error, Result};

/// Largest resized image (before the crop) that preprocessing allocates: the aspect-ratio limit at
/// a 1024-pixel input, far above what a CLIP bundle uses.
pub const MAX_RESIZED_PIXELS: u64 = 1024 * 1024 * MAX_ASPECT_RATIO;

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// What the resize keeps of an image that is not square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Crop {
    /// Resize the shorter side to `resize_shortest_edge`, then cut the centre square (CLIP's).
    #[default]
    Center,
    /// Resize the whole image to `image_size` x `image_size`: nothing cut, aspect ratio not kept
    /// (`resize_shortest_edge` equals `image_size`).
    None,
}

impl std::fmt::Display for Crop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Crop::Center => "center",
            Crop::None => "none",
        })
    }
}

/// How a bundle wants its images prepared (stored in the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Side of the square model input.
    pub image_size: u32,
    /// Shorter side after resizing (before the centre crop).
    pub resize_shortest_edge: u32,
    /// Always "bicubic" (PIL's filter, a = -0.5, antialiased).
    pub resize_filter: String,
    /// Centre crop after the shorter-side resize (CLIP's), or none: the whole image resized to
    /// the square (aspect ratio not kept).
    #[serde(default)]
    pub crop: Crop,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            image_size: 224,
            resize_shortest_edge: 224,
            resize_filter: "bicubic".into(),
            crop: Crop::Center,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }
}

impl PreprocessConfig {
    /// Values of one preprocessed image (3 x size x size).
    pub fn tensor_len(&self) -> usize {
        3 * self.image_size as usize * self.image_size as usize
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.resize_filter != "bicubic" {
            return Err(format!(
                "resize filter {:?} is not supported (bicubic only)",
                self.resize_filter
            ));
        }
        if self.crop == Crop::None && self.resize_shortest_edge != self.image_size {
            return Err(format!(
                "crop none resizes to the {0}x{0} input, so the shortest edge must be {0}, not {1}",
                self.image_size, self.resize_shortest_edge
            ));
        }
        if self.image_size == 0
            || self.resize_shortest_edge > 1024
            || self.resize_shortest_edge < self.image_size
        {
            return Err(format!(
                "image size {} with shortest edge {} is not a valid resize-then-crop",
                self.image_size, self.resize_shortest_edge
            ));
        }
        if self.std.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
            return Err("std must be positive".into());
        }
        Ok(())
    }
}

/// Output size of the shorter-side resize, as `transformers.get_resize_output_image_size`; `None`
/// for an empty image or a result above [`MAX_RESIZED_PIXELS`] (checked, never wrapping).
pub fn resized_size(width: u32, height: u32, shortest: u32) -> Option<(u32, u32)> {
    let (w, h, s) = (width as u64, height as u64, shortest as u64);
    if w == 0 || h == 0 || s == 0 {
        return None;
    }
    let (out_w, out_h) = if w <= h {
        (s, s.checked_mul(h)? / w)
    } else {
        (s.checked_mul(w)? / h, s)
    };
    if out_w.checked_mul(out_h)? > MAX_RESIZED_PIXELS {
        return None;
    }
    Some((u32::try_from(out_w).ok()?, u32::try_from(out_h).ok()?))
}

/// Resize (shorter side, PIL bicubic) and centre-crop, or with [`Crop::None`] resize the whole
/// image to the square: the 8-bit picture the model sees. An image whose resize would exceed
/// [`MAX_RESIZED_PIXELS`] is an error before anything is allocated.
pub fn resize_crop(img: &Image, cfg: &PreprocessConfig) -> Result<Image> {
    if cfg.crop == Crop::None {
        return resize_whole(img, cfg.image_size);
    }
    let (new_w, new_h) =
        resized_size(img.width, img.height, cfg.resize_shortest_edge).ok_or_else(|| {
            Error::Preprocess {
                width: img.width,
                height: img.height,
                reason: format!(
                    "resizing its shorter side to {} would exceed {MAX_RESIZED_PIXELS} pixels",
                    cfg.resize_shortest_edge
                ),
            }
        })?;
    if new_w < cfg.image_size || new_h < cfg.image_size {
        return Err(Error::Preprocess {
            width: img.width,
            height: img.height,
            reason: format!(
                "resized to {new_w}x{new_h}, smaller than the {} crop",
                cfg.image_size
            ),
        });
    }
    let channels = img.channels();
    let resized = resample(img, new_w as usize, new_h as usize);
    let size = cfg.image_size as usize;
    let (new_w, new_h) = (new_w as usize, new_h as usize);
    // Centre crop (floor of half the excess, as transformers; the resize guarantees no padding).
    let top = (new_h - size) / 2;
    let left = (new_w - size) / 2;
    let mut crop = Vec::with_capacity(size * size * channels);
    for y in 0..size {
        crop.extend_from_slice(
            &resized[((top + y) * new_w + left) * channels..][..size * channels],
        );
    }
    Ok(square_like(img, size as u32, crop))
}

/// `img` resampled (PIL bicubic) to `w` x `h`, samples interleaved as in `img`.
fn resample(img: &Image, w: usize, h: usize) -> Vec<u8> {
    let src = match &img.pixels {
        Pixels::Gray(p) | Pixels::Rgb(p) => p.as_slice(),
    };
    let (src_w, src_h) = (img.width as usize, img.height as usize);
    resample_bicubic(src, src_w, src_h, img.channels(), w, h)
}

/// A `size` x `size` image of `samples`, gray or RGB as `like`.
fn square_like(like: &Image, size: u32, samples: Vec<u8>) -> Image {
    Image {
        width: size,
        height: size,
        pixels: match like.pixels {
            Pixels::Gray(_) => Pixels::Gray(samples),
            Pixels::Rgb(_) => Pixels::Rgb(samples),
        },
    }
}

/// The whole image resized (PIL bicubic, each axis on its own) to `size` x `size`.
fn resize_whole(img: &Image, size: u32) -> Result<Image> {
    if img.width == 0 || img.height == 0 || size == 0 {
        return Err(Error::Preprocess {
            width: img.width,
            height: img.height,
            reason: "an empty image cannot be resized".into(),
        });
    }
    let s = size as usize;
    Ok(square_like(img, size, resample(img, s, s)))
}

/// Scales a cropped 8-bit picture to [0, 1] and normalises it into `out` (CHW, 3 channels).
pub fn normalize_into(crop: &Image, cfg: &PreprocessConfig, out: &mut [f32]) {
    let plane = (crop.width * crop.height) as usize;
    // 8-bit value -> normalised float, per channel: a 256-entry table avoids a division per pixel.
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, slot) in table.iter_mut().enumerate() {
            *slot = ((v as f64 / 255.0) as f32 - cfg.mean[c]) / cfg.std[c];
        }
    }
    match &crop.pixels {
        Pixels::Gray(g) => {
            for c in 0..3 {
                for (o, &v) in out[c * plane..(c + 1) * plane].iter_mut().zip(g) {
                    *o = lut[c][v as usize];
                }
            }
        }
        Pixels::Rgb(rgb) => {
            for (i, px) in rgb.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * plane + i] = lut[c][px[c] as usize];
                }
            }
        }
    }
}

/// Resize, crop and normalise into `out` (length `cfg.tensor_len()`, CHW).
pub fn preprocess_into(img: &Image, cfg: &PreprocessConfig, out: &mut [f32]) -> Result<()> {
    normalize_into(&resize_crop(img, cfg)?, cfg, out);
    Ok(())
}

pub fn preprocess(img: &Image, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    let mut out = vec![0f32; cfg.tensor_len()];
    preprocess_into(img, cfg, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_aspect_as_transformers() {
        assert_eq!(resized_size(640, 480, 224), Some((298, 224)));
        assert_eq!(resized_size(480, 640, 224), Some((224, 298)));
        assert_eq!(resized_size(64, 64, 224), Some((224, 224)));
        assert_eq!(resized_size(1841, 1955, 224), Some((224, 237)));
    }

    #[test]
    fn extreme_shapes_are_refused_not_allocated() {
        // 1 x 19,173,962 overflowed u32 (224 * h) and panicked; 1 x 4,000,000 took 23 GB.
        assert_eq!(resized_size(1, 19_173_962, 224), None);
        assert_eq!(resized_size(1, 4_000_000, 224), None);
        assert_eq!(resized_size(u32::MAX, 1, 1024), None);
        assert_eq!(resized_size(0, 10, 224), None);
        let img = Image {
            width: 1,
            height: 65_535,
            pixels: Pixels::Gray(vec![0; 65_535]),
        };
        let err = preprocess(&img, &PreprocessConfig::default()).unwrap_err();
        assert!(err.to_string().contains("1x65535"), "{err}");
    }

    #[test]
    fn crop_none_resizes_the_whole_image_and_checks_its_sizes() {
        let whole = PreprocessConfig {
            image_size: 32,
            resize_shortest_edge: 32,
            crop: Crop::None,
            ..PreprocessConfig::default()
        };
        whole.validate().unwrap();
        // Left half black, right half white: a centre crop of the shorter-side resize cuts the
        // sides, the whole-image resize keeps both halves.
        let (w, h) = (200usize, 100usize);
        let px: Vec<u8> = (0..w * h)
            .map(|i| if i % w < w / 2 { 0 } else { 255 })
            .collect();
        let img = Image {
            width: w as u32,
            height: h as u32,
            pixels: Pixels::Gray(px),
        };
        let out = resize_crop(&img, &whole).unwrap();
        assert_eq!((out.width, out.height), (32, 32));
        let Pixels::Gray(g) = &out.pixels else {
            panic!("gray in, gray out")
        };
        assert_eq!((g[0], g[31], g[31 * 32], g[32 * 32 - 1]), (0, 255, 0, 255));
        assert_eq!(
            g.iter().filter(|&&v| v == 0).count(),
            g.iter().filter(|&&v| v == 255).count()
        );
        let bad = PreprocessConfig {
            resize_shortest_edge: 40,
            ..whole.clone()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("shortest edge must be 32"));
        let empty = Image {
            width: 0,
            height: 5,
            pixels: Pixels::Gray(vec![]),
        };
        assert!(resize_crop(&empty, &whole).is_err());
        // The manifest's spelling; an unknown value is refused by name.
        let json = serde_json::to_value(&whole).unwrap();
        assert_eq!(json["crop"], "none");
        let mut other = json.clone();
        other["crop"] = "pad".into();
        let err = serde_json::from_value::<PreprocessConfig>(other).unwrap_err();
        assert!(err.to_string().contains("pad"), "{err}");
    }

    #[test]
    fn normalisation_uses_clip_statistics() {
        let img = Image {
            width: 224,
            height: 224,
            pixels: Pixels::Gray(vec![255; 224 * 224]),
        };
        let t = preprocess(&img, &PreprocessConfig::default()).unwrap();
        for c in 0..3 {
            let expect = (1.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            assert!((t[c * 224 * 224] - expect).abs() < 1e-6);
        }
    }
}
