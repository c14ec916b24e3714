//! DICOM -> 8-bit image, following the DICOM grayscale pipeline: stored values -> modality LUT
//! (rescale slope/intercept) -> VOI window (centre/width, LINEAR / LINEAR_EXACT / SIGMOID, as pydicom's
//! `apply_voi_lut`) -> MONOCHROME1 inversion. Without a window the rescaled values are min-max normalised.

use std::io::Cursor;
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::{file::ReadPreamble, meta::FileMetaTable, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::{check_size, Image, Pixels};
use crate::error::{Error, Result};

const PREAMBLE: usize = 128;

pub(crate) fn has_dicom_magic(bytes: &[u8]) -> bool {
    bytes.len() >= PREAMBLE + 4 && &bytes[PREAMBLE..PREAMBLE + 4] == b"DICM"
        || bytes.starts_with(b"DICM")
}

/// The grayscale of a DICOM frame as floats in [0, 1] (after windowing and MONOCHROME1 inversion),
/// or `None` for colour images. Exposed for parity checks against pydicom.
pub struct Grayscale {
    pub width: u32,
    pub height: u32,
    pub values: Vec<f32>,
}

fn unsupported(name: &Path, reason: impl Into<String>) -> Error {
    Error::UnsupportedDicom {
        path: name.to_path_buf(),
        reason: reason.into(),
    }
}

/// A DICOM library error, kept as the cause.
fn decode_err(name: &Path, cause: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Dicom {
        path: name.to_path_buf(),
        cause: Box::new(cause),
    }
}

/// A problem this decoder finds itself (no library error behind it).
fn invalid(name: &Path, reason: impl Into<String>) -> Error {
    Error::Decode {
        path: name.to_path_buf(),
        format: "DICOM",
        reason: reason.into(),
    }
}

enum Decoded {
    Gray(Grayscale),
    Rgb(Image),
}

pub(crate) fn decode(bytes: &[u8], name: &Path) -> Result<Image> {
    match decode_first_frame(bytes, name)? {
        Decoded::Rgb(img) => Ok(img),
        Decoded::Gray(g) => Ok(Image {
            width: g.width,
            height: g.height,
            pixels: Pixels::Gray(
                g.values
                    .iter()
                    .map(|&v| (v * 255.0).round() as u8)
                    .collect(),
            ),
        }),
    }
}

/// Decodes the first frame of a grayscale DICOM to windowed floats in [0, 1].
pub fn decode_grayscale(bytes: &[u8], name: &Path) -> Result<Grayscale> {
    match decode_first_frame(bytes, name)? {
        Decoded::Gray(g) => Ok(g),
        Decoded::Rgb(_) => Err(unsupported(
            name,
            "colour image where grayscale was expected",
        )),
    }
}

fn decode_first_frame(bytes: &[u8], name: &Path) -> Result<Decoded> {
    let body = if bytes.starts_with(b"DICM") {
        bytes
    } else {
        &bytes[PREAMBLE..]
    };
    // Look at the transfer syntax before parsing the data set, so an unknown one gets a clear message.
    let meta = FileMetaTable::from_reader(Cursor::new(body)).map_err(|e| decode_err(name, e))?;
    let uid = meta
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let ts = TransferSyntaxRegistry
        .get(&uid)
        .ok_or_else(|| unsupported(name, format!("unknown transfer syntax {uid}")))?;
    if !ts.can_decode_all() {
        return Err(unsupported(
            name,
            format!(
                "transfer syntax {} ({uid}) cannot be decoded by this build",
                ts.name()
            ),
        ));
    }
    let preamble = if bytes.starts_with(b"DICM") {
        ReadPreamble::Never
    } else {
        ReadPreamble::Always
    };
    let obj = OpenFileOptions::new()
        .read_preamble(preamble)
        .from_reader(Cursor::new(bytes))
        .map_err(|e| decode_err(name, e))?;
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(Error::NoPixelData {
            path: name.to_path_buf(),
        });
    }
    let int_attr = |tag, what: &str| -> Result<u64> {
        obj.element(tag)
            .map_err(|_| invalid(name, format!("missing {what}")))?
            .to_int::<u64>()
            .map_err(|e| invalid(name, format!("bad {what}: {e}")))
    };
    let rows = int_attr(tags::ROWS, "Rows")?;
    let columns = int_attr(tags::COLUMNS, "Columns")?;
    let frames = int_attr(tags::NUMBER_OF_FRAMES, "NumberOfFrames").unwrap_or(1);
    check_size(name, columns, rows, frames)?;
    let float_attr = |tag| -> Option<Vec<f64>> {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_multi_float64().ok())
    };
    let str_attr = |tag| -> Option<String> {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_ascii_uppercase())
    };

    let decoded = obj
        .decode_pixel_data_frame(0)
        .map_err(|e| decode_err(name, e))?;
    let (width, height) = (decoded.columns(), decoded.rows());
    let spp = decoded.samples_per_pixel();
    if spp == 3 {
        let max = ((1u64 << decoded.bits_stored().min(16)) - 1) as f64;
        let raw: Vec<f64> = decoded
            .to_vec_frame_with_options(
                0,
                &ConvertOptions::new().with_modality_lut(ModalityLutOption::None),
            )
            .map_err(|e| decode_err(name, e))?;
        let rgb = raw
            .iter()
            .map(|&v| (v / max * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        return Ok(Decoded::Rgb(Image {
            width,
            height,
            pixels: Pixels::Rgb(rgb),
        }));
    }
    if spp != 1 {
        return Err(unsupported(name, format!("{spp} samples per pixel")));
    }
    let photometric = decoded.photometric_interpretation().as_str().to_string();
    let stored: Vec<f64> = decoded
        .to_vec_frame_with_options(
            0,
            &ConvertOptions::new().with_modality_lut(ModalityLutOption::None),
        )
        .map_err(|e| decode_err(name, e))?;

    let window = Window::from_attrs(
        float_attr(tags::WINDOW_CENTER).and_then(|v| v.first().copied()),
        float_attr(tags::WINDOW_WIDTH).and_then(|v| v.first().copied()),
        str_attr(tags::VOILUT_FUNCTION),
    );
    let bits_stored = decoded.bits_stored() as i32;
    let signed = decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
    let slope = float_attr(tags::RESCALE_SLOPE).and_then(|v| v.first().copied());
    let intercept = float_attr(tags::RESCALE_INTERCEPT).and_then(|v| v.first().copied());
    let values = to_unit_range(&stored, bits_stored, signed, slope, intercept, window)
        .map_err(|reason| unsupported(name, reason))?;
    let values = if photometric == "MONOCHROME1" {
        values.into_iter().map(|v| 1.0 - v).collect()
    } else {
        values
    };
    Ok(Decoded::Gray(Grayscale {
        width,
        height,
        values,
    }))
}

#[derive(Debug, Clone, Copy)]
enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    center: f64,
    width: f64,
    function: VoiFunction,
}

impl Window {
    fn from_attrs(
        center: Option<f64>,
        width: Option<f64>,
        function: Option<String>,
    ) -> Option<Window> {
        let function = match function.as_deref() {
            Some("LINEAR_EXACT") => VoiFunction::LinearExact,
            Some("SIGMOID") => VoiFunction::Sigmoid,
            _ => VoiFunction::Linear,
        };
        Some(Window {
            center: center?,
            width: width?,
            function,
        })
    }
}

/// Rescale, window and normalise stored values to [0, 1] (pydicom's `apply_modality_lut` then
/// `apply_windowing`, divided by its output range).
fn to_unit_range(
    stored: &[f64],
    bits_stored: i32,
    signed: bool,
    slope: Option<f64>,
    intercept: Option<f64>,
    window: Option<Window>,
) -> std::result::Result<Vec<f32>, String> {
    let (slope, intercept) = match (slope, intercept) {
        (Some(s), Some(i)) => (s, i),
        _ => (1.0, 0.0),
    };
    let rescaled = stored.iter().map(|&v| v * slope + intercept);
    let Some(w) = window else {
        // No window: min-max of the rescaled values.
        let values: Vec<f64> = rescaled.collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let span = if hi > lo { hi - lo } else { 1.0 };
        return Ok(values.iter().map(|&v| ((v - lo) / span) as f32).collect());
    };
    // The window's output range is the rescaled range of the stored bits (PS3.3 C.11.2.1.2).
    let (mut y_min, mut y_max) = if signed {
        (
            -(2f64.powi(bits_stored - 1)),
            2f64.powi(bits_stored - 1) - 1.0,
        )
    } else {
        (0.0, 2f64.powi(bits_stored) - 1.0)
    };
    y_min = y_min * slope + intercept;
    y_max = y_max * slope + intercept;
    let range = y_max - y_min;
    let unit = |y: f64| ((y - y_min) / range) as f32;
    let (mut center, mut width) = (w.center, w.width);
    match w.function {
        VoiFunction::Linear | VoiFunction::LinearExact => {
            if matches!(w.function, VoiFunction::Linear) {
                if width < 1.0 {
                    return Err(format!("window width {width} < 1 for a LINEAR window"));
                }
                center -= 0.5;
                width -= 1.0;
            } else if width <= 0.0 {
                return Err(format!(
                    "window width {width} <= 0 for a LINEAR_EXACT window"
                ));
            }
            Ok(rescaled
                .map(|x| {
                    if x <= center - width / 2.0 {
                        0.0
                    } else if x > center + width / 2.0 {
                        1.0
                    } else {
                        unit(((x - center) / width + 0.5) * range + y_min)
                    }
                })
                .collect())
        }
        VoiFunction::Sigmoid => {
            if width <= 0.0 {
                return Err(format!("window width {width} <= 0 for a SIGMOID window"));
            }
            Ok(rescaled
                .map(|x| unit(range / (1.0 + (-4.0 * (x - center) / width).exp()) + y_min))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_follows_the_standard() {
        // centre 100, width 11 (LINEAR): below 94.5 -> 0, above 104.5 -> 1, linear between.
        let w = Window {
            center: 100.0,
            width: 11.0,
            function: VoiFunction::Linear,
        };
        let out = to_unit_range(
            &[0.0, 94.5, 99.5, 104.5, 105.0, 4095.0],
            12,
            false,
            None,
            None,
            Some(w),
        )
        .unwrap();
        assert_eq!(out[0], 0.0);
        assert_eq!(out[1], 0.0);
        assert!((out[2] - 0.5).abs() < 1e-6, "{}", out[2]);
        assert!((out[3] - 1.0).abs() < 1e-6);
        assert_eq!(out[4], 1.0);
        assert_eq!(out[5], 1.0);
    }

    #[test]
    fn rescale_applies_before_window_and_minmax_without_one() {
        let out =
            to_unit_range(&[0.0, 10.0, 20.0], 16, false, Some(2.0), Some(-10.0), None).unwrap();
        assert_eq!(out, vec![0.0, 0.5, 1.0]);
        let w = Window {
            center: 0.0,
            width: 1.0,
            function: VoiFunction::Linear,
        };
        // rescaled: -10, 10, 30 -> window at 0 (width 1 -> threshold only)
        let out = to_unit_range(
            &[0.0, 10.0, 20.0],
            16,
            false,
            Some(2.0),
            Some(-10.0),
            Some(w),
        )
        .unwrap();
        assert_eq!(out, vec![0.0, 1.0, 1.0]);
    }

    #[test]
    fn bad_window_width_is_an_error() {
        let w = Window {
            center: 0.0,
            width: 0.5,
            function: VoiFunction::Linear,
        };
        assert!(to_unit_range(&[1.0], 8, false, None, None, Some(w)).is_err());
    }
}
