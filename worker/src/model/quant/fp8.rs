//! FP8 E4M3 (the OCP "e4m3fn" format every FP8 checkpoint and Hopper's tensor cores use) on the
//! host: decoding, rounding from f32, and the row quantization the GPU's quantizer kernel must
//! reproduce (its CPU reference, and the CPU path's view of an FP8 model).
//!
//! E4M3: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
//! (`m / 8 * 2^-6`); `0x7F` / `0xFF` are NaN; there is no infinity; the largest finite value is
//! 448. Rounding is to nearest, ties to even, saturating at ±448 (CUDA's `__NV_SATFINITE`).
//! A quantized row stores `q = round(w / scale)` with `scale = max|w| / 448` (1 for an all-zero
//! row), and means `q * scale`.

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The value of an E4M3 byte (NaN for `0x7F` / `0xFF`).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = ((b >> 3) & 0x0F, b & 0x07);
    if exp == 0x0F && man == 0x07 {
        return f32::NAN;
    }
    let magnitude =
        if exp == 0 { man as f32 / 8.0 * 2f32.powi(-6) } else { (1.0 + man as f32 / 8.0) * 2f32.powi(exp as i32 - 7) };
    sign * magnitude
}

/// The 127 finite non-negative values, by code (`0x00..=0x7E`): increasing.
fn positive_values() -> &'static [f32; 127] {
    static TABLE: std::sync::OnceLock<[f32; 127]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

/// `x` rounded to E4M3: nearest, ties to the even code, saturating at ±448; NaN to `0x7F`.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let values = positive_values();
    // The first code whose value is >= a (126, the largest, when a is beyond it).
    let hi = values.partition_point(|&v| v < a).min(126);
    let code = if hi == 0 || values[hi] == a {
        hi
    } else if a > values[126] {
        126
    } else {
        let lo = hi - 1;
        let (below, above) = (a - values[lo], values[hi] - a);
        if below < above || (below == above && lo % 2 == 0) { lo } else { hi }
    };
    sign | code as u8
}

/// The scale of values whose largest magnitude is `absmax`: `absmax / 448`, or 1 for zeros.
pub fn scale_for(absmax: f32) -> f32 {
    if absmax > 0.0 && absmax.is_finite() { absmax / E4M3_MAX } else { 1.0 }
}

/// How many values share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One scale for the whole matrix.
    Tensor,
    /// One scale per output row (per channel).
    Channel,
}

/// `rows x cols` row-major values quantized to E4M3: the codes and one scale per row (a
/// per-tensor scale repeated on every row).
pub fn quantize(values: &[f32], rows: usize, cols: usize, granularity: Granularity) -> (Vec<u8>, Vec<f32>) {
    let absmax = |vals: &[f32]| vals.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scales: Vec<f32> = match granularity {
        Granularity::Tensor => vec![scale_for(absmax(values)); rows],
        Granularity::Channel => values.chunks(cols.max(1)).take(rows).map(|row| scale_for(absmax(row))).collect(),
    };
    let codes = values
        .chunks(cols.max(1))
        .zip(&scales)
        .flat_map(|(row, &s)| row.iter().map(move |&v| f32_to_e4m3(v / s)))
        .collect();
    (codes, scales)
}

/// The values meant by `codes` (`rows` rows) with one scale per row.
pub fn dequantize(codes: &[u8], row_scales: &[f32]) -> Vec<f32> {
    let cols = codes.len().checked_div(row_scales.len()).unwrap_or(0);
    codes
        .chunks(cols.max(1))
        .zip(row_scales)
        .flat_map(|(row, &s)| row.iter().map(move |&c| e4m3_to_f32(c) * s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_follows_the_format() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x80), -0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0, "exponent 7 = bias");
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9), "the smallest subnormal");
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6), "the smallest normal");
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert!(positive_values().windows(2).all(|w| w[0] < w[1]), "codes increase with their values");
    }

    #[test]
    fn every_code_round_trips_and_rounding_is_to_nearest_even() {
        for b in (0u8..=255).filter(|&b| b & 0x7F != 0x7F) {
            let back = f32_to_e4m3(e4m3_to_f32(b));
            assert!(back == b || (b & 0x7F == 0 && back & 0x7F == 0), "{b:#x} -> {back:#x}");
        }
        // Between 1.0 (0x38) and 1.125 (0x39): the middle goes to the even code, others to the nearer.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        // Between 1.125 (0x39) and 1.25 (0x3A): the middle goes up, to the even 0x3A.
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3(-1.06), 0xB8);
        assert_eq!(f32_to_e4m3(1e6), 0x7E, "saturates");
        assert_eq!(f32_to_e4m3(-500.0), 0xFE);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(2f32.powi(-11)), 0x00, "below half the smallest subnormal: zero");
        // Exhaustively near every value: the chosen code is a nearest one.
        let values = positive_values();
        for i in 0..2000 {
            let x = i as f32 * 0.2331 + 0.001;
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = values.iter().map(|v| (v - x.min(448.0)).abs()).fold(f32::INFINITY, f32::min);
            assert!((got - x.min(448.0)).abs() <= best, "{x}: {got}");
        }
    }

    #[test]
    fn rows_quantize_within_half_a_step_of_their_scale() {
        let (rows, cols) = (3, 40);
        let values: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * (1 + i / cols) as f32).collect();
        for granularity in [Granularity::Tensor, Granularity::Channel] {
            let (codes, scales) = quantize(&values, rows, cols, granularity);
            assert_eq!((codes.len(), scales.len()), (rows * cols, rows));
            let back = dequantize(&codes, &scales);
            for (r, row) in values.chunks(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    // A relative step of 1/8 at most (3 mantissa bits), plus the subnormal floor.
                    let err = (back[r * cols + c] - v).abs();
                    assert!(
                        err <= v.abs() / 16.0 + scales[r] * 2f32.powi(-10),
                        "{granularity:?} {r},{c}: {v} -> {err}"
                    );
                }
            }
            if granularity == Granularity::Tensor {
                assert!(scales.iter().all(|&s| s == scales[0]));
            } else {
                assert!(scales[2] > scales[0], "each row its own scale");
            }
        }
        let (codes, scales) = quantize(&[0.0; 8], 2, 4, Granularity::Channel);
        assert_eq!((codes, scales), (vec![0; 8], vec![1.0, 1.0]), "zero rows get scale 1");
    }
}
