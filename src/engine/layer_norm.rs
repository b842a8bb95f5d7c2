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
        let normalized = map_bf16_rows(x, weight.len(), |src, dst| {
            normalize_row(src, weight, bias, self.eps, dst)
        })?;
        match normalized {
            Some(out) => Ok(out),
            None => self.candle.forward(x),
        }
    }
}

/// `row(src, dst)` on every row of `x`, on several threads, where `x` is a bf16 tensor on the
/// CPU whose rows are `width` long; `None` for any other tensor (the caller goes to candle).
pub(super) fn map_bf16_rows(
    x: &Tensor,
    width: usize,
    row: impl Fn(&[bf16], &mut [bf16]) + Sync,
) -> candle_core::Result<Option<Tensor>> {
    if x.dtype() != DType::BF16 || x.dim(candle_core::D::Minus1)? != width {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
        return Ok(None);
    };
    let src = &values[layout.start_offset()..layout.start_offset() + x.elem_count()];
    // zeroed pages from the allocator: `vec![bf16::ZERO; n]` writes every value first
    let mut out: Vec<bf16> = bytemuck::zeroed_vec(src.len());
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(src.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(dst, src)| {
            for (dst, src) in dst.chunks_exact_mut(width).zip(src.chunks_exact(width)) {
                row(src, dst);
            }
        });
    Tensor::from_vec(out, x.dims(), x.device()).map(Some)
}

/// One row: `dst = bf16((src − mean) · inv_std · weight + bias)`.
fn normalize_row(src: &[bf16], weight: &[f32], bias: &[f32], eps: f32, dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if src.len().is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above; the width is a multiple of 16.
        return unsafe { normalize_row_avx512(src, weight, bias, eps, dst) };
    }
    let mut row: Vec<f32> = src.iter().map(|s| s.to_f32()).collect();
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() / n;
    let inv_std = 1.0 / (var + eps).sqrt();
    for ((x, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
        *x = (*x - mean) * inv_std * w + b;
    }
    vector_math::round_to_bf16(&row, 1.0, dst);
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
pub(super) mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;
    use std::collections::HashMap;

    /// `len` bf16 values spread over [-2.5, 3.5), a different pattern for each `salt`.
    pub(in crate::engine) fn spread_values(len: usize, salt: usize) -> Tensor {
        let v: Vec<f32> = (0..len)
            .map(|i| ((i * 2_654_435_761 + salt * 40_503) % 4099) as f32 / 4099.0 * 6.0 - 2.5)
            .collect();
        Tensor::from_vec(v, len, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// bf16 parameters `names` of `width` spread values (the i-th with salt i + 1).
    pub(in crate::engine) fn spread_parameters(
        names: &[&str],
        width: usize,
    ) -> VarBuilder<'static> {
        let tensors: HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.to_string(), spread_values(width, i + 1)))
            .collect();
        VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu)
    }

    /// `rows` rows of spread values and `norm` of them, both widened to f32.
    pub(in crate::engine) fn normed_rows(
        norm: &dyn Module,
        rows: usize,
        width: usize,
    ) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let x = spread_values(rows * width, 3)
            .reshape((rows, width))
            .unwrap();
        let f32_rows =
            |t: &Tensor| -> Vec<Vec<f32>> { t.to_dtype(DType::F32).unwrap().to_vec2().unwrap() };
        (f32_rows(&x), f32_rows(&norm.forward(&x).unwrap()))
    }

    /// Against the definition in f64 (rounded to bf16 once): every value within one bf16 step,
    /// and candle's kernel on the same input as far off; rows of odd widths take the scalar tail.
    #[test]
    fn bf16_rows_match_the_definition_within_one_rounding() {
        for width in [1280, 37] {
            let vb = spread_parameters(&["weight", "bias"], width);
            let norm = LayerNorm::load(width, 1e-6, vb).unwrap();
            assert!(norm.affine.is_some(), "the bf16 CPU path is taken");
            let (xs, got) = normed_rows(&norm, 70, width);
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
