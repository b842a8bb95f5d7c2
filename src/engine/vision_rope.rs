//! The vision tower's rotary embedding of queries and keys on the CPU in one pass over the
//! stacked qkv output: each bf16 value of q and k widened to f32, rotated, rounded back, and q,
//! k and v written contiguous. It gives the bits of the reference's order (`float()`, rotate,
//! cast back), which candle's ops reach in five passes (widen, copy, `rope_thd`, narrow, round)
//! per tensor.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Rotated q and k and a copy of v, each `(n, heads, head_dim)` bf16, from `qkv`
/// `(n, 3, heads, head_dim)` bf16 and f32 tables `cos`/`sin` `(n, head_dim / 2)` (rotate-half
/// layout, as `rope_thd`). `None` where this pass does not apply (another device or dtype): use
/// candle's ops then.
pub fn split_rotated(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !qkv.device().is_cpu() || qkv.dtype() != DType::BF16 || cos.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, three, heads, d) = qkv.dims4()?;
    let half = d / 2;
    if three != 3 || d % 2 != 0 || cos.dims() != [n, half] || sin.dims() != [n, half] {
        candle_core::bail!(
            "vision rope: qkv {:?} with cos {:?} and sin {:?}",
            qkv.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (storage, layout) = qkv.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(values)) = &*storage else {
        candle_core::bail!("vision rope: expected a bf16 CPU tensor");
    };
    let src = &values[layout.start_offset()..layout.start_offset() + qkv.elem_count()];
    let (cos, sin) = (f32_vec(&cos)?, f32_vec(&sin)?);
    let width = heads * d;
    let mut q = vec![bf16::ZERO; n * width];
    let mut k = vec![bf16::ZERO; n * width];
    let mut v = vec![bf16::ZERO; n * width];
    q.par_chunks_mut(width)
        .zip(k.par_chunks_mut(width))
        .zip(v.par_chunks_mut(width))
        .enumerate()
        .for_each(|(token, ((q, k), v))| {
            let row = &src[token * 3 * width..(token + 1) * 3 * width];
            let (cos, sin) = (
                &cos[token * half..(token + 1) * half],
                &sin[token * half..(token + 1) * half],
            );
            v.copy_from_slice(&row[2 * width..]);
            for (src, dst) in [(&row[..width], q), (&row[width..2 * width], k)] {
                for (src, dst) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
                    let (x1s, x2s) = src.split_at(half);
                    let (d1, d2) = dst.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (x1s[i].to_f32(), x2s[i].to_f32());
                        // the expressions of candle's `rope_thd`, so the bits match it
                        d1[i] = bf16::from_f32(x1 * cos[i] - x2 * sin[i]);
                        d2[i] = bf16::from_f32(x1 * sin[i] + x2 * cos[i]);
                    }
                }
            }
        });
    let q = Tensor::from_vec(q, (n, heads, d), &Device::Cpu)?;
    let k = Tensor::from_vec(k, (n, heads, d), &Device::Cpu)?;
    let v = Tensor::from_vec(v, (n, heads, d), &Device::Cpu)?;
    Ok(Some((q, k, v)))
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    /// What the vision tower did before: candle's ops in f32, rounded back.
    fn with_candle_ops(t: Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let t = t.to_dtype(DType::F32).unwrap().unsqueeze(0).unwrap();
        candle_nn::rotary_emb::rope_thd(&t.contiguous().unwrap(), cos, sin)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u16> {
        let values: Vec<bf16> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn one_pass_gives_the_bits_of_candles_ops() {
        let (n, heads, d) = (11, 3, 16);
        let qkv = (Tensor::randn(0f32, 1.0, (n, 3, heads, d), &Device::Cpu).unwrap() * 20.0)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let angles = Tensor::randn(0f32, 3.0, (n, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let (q, k, v) = split_rotated(&qkv, &cos, &sin).unwrap().unwrap();
        assert_eq!(q.dims(), &[n, heads, d]);
        let want_q = with_candle_ops(qkv.i((.., 0)).unwrap(), &cos, &sin);
        let want_k = with_candle_ops(qkv.i((.., 1)).unwrap(), &cos, &sin);
        assert_eq!(bits(&q), bits(&want_q));
        assert_eq!(bits(&k), bits(&want_k));
        assert_eq!(bits(&v), bits(&qkv.i((.., 2)).unwrap()));
    }

    #[test]
    fn other_dtypes_are_left_to_candle_and_bad_tables_are_refused() {
        let qkv = Tensor::zeros((4, 3, 2, 8), DType::F32, &Device::Cpu).unwrap();
        let cos = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(split_rotated(&qkv, &cos, &cos).unwrap().is_none());
        let qkv = qkv.to_dtype(DType::BF16).unwrap();
        let short = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let err = split_rotated(&qkv, &short, &short).unwrap_err();
        assert!(err.to_string().contains("[3, 4]"), "{err}");
    }
}
