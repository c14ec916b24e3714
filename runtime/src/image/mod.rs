//! File -> [`Image`] -> model tensor: the decoded image type and its size limits, the decoders
//! ([`decode`] for PNG/JPEG, [`dicom`]), input discovery ([`files`]), PIL's bicubic resampler
//! ([`resample`]) and CLIP preprocessing ([`preprocess`]).
//!
//! Everything downstream (preprocessing, the browser demo's preview) works on [`Image`], so every
//! input format ends up as 8-bit gray or RGB here, exactly once.

use std::path::Path;

use crate::error::{Error, Result};

pub mod decode;
pub mod dicom;
pub mod files;
pub mod preprocess;
pub mod resample;

/// Largest number of pixels (width x height x frames) that a decoder may allocate for.
/// 16384 x 16384: larger than any radiograph, small enough to refuse forged headers before allocating.
pub const MAX_PIXELS: u64 = 16_384 * 16_384;
/// Largest ratio of the long side to the short side. Resizing the short side to the model's input
/// size scales the long side by the same factor, so a 1 x 65535 image would become 224 x 14.7 M;
/// the longest real radiographs (full-leg, whole-spine stitches) are about 1:4.
pub const MAX_ASPECT_RATIO: u64 = 32;
/// Largest input file read into memory.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Pixel samples of a decoded image, row-major, 8 bits per sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    Gray(Vec<u8>),
    Rgb(Vec<u8>),
}

/// A decoded image, ready for preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub pixels: Pixels,
}

impl Image {
    pub fn channels(&self) -> usize {
        match self.pixels {
            Pixels::Gray(_) => 1,
            Pixels::Rgb(_) => 3,
        }
    }

    /// Interleaved RGBA, for display (the browser demo draws this on a canvas).
    pub fn to_rgba(&self) -> Vec<u8> {
        match &self.pixels {
            Pixels::Gray(g) => g.iter().flat_map(|&v| [v, v, v, 255]).collect(),
            Pixels::Rgb(c) => c
                .chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect(),
        }
    }
}

pub(crate) fn check_size(name: &Path, width: u64, height: u64, frames: u64) -> Result<()> {
    let pixels = width.saturating_mul(height).saturating_mul(frames.max(1));
    if width == 0 || height == 0 {
        return Err(Error::Decode {
            path: name.to_path_buf(),
            format: "input",
            reason: format!("image has an empty size {width}x{height}"),
        });
    }
    if pixels > MAX_PIXELS {
        return Err(Error::TooLarge {
            path: name.to_path_buf(),
            width,
            height,
            frames,
            limit: MAX_PIXELS,
        });
    }
    let (short, long) = (width.min(height), width.max(height));
    if long > short.saturating_mul(MAX_ASPECT_RATIO) {
        let scale = 224u64;
        return Err(Error::AspectRatio {
            path: name.to_path_buf(),
            width,
            height,
            limit: MAX_ASPECT_RATIO,
            resized_pixels: scale.saturating_mul(long.saturating_mul(scale) / short),
        });
    }
    Ok(())
}
