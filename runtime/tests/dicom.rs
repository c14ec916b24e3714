//! DICOM decoding against pydicom (real files from the PyPI package pydicom-data), and DICOM files
//! written here with dicom-rs for the pipeline's corner cases.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use runtime::bundle::npy;
use runtime::image::decode::decode_bytes;
use runtime::image::dicom;
use runtime::image::Pixels;
use runtime::Error;

/// Real files: NEMA WG04 radiographs (uncompressed and JPEG 2000) and the compressed syntaxes.
const FILES: [&str; 8] = [
    "RG1_UNCI.dcm",                   // chest CR, 15-bit, MONOCHROME1, explicit VR LE
    "RG1_J2KI.dcm",                   // same, JPEG 2000 (lossy)
    "RG3_UNCI.dcm",                   // leg CR, 10-bit, MONOCHROME1
    "RG3_J2KI.dcm",                   // same, JPEG 2000
    "JPEG-LL.dcm",                    // JPEG lossless (process 14)
    "JPGLosslessP14SV1_1s_1f_8b.dcm", // JPEG lossless SV1, 8-bit
    "emri_small_RLE.dcm",             // RLE lossless, 16-bit MR
    "color3d_jpeg_baseline.dcm",      // JPEG baseline, YBR colour, multi-frame
];

#[test]
fn real_dicoms_decode_as_pydicom() {
    let data = pydicom_data();
    let out_tmp = tmpdir("dicom-ref");
    let out = out_tmp.path().to_path_buf();
    let files: Vec<PathBuf> = FILES.iter().map(|f| data.join(f)).collect();
    let status = Command::new(test_python())
        .arg(root().join("scripts/dicom_reference.py"))
        .arg(&out)
        .args(&files)
        .status()
        .expect("run pydicom reference");
    assert!(status.success(), "pydicom reference script failed");
    let mut report = Vec::new();
    for f in &files {
        let name = f.file_stem().expect("stem").to_string_lossy().to_string();
        let (shape, reference) =
            npy::read(&out.join(format!("{name}.npy"))).expect("reference npy");
        let bytes = std::fs::read(f).expect("read dicom");
        let (ours, tolerance) = if shape.len() == 3 {
            let img = decode_bytes(&bytes, f).expect("decode colour");
            let Pixels::Rgb(rgb) = img.pixels else {
                panic!("{name}: expected RGB")
            };
            // Colour JPEG: different JPEG decoders (libjpeg vs jpeg-decoder) differ by a few
            // levels; the README reports max 0.02 (5 levels of 255).
            (
                rgb.iter().map(|&v| v as f32 / 255.0).collect::<Vec<f32>>(),
                0.02,
            )
        } else {
            let g = dicom::decode_grayscale(&bytes, f).expect("decode grayscale");
            // The README reports 6e-8: float rounding of the LUTs, below 1e-7.
            (g.values, 1e-7)
        };
        assert_eq!(ours.len(), reference.len(), "{name}: size");
        let (max, mean) = (
            max_abs_diff(&ours, &reference),
            mean_abs_diff(&ours, &reference),
        );
        report.push(format!("{name}: max {max:.1e} mean {mean:.1e}"));
        assert!(
            max <= tolerance,
            "{name}: max difference {max} (mean {mean})"
        );
    }
    eprintln!("DICOM vs pydicom (values in [0,1]): {}", report.join("; "));
}

#[test]
fn monochrome1_chest_is_inverted_and_windowed() {
    let f = pydicom_data().join("RG1_UNCI.dcm");
    let img = decode_bytes(&std::fs::read(&f).expect("read"), &f).expect("decode");
    assert_eq!((img.width, img.height), (1841, 1955));
    let Pixels::Gray(g) = img.pixels else {
        panic!("gray expected")
    };
    // Chest PA: the lungs (centre-left and centre-right) are darker than the mediastinum (centre).
    let at = |x: usize, y: usize| g[y * 1841 + x] as f32;
    let lungs = (at(600, 800) + at(1250, 800)) / 2.0;
    let spine = at(920, 800);
    assert!(
        spine > lungs + 20.0,
        "mediastinum {spine} vs lungs {lungs}: inversion wrong?"
    );
}

#[test]
fn rescale_and_window_from_written_dicom() {
    let dir_tmp = tmpdir("dcm-window");
    let dir = dir_tmp.path().to_path_buf();
    // Stored 0..4095 ramp; rescale 2x - 1000; window centre 0, width 2001 -> stored 250..749 ramps.
    let pixels: Vec<u16> = (0..64u16).map(|i| i * 64).collect();
    let mut obj = image_object(8, 8, pixels.clone(), "MONOCHROME2");
    obj.put(DataElement::new(
        tags::RESCALE_SLOPE,
        VR::DS,
        PrimitiveValue::from("2"),
    ));
    obj.put(DataElement::new(
        tags::RESCALE_INTERCEPT,
        VR::DS,
        PrimitiveValue::from("-1000"),
    ));
    obj.put(DataElement::new(
        tags::WINDOW_CENTER,
        VR::DS,
        PrimitiveValue::from("0"),
    ));
    obj.put(DataElement::new(
        tags::WINDOW_WIDTH,
        VR::DS,
        PrimitiveValue::from("2001"),
    ));
    let path = write_dicom(&dir, "window.dcm", obj, "1.2.840.10008.1.2.1");
    let g = dicom::decode_grayscale(&std::fs::read(&path).expect("read"), &path).expect("decode");
    for (i, &stored) in pixels.iter().enumerate() {
        let x = stored as f64 * 2.0 - 1000.0;
        // LINEAR: c' = -0.5, w' = 2000; output range = rescaled stored range [-1000, 7190].
        let y = if x <= -0.5 - 1000.0 {
            0.0
        } else if x > -0.5 + 1000.0 {
            1.0
        } else {
            (((x + 0.5) / 2000.0 + 0.5) * 8190.0) / 8190.0
        };
        assert!(
            (g.values[i] as f64 - y).abs() < 1e-6,
            "pixel {i}: stored {stored} -> {} expected {y}",
            g.values[i]
        );
    }
}

#[test]
fn dicom_without_pixel_data_is_a_clear_error() {
    let dir_tmp = tmpdir("dcm-nopixels");
    let dir = dir_tmp.path().to_path_buf();
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.1"),
    ));
    obj.put(DataElement::new(
        tags::PATIENT_NAME,
        VR::PN,
        PrimitiveValue::from("Doe^John"),
    ));
    let path = write_dicom(&dir, "nopixels.dcm", obj, "1.2.840.10008.1.2.1");
    let err = decode_bytes(&std::fs::read(&path).expect("read"), &path).expect_err("must fail");
    assert!(matches!(err, Error::NoPixelData { .. }), "{err}");
    assert!(err.to_string().contains("no pixel data"), "{err}");
}

#[test]
fn unknown_transfer_syntax_is_a_clear_error() {
    let dir_tmp = tmpdir("dcm-ts");
    let dir = dir_tmp.path().to_path_buf();
    let obj = image_object(4, 4, vec![0; 16], "MONOCHROME2");
    let path = write_dicom(&dir, "ts.dcm", obj, "1.2.840.10008.1.2.1");
    // Rewrite the transfer syntax UID in the meta group to one nobody knows (same length).
    let mut bytes = std::fs::read(&path).expect("read");
    let needle = b"1.2.840.10008.1.2.1";
    let pos = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("ts uid in meta");
    bytes[pos..pos + needle.len()].copy_from_slice(b"1.2.840.99999.9.9.9");
    let err = decode_bytes(&bytes, &path).expect_err("must fail");
    assert!(
        err.to_string()
            .contains("unknown transfer syntax 1.2.840.99999.9.9.9"),
        "{err}"
    );
}

#[test]
fn absurd_dicom_size_is_refused_before_decoding() {
    let dir_tmp = tmpdir("dcm-size");
    let dir = dir_tmp.path().to_path_buf();
    let mut obj = image_object(4, 4, vec![0; 16], "MONOCHROME2");
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(65535u16),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(65535u16),
    ));
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("1000"),
    ));
    let path = write_dicom(&dir, "huge.dcm", obj, "1.2.840.10008.1.2.1");
    let err = decode_bytes(&std::fs::read(&path).expect("read"), &path).expect_err("must fail");
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}
