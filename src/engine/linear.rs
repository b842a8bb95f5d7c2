//! The engine's linear layers (decoder and vision tower): dense weights (one-token inputs go
//! through the bandwidth-bound `matvec` kernel, longer ones through a plain 2-D
//! matmul), bf16 weights packed for the `gemm` kernel where the CPU runs it (AVX512-BF16 or AVX2)
//! ([`Linear::pack_for_cpu`]; candle's bf16 matmul widens to f32 and runs at a third of the
//! speed), or quantized weights, which read 3.5–7× fewer bytes per decoded token than f32:
//! `q8_0` (GGML's Q8_0 blocks, on the CPU multiplied by our own kernel: in 8-bit against
//! Q8_0-quantized activations where the CPU has AVX512-VNNI, as llama.cpp does, else with f32
//! activations; on a GPU through candle's quantized matmul) or `q4k` (GGML's Q4_K through
//! candle's quantized matmul on every device). Prompts of more than one token multiply with
//! the dequantized weights, one layer at a time. Layers that read the same input are stacked
//! into one ([`Linear::load_stacked`], [`GatedLinear`] for the MLP's gate and up), so a token
//! reads them in one pass; [`WeightLayer`] is what the loader does with each layer.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use candle_nn::VarBuilder;
use half::bf16;

use super::gemm::{Kernel, PackedWeight, SharedOut, Strides};
use super::matvec;
use super::vector_math;
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
    /// bf16 packed for the `gemm` kernel, with the bias in f32 (added before rounding).
    PackedBf16(Arc<PackedWeight>, Option<Arc<Vec<f32>>>),
}

/// An activation applied to a layer's output in f32, before it is rounded to the output dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 · x)`, the vision tower's MLP activation.
    QuickGelu,
}

impl Activation {
    /// `dst = bf16(activation(src))`.
    fn apply_to_bf16(self, src: &[f32], dst: &mut [bf16]) {
        match self {
            Self::QuickGelu => vector_math::quick_gelu_to_bf16(src, dst),
        }
    }

    /// The same on a tensor, with candle's ops (in the tensor's dtype).
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// How a layer's weights are stored: what the model's loader does with every layer.
pub trait WeightLayer {
    /// Stores the weights in `format` (the dense copy is freed). Returns false, leaving the
    /// layer dense, when its rows do not divide into the format's blocks.
    fn quantize(&mut self, format: Quantization) -> candle_core::Result<bool>;

    /// Packs dense bf16 weights on the CPU for the `gemm` kernel (the dense copy is freed);
    /// a no-op for other dtypes and devices, quantized weights, or CPUs without the instructions.
    fn pack_for_cpu(&mut self) -> candle_core::Result<()>;

    /// Bytes the weights occupy (what a decode step reads).
    fn weight_bytes(&self) -> usize;
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

    /// Several layers over the same input loaded as one (their weights and biases stacked along
    /// the output dimension, in the order of `parts`: `(out_dim, name)`), so a token reads them in
    /// one pass; split the output with [`Tensor::narrow`].
    pub fn load_stacked(
        in_dim: usize,
        parts: &[(usize, &str)],
        with_bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weights = parts
            .iter()
            .map(|&(out_dim, name)| vb.pp(name).get((out_dim, in_dim), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bias = if with_bias {
            let biases = parts
                .iter()
                .map(|&(out_dim, name)| vb.pp(name).get(out_dim, "bias"))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self::new(Tensor::cat(&weights, 0)?, bias))
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
            #[cfg(feature = "cuda")]
            _ if super::cuda_fused::enabled(x) => {
                let (y, bias) = self.forward_split_bias(x)?;
                match activation {
                    Activation::QuickGelu => super::cuda_fused::bias_quick_gelu(&y, bias),
                }
            }
            _ => activation.apply(&self.forward(x)?),
        }
    }

    /// `residual + (x · Wᵀ + b)`, a residual connection: the layer's output is rounded to the
    /// model's dtype before the sum, as with two separate ops (the same bits), but where the
    /// layer is packed the sum happens in the kernel's rounding step instead of another pass.
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if let Weight::PackedBf16(w, bias) = &self.weight
            && residual.dtype() == DType::BF16
            && residual.device().is_cpu()
        {
            let expected: Vec<usize> = x
                .dims()
                .iter()
                .take(x.rank().saturating_sub(1))
                .copied()
                .chain([w.n()])
                .collect();
            let bias = bias.as_deref().map(|b| b.as_slice());
            return with_residual(residual, &expected, |r| {
                packed_bf16_into(x, w, bias, 1, residual_finish(r))
            });
        }
        #[cfg(feature = "cuda")]
        if super::cuda_fused::enabled(x) {
            let (y, bias) = self.forward_split_bias(x)?;
            return super::cuda_fused::bias_residual(&y, bias, residual);
        }
        residual + self.forward(x)?
    }
}

/// `residual + fc2(activation(fc1(x)))`, an MLP with its residual connection (the vision
/// tower's). Where both layers are packed bf16 on the CPU, the hidden activations never become a
/// tensor: they go to a buffer this thread keeps between calls, in rows one cache line longer
/// than the hidden width, a chunk of rows at a time ([`mlp_chunk_rows`]). Measured at a
/// 1280×720 screenshot's 4,784 patches (a 49 MB hidden layer): a fresh buffer every layer was
/// faulted in page by page, 15 of the MLP's 85 ms; and rows 10 KiB apart fall on few L1 sets,
/// which made the second product 11% slower. Candle's ops (or the layers' own paths) otherwise,
/// with the same bits.
pub fn mlp_plus(
    fc1: &Linear,
    activation: Activation,
    fc2: &Linear,
    x: &Tensor,
    residual: &Tensor,
) -> candle_core::Result<Tensor> {
    mlp_plus_in_chunks(fc1, activation, fc2, x, residual, MLP_HIDDEN_CHUNK_BYTES)
}

/// [`mlp_plus`] with at most `chunk_bytes` of hidden activations per chunk of rows.
fn mlp_plus_in_chunks(
    fc1: &Linear,
    activation: Activation,
    fc2: &Linear,
    x: &Tensor,
    residual: &Tensor,
    chunk_bytes: usize,
) -> candle_core::Result<Tensor> {
    if let (Weight::PackedBf16(w1, b1), Weight::PackedBf16(w2, b2)) = (&fc1.weight, &fc2.weight)
        && x.dtype() == DType::BF16
        && residual.dtype() == DType::BF16
        && residual.device().is_cpu()
        && w2.k() == w1.n()
        && w1.n().is_multiple_of(32)
        && x.dim(candle_core::D::Minus1)? == w1.k()
    {
        let (k, hidden, n) = (w1.k(), w1.n(), w2.n());
        let (b1, b2) = (
            b1.as_deref().map(|b| b.as_slice()),
            b2.as_deref().map(|b| b.as_slice()),
        );
        return with_bf16_rows(x, k, n, "packed bf16 MLP", |a, rows, dims| {
            let shape = dims.clone();
            with_residual(residual, &shape, |r| {
                // taken out while in use, as the sums
                let mut hidden_rows = HIDDEN.take();
                let ld = hidden + 32;
                let chunk = mlp_chunk_rows(rows, ld, chunk_bytes);
                if hidden_rows.len() < chunk * ld {
                    hidden_rows.resize(chunk * ld, bf16::ZERO);
                }
                let finish = residual_finish(r);
                let fill = |out: &SharedOut<bf16>| {
                    for first_row in (0..rows).step_by(chunk) {
                        let here = chunk.min(rows - first_row);
                        let h = SharedOut(hidden_rows.as_mut_ptr());
                        let x_rows = &a[first_row * k..(first_row + here) * k];
                        with_kept_sums(w1, x_rows, (here, k), b1, 1, |row, first, values| {
                            // SAFETY: each thread writes only its own columns of each row,
                            // inside the buffer (chunk × ld, ld > hidden).
                            let out = unsafe { h.slice(row * ld + first, values.len()) };
                            activation.apply_to_bf16(values, out);
                        });
                        let a2 = &hidden_rows[..here * ld];
                        finish_into(w2, a2, (here, ld), b2, 1, (out, first_row), &finish);
                    }
                };
                // SAFETY: every chunk's second product finishes every row of its chunk in
                // every thread's columns (see `PackedWeight::matmul_bf16_then`), and the chunks
                // cover all rows: all `rows × n` values.
                let y = unsafe { rows_finished(rows, n, dims, fill) };
                HIDDEN.set(hidden_rows);
                y
            })
        });
    }
    fc2.forward_plus(&fc1.forward_activated(x, activation)?, residual)
}

/// At most this many bytes of hidden activations per chunk of [`mlp_plus`]: a chunk's hidden rows
/// are read back by the second product from the last-level cache, where the whole 49 MB of a
/// 1280×720 screenshot's were written out to memory and read back from it. Measured with
/// `vision_mlp_rate` at 4,784 patches (three runs each): 63.0–64.1 ms whole, 58.2–59.9 in two
/// chunks, 58.4–61.1 in four (each chunk's weights are read again, from that cache); 1,196
/// patches (12 MB) stay one chunk, and chunks of 160 rows were 13% slower there.
const MLP_HIDDEN_CHUNK_BYTES: usize = 16 << 20;

/// Rows per chunk of [`mlp_plus`] for `rows` rows of bf16 hidden activations `ld` values apart:
/// equal chunks in whole 32-row blocks of the products, each within `chunk_bytes` (or one block).
fn mlp_chunk_rows(rows: usize, ld: usize, chunk_bytes: usize) -> usize {
    let most = (chunk_bytes / (2 * ld) / 32 * 32).max(32);
    let chunks = rows.div_ceil(most).max(1);
    rows.div_ceil(chunks).next_multiple_of(32).min(rows).max(1)
}

/// `f` on the values of a bf16 CPU `residual` of shape `dims` (an error naming both shapes
/// otherwise).
fn with_residual(
    residual: &Tensor,
    dims: &[usize],
    f: impl FnOnce(&[bf16]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if residual.dims() != dims {
        candle_core::bail!(
            "residual of shape {:?} for an output of shape {dims:?}",
            residual.dims()
        );
    }
    let residual = residual.contiguous()?;
    let (storage, layout) = residual.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
        candle_core::bail!("bf16 residual on a non-CPU device");
    };
    f(&values[layout.start_offset()..layout.start_offset() + residual.elem_count()])
}

/// The packed kernel's rounding step with a residual connection: the sums rounded, the residual
/// added and rounded again (the bits of two separate bf16 ops).
fn residual_finish(r: &[bf16]) -> impl Fn(usize, &[f32], &mut [bf16]) + Sync + '_ {
    move |offset, sums, out| {
        vector_math::add_rounded_to_bf16(sums, &r[offset..offset + out.len()], out)
    }
}

/// A Q4_K weight on the CPU unpacked into the bf16 kernel's panels, each row dequantized from
/// its own blocks on the thread that packs it (`None` for other formats and devices, or where
/// the CPU lacks the kernel). Dequantizing the whole tensor first ran on one thread and made a
/// 331-token prompt in q4k 10× slower than in bf16.
fn ggml_rows_bf16(q: &QTensor) -> candle_core::Result<Option<PackedWeight>> {
    use candle_core::quantized::{GgmlType, k_quants::BlockQ4K};
    if q.dtype() != GgmlDType::Q4K || !matches!(q.device(), Device::Cpu) {
        return Ok(None);
    }
    let (n, k) = q.shape().dims2()?;
    let bytes = q.data()?;
    let per_row = k / BlockQ4K::BLCK_SIZE;
    let size = std::mem::size_of::<BlockQ4K>();
    if !k.is_multiple_of(BlockQ4K::BLCK_SIZE)
        || bytes.len() != n * per_row * size
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<BlockQ4K>())
    {
        return Ok(None);
    }
    // SAFETY: a CPU QTensor of dtype Q4K stores its blocks as `[BlockQ4K]` (plain `repr(C)`
    // data), whose bytes these are: length and alignment checked just above.
    let blocks: &[BlockQ4K] =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), n * per_row) };
    thread_local! {
        static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    Ok(PackedWeight::pack_bf16_rows(
        n,
        k,
        Placement::Scratch,
        |r, out| {
            ROW.with_borrow_mut(|row| {
                row.resize(k, 0.0);
                BlockQ4K::to_float(&blocks[r * per_row..(r + 1) * per_row], row);
                vector_math::round_to_bf16(row, 1.0, out);
            })
        },
    ))
}

/// Rows per chunk when a weight is quantized: its f32 copy is made a chunk at a time (16 MiB
/// for the 2B model's output layer, whose whole f32 copy would take 933 MB).
const QUANTIZE_CHUNK_ROWS: usize = 2048;

/// Rows `r0..r0 + rows` of the `(n, k)` weight `w` in f32, row-major.
fn rows_f32(w: &Tensor, r0: usize, rows: usize) -> candle_core::Result<Vec<f32>> {
    w.narrow(0, r0, rows)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// `w` quantized to `format` on its device, for candle's quantized matmul. On the CPU Q4_K is
/// quantized `chunk_rows` rows at a time, on all threads, into the same blocks as
/// `QTensor::quantize` makes from the whole f32 matrix.
fn ggml_weight(w: &Tensor, format: Quantization, chunk_rows: usize) -> candle_core::Result<Weight> {
    use candle_core::quantized::{GgmlType, QStorage, k_quants::BlockQ4K};
    use rayon::prelude::*;
    let (n, k) = w.dims2()?;
    let q = if format == Quantization::Q4K && w.device().is_cpu() {
        let per_row = k / BlockQ4K::BLCK_SIZE;
        let mut blocks = vec![BlockQ4K::zeros(); n * per_row];
        for r0 in (0..n).step_by(chunk_rows) {
            let rows = chunk_rows.min(n - r0);
            let values = rows_f32(w, r0, rows)?;
            blocks[r0 * per_row..(r0 + rows) * per_row]
                .par_chunks_mut(per_row)
                .zip(values.par_chunks(k))
                .for_each(|(ys, xs)| BlockQ4K::from_float(xs, ys));
        }
        QTensor::new(QStorage::Cpu(Box::new(blocks)), (n, k))?
    } else {
        QTensor::quantize(&w.to_dtype(DType::F32)?, format.ggml())?
    };
    let q = Arc::new(q);
    Ok(Weight::Ggml(q.clone(), QMatMul::from_arc(q)?))
}

impl WeightLayer for Linear {
    fn quantize(&mut self, format: Quantization) -> candle_core::Result<bool> {
        let Weight::Dense(w) = &self.weight else {
            return Ok(true);
        };
        if !format.fits(w.dim(1)?) {
            return Ok(false);
        }
        let (n, k) = w.dims2()?;
        self.weight = match format {
            // our Q8_0 kernel is a CPU kernel: elsewhere Q8_0 goes through candle's quantized
            // matmul on the device, like Q4_K
            Quantization::Q8_0 if w.device().is_cpu() => Weight::Int8(Arc::new(
                matvec::Int8Rows::quantize_chunks(n, k, QUANTIZE_CHUNK_ROWS, |r0, rows| {
                    rows_f32(w, r0, rows)
                })?,
            )),
            Quantization::Q8_0 | Quantization::Q4K => ggml_weight(w, format, QUANTIZE_CHUNK_ROWS)?,
        };
        Ok(true)
    }

    fn pack_for_cpu(&mut self) -> candle_core::Result<()> {
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

    fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Int8(q) => q.bytes(),
            Weight::Ggml(q, _) => q.storage_size_in_bytes(),
            Weight::PackedBf16(w, _) => w.n() * w.k() * 2,
        }
    }
}

impl Linear {
    /// Whether the weights are packed for the CPU's bf16 kernel.
    pub fn is_packed(&self) -> bool {
        matches!(self.weight, Weight::PackedBf16(..))
    }

    /// The packed bf16 weight and its f32 bias, where the layer is packed for the CPU kernel:
    /// for callers that run the product with their own epilogue ([`with_kept_sums`]).
    pub fn packed_bf16_parts(&self) -> Option<(&PackedWeight, Option<&[f32]>)> {
        match &self.weight {
            Weight::PackedBf16(w, bias) => Some((w, bias.as_deref().map(|b| b.as_slice()))),
            _ => None,
        }
    }

    /// Row `r` of the weight (`in` values) in bf16, from packed weights (the embedding lookup of
    /// a tied output layer held packed only).
    pub fn row_bf16(&self, r: usize, out: &mut [bf16]) -> candle_core::Result<()> {
        match &self.weight {
            Weight::PackedBf16(w, _) => w
                .row_bf16(r, out)
                .ok_or_else(|| candle_core::Error::Msg("bf16 layer packed in f32".into())),
            _ => candle_core::bail!("rows are read back from packed bf16 weights only"),
        }
    }

    /// `x · Wᵀ` and the bias still to add, for callers that fuse the bias into their next step.
    /// A layer packed for the CPU adds its bias in the product and returns `None` for it.
    pub fn forward_split_bias(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<&Tensor>)> {
        if let Weight::PackedBf16(w, bias) = &self.weight {
            return Ok((
                packed_bf16(x, w, bias.as_deref().map(|b| b.as_slice()), None)?,
                None,
            ));
        }
        Ok((self.forward_unbiased(x)?, self.bias.as_ref()))
    }

    /// `x · Wᵀ` of a layer that is not packed for the CPU.
    fn forward_unbiased(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(match &self.weight {
            Weight::PackedBf16(..) => {
                candle_core::bail!("a packed layer multiplies through forward_split_bias")
            }
            #[cfg(feature = "cuda")]
            Weight::Dense(w) if let Some(y) = super::cuda_fused::gemv(x, w)? => y,
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
                } else if x.dtype() == DType::BF16
                    && x.device().is_cpu()
                    && let Some(packed) =
                        PackedWeight::pack_bf16_rows(n, k, Placement::Scratch, |r, out| {
                            q.row_bf16(r, out)
                        })
                {
                    // a prompt in bf16: the weights unpacked into the bf16 kernel's panels for
                    // this product (one pass over them), instead of candle's matmul over an f32
                    // copy cast to bf16, which made a 331-token prompt 9× slower than unquantized
                    packed_bf16(x, &packed, None, None)?
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
                } else if x.dtype() == DType::BF16
                    && x.device().is_cpu()
                    && let Some(packed) = ggml_rows_bf16(q)?
                {
                    // a prompt in bf16 on the CPU: the weights unpacked a row at a time on
                    // every thread into the bf16 kernel's panels, as for Q8_0 above
                    packed_bf16(x, &packed, None, None)?
                } else if x.dtype() == DType::BF16 && x.device().is_cpu() {
                    // the same through one dequantized copy, for other block formats
                    let (n, k) = q.shape().dims2()?;
                    let values: Vec<f32> = q.dequantize(x.device())?.flatten_all()?.to_vec1()?;
                    match PackedWeight::pack_bf16_rows(n, k, Placement::Scratch, |r, out| {
                        vector_math::round_to_bf16(&values[r * k..(r + 1) * k], 1.0, out)
                    }) {
                        Some(packed) => packed_bf16(x, &packed, None, None)?,
                        None => matmul_2d(
                            x,
                            &Tensor::from_vec(values, (n, k), x.device())?.to_dtype(x.dtype())?,
                        )?,
                    }
                } else {
                    let w = q.dequantize(x.device())?.to_dtype(x.dtype())?;
                    matmul_2d(x, &w)?
                }
            }
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (y, bias) = self.forward_split_bias(x)?;
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `silu(x · Gᵀ) ⊙ (x · Uᵀ)`, the decoder MLP's gate and up projections as one layer: one pass
/// over both weights per token. Packed for the bf16 kernel, the rows are interleaved in blocks
/// of 32 (a panel of gate columns, then the same columns of up), so the thread that computed a
/// pair of panels applies the gate to them in f32 and rounds once.
#[derive(Clone)]
pub struct GatedLinear {
    /// `[G; U]` stacked, or interleaved per panel once packed.
    fused: Linear,
    width: usize,
}

/// Columns per interleaved block of [`GatedLinear`] (one panel of the packed kernel).
const GATE_BLOCK: usize = 32;

impl GatedLinear {
    /// Loads `gate` and `up` (both `width × in_dim`, no bias) from under `vb`.
    pub fn load(
        in_dim: usize,
        width: usize,
        gate: &str,
        up: &str,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            fused: Linear::load_stacked(in_dim, &[(width, gate), (width, up)], false, vb)?,
            width,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Weight::PackedBf16(w, _) = &self.fused.weight {
            return packed_bf16_gated(x, w);
        }
        #[cfg(feature = "cuda")]
        if let Weight::Dense(w) = &self.fused.weight
            && let Some(y) = super::cuda_fused::gemv_silu(x, w, self.width)?
        {
            return Ok(y);
        }
        let y = self.fused.forward(x)?;
        #[cfg(feature = "cuda")]
        if super::cuda_fused::enabled(&y) {
            return super::cuda_fused::silu_mul(&y, self.width);
        }
        let last = y.rank() - 1;
        let gate = y.narrow(last, 0, self.width)?;
        let up = y.narrow(last, self.width, self.width)?;
        candle_nn::ops::silu(&gate)? * up
    }
}

impl WeightLayer for GatedLinear {
    fn quantize(&mut self, format: Quantization) -> candle_core::Result<bool> {
        self.fused.quantize(format)
    }

    /// Interleaves gate and up per panel (a width that is not a multiple of 32 stays dense).
    fn pack_for_cpu(&mut self) -> candle_core::Result<()> {
        let Weight::Dense(w) = &self.fused.weight else {
            return Ok(());
        };
        let bf16_kernel = Kernel::detect().is_some_and(Kernel::has_bf16);
        if !self.width.is_multiple_of(GATE_BLOCK)
            || w.dtype() != DType::BF16
            || !w.device().is_cpu()
            || !bf16_kernel
        {
            return Ok(());
        }
        // row r of the interleaved weight: block r / 64, gate for its first 32 rows, then up
        let order: Vec<u32> = (0..2 * self.width)
            .map(|r| {
                let (block, i) = (r / (2 * GATE_BLOCK), r % (2 * GATE_BLOCK));
                let source = if i < GATE_BLOCK {
                    block * GATE_BLOCK + i
                } else {
                    self.width + block * GATE_BLOCK + i - GATE_BLOCK
                };
                source as u32
            })
            .collect();
        let interleaved = w.index_select(&Tensor::new(order, w.device())?, 0)?;
        let mut packed = Linear::new(interleaved, None);
        packed.pack_for_cpu()?;
        if matches!(packed.weight, Weight::PackedBf16(..)) {
            self.fused = packed;
        }
        Ok(())
    }

    fn weight_bytes(&self) -> usize {
        self.fused.weight_bytes()
    }
}

/// [`GatedLinear`]'s packed path: `x · Wᵀ` with `W` interleaved per 32 rows, gated in f32.
fn packed_bf16_gated(x: &Tensor, w: &PackedWeight) -> candle_core::Result<Tensor> {
    // two panels per thread: a gate block and its up block always land on the same thread
    packed_bf16_into(x, w, None, 2, |_, sums, out| {
        for (out, pair) in out.chunks_mut(GATE_BLOCK).zip(sums.chunks(2 * GATE_BLOCK)) {
            let (gate, up) = pair.split_at(GATE_BLOCK);
            vector_math::silu_gate_to_bf16(gate, up, out);
        }
    })
}

/// `activation(x (.., in) · wᵀ + bias)` through the packed bf16 kernel, rounded once to bf16.
fn packed_bf16(
    x: &Tensor,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    activation: Option<Activation>,
) -> candle_core::Result<Tensor> {
    packed_bf16_into(x, w, bias, 1, |_, sums, out| match activation {
        Some(act) => act.apply_to_bf16(sums, out),
        None => vector_math::round_to_bf16(sums, 1.0, out),
    })
}

/// `x (.., in) · wᵀ + bias` through the packed kernel, threads taking `group` panels at a time,
/// made a bf16 tensor of `n / group` columns by `finish(offset, sums, out)`: each thread calls
/// it with the f32 sums of its columns of one row and the matching `1 / group` share of that
/// row's output, which starts at `offset` in the row-major output.
fn packed_bf16_into(
    x: &Tensor,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    group: usize,
    finish: impl Fn(usize, &[f32], &mut [bf16]) + Sync,
) -> candle_core::Result<Tensor> {
    let k = w.k();
    if x.dtype() != DType::BF16 || x.dim(candle_core::D::Minus1)? != k {
        candle_core::bail!(
            "packed bf16 layer of {k} inputs got a {:?} input of shape {:?}",
            x.dtype(),
            x.dims()
        );
    }
    with_bf16_rows(x, k, w.n() / group, "packed bf16 layer", |a, rows, dims| {
        packed_bf16_rows(a, (rows, k), w, bias, group, dims, finish)
    })
}

/// `f(values, rows, dims)` on the rows of `k` values of a bf16 CPU tensor `x` (made contiguous),
/// with `dims` its shape with the last dimension `out_width`: the input side of the packed
/// products. `what` names the product in the error for a non-CPU input.
pub(super) fn with_bf16_rows<R>(
    x: &Tensor,
    k: usize,
    out_width: usize,
    what: &str,
    f: impl FnOnce(&[bf16], usize, Vec<usize>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let x = x.contiguous()?;
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dim") = out_width;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
        candle_core::bail!("{what} on a non-CPU input");
    };
    f(
        &values[layout.start_offset()..layout.start_offset() + rows * k],
        rows,
        dims,
    )
}

/// [`packed_bf16_into`] on `rows` rows of bf16 values `lda` apart, the output shaped `dims`.
fn packed_bf16_rows(
    a: &[bf16],
    (rows, lda): (usize, usize),
    w: &PackedWeight,
    bias: Option<&[f32]>,
    group: usize,
    dims: Vec<usize>,
    finish: impl Fn(usize, &[f32], &mut [bf16]) + Sync,
) -> candle_core::Result<Tensor> {
    // SAFETY: the product calls `finish` on every row of every thread's columns (see
    // `PackedWeight::matmul_bf16_then`), which writes all `rows × n / group` values.
    unsafe {
        rows_finished(rows, w.n() / group, dims, |out| {
            finish_into(w, a, (rows, lda), bias, group, (out, 0), &finish)
        })
    }
}

/// A bf16 tensor of `rows × width` values shaped `dims`, written by `fill` through the
/// [`SharedOut`] it gets (by [`finish_into`]). Not zeroed first (12 MB for the vision MLP's hidden
/// layer at 640×360).
///
/// # Safety
/// `fill` writes every one of the `rows × width` values.
unsafe fn rows_finished(
    rows: usize,
    width: usize,
    dims: Vec<usize>,
    fill: impl FnOnce(&SharedOut<bf16>),
) -> candle_core::Result<Tensor> {
    let mut out: Vec<bf16> = Vec::with_capacity(rows * width);
    fill(&SharedOut(
        out.spare_capacity_mut().as_mut_ptr().cast::<bf16>(),
    ));
    // SAFETY: `fill` wrote all `rows × width` values (the caller's contract).
    unsafe { out.set_len(rows * width) };
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// `x · wᵀ + bias` for `rows` rows of `a` (`lda` apart) through [`with_kept_sums`], each row's
/// sums finished by `finish(offset, sums, out)` into row `first_row + row` of `out`, a row-major
/// output `w.n() / group` wide (see [`packed_bf16_into`]).
fn finish_into(
    w: &PackedWeight,
    a: &[bf16],
    (rows, lda): (usize, usize),
    bias: Option<&[f32]>,
    group: usize,
    (out, first_row): (&SharedOut<bf16>, usize),
    finish: &(impl Fn(usize, &[f32], &mut [bf16]) + Sync),
) {
    let width = w.n() / group;
    with_kept_sums(w, a, (rows, lda), bias, group, |row, first, values| {
        let offset = (first_row + row) * width + first / group;
        // SAFETY: each thread finishes only its own columns of each row of `out`, inside the
        // output the caller allocated (rows_finished's `rows × width`).
        let out = unsafe { out.slice(offset, values.len() / group) };
        finish(offset, values, out);
    });
}

/// `PackedWeight::matmul_bf16_then` with this thread's kept sums as its working space.
pub(super) fn with_kept_sums(
    w: &PackedWeight,
    a: &[bf16],
    (rows, lda): (usize, usize),
    bias: Option<&[f32]>,
    group: usize,
    finish: impl Fn(usize, usize, &[f32]) + Sync,
) {
    let n = w.n();
    // taken out while in use: a rayon thread waiting for this product's threads may run
    // another product meanwhile (another model's, or a nested one), which then gets a fresh one
    let mut sums = SUMS.take();
    // every sum is written by the product before it is read
    if sums.len() < rows * n {
        sums.resize(rows * n, 0.0);
    }
    w.matmul_bf16_then(a, rows, lda, bias, &mut sums[..rows * n], n, group, finish);
    SUMS.set(sums);
}

thread_local! {
    /// The f32 sums of the packed products run from this thread, kept for the next product:
    /// a fresh buffer of this size (tens of MB for a screenshot's patches) comes from `mmap`
    /// and faults in zeroed pages on every call, which doubled the time of the vision tower's
    /// q/k/v product at 1280×720. It grows to the largest product and stays (within the peak
    /// memory of a step, which held it anyway).
    static SUMS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The hidden activations of [`mlp_plus`], kept for the next call for the same reason.
    static HIDDEN: std::cell::Cell<Vec<bf16>> = const { std::cell::Cell::new(Vec::new()) };
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
    use candle_core::{Device, Shape};

    /// Values drawn from N(0, std²) by a generator seeded with `seed`: the same every run, so
    /// that the statistical bounds below (quantization errors) hold for these draws always,
    /// not nearly always.
    fn normal(shape: impl Into<Shape>, std: f32, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let shape = shape.into();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                // Box–Muller
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

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
        let w = normal((48, 64), 1.0, 1);
        let b = normal(48, 1.0, 2);
        let ours = Linear::new(w.clone(), Some(b.clone()));
        let theirs = candle_nn::Linear::new(w, Some(b));
        for rows in [1, 5] {
            let x = normal((1, rows, 64), 1.0, 3);
            let diff = max_abs(&(ours.forward(&x).unwrap() - theirs.forward(&x).unwrap()).unwrap());
            assert!(diff < 1e-4, "rows {rows}: {diff}");
        }
    }

    #[test]
    fn weights_quantized_in_chunks_of_rows_equal_the_whole_matrix_quantized() {
        // 37 rows in chunks of 8: four whole chunks and a short last one
        let w = normal((37, 512), 1.0, 4).to_dtype(DType::BF16).unwrap();
        let Weight::Ggml(chunked, _) = ggml_weight(&w, Quantization::Q4K, 8).unwrap() else {
            panic!("q4k is a GGML weight");
        };
        let whole = QTensor::quantize(&w.to_dtype(DType::F32).unwrap(), GgmlDType::Q4K).unwrap();
        assert_eq!(chunked.shape().dims(), &[37, 512]);
        assert!(
            chunked.data().unwrap() == whole.data().unwrap(),
            "q4k blocks differ"
        );
        let chunked =
            matvec::Int8Rows::quantize_chunks(37, 512, 8, |r0, rows| rows_f32(&w, r0, rows))
                .unwrap();
        let whole = matvec::Int8Rows::quantize(&rows_f32(&w, 0, 37).unwrap(), 37, 512);
        assert_eq!(
            chunked.dequantize(),
            whole.dequantize(),
            "q8_0 blocks differ"
        );
    }

    #[test]
    fn quantized_forward_stays_close_and_shrinks_the_weight() {
        let w = normal((64, 256), 1.0, 5);
        let x = normal((1, 1, 256), 1.0, 6);
        let dense = Linear::new(w.clone(), None);
        let exact = dense.forward(&x).unwrap();
        let scale = max_abs(&exact);
        // Q8_0 through candle's quantized matmul is what a GPU gets; built here on the CPU
        let candle_q8_0 = Linear {
            weight: ggml_weight(&w, Quantization::Q8_0, QUANTIZE_CHUNK_ROWS).unwrap(),
            bias: None,
        };
        for (name, format, tolerance, max_bytes) in [
            ("q8_0", Some(Quantization::Q8_0), 0.02, 64 * 256 * 9 / 8),
            ("q4k", Some(Quantization::Q4K), 0.15, 64 * 256 * 5 / 8),
            ("candle's q8_0", None, 0.02, 64 * 256 * 9 / 8),
        ] {
            let q = match format {
                Some(format) => {
                    let mut q = dense.clone();
                    assert!(q.quantize(format).unwrap());
                    q
                }
                None => candle_q8_0.clone(),
            };
            assert!(
                q.weight_bytes() <= max_bytes,
                "{name}: {}",
                q.weight_bytes()
            );
            for rows in [1, 3] {
                let x = x.repeat((1, rows, 1)).unwrap();
                let want = exact.repeat((1, rows, 1)).unwrap();
                let diff = max_abs(&(q.forward(&x).unwrap() - &want).unwrap());
                assert!(
                    diff / scale < tolerance,
                    "{name}, {rows} rows: {diff} of {scale}"
                );
            }
        }
    }

    #[test]
    fn quantized_prompts_in_bf16_multiply_the_dequantized_weights() {
        let w = normal((96, 256), 1.0, 7);
        for format in [Quantization::Q8_0, Quantization::Q4K] {
            let mut q = Linear::new(w.clone(), None);
            assert!(q.quantize(format).unwrap());
            // what the quantized layer stands for, in bf16 (the old path: dequantize, cast, matmul)
            let approx = match &q.weight {
                Weight::Int8(q) => Tensor::from_vec(q.dequantize(), (96, 256), &Device::Cpu),
                Weight::Ggml(q, _) => q.dequantize(&Device::Cpu),
                _ => panic!("{format}: not quantized"),
            }
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
            for rows in [3, 40] {
                let x = normal((1, rows, 256), 1.0, 8)
                    .to_dtype(DType::BF16)
                    .unwrap();
                let got = q.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
                let want = matmul_2d(
                    &x.to_dtype(DType::F32).unwrap(),
                    &approx.to_dtype(DType::F32).unwrap(),
                )
                .unwrap();
                let diff = max_abs(&(&got - &want).unwrap());
                // sums in f32, one rounding to bf16 (a step is 2⁻⁸ of the value)
                assert!(
                    diff <= max_abs(&want) / 128.0,
                    "{format}, {rows} rows: {diff} of {}",
                    max_abs(&want)
                );
            }
        }
    }

    #[test]
    fn a_residual_in_the_packed_kernel_gives_the_bits_of_a_separate_add() {
        let seed = std::cell::Cell::new(100);
        let bf16_randn = |shape: &[usize]| {
            seed.set(seed.get() + 1);
            normal(shape, 1.0, seed.get())
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let mut packed = Linear::new(bf16_randn(&[96, 64]), Some(bf16_randn(&[96])));
        packed.pack_for_cpu().unwrap();
        if !matches!(packed.weight, Weight::PackedBf16(..)) {
            eprintln!("this CPU runs no bf16 gemm kernel: the packed layer is not used here");
            return;
        }
        let bits = |t: &Tensor| -> Vec<u16> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        for rows in [1, 13, 40] {
            let x = bf16_randn(&[2, rows, 64]);
            // residuals much larger than the layer's output, so a missed rounding shows
            let residual = (bf16_randn(&[2, rows, 96]) * 30.0).unwrap();
            let fused = packed.forward_plus(&x, &residual).unwrap();
            let separate = (&residual + packed.forward(&x).unwrap()).unwrap();
            assert_eq!(fused.dims(), &[2, rows, 96]);
            assert_eq!(bits(&fused), bits(&separate), "rows {rows}");
        }
        let err = packed
            .forward_plus(&bf16_randn(&[3, 64]), &bf16_randn(&[3, 64]))
            .unwrap_err();
        assert!(err.to_string().contains("[3, 64]"), "{err}");
    }

    #[test]
    fn mlp_chunks_are_equal_whole_blocks_within_the_budget() {
        let ld = 5120 + 32;
        // a 1280×720 screenshot's patches: three chunks of 1,600 rows (the last 1,584)
        assert_eq!(mlp_chunk_rows(4784, ld, MLP_HIDDEN_CHUNK_BYTES), 1600);
        // a 640×360 screenshot's: one chunk
        assert_eq!(mlp_chunk_rows(1196, ld, MLP_HIDDEN_CHUNK_BYTES), 1196);
        assert_eq!(mlp_chunk_rows(1, ld, MLP_HIDDEN_CHUNK_BYTES), 1);
        // a budget under one block's rows still makes whole blocks
        assert_eq!(mlp_chunk_rows(100, ld, 1000), 32);
        for rows in [33, 64, 65, 1000, 4784] {
            for budget in [32 * 2 * ld, 100 * 2 * ld, 1 << 20] {
                let chunk = mlp_chunk_rows(rows, ld, budget);
                assert!(
                    chunk.is_multiple_of(32) || chunk == rows,
                    "{rows} rows, {budget} B: {chunk}"
                );
                assert!(chunk * 2 * ld <= budget, "{rows} rows, {budget} B: {chunk}");
            }
        }
    }

    #[test]
    fn the_fused_mlp_gives_the_bits_of_its_two_layers_run_one_after_the_other() {
        let seed = std::cell::Cell::new(200);
        let bf16_randn = |shape: &[usize]| {
            seed.set(seed.get() + 1);
            normal(shape, 1.0, seed.get())
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (dim, hidden) = (64, 96);
        let mut fc1 = Linear::new(bf16_randn(&[hidden, dim]), Some(bf16_randn(&[hidden])));
        let mut fc2 = Linear::new(bf16_randn(&[dim, hidden]), Some(bf16_randn(&[dim])));
        fc1.pack_for_cpu().unwrap();
        fc2.pack_for_cpu().unwrap();
        if !matches!(fc1.weight, Weight::PackedBf16(..)) {
            eprintln!("this CPU runs no bf16 gemm kernel: the packed layers are not used here");
            return;
        }
        let bits = |t: &Tensor| -> Vec<u16> {
            let values = t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
            values.iter().map(|v| v.to_bits()).collect()
        };
        // growing and shrinking, so that the kept hidden buffer is reused at other sizes; whole,
        // and in chunks of 32 rows (the last one shorter), 64 and 96 (one chunk here and there)
        let ld = hidden + 32;
        for rows in [13, 70, 1, 40, 100] {
            let x = bf16_randn(&[2, rows, dim]);
            let residual = (bf16_randn(&[2, rows, dim]) * 30.0).unwrap();
            let hidden_layer = fc1.forward_activated(&x, Activation::QuickGelu).unwrap();
            let separate = fc2.forward_plus(&hidden_layer, &residual).unwrap();
            for chunk_rows in [usize::MAX / 2 / ld, 32, 64, 96] {
                let fused = mlp_plus_in_chunks(
                    &fc1,
                    Activation::QuickGelu,
                    &fc2,
                    &x,
                    &residual,
                    chunk_rows * 2 * ld,
                )
                .unwrap();
                assert_eq!(fused.dims(), &[2, rows, dim]);
                assert_eq!(
                    bits(&fused),
                    bits(&separate),
                    "rows {rows}, chunks of {chunk_rows}"
                );
            }
        }
        let err = mlp_plus(
            &fc1,
            Activation::QuickGelu,
            &fc2,
            &bf16_randn(&[3, dim]),
            &bf16_randn(&[3, hidden]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("[3, 96]"), "{err}");
    }

    #[test]
    fn packed_bf16_matches_the_dense_layer_where_the_cpu_has_the_kernel() {
        let w = normal((70, 96), 1.0, 10).to_dtype(DType::BF16).unwrap();
        let b = normal(70, 1.0, 11).to_dtype(DType::BF16).unwrap();
        let dense = Linear::new(w.clone(), Some(b.clone()));
        let mut packed = dense.clone();
        packed.pack_for_cpu().unwrap();
        if !matches!(packed.weight, Weight::PackedBf16(..)) {
            eprintln!("this CPU runs no bf16 gemm kernel: the packed layer is not used here");
            return;
        }
        assert_eq!(packed.weight_bytes(), dense.weight_bytes());
        let x = normal((5, 96), 1.0, 12).to_dtype(DType::BF16).unwrap();
        let f32_of = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let fused = f32_of(packed.forward_activated(&x, Activation::QuickGelu).unwrap());
        let plain = Activation::QuickGelu
            .apply(&f32_of(packed.forward(&x).unwrap()))
            .unwrap();
        let diff = max_abs(&(fused - plain).unwrap());
        assert!(diff <= 0.25, "{diff}");
        for rows in [1, 13, 40] {
            let x = normal((2, rows, 96), 1.0, 13)
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

    /// A [`GatedLinear`] from random gate and up weights, with the plain `silu(x·Gᵀ) ⊙ (x·Uᵀ)`
    /// computed in f32 from the same (rounded) values.
    fn gated_case(width: usize, dtype: DType) -> (GatedLinear, Tensor, Tensor) {
        let round = |t: Tensor| t.to_dtype(dtype).unwrap();
        let (gate, up) = (
            round(normal((width, 64), 0.2, 14)),
            round(normal((width, 64), 0.2, 15)),
        );
        let x = round(normal((1, 3, 64), 1.0, 16));
        let layer = GatedLinear {
            fused: Linear::new(Tensor::cat(&[&gate, &up], 0).unwrap(), None),
            width,
        };
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let g = f(&x).broadcast_matmul(&f(&gate).t().unwrap()).unwrap();
        let u = f(&x).broadcast_matmul(&f(&up).t().unwrap()).unwrap();
        let want = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
        (layer, x, want)
    }

    #[test]
    fn gated_layer_matches_silu_gate_times_up_dense_quantized_and_packed() {
        let f = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        // a width of 5 blocks of 32 (odd: the last thread's pair of panels is whole) and one
        // that is no multiple of 32 (stays dense)
        for width in [160, 40] {
            let (layer, x, want) = gated_case(width, DType::F32);
            let diff = max_abs(&(f(layer.forward(&x).unwrap()) - &want).unwrap());
            assert!(diff < 1e-5, "f32 width {width}: {diff}");
            let mut q = layer.clone();
            assert!(q.quantize(Quantization::Q8_0).unwrap());
            let diff = max_abs(&(f(q.forward(&x).unwrap()) - &want).unwrap());
            assert!(diff < 0.02 * max_abs(&want), "q8_0 width {width}: {diff}");

            let (mut layer, x, want) = gated_case(width, DType::BF16);
            let bytes = layer.weight_bytes();
            layer.pack_for_cpu().unwrap();
            assert_eq!(layer.weight_bytes(), bytes);
            let packed = matches!(layer.fused.weight, Weight::PackedBf16(..));
            assert_eq!(
                packed,
                width % 32 == 0 && Kernel::detect().is_some_and(|k| k.has_bf16())
            );
            let got = layer.forward(&x).unwrap();
            assert_eq!((got.dims(), got.dtype()), (&[1, 3, width][..], DType::BF16));
            // packed: one rounding of values below 4 (2^-8 relative); dense: four roundings
            let diff = max_abs(&(f(got) - &want).unwrap());
            let tolerance = if packed { 0.008 } else { 0.05 };
            assert!(
                diff < tolerance * max_abs(&want).max(1.0),
                "bf16 width {width} packed {packed}: {diff}"
            );
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

    /// The decoder MLP (the gated gate/up layer, then down plus the residual) of the 2B shapes
    /// at a 640×360 and a 1280×720 prompt's rows, as run and as bare products: what the gate's
    /// epilogue and the tensors around the products cost
    /// (`cargo test --release --lib text_mlp_rate -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn text_mlp_rate() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        let (dim, hidden) = (1536, 8960);
        // (not `Tensor::arange` in f32: past 2^24 its steps stop adding, and it never ends)
        let weight = |n: usize, k: usize, seed: f32| {
            let values: Vec<bf16> = (0..n * k)
                .map(|i| bf16::from_f32((i as f32 * seed / (n * k) as f32).sin() * 0.05))
                .collect();
            Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap()
        };
        let mut gate_up = GatedLinear {
            fused: Linear::new(weight(2 * hidden, dim, 5.0), None),
            width: hidden,
        };
        gate_up.pack_for_cpu().unwrap();
        let mut down = Linear::new(weight(dim, hidden, 3.0), None);
        down.pack_for_cpu().unwrap();
        let (Weight::PackedBf16(w1, _), Weight::PackedBf16(w2, _)) =
            (&gate_up.fused.weight, &down.weight)
        else {
            panic!("packed");
        };
        let best = |run: &mut dyn FnMut()| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    run();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        for m in [331, 1228] {
            let x = normal((m, dim), 1.0, 17).to_dtype(DType::BF16).unwrap();
            let model = best(&mut || {
                let h = gate_up.forward(&x).unwrap();
                down.forward_plus(&h, &x).unwrap();
            });
            let gated = best(&mut || {
                gate_up.forward(&x).unwrap();
            });
            let a1: Vec<bf16> = x.flatten_all().unwrap().to_vec1().unwrap();
            let a2: Vec<bf16> = gate_up
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (mut c1, mut c2) = (vec![0f32; m * 2 * hidden], vec![0f32; m * dim]);
            let bare_gate_up = best(&mut || {
                w1.matmul_bf16_then(&a1, m, dim, None, &mut c1, 2 * hidden, 2, |_, _, _| {});
            });
            let bare_down = best(&mut || {
                w2.matmul_bf16_then(&a2, m, hidden, None, &mut c2, dim, 1, |_, _, _| {});
            });
            let gflop = 6.0 * (m * dim * hidden) as f64 / 1e9;
            let rate = |s: f64, share: f64| {
                format!("{:.2} ms ({:.0} GFLOP/s)", s * 1e3, share * gflop / s)
            };
            eprintln!(
                "text MLP {m} rows: as run {}, gate_up as a layer {}, bare gate_up {}, bare down {}",
                rate(model, 1.0),
                rate(gated, 2.0 / 3.0),
                rate(bare_gate_up, 2.0 / 3.0),
                rate(bare_down, 1.0 / 3.0)
            );
        }
    }

    /// The vision tower's MLP at 640×360 and 1280×720 (1,196 and 4,784 patches) as the model
    /// runs it ([`mlp_plus`]), as two layers (fc1 with its QuickGELU, then fc2 with its
    /// residual), and the same two products with nothing done to their sums: what the
    /// epilogues and the bf16 tensors around the products cost
    /// (`cargo test --release --lib vision_mlp_rate -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn vision_mlp_rate() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        let (dim, hidden) = (1280, 5120);
        let dense = |n: usize, k: usize, seed: f64| {
            let w = Tensor::arange(0f32, (n * k) as f32, &Device::Cpu).unwrap();
            let w = ((w * (seed / (n * k) as f64)).unwrap().sin().unwrap() * 0.05).unwrap();
            let w = w.reshape((n, k)).unwrap().to_dtype(DType::BF16).unwrap();
            let mut layer = Linear::new(w, None);
            layer.pack_for_cpu().unwrap();
            layer
        };
        let (fc1, fc2) = (dense(hidden, dim, 7.0), dense(dim, hidden, 11.0));
        let best = |run: &mut dyn FnMut()| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    run();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        let (Weight::PackedBf16(w1, _), Weight::PackedBf16(w2, _)) = (&fc1.weight, &fc2.weight)
        else {
            panic!("packed");
        };
        for m in [1196, 4784] {
            let x = normal((m, dim), 1.0, 17).to_dtype(DType::BF16).unwrap();
            let model = best(&mut || {
                mlp_plus(&fc1, Activation::QuickGelu, &fc2, &x, &x).unwrap();
            });
            let layers = best(&mut || {
                let h = fc1.forward_activated(&x, Activation::QuickGelu).unwrap();
                fc2.forward_plus(&h, &x).unwrap();
            });
            let a1: Vec<bf16> = x.flatten_all().unwrap().to_vec1().unwrap();
            let a2 = vec![bf16::ONE; m * hidden];
            let (mut c1, mut c2) = (vec![0f32; m * hidden], vec![0f32; m * dim]);
            let bare = best(&mut || {
                w1.matmul_bf16_then(&a1, m, dim, None, &mut c1, hidden, 1, |_, _, _| {});
                w2.matmul_bf16_then(&a2, m, hidden, None, &mut c2, dim, 1, |_, _, _| {});
            });
            let gflop = 4.0 * (m * dim * hidden) as f64 / 1e9;
            let rate = |s: f64| format!("{:.2} ms ({:.0} GFLOP/s)", s * 1e3, gflop / s);
            eprintln!(
                "vision MLP {m} patches: as run {}, as two layers {}, products alone {}",
                rate(model),
                rate(layers),
                rate(bare)
            );
        }
    }
}
