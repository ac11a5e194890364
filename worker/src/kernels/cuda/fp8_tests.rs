//! The FP8 kernels (`fp8.cu`) against the host: row quantization bit for bit with
//! `model::quant::fp8`, and every product path (GEMV rows 1-8, tensor cores with per-token
//! activation quantization, the dequantizing path) against an f32 product of the same codes.

use candle_core::{DType, Tensor};

use super::CudaKernels;
use super::tests::{assert_close, device, download, random, rounded, upload_f32};
use crate::model::quant::fp8::{Granularity, dequantize, quantize};

/// `x · Wᵀ` in f64 on the host for row-major `x` [m, k] and `w` [n, k].
fn product(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32;
        }
    }
    y
}

/// An FP8 weight of `n` rows of `k` on the device (quantized on the host) and the values it means.
fn weight(k: &CudaKernels, seed: u64, n: usize, kk: usize) -> (super::fp8::Fp8Weight, Vec<f32>) {
    let dev = k.device();
    // Rows of different magnitudes, so the per-row scales matter.
    let values: Vec<f32> =
        random(seed, n * kk, 0.05).iter().enumerate().map(|(i, v)| v * (1.0 + (i / kk % 7) as f32)).collect();
    let (codes, scales) = quantize(&values, n, kk, Granularity::Channel);
    let meant = dequantize(&codes, &scales);
    let codes = Tensor::from_vec(codes, (n, kk), dev).unwrap();
    let scales = Tensor::from_vec(scales, n, dev).unwrap();
    (k.fp8_weight(codes, scales, true).unwrap(), meant)
}

#[test]
fn quantizing_rows_on_the_gpu_gives_the_hosts_codes_and_scales() {
    let dev = device();
    let k = CudaKernels::load(&dev, DType::BF16, 64).unwrap();
    let (n, kk) = (37, 1056);
    let mut values = rounded(&random(11, n * kk, 3.0), DType::BF16);
    values[..kk].fill(0.0); // a zero row: scale 1
    values[2 * kk + 5] = 1e4; // one large value: the rest of its row goes subnormal or zero
    let values = rounded(&values, DType::BF16);
    let w = upload_f32(&values, &[n, kk], DType::BF16, &dev).unwrap();
    let got = k.quantize_weight_fp8(&w).unwrap();
    let (codes, scales) = quantize(&values, n, kk, Granularity::Channel);
    assert_eq!(got.scales.to_vec1::<f32>().unwrap(), scales);
    assert_eq!(got.codes.flatten_all().unwrap().to_vec1::<u8>().unwrap(), codes);
}

#[test]
fn the_fp8_gemv_matches_the_product_of_its_codes_for_every_row_count() {
    let dev = device();
    let k = CudaKernels::load(&dev, DType::BF16, 64).unwrap();
    // 1000 rows: not a multiple of any rows-per-block; k = 1040 leaves a partial last sweep. One
    // row also at 6144 and 16400 outputs: each of gemv.rs's one-row shapes (split, one feature
    // per warp, wide) is taken once.
    let shapes = (1..=8).map(|m| (m, 1000, 1040)).chain([(1, 6144, 1040), (1, 16400, 1040)]);
    // And Llama-3.1-8B's gate_up and down at one and two rows.
    let shapes = shapes.chain([(1, 28672, 4096), (2, 28672, 4096), (1, 4096, 14336)]);
    for (i, (m, n, kk)) in shapes.enumerate() {
        let (w, meant) = weight(&k, 100 + i as u64, n, kk);
        let x = rounded(&random(200 + i as u64, m * kk, 1.0), DType::BF16);
        let x_dev = upload_f32(&x, &[m, kk], DType::BF16, &dev).unwrap();
        let y = k.alloc((m, n)).unwrap();
        k.gemv_fp8_into(&x_dev, &w, &y, m).unwrap();
        assert_close(&format!("fp8 gemv m={m} n={n}"), DType::BF16, &download(&y), &product(&x, &meant, m, n, kk));
    }
}

#[test]
fn fp8_products_of_many_rows_match_through_tensor_cores_and_through_dequantization() {
    let dev = device();
    for dequantize_path in [false, true] {
        let mut k = CudaKernels::load(&dev, DType::BF16, 64).unwrap();
        if dequantize_path {
            k.force_fp8_dequantize().unwrap();
        } else if !k.fp8_tensor_cores() {
            continue; // no FP8 tensor cores on this GPU
        } else {
            k.enable_fp8(true).unwrap();
        }
        // Past the GEMV; the last weight spans two dequantized slices (16M values each).
        for (i, &(m, n, kk)) in [(3, 96, 256), (9, 1000, 1040), (64, 512, 4096), (16, 16400, 1024)].iter().enumerate() {
            let (w, meant) = weight(&k, 300 + i as u64, n, kk);
            let x = rounded(&random(400 + i as u64, m * kk, 1.0), DType::BF16);
            let x_dev = upload_f32(&x, &[m, kk], DType::BF16, &dev).unwrap();
            let got = download(&k.linear_fp8(&x_dev, &w).unwrap());
            // Tensor cores multiply codes by codes: the activations as quantized per token.
            let x_used = if dequantize_path || m <= k.gemv_rows {
                x.clone()
            } else {
                let (codes, scales) = quantize(&x, m, kk, Granularity::Channel);
                dequantize(&codes, &scales)
            };
            let what =
                format!("fp8 m={m} n={n} k={kk} ({})", if dequantize_path { "dequantized" } else { "tensor cores" });
            assert_close(&what, DType::BF16, &got, &product(&x_used, &meant, m, n, kk));
            if !dequantize_path && m > k.gemv_rows {
                // And within E4M3's rounding (3 mantissa bits: ~2.5% relative) of the product of
                // the unquantized activations.
                let err = super::tests::relative_error(&got, &product(&x, &meant, m, n, kk));
                assert!(err < 5e-2, "{what} vs bf16 x: relative error {err:.2e}");
            }
        }
    }
}
