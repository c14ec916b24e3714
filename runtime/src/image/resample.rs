//! PIL's bicubic resampling (Pillow `src/libImaging/Resample.c`), 8 bits per channel, written out
//! because no crate matches Pillow bit for bit: antialiased when shrinking, 8-bit fixed point.

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, tap count, fixed-point weights (`ksize` slots each).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn precompute_coefficients(in_size: usize, out_size: usize) -> Coefficients {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filter_scale;
        // Truncation toward zero as C's (int) cast.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *slot = w;
            total += w;
        }
        for (x, &w) in k.iter().enumerate().take(xmax) {
            let w = if total != 0.0 { w / total } else { w };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `fn $name(args)`: runs `$pass(args)` compiled for AVX2 when the CPU has it (the taps' dot
/// products then use 8-lane integer multiplies, which the x86-64 baseline, SSE2, lacks),
/// else as compiled. Same arithmetic, same result: only the instructions differ. The pass is
/// inlined into a function of its own with the feature enabled (a closure handed to such a
/// function is compiled apart, for the baseline, and never gets the wider instructions).
macro_rules! best_simd {
    ($name:ident => $pass:ident($($arg:ident: $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    $pass($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $pass($($arg),*)
        }
    };
}

best_simd!(run_horizontal_pass => horizontal_pass(src: &[u8], w: usize, channels: usize, co: &Coefficients, out: &mut [u8]));
best_simd!(run_vertical_pass => vertical_pass(src: &[u8], stride: usize, co: &Coefficients, out: &mut [u8]));

/// Separable bicubic resize of interleaved 8-bit samples in Pillow's order: horizontal pass, then
/// vertical, except when the height shrinks by more than twice as many pixels as the width (then
/// vertical first, as Pillow 13's `ImagingResampleInner`; the order changes the rounding).
pub fn resample_bicubic(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let shrink_y = h as i64 - out_h as i64;
    let vertical_first = shrink_y > 0 && shrink_y > (w as i64 - out_w as i64) * 2;
    let vertical = |src: &[u8], width: usize| -> Option<Vec<u8>> {
        (out_h != h).then(|| {
            let co = precompute_coefficients(h, out_h);
            let mut out = vec![0u8; out_h * width * channels];
            run_vertical_pass(src, width * channels, &co, &mut out);
            out
        })
    };
    let horizontal = |src: &[u8], rows: usize| -> Option<Vec<u8>> {
        (out_w != w).then(|| {
            let co = precompute_coefficients(w, out_w);
            let mut out = vec![0u8; out_w * rows * channels];
            run_horizontal_pass(src, w, channels, &co, &mut out);
            out
        })
    };
    if vertical_first {
        let v = vertical(src, w).expect("the height changes");
        horizontal(&v, out_h).unwrap_or(v)
    } else {
        match horizontal(src, h) {
            Some(x) => vertical(&x, out_w).unwrap_or(x),
            None => vertical(src, w).unwrap_or_else(|| src.to_vec()),
        }
    }
}

/// Each row resampled along x. Integer arithmetic wraps as Pillow's C (it never overflows: the
/// weights sum to 2^22 and samples are below 2^8), which also lets the compiler vectorise it.
#[inline(always)]
fn horizontal_pass(src: &[u8], w: usize, channels: usize, co: &Coefficients, out: &mut [u8]) {
    let out_w = co.bounds.len();
    let half = 1i32 << (PRECISION_BITS - 1);
    for (row, out_row) in src
        .chunks_exact(w * channels)
        .zip(out.chunks_exact_mut(out_w * channels))
    {
        for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
            let k = &co.weights[xx * co.ksize..xx * co.ksize + n];
            if channels == 1 {
                let acc = row[xmin..xmin + n]
                    .iter()
                    .zip(k)
                    .fold(half, |a, (&p, &kw)| {
                        a.wrapping_add((p as i32).wrapping_mul(kw))
                    });
                out_row[xx] = clip8(acc);
            } else {
                for c in 0..channels {
                    let mut acc = half;
                    for (i, &kw) in k.iter().enumerate() {
                        acc = acc
                            .wrapping_add((row[(xmin + i) * channels + c] as i32).wrapping_mul(kw));
                    }
                    out_row[xx * channels + c] = clip8(acc);
                }
            }
        }
    }
}

/// Each column resampled along y, a whole output row at a time.
#[inline(always)]
fn vertical_pass(src: &[u8], stride: usize, co: &Coefficients, out: &mut [u8]) {
    let mut acc = vec![0i32; stride];
    for (yy, &(ymin, n)) in co.bounds.iter().enumerate() {
        let k = &co.weights[yy * co.ksize..yy * co.ksize + n];
        acc.fill(1 << (PRECISION_BITS - 1));
        for (i, &kw) in k.iter().enumerate() {
            let row = &src[(ymin + i) * stride..(ymin + i + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add((v as i32).wrapping_mul(kw));
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 50 * 30];
        let out = resample_bicubic(&src, 50, 30, 1, 13, 71);
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(1955, 224), (64, 224), (300, 224), (7, 3)] {
            let co = precompute_coefficients(i, o);
            for (xx, &(_, n)) in co.bounds.iter().enumerate() {
                let sum: i64 = co.weights[xx * co.ksize..xx * co.ksize + n]
                    .iter()
                    .map(|&v| v as i64)
                    .sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o} pixel {xx}: {sum}"
                );
            }
        }
    }
}
