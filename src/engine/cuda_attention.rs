//! Attention on a CUDA device through cuBLAS, reading queries, keys and values where they are:
//! `(rows, heads, d)` operands with any row stride (a KV cache prefix, a frame of the vision
//! tower), grouped-query heads served without expanding the keys and values. Per chunk of
//! queries: scores = q·kᵀ·scale with bf16/f16 (or f32) operands and f32 results, the causal mask
//! and the softmax in f32, the probabilities rounded to the model dtype (as flash attention does),
//! then p·v accumulated in f32 and written straight into the `(S, heads, d)` output.
//! Each product is `rep` strided-batched GEMMs (one per query head of a key/value head, batched
//! over the key/value heads; one in all for a single query); nothing is copied or expanded. The
//! mask, the softmax and the rounding are one kernel (`attention_softmax.cu`, compiled by NVRTC on
//! first use) that reads each row of scores once; if it cannot be compiled or loaded, candle's
//! ops do the same in three passes (with a warning). Prompts and frames in bf16/f16 go through
//! [`super::cuda_flash`] instead, which never writes the scores, and bf16 decode steps through
//! [`super::cuda_fused::decode_attention`] (no cuBLAS calls).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, SyncOnDrop};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use std::sync::{Once, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Largest f32 score block (heads × queries × keys) per chunk: 1 GiB.
const SCORE_BUDGET: usize = 1 << 28;

/// softmax(q·kᵀ·scale)·v with `q` `(S, heads, d)`, `k`/`v` `(T, kv_heads, d)` on one CUDA device;
/// with `causal_offset`, query `i` sees keys `0..=i + offset`. Returns `(S, heads, d)` in q's dtype.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> Result<Tensor> {
    let (s, heads, d) = q.dims3()?;
    let (t, kv_heads, dk) = k.dims3()?;
    if dk != d || v.dims3()? != (t, kv_heads, d) || kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!(
            "attention shapes: q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    let (q, k, v) = (rows_view(q)?, rows_view(k)?, rows_view(v)?);
    if let Some(out) = super::cuda_flash::attend(&q, &k, &v, scale, causal_offset)? {
        return Ok(out);
    }
    // one query that sees every key: a decode step
    if causal_offset.is_none_or(|o| o + 1 >= t)
        && let Some(out) = super::cuda_fused::decode_attention(&q, &k, &v, scale)?
    {
        return Ok(out);
    }
    let chunk = (SCORE_BUDGET / (heads * t.max(1))).clamp(1, s.max(1));
    let mut outs = Vec::new();
    let mut start = 0;
    while start < s {
        let len = chunk.min(s - start);
        let qc = q.narrow(0, start, len)?;
        let scores = qc.apply_op2_no_bwd(
            &k,
            &Scores {
                scale: scale as f32,
            },
        )?;
        // query `start + i` sees keys up to `start + i + offset`: masked only where the chunk's
        // first query does not see every key (never for a decode step)
        let first_visible = causal_offset.map(|o| start + o).filter(|f| f + 1 < t);
        let probs = probabilities(&scores, first_visible, len, v.dtype())?;
        outs.push(probs.apply_op2_no_bwd(&v, &Mix { heads })?);
        start += len;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 0)
}

/// softmax over the last dimension of `scores` `(heads, len, T)` f32, keys after
/// `first_visible + i` hidden from query row `i`, rounded to `dtype`.
fn probabilities(
    scores: &Tensor,
    first_visible: Option<usize>,
    len: usize,
    dtype: DType,
) -> Result<Tensor> {
    let fused = RowSoftmax {
        first_visible,
        rows_per_head: len,
        dtype,
    };
    match scores.apply_op1_no_bwd(&fused) {
        Ok(probs) => Ok(probs),
        Err(e) => {
            static WARN: Once = Once::new();
            WARN.call_once(|| {
                tracing::warn!("attention softmax kernel unavailable ({e}); using candle's ops")
            });
            let t = scores.dim(2)?;
            let scores = match first_visible {
                Some(first) => super::attention::causal_masked(scores, first, len, t)?,
                None => scores.clone(),
            };
            candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)
        }
    }
}

const SOFTMAX_SOURCE: &str = include_str!("attention_softmax.cu");

/// PTX of [`SOFTMAX_SOURCE`], compiled once per process.
fn softmax_ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compiled_ptx(&PTX, SOFTMAX_SOURCE, "attention_softmax.cu", None)
}

/// The PTX of the engine's CUDA source `source` (file name `file`, for the error), compiled by
/// NVRTC for the virtual architecture `arch` (NVRTC's default if `None`) on the first call and
/// kept in `cell`; a failure is kept too, so it is not retried.
pub(super) fn compiled_ptx(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    source: &str,
    file: &str,
    arch: Option<&'static str>,
) -> Result<&'static str> {
    cell.get_or_init(|| {
        let options = nvrtc::CompileOptions {
            arch,
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(source, options)
            .map(|ptx| ptx.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("NVRTC could not compile {file}: {e}")))
}

/// The fused mask + softmax + rounding of `attention_softmax.cu` on contiguous f32 scores.
struct RowSoftmax {
    first_visible: Option<usize>,
    rows_per_head: usize,
    dtype: DType,
}

impl CustomOp1 for RowSoftmax {
    fn name(&self) -> &'static str {
        "cuda-attention-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: scores must be contiguous", self.name());
        };
        let ncols = *layout.dims().last().unwrap_or(&0);
        if ncols == 0 || self.rows_per_head == 0 {
            candle_core::bail!("{}: empty scores {:?}", self.name(), layout.shape());
        }
        let rows = (o2 - o1) / ncols;
        let scores = storage.as_cuda_slice::<f32>()?.slice(o1..o2);
        let device = storage.device().clone();
        let kernel = match self.dtype {
            DType::F32 => "attention_softmax_f32",
            DType::BF16 => "attention_softmax_bf16",
            DType::F16 => "attention_softmax_f16",
            other => candle_core::bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        let func =
            device.get_or_load_custom_func(kernel, "vlad_attention_softmax", softmax_ptx()?)?;
        let config = LaunchConfig {
            grid_dim: (
                u32::try_from(rows).map_err(|_| candle_core::Error::Msg(format!("{rows} rows")))?,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ncols =
            i32::try_from(ncols).map_err(|_| candle_core::Error::Msg(format!("{ncols} keys")))?;
        let rows_per_head = self.rows_per_head as i32;
        let first_visible: i64 = self.first_visible.map_or(-1, |f| f as i64);
        let out = alloc(&device, self.dtype, rows * ncols as usize)?;
        {
            let mut launch = func.builder();
            launch.arg(&scores);
            // SAFETY (all three): the output is a fresh buffer of rows × ncols elements of the
            // kernel's output type, the scores rows × ncols f32 values.
            match self.dtype {
                DType::F32 => launch.arg(out.as_cuda_slice::<f32>()?),
                DType::BF16 => launch.arg(out.as_cuda_slice::<bf16>()?),
                _ => launch.arg(out.as_cuda_slice::<f16>()?),
            };
            launch.arg(&ncols);
            launch.arg(&rows_per_head);
            launch.arg(&first_visible);
            unsafe { launch.launch(config) }.w()?;
        }
        Ok((out, layout.shape().clone()))
    }
}

/// `x` as `(rows, heads, d)` with unit stride inside a row: kept as it is when already so, else
/// copied.
fn rows_view(x: &Tensor) -> Result<Tensor> {
    if row_stride(x.layout()).is_some() {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// The row stride of a `(rows, heads, d)` layout whose heads lie side by side in each row.
pub(super) fn row_stride(layout: &Layout) -> Option<usize> {
    match (layout.dims(), layout.stride()) {
        ([rows, heads, d], [row, head, 1]) if *heads <= 1 || *head == *d => {
            Some(if *rows <= 1 { heads * d } else { *row })
        }
        _ => None,
    }
}

fn cuda_type(dtype: DType) -> Result<cublas_sys::cudaDataType> {
    Ok(match dtype {
        DType::BF16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => cublas_sys::cudaDataType::CUDA_R_16F,
        DType::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
        other => candle_core::bail!("CUDA attention: unsupported dtype {other:?}"),
    })
}

/// The device address of element `offset` of `storage`.
fn element_ptr<'a>(
    storage: &'a CudaStorage,
    offset: usize,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let dtype = storage.dtype();
    let (base, guard) = match dtype {
        DType::BF16 => storage.as_cuda_slice::<bf16>()?.device_ptr(stream),
        DType::F16 => storage.as_cuda_slice::<f16>()?.device_ptr(stream),
        DType::F32 => storage.as_cuda_slice::<f32>()?.device_ptr(stream),
        other => candle_core::bail!("CUDA attention: unsupported dtype {other:?}"),
    };
    Ok((base + (offset * dtype.size_in_bytes()) as u64, guard))
}

/// A fresh device buffer of `len` elements of `dtype`.
fn alloc(device: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorage> {
    // SAFETY: every element is written by the GEMMs that follow before anything reads it.
    Ok(unsafe {
        match dtype {
            DType::BF16 => CudaStorage::wrap_cuda_slice(device.alloc::<bf16>(len)?, device.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(device.alloc::<f16>(len)?, device.clone()),
            DType::F32 => CudaStorage::wrap_cuda_slice(device.alloc::<f32>(len)?, device.clone()),
            other => candle_core::bail!("CUDA attention: unsupported dtype {other:?}"),
        }
    })
}

/// One operand of a strided-batched GEMM: address, leading dimension, stride between batches.
struct Operand {
    ptr: u64,
    ld: usize,
    batch_stride: usize,
    dtype: DType,
}

/// `C = alpha · op(A) · op(B)` (column-major, cuBLAS's convention) for `batch` matrices, f32
/// accumulation.
#[allow(clippy::too_many_arguments)]
fn gemm(
    device: &CudaDevice,
    transpose_a: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: &Operand,
    b: &Operand,
    c: &Operand,
    batch: usize,
) -> Result<()> {
    let blas = device.cublas_handle();
    let op = |t: bool| {
        if t {
            cublas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            cublas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let int = |x: usize| {
        i32::try_from(x).map_err(|_| {
            candle_core::Error::Msg(format!("CUDA attention: {x} does not fit a cuBLAS int"))
        })
    };
    let beta = 0f32;
    // SAFETY: the operands address buffers of at least the sizes the dimensions, leading
    // dimensions and batch strides describe (checked by the callers' shapes), on the stream the
    // cuBLAS handle runs on.
    unsafe {
        cublas::gemm_strided_batched_ex(
            *blas.handle(),
            op(transpose_a),
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            int(m)?,
            int(n)?,
            int(k)?,
            (&alpha as *const f32).cast(),
            a.ptr as *const _,
            cuda_type(a.dtype)?,
            int(a.ld)?,
            a.batch_stride as i64,
            b.ptr as *const _,
            cuda_type(b.dtype)?,
            int(b.ld)?,
            b.batch_stride as i64,
            (&beta as *const f32).cast(),
            c.ptr as *mut _,
            cuda_type(c.dtype)?,
            int(c.ld)?,
            c.batch_stride as i64,
            int(batch)?,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .w()
    }
}

/// The CPU half of the CUDA-only custom ops.
pub(super) fn cuda_only(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} runs on CUDA devices only")
}

/// `(S, heads, d)` queries × `(T, kv_heads, d)` keys → `(heads, S, T)` f32 scores.
struct Scores {
    scale: f32,
}

impl CustomOp2 for Scores {
    fn name(&self) -> &'static str {
        "cuda-attention-scores"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (s, heads, d) = ql.shape().dims3()?;
        let (t, kv_heads, _) = kl.shape().dims3()?;
        let rep = heads / kv_heads;
        let (Some(q_row), Some(k_row)) = (row_stride(ql), row_stride(kl)) else {
            candle_core::bail!("{}: operands need unit-stride rows", self.name());
        };
        let device = q.device().clone();
        let stream = device.cuda_stream();
        let out = alloc(&device, DType::F32, heads * s * t)?;
        {
            let (out_ptr, _out_guard) = element_ptr(&out, 0, &stream)?;
            // one query: the `rep` heads of a group are the columns of one product
            let (calls, columns, q_ld) = if s == 1 { (1, rep, d) } else { (rep, s, q_row) };
            let (k_ptr, _k_guard) = element_ptr(k, kl.start_offset(), &stream)?;
            for r in 0..calls {
                let (q_ptr, _q_guard) = element_ptr(q, ql.start_offset() + r * d, &stream)?;
                // column-major: scoresᵀ (T × S) = K (T × d, rows of k_row) · Qᵀ (d × S)
                gemm(
                    &device,
                    true,
                    (t, columns, d),
                    self.scale,
                    &Operand {
                        ptr: k_ptr,
                        ld: k_row,
                        batch_stride: d,
                        dtype: k.dtype(),
                    },
                    &Operand {
                        ptr: q_ptr,
                        ld: q_ld,
                        batch_stride: rep * d,
                        dtype: q.dtype(),
                    },
                    &Operand {
                        ptr: out_ptr + (r * s * t * 4) as u64,
                        ld: t,
                        batch_stride: rep * s * t,
                        dtype: DType::F32,
                    },
                    kv_heads,
                )?;
            }
        }
        Ok((out, Shape::from((heads, s, t))))
    }
}

/// `(heads, S, T)` probabilities × `(T, kv_heads, d)` values → `(S, heads, d)`.
struct Mix {
    heads: usize,
}

impl CustomOp2 for Mix {
    fn name(&self) -> &'static str {
        "cuda-attention-mix"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        pl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (heads, s, t) = pl.shape().dims3()?;
        let (_, kv_heads, d) = vl.shape().dims3()?;
        if heads != self.heads || !pl.is_contiguous() || p.dtype() != v.dtype() {
            candle_core::bail!("{}: probabilities {:?} do not fit", self.name(), pl.shape());
        }
        let rep = heads / kv_heads;
        let Some(v_row) = row_stride(vl) else {
            candle_core::bail!("{}: values need unit-stride rows", self.name());
        };
        let device = p.device().clone();
        let stream = device.cuda_stream();
        let dtype = v.dtype();
        let out = alloc(&device, dtype, s * heads * d)?;
        {
            let (out_ptr, _out_guard) = element_ptr(&out, 0, &stream)?;
            // one query: the `rep` heads of a group are the columns of one product
            let (calls, columns, out_ld) = if s == 1 {
                (1, rep, d)
            } else {
                (rep, s, heads * d)
            };
            let (v_ptr, _v_guard) = element_ptr(v, vl.start_offset(), &stream)?;
            for r in 0..calls {
                let (p_ptr, _p_guard) = element_ptr(p, pl.start_offset() + r * s * t, &stream)?;
                // column-major: outᵀ (d × S, rows of heads·d) = Vᵀ (d × T) · Pᵀ (T × S)
                gemm(
                    &device,
                    false,
                    (d, columns, t),
                    1.0,
                    &Operand {
                        ptr: v_ptr,
                        ld: v_row,
                        batch_stride: d,
                        dtype,
                    },
                    &Operand {
                        ptr: p_ptr,
                        ld: t,
                        batch_stride: rep * s * t,
                        dtype,
                    },
                    &Operand {
                        ptr: out_ptr + (r * d * dtype.size_in_bytes()) as u64,
                        ld: out_ld,
                        batch_stride: rep * d,
                        dtype,
                    },
                    kv_heads,
                )?;
            }
        }
        Ok((out, Shape::from((s, heads, d))))
    }
}
