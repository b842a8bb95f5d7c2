//! Flash attention on CUDA devices: the kernels of `flash_attention.cu` (compiled by NVRTC on
//! first use), which keep each block of scores in registers instead of writing queries × keys
//! f32 scores to memory and reading them back twice (what [`super::cuda_attention`]'s cuBLAS path
//! does). Used for prompts and vision frames with bf16 or f16 operands and a head size the kernels
//! are built for; [`attend`] answers `None` where it does not apply (f32, a single query, other
//! head sizes, unaligned rows, `VLAD_CUDA_FLASH=0`, or a kernel that cannot be built), and the
//! caller takes the cuBLAS path. `VLAD_CUDA_FLASH=async` selects the build whose key and value
//! tiles land in shared memory with `cp.async` while the tensor cores work (see the .cu file).

use std::sync::{Once, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::cuda_attention::{cuda_only, row_stride};
use super::cuda_fused::{blocks, int};

/// Head sizes `flash_attention.cu` is instantiated for.
const HEAD_SIZES: [usize; 6] = [16, 32, 64, 80, 96, 128];
/// Virtual rows (query × head of a group) per block of the kernel.
const ROWS_PER_BLOCK: usize = 64;
const THREADS_PER_BLOCK: u32 = 128;
const SOURCE: &str = include_str!("flash_attention.cu");

/// softmax(q·kᵀ·scale)·v as in [`super::cuda_attention::attend`] (same shapes and mask), through
/// the flash kernels; `None` where they do not apply.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> Result<Option<Tensor>> {
    attend_with(Staging::chosen(), q, k, v, scale, causal_offset)
}

/// How a block stages its key and value tiles: both kernel builds compute the same sums in the
/// same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staging {
    /// Loaded through registers before each tile, every warp waiting for them.
    Loads,
    /// `cp.async`, overlapped with the products (`VLAD_CUDA_FLASH=async`).
    Async,
}

impl Staging {
    fn chosen() -> Self {
        static CHOSEN: OnceLock<Staging> = OnceLock::new();
        *CHOSEN.get_or_init(|| match std::env::var("VLAD_CUDA_FLASH").as_deref() {
            Ok("async") => Staging::Async,
            _ => Staging::Loads,
        })
    }
}

fn attend_with(
    staging: Staging,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> Result<Option<Tensor>> {
    if !applies(q, k, v)? {
        return Ok(None);
    }
    if let Err(e) = ptx(staging) {
        static WARN: Once = Once::new();
        WARN.call_once(|| tracing::warn!("flash attention unavailable ({e}); using cuBLAS"));
        return Ok(None);
    }
    let op = Flash {
        scale: scale as f32,
        causal_offset,
        staging,
    };
    q.apply_op3_no_bwd(k, v, &op).map(Some)
}

/// Whether the kernels take these operands: bf16/f16, more than one query, a head size they are
/// built for, rows and starts on 16-byte boundaries, and not switched off.
fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| std::env::var("VLAD_CUDA_FLASH").as_deref() != Ok("0"));
    let (s, _, d) = q.dims3()?;
    let dtype = q.dtype();
    let aligned = |x: &Tensor| {
        row_stride(x.layout()).is_some_and(|row| row % 8 == 0)
            && x.layout().start_offset().is_multiple_of(8)
    };
    Ok(enabled
        && s > 1
        && matches!(dtype, DType::BF16 | DType::F16)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && HEAD_SIZES.contains(&d)
        && aligned(q)
        && aligned(k)
        && aligned(v))
}

/// PTX of [`SOURCE`] for compute capability 8.0 and later (the bf16 tensor-core instructions)
/// and its module name, compiled once per process and staging (`cp.async` needs 8.0 too).
fn ptx(staging: Staging) -> Result<(&'static str, &'static str)> {
    static LOADS: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    static ASYNC: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compile = super::cuda_attention::compiled_ptx;
    Ok(match staging {
        Staging::Loads => (
            compile(&LOADS, SOURCE, "flash_attention.cu", Some("compute_80"))?,
            "vlad_flash_attention",
        ),
        Staging::Async => (
            compile(
                &ASYNC,
                &format!("#define FLASH_ASYNC 1\n{SOURCE}"),
                "flash_attention.cu (FLASH_ASYNC)",
                Some("compute_80"),
            )?,
            "vlad_flash_attention_async",
        ),
    })
}

struct Flash {
    scale: f32,
    causal_offset: Option<usize>,
    staging: Staging,
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "cuda-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
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
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (s, heads, d) = ql.shape().dims3()?;
        let (t, kv_heads, _) = kl.shape().dims3()?;
        let (Some(q_row), Some(k_row), Some(v_row)) =
            (row_stride(ql), row_stride(kl), row_stride(vl))
        else {
            candle_core::bail!("{}: operands need unit-stride rows", self.name());
        };
        let rep = heads / kv_heads;
        let dtype = q.dtype();
        let name = match dtype {
            DType::BF16 => format!("flash_attention_bf16_d{d}"),
            DType::F16 => format!("flash_attention_f16_d{d}"),
            other => candle_core::bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        let device = q.device().clone();
        let (ptx, module) = ptx(self.staging)?;
        let func = device.get_or_load_custom_func(&name, module, ptx)?;
        let config = LaunchConfig {
            grid_dim: (
                blocks(s * rep, ROWS_PER_BLOCK)?,
                int(kv_heads, "heads")? as u32,
                1,
            ),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s_arg, t_arg, rep_arg) = (int(s, "queries")?, int(t, "keys")?, int(rep, "heads")?);
        let (q_row, k_row, v_row, out_row) =
            (q_row as i64, k_row as i64, v_row as i64, (heads * d) as i64);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let causal: i64 = self.causal_offset.map_or(-1, |o| o as i64);
        let len = |l: &Layout, rows: usize, row: i64| (rows - 1) * row as usize + l.dims()[1] * d;
        macro_rules! launch {
            ($t:ty) => {{
                // SAFETY: the kernel writes every element (each query's heads, all d values)
                let out = unsafe { device.alloc::<$t>(s * heads * d)? };
                {
                    let qv = q
                        .as_cuda_slice::<$t>()?
                        .slice(ql.start_offset()..ql.start_offset() + len(ql, s, q_row));
                    let kv = k
                        .as_cuda_slice::<$t>()?
                        .slice(kl.start_offset()..kl.start_offset() + len(kl, t, k_row));
                    let vv = v
                        .as_cuda_slice::<$t>()?
                        .slice(vl.start_offset()..vl.start_offset() + len(vl, t, v_row));
                    let mut builder = func.builder();
                    builder.arg(&qv).arg(&kv).arg(&vv).arg(&out);
                    builder.arg(&s_arg).arg(&t_arg).arg(&rep_arg);
                    builder.arg(&q_row).arg(&k_row).arg(&v_row).arg(&out_row);
                    builder.arg(&scale_log2).arg(&causal);
                    // SAFETY: the views cover every element the kernel reads (rows of the strides
                    // above, heads × d values each); the output holds s × heads × d values; the
                    // arguments match the kernel's signature in flash_attention.cu.
                    unsafe { builder.launch(config) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, device.clone())
            }};
        }
        let out = match dtype {
            DType::BF16 => launch!(bf16),
            _ => launch!(f16),
        };
        Ok((out, Shape::from((s, heads, d))))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// softmax(q·kᵀ·scale)·v in f64 on the host from the operands' values, `(S, heads, d)`.
    pub(crate) fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        causal_offset: Option<usize>,
    ) -> Vec<f64> {
        let values = |x: &Tensor| -> Vec<f64> {
            x.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (s, heads, d) = q.dims3().unwrap();
        let (t, kv_heads, _) = k.dims3().unwrap();
        let (qv, kv, vv) = (values(q), values(k), values(v));
        let mut out = vec![0.0; s * heads * d];
        for i in 0..s {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let visible = causal_offset.map_or(t, |o| (i + o + 1).min(t));
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|c| qv[(i * heads + h) * d + c] * kv[(j * kv_heads + g) * d + c])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in 0..d {
                    out[(i * heads + h) * d + c] = (0..visible)
                        .map(|j| exps[j] * vv[(j * kv_heads + g) * d + c])
                        .sum::<f64>()
                        / sum;
                }
            }
        }
        out
    }

    /// The flash kernels against f64 sums of the same (rounded) operands: vision frames (d = 80,
    /// no mask, a length that is not a multiple of the tiles), grouped-query prompts after a
    /// cached prefix (d = 128, causal), the fixtures' d = 16, f16, and queries read in place from
    /// a wider qkv row (strided rows). Needs a CUDA device; says so and passes without one.
    #[test]
    fn flash_attention_matches_exact_sums_on_the_gpu() {
        let Ok(device) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: flash attention not checked");
            return;
        };
        // (queries, keys, heads, kv heads, d, causal offset, dtype)
        let cases = [
            (300, 300, 4, 4, 80, None, DType::BF16),
            (200, 250, 12, 2, 128, Some(50), DType::BF16),
            (70, 70, 4, 2, 16, Some(0), DType::BF16),
            (129, 129, 3, 3, 32, Some(0), DType::F16),
            (65, 1000, 2, 1, 64, Some(935), DType::F16),
            (100, 100, 2, 2, 96, None, DType::BF16),
        ];
        for ((s, t, heads, kv_heads, d, causal, dtype), staging) in cases
            .into_iter()
            .flat_map(|case| [(case, Staging::Loads), (case, Staging::Async)])
        {
            let rand = |rows: usize, width: usize| {
                Tensor::randn(0f32, 1.0, (rows, width), &device)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // q read in place from a (S, q | k | v) row like the decoder's fused projection
            let qkv = rand(s, (heads + 2 * kv_heads) * d);
            let q = qkv
                .i((.., 0..heads * d))
                .unwrap()
                .reshape((s, heads, d))
                .unwrap();
            let k = rand(t, kv_heads * d).reshape((t, kv_heads, d)).unwrap();
            let v = rand(t, kv_heads * d).reshape((t, kv_heads, d)).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let got = attend_with(staging, &q, &k, &v, scale, causal)
                .unwrap()
                .unwrap_or_else(|| panic!("flash attention did not take d={d} {dtype:?}"));
            assert_eq!(got.dims3().unwrap(), (s, heads, d));
            let got: Vec<f32> = got
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = reference(&q, &k, &v, scale, causal);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs() / (0.02 + w.abs()))
                .fold(0.0, f64::max);
            // bf16 probabilities and outputs: a few 2^-8 relative steps
            assert!(
                worst < 0.05,
                "s={s} t={t} heads={heads}/{kv_heads} d={d} {causal:?} {dtype:?} {staging:?}: worst {worst}"
            );
        }
    }
}
