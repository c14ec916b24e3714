//! File -> decoded 8-bit image: PNG, JPEG (8/16-bit, gray or RGB) and DICOM.
//!
//! Everything downstream (preprocessing, the browser demo's preview) works on [`Image`], so every input
//! format ends up as 8-bit gray or RGB here, exactly once.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::{check_size, dicom, Image, Pixels, MAX_FILE_BYTES, MAX_PIXELS};
use crate::error::{Error, Result};

/// Container formats recognised by their first bytes (never by the file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
    Dicom,
}

pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if dicom::has_dicom_magic(bytes) {
        Some(Format::Dicom)
    } else {
        None
    }
}

/// Reads and decodes one file.
pub fn decode_file(path: &Path) -> Result<Image> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::BadPath(format!(
            "{}: is a directory",
            path.display()
        )));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            format: "input",
            reason: format!(
                "file of {} bytes is larger than the 1 GiB limit",
                meta.len()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(&bytes, path)
}

/// Decodes an in-memory file; `name` is only used in error messages.
pub fn decode_bytes(bytes: &[u8], name: &Path) -> Result<Image> {
    if bytes.is_empty() {
        return Err(Error::EmptyFile {
            path: name.to_path_buf(),
        });
    }
    match sniff(bytes) {
        Some(Format::Png) => decode_raster(bytes, name, image::ImageFormat::Png, "PNG"),
        Some(Format::Jpeg) => decode_raster(bytes, name, image::ImageFormat::Jpeg, "JPEG"),
        Some(Format::Dicom) => dicom::decode(bytes, name),
        None => Err(Error::UnknownFormat {
            path: name.to_path_buf(),
        }),
    }
}

fn decode_raster(
    bytes: &[u8],
    name: &Path,
    format: image::ImageFormat,
    label: &'static str,
) -> Result<Image> {
    let decode_err = |cause: image::ImageError| Error::Image {
        path: name.to_path_buf(),
        format: label,
        cause,
    };
    // Check the header's claimed size before anything is allocated for pixels. PNG keeps it at a
    // fixed place (IHDR), so even a file cut right after its header is refused for its size.
    if format == image::ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        check_size(name, w as u64, h as u64, 1)?;
    }
    // The JPEG decoder fills a cut-off file with grey and reports success; PIL refuses such a file
    // ("image file is truncated"), and so does this: no end-of-image marker after the scan data.
    if format == image::ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        return Err(Error::Decode {
            path: name.to_path_buf(),
            format: label,
            reason: "the file is truncated (no end-of-image marker after the image data)".into(),
        });
    }
    if format == image::ImageFormat::Png {
        if let Some(img) = decode_gray_png(bytes) {
            return Ok(img);
        }
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    check_size(name, width as u64, height as u64, 1)?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    let decoded = reader.decode().map_err(decode_err)?;
    Ok(from_dynamic(decoded))
}

/// Grayscale, non-interlaced PNGs (the radiograph case), row by row: each row goes straight to 8
/// bits as it is unfiltered, so neither the 16-bit image nor the image crate's two conversion passes
/// over it exist. Same pixels as the general path (the same `png` decoder with the same `EXPAND`,
/// then [`to_u8`]). `None` for every other PNG and on any error: the general path then decodes it,
/// or reports the error, as before.
fn decode_gray_png(bytes: &[u8]) -> Option<Image> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    decoder.set_limits(png::Limits {
        bytes: usize::try_from(MAX_PIXELS * 8).unwrap_or(usize::MAX),
    });
    let mut reader = decoder.read_info().ok()?;
    let (width, height) = (reader.info().width, reader.info().height);
    if reader.info().interlaced || reader.output_color_type().0 != png::ColorType::Grayscale {
        return None;
    }
    let sixteen = match reader.output_color_type().1 {
        png::BitDepth::Eight => false,
        png::BitDepth::Sixteen => true,
        _ => return None,
    };
    let mut pixels = Vec::with_capacity(width as usize * height as usize);
    while let Some(row) = reader.next_row().ok()? {
        let data = row.data();
        if sixteen {
            pixels.extend(
                data.chunks_exact(2)
                    .map(|v| to_u8(u16::from_be_bytes([v[0], v[1]]))),
            );
        } else {
            pixels.extend_from_slice(data);
        }
    }
    (pixels.len() == width as usize * height as usize).then_some(Image {
        width,
        height,
        pixels: Pixels::Gray(pixels),
    })
}

/// Whether a JPEG stream reaches its end-of-image marker (FF D9) after its first scan. Headers are
/// walked segment by segment; inside entropy-coded data a 0xFF byte is always followed by 0x00 or a
/// restart marker, so FF D9 there can only be the real end.
pub fn jpeg_has_end(bytes: &[u8]) -> bool {
    let mut pos = 2; // after SOI
    while pos + 1 < bytes.len() {
        if bytes[pos] != 0xFF {
            return false;
        }
        let marker = bytes[pos + 1];
        pos += 2;
        match marker {
            0xFF => pos -= 1, // fill byte
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let Some(len) = bytes.get(pos..pos + 2) else {
                    return false;
                };
                let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                if len < 2 {
                    return false;
                }
                pos += len;
                if marker == 0xDA {
                    return bytes
                        .get(pos..)
                        .is_some_and(|rest| rest.windows(2).any(|w| w == [0xFF, 0xD9]));
                }
            }
        }
    }
    false
}

/// 16-bit samples become 8-bit by rounding v / 257 (0 -> 0, 65535 -> 255); alpha is dropped.
fn from_dynamic(img: DynamicImage) -> Image {
    let (width, height) = (img.width(), img.height());
    let pixels = match img {
        DynamicImage::ImageLuma8(b) => Pixels::Gray(b.into_raw()),
        DynamicImage::ImageLumaA8(b) => {
            Pixels::Gray(b.into_raw().chunks_exact(2).map(|p| p[0]).collect())
        }
        DynamicImage::ImageLuma16(b) => Pixels::Gray(b.into_raw().into_iter().map(to_u8).collect()),
        DynamicImage::ImageLumaA16(b) => {
            Pixels::Gray(b.into_raw().chunks_exact(2).map(|p| to_u8(p[0])).collect())
        }
        DynamicImage::ImageRgb8(b) => Pixels::Rgb(b.into_raw()),
        DynamicImage::ImageRgb16(b) => Pixels::Rgb(b.into_raw().into_iter().map(to_u8).collect()),
        other => Pixels::Rgb(other.to_rgb8().into_raw()),
    };
    Image {
        width,
        height,
        pixels,
    }
}

fn to_u8(v: u16) -> u8 {
    ((v as u32 * 255 + 32_767) / 65_535) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_maps_to_full_eight_bit_range() {
        assert_eq!(to_u8(0), 0);
        assert_eq!(to_u8(65_535), 255);
        assert_eq!(to_u8(257 * 100), 100);
        assert_eq!(to_u8(257 * 100 + 128), 100);
        assert_eq!(to_u8(257 * 100 + 129), 101);
    }

    #[test]
    fn sniff_recognises_magic_bytes_not_names() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Some(Format::Png));
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(Format::Jpeg));
        assert_eq!(sniff(b"hello, I am text"), None);
        let mut dcm = vec![0u8; 132];
        dcm[128..132].copy_from_slice(b"DICM");
        assert_eq!(sniff(&dcm), Some(Format::Dicom));
    }
}
