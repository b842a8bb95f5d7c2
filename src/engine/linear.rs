//! The engine's linear layers (decoder and vision tower): dense weights (one-token inputs go
//! through the bandwidth-bound [`super::matvec`] kernel, longer ones through a plain 2-D
//! matmul), bf16 weights packed for the AVX512-BF16 [`super::gemm`] kernel where the CPU has it
//! ([`Linear::pack_for_cpu`]; candle's bf16 matmul widens to f32 and runs at a third of the
//! speed), or quantized weights, which read 3.5–7× fewer bytes per decoded token than f32:
//! `q8_0` (GGML's Q8_0 blocks, multiplied by our own kernel: in 8-bit against Q8_0-quantized
//! activations where the CPU has AVX512-VNNI, as llama.cpp does, else with f32 activations) or `q4k`
//! (GGML's Q4_K through candle's quantized matmul). Prompts of more than one token multiply with
//! the dequantized weights, one layer at a time.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use candle_nn::VarBuilder;
use half::bf16;

use super::gemm::{PackedWeight, SharedOut, Strides};
use super::matvec;
use super::weight_buffer::Placement;

/// A quantized weight format for the language model's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// 8-bit blocks of 32 with one f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit super-blocks of 256 with 6-bit sub-block scales (4.5 bits per weight).
    Q4K,
}

impl Quantization {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// Whether a weight whose rows have `k` values can be stored in this format.
    fn fits(self, k: usize) -> bool {
        k.is_multiple_of(self.ggml().block_size())
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4k",
        })
    }
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4k" | "q4_k" => Ok(Self::Q4K),
            other => Err(format!("unknown quantization `{other}`; use q8_0 or q4k")),
        }
    }
}

#[derive(Clone)]
enum Weight {
    /// `(out, in)`, row-major.
    Dense(Tensor),
    Int8(Arc<matvec::Int8Rows>),
    /// The quantized tensor (dequantized for prompts) and candle's matmul over it (one token).
    Ggml(Arc<QTensor>, QMatMul),
    /// bf16 packed for the AVX512-BF16 kernel, with the bias in f32 (added before rounding).
    PackedBf16(Arc<PackedWeight>, Option<Arc<Vec<f32>>>),
}

/// An activation applied to a layer's output in f32, before it is rounded to the output dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 · x)`, the vision tower's MLP activation.
    QuickGelu,
}

impl Activation {
    fn apply_f32(self, x: f32) -> f32 {
        match self {
            Self::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        }
    }

    /// The same on a tensor, with candle's ops (in the tensor's dtype).
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// `y = x · Wᵀ (+ b)` over the last dimension of `x`.
#[derive(Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    pub fn load(
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Stores the weight in `format` (the dense copy is freed). Returns false, leaving the layer
    /// dense, when its rows do not divide into the format's blocks.
    pub fn quantize(&mut self, format: Quantization) -> candle_core::Result<bool> {
        let Weight::Dense(w) = &self.weight else {
            return Ok(true);
        };
        if !format.fits(w.dim(1)?) {
            return Ok(false);
        }
        let (n, k) = w.dims2()?;
        self.weight = match format {
            Quantization::Q8_0 => {
                let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                Weight::Int8(Arc::new(matvec::Int8Rows::quantize(&values, n, k)))
            }
            Quantization::Q4K => {
                let q = Arc::new(QTensor::quantize(&w.to_dtype(DType::F32)?, format.ggml())?);
                Weight::Ggml(q.clone(), QMatMul::from_arc(q)?)
            }
        };
        Ok(true)
    }

    /// Packs a dense bf16 weight on the CPU for the AVX512-BF16 kernel (the dense copy is freed);
    /// a no-op for other dtypes and devices, quantized weights, or CPUs without the instructions.
    pub fn pack_for_cpu(&mut self) -> candle_core::Result<()> {
        let Weight::Dense(w) = &self.weight else {
            return Ok(());
        };
        if w.dtype() != DType::BF16 || !w.device().is_cpu() {
            return Ok(());
        }
        let (n, k) = w.dims2()?;
        let values: Vec<bf16> = w.flatten_all()?.to_vec1()?;
        let Some(packed) =
            PackedWeight::pack_bf16(&values, n, k, Strides::row_major(k), Placement::Model)
        else {
            return Ok(());
        };
        let bias = match &self.bias {
            Some(b) => Some(Arc::new(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
            None => None,
        };
        self.weight = Weight::PackedBf16(Arc::new(packed), bias);
        self.bias = None;
        Ok(())
    }

    /// `activation(x · Wᵀ + b)`: fused into the packed kernel's rounding step (one rounding
    /// instead of one per elementwise op), candle's ops otherwise.
    pub fn forward_activated(
        &self,
        x: &Tensor,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::PackedBf16(w, bias) => packed_bf16(
                x,
                w,
                bias.as_deref().map(|b| b.as_slice()),
                Some(activation),
            ),
            _ => activation.apply(&self.forward(x)?),
        }
    }

    /// Bytes the weight occupies (what a decode step reads).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Int8(q) => q.bytes(),
            Weight::Ggml(q, _) => q.storage_size_in_bytes(),
            Weight::PackedBf16(w, _) => w.n() * w.k() * 2,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::PackedBf16(w, bias) => {
                return packed_bf16(x, w, bias.as_deref().map(|b| b.as_slice()), None);
            }
            Weight::Dense(w) => match matvec::matvec(x, w)? {
                Some(y) => y,
                None => matmul_2d(x, w)?,
            },
            Weight::Int8(q) => {
                let (n, k) = q.dims();
                if x.elem_count() == k && matches!(x.device(), Device::Cpu) {
                    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let mut dims = x.dims().to_vec();
                    *dims.last_mut().expect("x has a last dim") = n;
                    Tensor::from_vec(q.matvec(&xs), dims, &Device::Cpu)?.to_dtype(x.dtype())?
                } else {
                    let w = Tensor::from_vec(q.dequantize(), (n, k), &Device::Cpu)?
                        .to_device(x.device())?
                        .to_dtype(x.dtype())?;
                    matmul_2d(x, &w)?
                }
            }
            Weight::Ggml(q, matmul) => {
                let k = q.shape().dims2()?.1;
                if x.elem_count() == k {
                    matmul
                        .forward(&x.to_dtype(DType::F32)?)?
                        .to_dtype(x.dtype())?
                } else {
                    let w = q.dequantize(x.device())?.to_dtype(x.dtype())?;
                    matmul_2d(x, &w)?
                }
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `activation(x (.., in) · wᵀ + bias)` through the packed bf16 kernel, rounded once to bf16.
fn packed_bf16(
    x: &Tensor,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    activation: Option<Activation>,
) -> candle_core::Result<Tensor> {
    let k = w.k();
    if x.dtype() != DType::BF16 || x.dim(candle_core::D::Minus1)? != k {
        candle_core::bail!(
            "packed bf16 layer of {k} inputs got a {:?} input of shape {:?}",
            x.dtype(),
            x.dims()
        );
    }
    let x = x.contiguous()?;
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dim") = w.n();
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
        candle_core::bail!("packed bf16 layer on a non-CPU input");
    };
    let a = &values[layout.start_offset()..layout.start_offset() + rows * k];
    let n = w.n();
    let mut sums = vec![0f32; rows * n];
    let mut out = vec![bf16::ZERO; rows * n];
    let dst = SharedOut(out.as_mut_ptr());
    w.matmul_bf16_then(a, rows, k, bias, &mut sums, n, 1, |row, first, values| {
        // SAFETY: each thread finishes only its own columns of `out` (rows × n).
        let dst = unsafe { dst.slice(row * n + first, values.len()) };
        match activation {
            Some(act) => {
                for (d, &v) in dst.iter_mut().zip(values) {
                    *d = bf16::from_f32(act.apply_f32(v));
                }
            }
            None => {
                for (d, &v) in dst.iter_mut().zip(values) {
                    *d = bf16::from_f32(v);
                }
            }
        }
    });
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// `x (.., in) · wᵀ` as one 2-D matmul: no broadcast copy of the weight per batch.
fn matmul_2d(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dim") = w.dim(0)?;
    x.reshape((rows, k))?.matmul(&w.t()?)?.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The largest magnitude in `t` (f32).
    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn dense_forward_matches_candle_linear_for_one_and_many_rows() {
        let w = Tensor::randn(0f32, 1.0, (48, 64), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 48, &Device::Cpu).unwrap();
        let ours = Linear::new(w.clone(), Some(b.clone()));
        let theirs = candle_nn::Linear::new(w, Some(b));
        for rows in [1, 5] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 64), &Device::Cpu).unwrap();
            let diff = max_abs(&(ours.forward(&x).unwrap() - theirs.forward(&x).unwrap()).unwrap());
            assert!(diff < 1e-4, "rows {rows}: {diff}");
        }
    }

    #[test]
    fn quantized_forward_stays_close_and_shrinks_the_weight() {
        let w = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 1, 256), &Device::Cpu).unwrap();
        let dense = Linear::new(w.clone(), None);
        let exact = dense.forward(&x).unwrap();
        let scale = max_abs(&exact);
        for (format, tolerance, max_bytes) in [
            (Quantization::Q8_0, 0.02, 64 * 256 * 9 / 8),
            (Quantization::Q4K, 0.15, 64 * 256 * 5 / 8),
        ] {
            let mut q = dense.clone();
            assert!(q.quantize(format).unwrap());
            assert!(
                q.weight_bytes() <= max_bytes,
                "{format}: {}",
                q.weight_bytes()
            );
            let diff = max_abs(&(q.forward(&x).unwrap() - &exact).unwrap());
            assert!(diff / scale < tolerance, "{format}: {diff} of {scale}");
        }
    }

    #[test]
    fn packed_bf16_matches_the_dense_layer_where_the_cpu_has_the_kernel() {
        let w = Tensor::randn(0f32, 1.0, (70, 96), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, 70, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let dense = Linear::new(w.clone(), Some(b.clone()));
        let mut packed = dense.clone();
        packed.pack_for_cpu().unwrap();
        if !matches!(packed.weight, Weight::PackedBf16(..)) {
            eprintln!("this CPU lacks AVX512-BF16: the packed layer is not used here");
            return;
        }
        assert_eq!(packed.weight_bytes(), dense.weight_bytes());
        let x = Tensor::randn(0f32, 1.0, (5, 96), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let f32_of = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let fused = f32_of(packed.forward_activated(&x, Activation::QuickGelu).unwrap());
        let plain = Activation::QuickGelu
            .apply(&f32_of(packed.forward(&x).unwrap()))
            .unwrap();
        let diff = max_abs(&(fused - plain).unwrap());
        assert!(diff <= 0.25, "{diff}");
        for rows in [1, 13, 40] {
            let x = Tensor::randn(0f32, 1.0, (2, rows, 96), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let exact = x
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap()
                .broadcast_add(&b.to_dtype(DType::F32).unwrap())
                .unwrap();
            let got = packed.forward(&x).unwrap();
            assert_eq!(got.dims(), &[2, rows, 70]);
            assert_eq!(got.dtype(), DType::BF16);
            let diff = max_abs(&(got.to_dtype(DType::F32).unwrap() - &exact).unwrap());
            // one rounding to bf16 of values up to ~40: half a unit in the last place is 0.125
            assert!(diff <= 0.125, "rows {rows}: {diff}");
        }
    }

    #[test]
    fn rows_that_do_not_fit_the_blocks_stay_dense() {
        let mut layer = Linear::new(
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
            None,
        );
        assert!(!layer.quantize(Quantization::Q4K).unwrap());
        assert_eq!(layer.weight_bytes(), 4 * 64 * 4);
        assert!(layer.quantize(Quantization::Q8_0).unwrap());
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("Q8_0".parse::<Quantization>(), Ok(Quantization::Q8_0));
        assert_eq!("q4k".parse::<Quantization>(), Ok(Quantization::Q4K));
        assert!(
            "q3".parse::<Quantization>()
                .unwrap_err()
                .contains("q8_0 or q4k")
        );
    }
}
