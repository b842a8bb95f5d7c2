//! The vision tower's LayerNorm. bf16 rows on the CPU are normalised here, sixteen lanes at a
//! time on several threads (candle's CPU kernel walks each row with scalar conversions, which
//! made the norms as slow as a quarter of the MLP); other dtypes and devices go to candle.
//!
//! A row is widened to f32, its mean taken, then the variance as the mean of squared
//! deviations (two passes, as PyTorch's CPU kernel, rather than `E[x²] − mean²`), and each value
//! is rounded to bf16 once at the end.

use candle_core::{CpuStorage, DType, Module, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::vector_math;

/// Rows per rayon task: enough to pay for the task, few enough to share out a screenshot.
const ROWS_PER_TASK: usize = 16;

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dimension.
#[derive(Clone)]
pub struct LayerNorm {
    candle: candle_nn::LayerNorm,
    /// The weight and bias in f32, for the bf16 CPU path.
    affine: Option<(Vec<f32>, Vec<f32>)>,
    eps: f32,
}

impl LayerNorm {
    pub fn load(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        let config = candle_nn::LayerNormConfig {
            eps,
            ..Default::default()
        };
        let candle = candle_nn::layer_norm(size, config, vb)?;
        let affine = match (candle.weight(), candle.bias()) {
            (w, Some(b)) if w.device().is_cpu() && w.dtype() == DType::BF16 => Some((
                w.to_dtype(DType::F32)?.to_vec1()?,
                b.to_dtype(DType::F32)?.to_vec1()?,
            )),
            _ => None,
        };
        Ok(Self {
            candle,
            affine,
            eps: eps as f32,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some((weight, bias)) = &self.affine else {
            return self.candle.forward(x);
        };
        let width = weight.len();
        if x.dtype() != DType::BF16 || x.dim(candle_core::D::Minus1)? != width {
            return self.candle.forward(x);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
            return self.candle.forward(&x);
        };
        let src = &values[layout.start_offset()..layout.start_offset() + x.elem_count()];
        // zeroed pages from the allocator: `vec![bf16::ZERO; n]` writes every value first
        let mut out: Vec<bf16> = bytemuck::zeroed_vec(src.len());
        out.par_chunks_mut(width * ROWS_PER_TASK)
            .zip(src.par_chunks(width * ROWS_PER_TASK))
            .for_each_init(
                || vec![0f32; width],
                |row_f32, (dst, src)| {
                    for (dst, src) in dst.chunks_exact_mut(width).zip(src.chunks_exact(width)) {
                        normalize_row(src, weight, bias, self.eps, row_f32, dst);
                    }
                },
            );
        Tensor::from_vec(out, x.dims(), x.device())
    }
}

/// One row: `dst = bf16((src − mean) · inv_std · weight + bias)`, through `row` (f32 scratch of
/// the row's width).
fn normalize_row(
    src: &[bf16],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    row: &mut [f32],
    dst: &mut [bf16],
) {
    #[cfg(target_arch = "x86_64")]
    if src.len().is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above; the width is a multiple of 16.
        return unsafe { normalize_row_avx512(src, weight, bias, eps, dst) };
    }
    for (x, s) in row.iter_mut().zip(src) {
        *x = s.to_f32();
    }
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() / n;
    let inv_std = 1.0 / (var + eps).sqrt();
    for ((x, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
        *x = (*x - mean) * inv_std * w + b;
    }
    vector_math::round_to_bf16(row, 1.0, dst);
}

/// [`normalize_row`] sixteen lanes at a time (the sums in sixteen lanes, then across them).
///
/// # Safety
/// AVX-512F; every slice is as long as `src`, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn normalize_row_avx512(
    src: &[bf16],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    dst: &mut [bf16],
) {
    use std::arch::x86_64::*;
    let n = src.len();
    // SAFETY (all loads and stores): offsets below `n`, a multiple of 16 (the caller's contract).
    unsafe {
        let x = |i: usize| vector_math::load_bf16(src.as_ptr().add(i));
        let mut sum = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            sum = _mm512_add_ps(sum, x(i));
        }
        let mean = _mm512_reduce_add_ps(sum) / n as f32;
        let vmean = _mm512_set1_ps(mean);
        let mut squares = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let d = _mm512_sub_ps(x(i), vmean);
            squares = _mm512_fmadd_ps(d, d, squares);
        }
        let var = _mm512_reduce_add_ps(squares) / n as f32;
        let inv_std = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        for i in (0..n).step_by(16) {
            let scaled = _mm512_mul_ps(_mm512_sub_ps(x(i), vmean), inv_std);
            let w = _mm512_loadu_ps(weight.as_ptr().add(i));
            let b = _mm512_loadu_ps(bias.as_ptr().add(i));
            vector_math::store_bf16(dst.as_mut_ptr().add(i), _mm512_fmadd_ps(scaled, w, b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;
    use std::collections::HashMap;

    /// Against the definition in f64 (rounded to bf16 once): every value within one bf16 step,
    /// and candle's kernel on the same input as far off; rows of odd widths take the scalar tail.
    #[test]
    fn bf16_rows_match_the_definition_within_one_rounding() {
        for width in [1280, 37] {
            let rows = 70;
            let value = |i: usize, salt: usize| {
                ((i * 2_654_435_761 + salt * 40_503) % 4099) as f32 / 4099.0 * 6.0 - 2.5
            };
            let make = |len: usize, salt: usize| -> Tensor {
                let v: Vec<f32> = (0..len).map(|i| value(i, salt)).collect();
                Tensor::from_vec(v, len, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            };
            let mut tensors = HashMap::new();
            tensors.insert("weight".to_string(), make(width, 1));
            tensors.insert("bias".to_string(), make(width, 2));
            let vb = VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu);
            let norm = LayerNorm::load(width, 1e-6, vb).unwrap();
            assert!(norm.affine.is_some(), "the bf16 CPU path is taken");
            let x = make(rows * width, 3).reshape((rows, width)).unwrap();
            let got: Vec<Vec<f32>> = norm
                .forward(&x)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2()
                .unwrap();
            let xs: Vec<Vec<f32>> = x.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
            let w: Vec<f32> = norm.affine.as_ref().unwrap().0.clone();
            let b: Vec<f32> = norm.affine.as_ref().unwrap().1.clone();
            for (r, (row, got)) in xs.iter().zip(&got).enumerate() {
                let n = width as f64;
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                for j in 0..width {
                    let want =
                        (row[j] as f64 - mean) / (var + 1e-6).sqrt() * w[j] as f64 + b[j] as f64;
                    // one bf16 step at this magnitude (8 bits of mantissa)
                    let step = (want.abs().max(1e-3)) / 128.0;
                    assert!(
                        (got[j] as f64 - want).abs() <= step,
                        "width {width}, row {r}, column {j}: {} vs {want}",
                        got[j]
                    );
                }
            }
        }
    }
}
