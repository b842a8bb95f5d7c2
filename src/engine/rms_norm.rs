//! The decoder's RMSNorm. bf16 rows on the CPU are normalised here, sixteen lanes at a time on
//! several threads (candle's CPU kernel converts every value with scalar code: about 2.3 ms per
//! norm of a 1280×720 prompt's 1,228 rows, and a prefill runs 57 of them); other dtypes and
//! devices go to candle.
//!
//! As the reference (transformers' `Qwen2RMSNorm`): the mean of the squares in f32,
//! `x · rsqrt(mean + eps)` rounded to bf16, then multiplied by the bf16 weight and rounded again
//! (candle rounds once, after the weight).

use candle_core::{DType, Module, Tensor};
use half::bf16;

use super::layer_norm::map_bf16_rows;
use super::vector_math;

/// `x / sqrt(mean(x²) + eps) · weight` over the last dimension.
#[derive(Clone)]
pub struct RmsNorm {
    candle: candle_nn::RmsNorm,
    /// The bf16 weight widened to f32, for the bf16 CPU path.
    weight: Option<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        let candle = candle_nn::rms_norm(size, eps, vb)?;
        let w = candle.weight();
        let weight = if w.device().is_cpu() && w.dtype() == DType::BF16 {
            Some(w.to_dtype(DType::F32)?.to_vec1()?)
        } else {
            None
        };
        Ok(Self {
            candle,
            weight,
            eps: eps as f32,
        })
    }

    /// The weight, for the CUDA kernel that adds the residual and normalises in one.
    #[cfg(feature = "cuda")]
    pub fn weight(&self) -> &Tensor {
        self.candle.weight()
    }

    #[cfg(feature = "cuda")]
    pub fn eps(&self) -> f64 {
        self.candle.eps()
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(weight) = &self.weight else {
            return self.candle.forward(x);
        };
        let normalized = map_bf16_rows(x, weight.len(), |src, dst| {
            normalize_row(src, weight, self.eps, dst)
        })?;
        match normalized {
            Some(out) => Ok(out),
            None => self.candle.forward(x),
        }
    }
}

/// One row: `dst = bf16(weight · bf16(src · rsqrt(mean(src²) + eps)))`.
fn normalize_row(src: &[bf16], weight: &[f32], eps: f32, dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if src.len().is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above; the width is a multiple of 16.
        return unsafe { normalize_row_avx512(src, weight, eps, dst) };
    }
    // eight running sums, as the vector path keeps sixteen: one sum over a 1536-wide row
    // drifts enough to move a rounding (and loops the compiler can run in vector lanes)
    let square = |s: &bf16| s.to_f32() * s.to_f32();
    let mut lanes = [0f32; 8];
    let chunks = src.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(square).sum();
    for chunk in chunks {
        for (lane, s) in lanes.iter_mut().zip(chunk) {
            *lane += square(s);
        }
    }
    let mean_square = (lanes.iter().sum::<f32>() + rest) / src.len() as f32;
    let inv_rms = 1.0 / (mean_square + eps).sqrt();
    for ((d, s), &w) in dst.iter_mut().zip(src).zip(weight) {
        *d = bf16::from_f32(w * bf16::from_f32(s.to_f32() * inv_rms).to_f32());
    }
}

/// [`normalize_row`] sixteen lanes at a time (the squares summed in sixteen lanes, then across
/// them).
///
/// # Safety
/// AVX-512F; every slice is as long as `src`, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn normalize_row_avx512(src: &[bf16], weight: &[f32], eps: f32, dst: &mut [bf16]) {
    use std::arch::x86_64::*;
    let n = src.len();
    // SAFETY (all loads and stores): offsets below `n`, a multiple of 16 (the caller's contract).
    unsafe {
        let x = |i: usize| vector_math::load_bf16(src.as_ptr().add(i));
        let mut squares = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            squares = _mm512_fmadd_ps(x(i), x(i), squares);
        }
        let mean_square = _mm512_reduce_add_ps(squares) / n as f32;
        let inv_rms = _mm512_set1_ps(1.0 / (mean_square + eps).sqrt());
        for i in (0..n).step_by(16) {
            let normed = vector_math::round_bf16_avx512(_mm512_mul_ps(x(i), inv_rms));
            let w = _mm512_loadu_ps(weight.as_ptr().add(i));
            vector_math::store_bf16(dst.as_mut_ptr().add(i), _mm512_mul_ps(normed, w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::layer_norm::tests::{normed_rows, spread_parameters};

    /// Against the reference's definition computed in f64 with its two roundings to bf16: the
    /// same bits, except where the f32 sums put a value on the other side of a rounding
    /// boundary (then one bf16 step); rows of odd widths take the scalar path.
    #[test]
    fn bf16_rows_match_the_reference_definition() {
        for width in [1536, 37] {
            let norm = RmsNorm::load(width, 1e-6, spread_parameters(&["weight"], width)).unwrap();
            assert!(norm.weight.is_some(), "the bf16 CPU path is taken");
            let (xs, got) = normed_rows(&norm, 70, width);
            let w = norm.weight.as_ref().unwrap();
            let bf = |v: f64| bf16::from_f64(v).to_f64();
            let (mut exact, mut total) = (0, 0);
            for (r, (row, got)) in xs.iter().zip(&got).enumerate() {
                let n = width as f64;
                let mean_square = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
                let inv_rms = 1.0 / (mean_square + 1e-6).sqrt();
                for j in 0..width {
                    let want = bf(w[j] as f64 * bf(row[j] as f64 * inv_rms));
                    let step = want.abs().max(1e-3) / 128.0;
                    let got = got[j] as f64;
                    assert!(
                        (got - want).abs() <= step,
                        "width {width}, row {r}, column {j}: {got} vs {want}"
                    );
                    exact += usize::from(got == want);
                    total += 1;
                }
            }
            // the two roundings, not one: candle's single rounding differs on about a tenth
            assert!(
                exact as f64 >= 0.995 * total as f64,
                "width {width}: {exact} of {total} exact"
            );
        }
    }
}
