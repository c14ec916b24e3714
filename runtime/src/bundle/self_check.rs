//! A bundle's self-check: fixed synthetic encoder inputs and the image embeddings its encoder gave
//! for them when the bundle was written. A loaded bundle that does not reproduce them (another
//! execution provider, another ONNX Runtime, a changed graph) is refused before it scores anything
//! (`runtime serve` is not ready, `runtime info --check` fails).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest's file role of the expected embeddings.
pub const SELF_CHECK: &str = "self_check";
pub const SELF_CHECK_FILE: &str = "self_check.npy";
/// The one input generator so far (see [`inputs`]); a bundle names the one it was written with.
pub const INPUTS_V1: &str = "synthetic-v1";
/// Inputs per check: a gradient, a checkerboard, noise.
pub const COUNT: usize = 3;
/// Largest difference allowed in any component of the L2-normalised embeddings. Measured on the
/// same CPU: 0; the margin covers other CPUs' kernels and CUDA's float sums, not a changed model
/// (which moves embeddings by far more than this).
pub const TOLERANCE: f32 = 2e-3;

/// What the manifest records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfCheck {
    /// The generator of the inputs ([`INPUTS_V1`]).
    pub inputs: String,
    pub count: usize,
    /// Largest allowed difference in any component of the normalised embeddings.
    pub tolerance: f32,
}

impl SelfCheck {
    pub fn v1() -> SelfCheck {
        SelfCheck {
            inputs: INPUTS_V1.into(),
            count: COUNT,
            tolerance: TOLERANCE,
        }
    }
}

/// `count` encoder inputs `[count, 3, size, size]` in the range CLIP-normalised pixels take, from
/// integer arithmetic only (the same values on every platform). `None` for an unknown generator.
pub fn inputs(generator: &str, count: usize, size: usize) -> Option<Vec<f32>> {
    if generator != INPUTS_V1 {
        return None;
    }
    let mut out = Vec::with_capacity(count * 3 * size * size);
    for k in 0..count {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let v = match k % 3 {
                        // Diagonal gradient, a different slope per channel: -2 .. 2.
                        0 => ((x + y * (c + 1)) % (2 * size)) as f32 / size as f32 * 2.0 - 2.0,
                        // 8-pixel checkerboard, channel-dependent contrast.
                        1 => {
                            let on = ((x / 8) + (y / 8)) % 2 == 0;
                            (if on { 1.0 } else { -1.0 }) * (0.5 + 0.5 * c as f32)
                        }
                        // Hash noise in [-2, 2).
                        _ => {
                            let i = ((k * 3 + c) * size + y) * size + x;
                            let h = (i as u64)
                                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                                .rotate_left(17)
                                .wrapping_mul(0xBF58_476D_1CE4_E5B9);
                            (h >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
                        }
                    };
                    out.push(v);
                }
            }
        }
    }
    Some(out)
}

/// The check's encoder inputs for a bundle of crop size `size`; an error naming the bundle `dir`
/// when a newer tool wrote them with a generator this runtime does not know.
pub fn check_inputs(check: &SelfCheck, size: usize, dir: &Path) -> Result<Vec<f32>> {
    inputs(&check.inputs, check.count, size).ok_or_else(|| {
        Error::bundle(
            dir,
            format!(
                "its self-check uses inputs '{}', which this runtime does not know (a newer tool wrote it)",
                check.inputs
            ),
        )
    })
}

/// `got` (the encoder's embeddings of [`check_inputs`], on `device`) against the recorded
/// `self_check.npy` bytes: the largest difference, or an error saying how far off they are.
/// The one comparison of `runtime serve`, `runtime info --check` and the browser page.
pub fn compare(
    check: &SelfCheck,
    dim: usize,
    recorded_npy: &[u8],
    got: &[f32],
    dir: &Path,
    device: &str,
) -> Result<f32> {
    let (shape, expected) = super::npy::from_bytes(recorded_npy, &dir.join(SELF_CHECK_FILE))?;
    if shape != [check.count, dim] || got.len() != check.count * dim {
        return Err(Error::bundle(
            dir,
            format!(
                "self-check embeddings of shape {shape:?} and {} values computed, for [{}, {dim}]",
                got.len(),
                check.count
            ),
        ));
    }
    let diff = max_difference(got, &expected, dim);
    // NaN (a broken encoder) fails too.
    if diff.is_nan() || diff > check.tolerance {
        return Err(Error::bundle(
            dir,
            format!(
                "self-check failed on {device}: the image embeddings of its {} check inputs differ by up to {diff:.1e} from those written with the bundle (tolerance {:.0e}); another execution provider, ONNX Runtime or encoder file gives other results",
                check.count, check.tolerance
            ),
        ));
    }
    Ok(diff)
}

/// The largest difference between two sets of embeddings after L2-normalising each row.
pub fn max_difference(got: &[f32], expected: &[f32], dim: usize) -> f32 {
    let (a, b) = (
        crate::scoring::normalize_rows(got, dim),
        crate::scoring::normalize_rows(expected, dim),
    );
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        // NaN stays NaN (f32::max would drop it): a broken encoder must not pass.
        .fold(0f32, |m, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_fixed_and_in_range() {
        let a = inputs(INPUTS_V1, COUNT, 16).expect("known");
        assert_eq!(a.len(), COUNT * 3 * 16 * 16);
        assert_eq!(a, inputs(INPUTS_V1, COUNT, 16).expect("known"));
        assert!(a.iter().all(|v| (-2.0..=2.0).contains(v)));
        // The three kinds differ.
        let plane = 3 * 16 * 16;
        assert_ne!(a[..plane], a[plane..2 * plane]);
        assert_ne!(a[plane..2 * plane], a[2 * plane..]);
        assert!(inputs("synthetic-v9", COUNT, 16).is_none());
    }

    #[test]
    fn difference_ignores_scale_not_direction() {
        let e = [1.0, 2.0, 2.0, 0.0, 3.0, 4.0];
        let scaled: Vec<f32> = e.iter().map(|v| v * 7.0).collect();
        assert!(max_difference(&scaled, &e, 3) < 1e-6);
        let other = [2.0, 1.0, 2.0, 0.0, 3.0, 4.0];
        assert!(max_difference(&other, &e, 3) > 0.3);
        let broken = [f32::NAN, 1.0, 1.0, 0.0, 3.0, 4.0];
        assert!(max_difference(&broken, &e, 3).is_nan());
    }
}
