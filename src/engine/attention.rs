//! Attention kernels of the engine: block-diagonal (per frame) for the vision tower and causal with
//! a KV offset for the decoder. On CPUs with AVX-512 both go through
//! [`super::fused_attention`] (per head and block of queries, scores never leave L2; 3–4× faster
//! than the matmul path below for a 640×360 frame). Elsewhere prompts and frames go through
//! matmul-based attention that chunks the queries, so no score block exceeds a fixed budget and
//! nothing spans two frames, and single-token decode steps use candle-nn's flash kernel.
//! (Measured on a 2-core CPU: candle-nn 0.11's CPU flash kernels are 5–6× slower than matmul
//! attention for prompt-sized inputs.) On CUDA devices, [`super::cuda_attention`] (cuBLAS on the
//! operands in place).

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;

use super::fused_attention::{self, AttentionShape};

/// Upper bound on the elements of one dense score block (heads × queries × keys).
const DENSE_SCORE_BUDGET: usize = 1 << 26;

/// Non-causal attention restricted to consecutive blocks of `lens` rows (one block per frame).
/// `q`, `k`, `v`: `(N, heads, d)` f32; returns `(N, heads, d)`.
pub fn block_diagonal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    scale: f64,
) -> candle_core::Result<Tensor> {
    let mut outs = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        let qs = q.narrow(0, start, len)?;
        let ks = k.narrow(0, start, len)?;
        let vs = v.narrow(0, start, len)?;
        outs.push(dense(&qs, &ks, &vs, scale, None)?);
        start += len;
    }
    Tensor::cat(&outs, 0)
}

/// Causal attention of `q` `(1, S, heads, d)` over `k`, `v` `(1, T, kv_heads, d)` where the
/// queries are the last `S` positions of the `T` keys (`T - S` cached before them).
/// Grouped-query attention is handled by the kernels. Returns `(1, S, heads, d)`.
pub fn causal(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (_, s, heads, _) = q.dims4()?;
    let (_, t, kv_heads, _) = k.dims4()?;
    let offset = t - s;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        // grouped-query heads read in place, no expansion
        let (q, k, v) = (q.squeeze(0)?, k.squeeze(0)?, v.squeeze(0)?);
        return super::cuda_attention::attend(&q, &k, &v, scale, Some(offset))?.unsqueeze(0);
    }
    if let Some(out) = fused(
        &q.squeeze(0)?,
        &k.squeeze(0)?,
        &v.squeeze(0)?,
        scale,
        Some(offset),
    )? {
        return out.unsqueeze(0);
    }
    if s == 1 && q.device().is_cpu() && q.dtype() == DType::F32 {
        let mask = candle_nn::attention::AttnMask::causal_with_offset(offset);
        let out = candle_nn::attention::flash_attn::<f32>(q, k, v, scale as f32, mask, None, None)?;
        // the kernels return (1, heads, S, d)
        return out.transpose(1, 2)?.contiguous();
    }
    let rep = heads / kv_heads;
    let expand = |x: &Tensor| -> candle_core::Result<Tensor> {
        let x = x.squeeze(0)?;
        if rep == 1 {
            return Ok(x);
        }
        let (t, kvh, d) = x.dims3()?;
        x.unsqueeze(2)?
            .broadcast_as((t, kvh, rep, d))?
            .reshape((t, kvh * rep, d))
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let out = dense(&q.squeeze(0)?, &k, &v, scale, Some(offset))?;
    out.unsqueeze(0)
}

/// softmax(q·kᵀ·scale)·v with `q` `(S, h, d)`, `k`/`v` `(T, h, d)`; queries chunked to bound the
/// score memory. With `causal_offset`, query `i` sees keys `0..=i + offset`.
pub(crate) fn dense(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return super::cuda_attention::attend(q, k, v, scale, causal_offset);
    }
    match fused(q, k, v, scale, causal_offset)? {
        Some(out) => Ok(out),
        None => matmul_attention(q, k, v, scale, causal_offset),
    }
}

/// [`dense`] as candle matmuls (f32), the queries chunked to bound the score memory.
fn matmul_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> candle_core::Result<Tensor> {
    let (s, heads, _) = q.dims3()?;
    let t = k.dim(0)?;
    let dtype = q.dtype();
    let q = q.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous()?;
    let kt = k.transpose(0, 1)?.to_dtype(DType::F32)?.t()?.contiguous()?;
    let v = v.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous()?;
    let chunk = (DENSE_SCORE_BUDGET / (heads * t.max(1))).clamp(1, s.max(1));
    let mut outs = Vec::new();
    let mut start = 0;
    while start < s {
        let len = chunk.min(s - start);
        let qc = q.narrow(1, start, len)?;
        let mut scores = (qc.matmul(&kt)? * scale)?;
        // query `start + i` sees keys up to `start + i + offset`: a mask only where the chunk's
        // first query does not see every key (never for a decode step)
        if let Some(offset) = causal_offset.filter(|o| start + o + 1 < t) {
            scores = causal_masked(&scores, start + offset, len, t)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&v)?);
        start += len;
    }
    Tensor::cat(&outs, 1)?
        .transpose(0, 1)?
        .to_dtype(dtype)?
        .contiguous()
}

/// `scores` `(heads, len, t)` with key `j` of query row `i` set to -inf where `j > first + i`.
/// The mask is built where the scores are (no host-side mask copied to a GPU).
pub(super) fn causal_masked(
    scores: &Tensor,
    first: usize,
    len: usize,
    t: usize,
) -> candle_core::Result<Tensor> {
    let device = scores.device();
    let last_visible =
        Tensor::arange(first as u32, (first + len) as u32, device)?.reshape((len, 1))?;
    let keys = Tensor::arange(0u32, t as u32, device)?.reshape((1, t))?;
    let visible = keys
        .broadcast_le(&last_visible)?
        .unsqueeze(0)?
        .broadcast_as(scores.shape())?;
    let hidden = Tensor::new(f32::NEG_INFINITY, device)?
        .to_dtype(scores.dtype())?
        .broadcast_as(scores.shape())?;
    visible.where_cond(scores, &hidden)
}

/// Attention through the fused CPU kernel: `q` `(S, heads, d)`, `k`/`v` `(T, kv_heads, d)`, all
/// f32 or all bf16 on the CPU. `None` where the kernel does not apply (another device or dtype, a
/// CPU without AVX-512), so the caller takes the matmul path.
fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> candle_core::Result<Option<Tensor>> {
    if !matches!(q.device(), Device::Cpu) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Ok(None);
    }
    let (s, heads, d) = q.dims3()?;
    let (t, kv_heads, _) = k.dims3()?;
    if kv_heads == 0 || heads % kv_heads != 0 || s == 0 || t == 0 {
        return Ok(None);
    }
    let shape = AttentionShape {
        s,
        t,
        heads,
        kv_heads,
        d,
        causal_offset,
        scale: scale as f32,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let slice = |layout: &candle_core::Layout, len: usize| {
        layout.start_offset()..layout.start_offset() + len
    };
    let (qn, kn) = (s * heads * d, t * kv_heads * d);
    let out = match (&*qs, &*ks, &*vs) {
        (
            Storage::Cpu(CpuStorage::F32(qv)),
            Storage::Cpu(CpuStorage::F32(kv)),
            Storage::Cpu(CpuStorage::F32(vv)),
        ) => fused_attention::attend::<f32>(
            &qv[slice(ql, qn)],
            &kv[slice(kl, kn)],
            &vv[slice(vl, kn)],
            shape,
        )
        .map(|o| Tensor::from_vec(o, (s, heads, d), &Device::Cpu)),
        (
            Storage::Cpu(CpuStorage::BF16(qv)),
            Storage::Cpu(CpuStorage::BF16(kv)),
            Storage::Cpu(CpuStorage::BF16(vv)),
        ) => fused_attention::attend::<bf16>(
            &qv[slice(ql, qn)],
            &kv[slice(kl, kn)],
            &vv[slice(vl, kn)],
            shape,
        )
        .map(|o| Tensor::from_vec(o, (s, heads, d), &Device::Cpu)),
        _ => None,
    };
    out.transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: (usize, usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn block_diagonal_matches_dense_per_frame_and_the_flash_kernel() {
        let (q, k, v) = (rand((13, 2, 8)), rand((13, 2, 8)), rand((13, 2, 8)));
        let lens = [4, 9];
        let fast = block_diagonal(&q, &k, &v, &lens, 0.3).unwrap();
        let a = dense(
            &q.narrow(0, 0, 4).unwrap(),
            &k.narrow(0, 0, 4).unwrap(),
            &v.narrow(0, 0, 4).unwrap(),
            0.3,
            None,
        )
        .unwrap();
        let b = dense(
            &q.narrow(0, 4, 9).unwrap(),
            &k.narrow(0, 4, 9).unwrap(),
            &v.narrow(0, 4, 9).unwrap(),
            0.3,
            None,
        )
        .unwrap();
        let slow = Tensor::cat(&[a, b], 0).unwrap();
        assert_eq!(fast.dims(), &[13, 2, 8]);
        assert!(max_diff(&fast, &slow) < 1e-5);
        let seqlens = Tensor::new(&[4u32, 9], &Device::Cpu).unwrap();
        let flash = candle_nn::attention::flash_attn_varlen_cpu(
            &q, &k, &v, None, &seqlens, &seqlens, 9, 9, 0.3, false, None, None,
        )
        .unwrap();
        assert!(max_diff(&fast, &flash) < 1e-5);
    }

    #[test]
    fn flash_causal_with_offset_and_gqa_matches_dense() {
        for s in [1usize, 3, 7] {
            let t = 7;
            let q = rand((s, 4, 8)).unsqueeze(0).unwrap();
            let k = rand((t, 2, 8)).unsqueeze(0).unwrap();
            let v = rand((t, 2, 8)).unsqueeze(0).unwrap();
            let fast = causal(&q, &k, &v, 0.35).unwrap();
            let rep = |x: &Tensor| {
                x.squeeze(0)
                    .unwrap()
                    .unsqueeze(2)
                    .unwrap()
                    .broadcast_as((t, 2, 2, 8))
                    .unwrap()
                    .reshape((t, 4, 8))
                    .unwrap()
            };
            let slow = dense(
                &q.squeeze(0).unwrap(),
                &rep(&k),
                &rep(&v),
                0.35,
                Some(t - s),
            )
            .unwrap();
            assert_eq!(fast.dims(), &[1, s, 4, 8]);
            assert!(max_diff(&fast.squeeze(0).unwrap(), &slow) < 1e-5, "s={s}");
        }
    }

    #[test]
    fn fused_kernel_matches_matmul_attention_in_f32_and_bf16() {
        let repeat = |x: &Tensor, rep: usize| {
            let (t, g, d) = x.dims3().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((t, g, rep, d))
                .unwrap()
                .reshape((t, g * rep, d))
                .unwrap()
        };
        // (queries, keys, heads, kv heads, d, causal offset)
        let cases = [
            (37, 37, 4, 4, 80, None),
            (30, 30, 6, 2, 16, Some(0)),
            (3, 50, 4, 1, 8, Some(47)),
            (1, 20, 2, 2, 8, Some(19)),
            // several blocks of queries per head, each task narrower or wider than the one
            // before on its thread: stale values in reused buffers must not leak in
            (100, 2000, 2, 1, 8, Some(1900)),
            // whole and partial AMX blocks of queries, keys and head size (zero-extended)
            (70, 70, 2, 2, 80, None),
            (64, 96, 2, 1, 80, Some(32)),
            (33, 45, 1, 1, 40, Some(12)),
            // keys in several chunks (online softmax); causal rows that see none of the
            // second chunk next to rows that see part of it
            (40, 1500, 2, 1, 80, None),
            (100, 1400, 2, 2, 80, Some(650)),
        ];
        for (s, t, heads, kv_heads, d, offset) in cases {
            let q = rand((s, heads, d));
            let (k, v) = (rand((t, kv_heads, d)), rand((t, kv_heads, d)));
            // on one thread the tasks share one set of scratch buffers
            let one_thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let fused = |q: &Tensor, k: &Tensor, v: &Tensor, offset| {
                one_thread.install(|| fused(q, k, v, 0.2, offset))
            };
            let Some(fast) = fused(&q, &k, &v, offset).unwrap() else {
                eprintln!("no AVX-512 on this CPU: the fused kernel is not used here");
                return;
            };
            let (k_all, v_all) = (repeat(&k, heads / kv_heads), repeat(&v, heads / kv_heads));
            let slow = matmul_attention(&q, &k_all, &v_all, 0.2, offset).unwrap();
            assert!(max_diff(&fast, &slow) < 1e-5, "f32 {s}x{t}");
            let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
            let fast = fused(&bf(&q), &bf(&k), &bf(&v), offset)
                .unwrap()
                .expect("bf16 kernel where the f32 one runs");
            // the same inputs rounded to bf16, attended in f32
            let f = |x: &Tensor| bf(x).to_dtype(DType::F32).unwrap();
            let slow = matmul_attention(&f(&q), &f(&k_all), &f(&v_all), 0.2, offset).unwrap();
            let diff = max_diff(&fast.to_dtype(DType::F32).unwrap(), &slow);
            assert!(diff < 0.03, "bf16 {s}x{t}: {diff}");
        }
    }

    #[test]
    fn fused_kernel_follows_scores_far_above_the_first_chunks() {
        // keys of the second and third chunk scaled up: their scores (about 70 in exponent
        // units) would overflow against the first chunk's largest, so the softmax's reference
        // must move; and the reverse, the first chunk's keys far above the rest
        let (s, t, heads, d) = (40, 1500, 2, 80);
        let q = rand((s, heads, d));
        let v = rand((t, heads, d));
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for (from, to) in [(700, 1500), (0, 600)] {
            let k = rand((t, heads, d));
            let loud = (k.narrow(0, from, to - from).unwrap() * 40.0).unwrap();
            let k = Tensor::cat(
                &[
                    k.narrow(0, 0, from).unwrap(),
                    loud,
                    k.narrow(0, to, t - to).unwrap(),
                ],
                0,
            )
            .unwrap();
            let Some(fast) = one_thread.install(|| fused(&q, &k, &v, 0.2, None)).unwrap() else {
                eprintln!("no AVX-512 on this CPU: the fused kernel is not used here");
                return;
            };
            let slow = matmul_attention(&q, &k, &v, 0.2, None).unwrap();
            // scores near 70 in exponent units: their f32 rounding alone moves an exponential
            // by about 10⁻⁵ relative (both kernels differ that much from each other)
            let finite = |x: &Tensor| {
                let values = x.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
                values
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .all(|v| v.is_finite())
            };
            assert!(finite(&fast), "f32, keys {from}..{to}: not finite");
            let diff = max_diff(&fast, &slow);
            assert!(diff < 1e-4, "f32, keys {from}..{to}: {diff}");
            let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
            let fast = one_thread
                .install(|| fused(&bf(&q), &bf(&k), &bf(&v), 0.2, None))
                .unwrap()
                .expect("bf16 kernel where the f32 one runs");
            let f = |x: &Tensor| bf(x).to_dtype(DType::F32).unwrap();
            let slow = matmul_attention(&f(&q), &f(&k), &f(&v), 0.2, None).unwrap();
            assert!(finite(&fast), "bf16, keys {from}..{to}: not finite");
            let diff = max_diff(&fast.to_dtype(DType::F32).unwrap(), &slow);
            assert!(diff < 0.03, "bf16, keys {from}..{to}: {diff}");
        }
    }

    #[test]
    fn dense_chunks_give_the_same_result() {
        let (q, k, v) = (rand((5, 1, 4)), rand((5, 1, 4)), rand((5, 1, 4)));
        let full = dense(&q, &k, &v, 1.0, Some(0)).unwrap();
        // a row of a causal attention at position 0 sees only itself
        let first = v.narrow(0, 0, 1).unwrap();
        assert!(max_diff(&full.narrow(0, 0, 1).unwrap(), &first) < 1e-6);
    }
}
