//! Rotary embeddings on the CPU in one pass over a stacked q/k/v projection: q, k and v are
//! split out of each row, q and k rotated (rotate-half layout, as candle's `rope_thd`), and all
//! three written contiguous — where candle's ops take a copy per tensor, the rotation, and for
//! the vision tower a widening and a rounding pass. Two arithmetics, each with the bits of the
//! reference's order:
//! - bf16 values with f32 tables (the vision tower): widened to f32, rotated, rounded once, as
//!   the reference's `float()`, rotate, cast back;
//! - values and tables in the same dtype (the decoder): every product and sum rounded to that
//!   dtype, as bf16 ops in the reference (and candle's `rope_thd`) round them.

use candle_core::{DType, Device, Layout, Result, Storage, Tensor, WithDType};
use half::bf16;
use rayon::prelude::*;

use super::gemm::{PackedWeight, SharedOut};
use super::linear::{self, Linear};
use super::vector_math;

thread_local! {
    /// One row's share of a projection rounded to bf16, before its rotation
    /// ([`projected_split_rotated`]).
    static ROUNDED: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`split_rotated`] of `qkv.forward(x)` (bf16 values, f32 tables, the vision tower) in the
/// product's own epilogue, where the layer is packed for the CPU's bf16 kernel: each thread
/// rounds its sums of a row to bf16 as the layer would, rotates them and writes q, k and v,
/// so the stacked projection is never a tensor and no second pass reads it. The same bits as
/// the two steps. Its threads take whole heads: groups of panels as wide as a multiple of
/// `head_dim`. `None` where the layer, the input or the tables do not fit this path.
pub fn projected_split_rotated(
    qkv: &Linear,
    x: &Tensor,
    heads: [usize; 3],
    head_dim: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some((w, bias)) = qkv.packed_bf16_parts() else {
        return Ok(None);
    };
    let d = head_dim;
    let widths = heads.map(|h| h * d);
    let width: usize = widths.iter().sum();
    let fits = x.dtype() == DType::BF16
        && x.device().is_cpu()
        && cos.dtype() == DType::F32
        && sin.dtype() == DType::F32
        && d > 0
        && d.is_multiple_of(2)
        && w.n() == width
        && x.dims().last() == Some(&w.k());
    if !fits {
        return Ok(None);
    }
    let (k, half) = (w.k(), d / 2);
    linear::with_bf16_rows(x, k, width, "rope projection", |a, n, _| {
        if cos.dims() != [n, half] || sin.dims() != [n, half] {
            candle_core::bail!(
                "rope: {n} rows for heads of {d} with cos {:?} and sin {:?}",
                cos.dims(),
                sin.dims()
            );
        }
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        let ((cos_s, cos_layout), (sin_s, sin_layout)) =
            (cos.storage_and_layout(), sin.storage_and_layout());
        let cos: &[f32] = cpu_values(&cos_s, cos_layout, n * half)?;
        let sin: &[f32] = cpu_values(&sin_s, sin_layout, n * half)?;
        rotated_in_epilogue((w, bias), (a, n), heads, d, (cos, sin)).map(Some)
    })
}

/// [`projected_split_rotated`] on `n` rows of bf16 input `a` and the tables' values.
fn rotated_in_epilogue(
    (w, bias): (&PackedWeight, Option<&[f32]>),
    (a, n): (&[bf16], usize),
    heads: [usize; 3],
    d: usize,
    (cos, sin): (&[f32], &[f32]),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (k, half) = (w.k(), d / 2);
    let widths = heads.map(|h| h * d);
    let width: usize = widths.iter().sum();
    // panels per group: the fewest whose columns are whole heads
    let lcm = d / gcd(d, 32) * 32;
    let group = lcm / 32;
    let mut outs: [Vec<bf16>; 3] = widths.map(|w| Vec::with_capacity(n * w));
    let dst = outs
        .each_mut()
        .map(|o| SharedOut(o.spare_capacity_mut().as_mut_ptr().cast::<bf16>()));
    // columns where q, k and v start
    let starts = [0, widths[0], widths[0] + widths[1], width];
    linear::with_kept_sums(w, a, (n, k), bias, group, |row, first, sums| {
        ROUNDED.with_borrow_mut(|rounded| {
            rounded.resize(sums.len(), bf16::ZERO);
            vector_math::round_to_bf16(sums, 1.0, rounded);
            let (cos, sin) = (
                &cos[row * half..(row + 1) * half],
                &sin[row * half..(row + 1) * half],
            );
            let cols = first..first + sums.len();
            for part in 0..3 {
                let (c0, c1) = (cols.start.max(starts[part]), cols.end.min(starts[part + 1]));
                if c0 >= c1 {
                    continue;
                }
                let src = &rounded[c0 - first..c1 - first];
                // SAFETY: each thread writes only its own columns (whole heads) of each row of
                // its part, inside `n` rows of `widths[part]`.
                let out =
                    unsafe { dst[part].slice(row * widths[part] + c0 - starts[part], c1 - c0) };
                if part < 2 {
                    rotate_bf16_heads(src, out, d, cos, sin);
                } else {
                    out.copy_from_slice(src);
                }
            }
        });
    });
    // SAFETY: the product handed every row of every thread's columns to the epilogue above,
    // which wrote all `n × widths[part]` values of each part.
    for (out, w) in outs.iter_mut().zip(widths) {
        unsafe { out.set_len(n * w) };
    }
    let [q, kk, v] = outs;
    let [hq, hk, hv] = heads;
    Ok((
        Tensor::from_vec(q, (n, hq, d), &Device::Cpu)?,
        Tensor::from_vec(kk, (n, hk, d), &Device::Cpu)?,
        Tensor::from_vec(v, (n, hv, d), &Device::Cpu)?,
    ))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Rotated q and k and a copy of v, `(n, heads[i], head_dim)` each, from `qkv` `(.., width)` with
/// `width = (heads[0] + heads[1] + heads[2]) · head_dim` (q heads, then k, then v) and tables
/// `cos`/`sin` `(n, head_dim / 2)`. `None` where this pass does not apply (another device, or
/// dtypes other than bf16 with f32 or bf16 tables, or f32 with f32 tables): use candle's ops then.
pub fn split_rotated(
    qkv: &Tensor,
    heads: [usize; 3],
    head_dim: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !qkv.device().is_cpu() {
        return Ok(None);
    }
    match (qkv.dtype(), cos.dtype()) {
        (DType::BF16, DType::F32) => split::<bf16, f32>(
            qkv,
            heads,
            head_dim,
            cos,
            sin,
            (rotate_bf16_f32, bf16_f32_lanes()),
        ),
        (DType::BF16, DType::BF16) => split::<bf16, bf16>(
            qkv,
            heads,
            head_dim,
            cos,
            sin,
            (rotate_bf16_bf16, bf16_bf16_lanes()),
        ),
        (DType::F32, DType::F32) => {
            let rotate =
                |x: (f32, f32), c: (f32, f32)| (x.0 * c.0 - x.1 * c.1, x.0 * c.1 + x.1 * c.0);
            split::<f32, f32>(qkv, heads, head_dim, cos, sin, (rotate, None))
        }
        _ => return Ok(None),
    }
    .map(Some)
}

/// One pair of bf16 values rotated with bf16 `(cos, sin)` in bf16 ops, each rounded: what
/// candle's `rope_thd` does on bf16, and the reference's `q·cos + rotate_half(q)·sin` in bf16.
fn rotate_bf16_bf16(x: (bf16, bf16), c: (bf16, bf16)) -> (bf16, bf16) {
    (x.0 * c.0 - x.1 * c.1, x.0 * c.1 + x.1 * c.0)
}

/// One pair of bf16 values rotated with f32 `(cos, sin)`: the expressions of candle's `rope_thd`
/// in f32, so the bits match it.
fn rotate_bf16_f32(x: (bf16, bf16), c: (f32, f32)) -> (bf16, bf16) {
    let (x1, x2) = (x.0.to_f32(), x.1.to_f32());
    (
        bf16::from_f32(x1 * c.0 - x2 * c.1),
        bf16::from_f32(x1 * c.1 + x2 * c.0),
    )
}

/// Whole heads of `d` bf16 values from `src` rotated into `dst` (as long) with one position's
/// f32 tables (`d / 2` each), with the bits of [`split_rotated`]'s vision-tower arithmetic.
pub fn rotate_bf16_heads(src: &[bf16], dst: &mut [bf16], d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    assert!(
        d.is_multiple_of(2)
            && src.len().is_multiple_of(d)
            && dst.len() == src.len()
            && cos.len() >= half
            && sin.len() >= half,
        "rope: {} values into {} for heads of {d} with tables of {} and {}",
        src.len(),
        dst.len(),
        cos.len(),
        sin.len()
    );
    if let Some(rotate_lanes) = bf16_f32_lanes() {
        // SAFETY: `bf16_f32_lanes` checked the CPU; the lengths were checked above.
        return unsafe {
            rotate_lanes(
                src.as_ptr(),
                dst.as_mut_ptr(),
                src.len(),
                d,
                cos.as_ptr(),
                sin.as_ptr(),
            )
        };
    }
    for (src, dst) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
        let (x1, x2) = src.split_at(half);
        let (d1, d2) = dst.split_at_mut(half);
        for i in 0..half {
            (d1[i], d2[i]) = rotate_bf16_f32((x1[i], x2[i]), (cos[i], sin[i]));
        }
    }
}

/// [`split_rotated`] for values `T` and tables `C`; `rotate((x1, x2), (cos, sin))` gives the
/// rotated pair, `lanes` (where the CPU has it) the same bits for whole heads at once.
fn split<T: WithDType + bytemuck::Zeroable, C: WithDType>(
    qkv: &Tensor,
    heads: [usize; 3],
    d: usize,
    cos: &Tensor,
    sin: &Tensor,
    (rotate, lanes): (
        impl Fn((T, T), (C, C)) -> (T, T) + Sync,
        Option<RotateLanes<T, C>>,
    ),
) -> Result<(Tensor, Tensor, Tensor)> {
    let half = d / 2;
    let widths = heads.map(|h| h * d);
    let width: usize = widths.iter().sum();
    let n = qkv.elem_count() / width.max(1);
    let shape_ok = width > 0
        && d.is_multiple_of(2)
        && qkv.dims().last() == Some(&width)
        && cos.dims() == [n, half]
        && sin.dims() == [n, half];
    if !shape_ok {
        candle_core::bail!(
            "rope: qkv {:?} for heads {heads:?} of {d} with cos {:?} and sin {:?}",
            qkv.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    // read in place: the tables are the same for every layer, so no per-layer copies
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let ((src, src_layout), (cos_s, cos_layout), (sin_s, sin_layout)) = (
        qkv.storage_and_layout(),
        cos.storage_and_layout(),
        sin.storage_and_layout(),
    );
    let src: &[T] = cpu_values(&src, src_layout, n * width)?;
    let cos: &[C] = cpu_values(&cos_s, cos_layout, n * half)?;
    let sin: &[C] = cpu_values(&sin_s, sin_layout, n * half)?;
    let [wq, wk, wv] = widths;
    // zeroed pages from the allocator: `vec![T::zero(); n]` of a bf16 writes every value first
    let (mut q, mut k, mut v): (Vec<T>, Vec<T>, Vec<T>) = (
        bytemuck::zeroed_vec(n * wq),
        bytemuck::zeroed_vec(n * wk),
        bytemuck::zeroed_vec(n * wv),
    );
    let rotate_heads = |src: &[T], dst: &mut [T], cos: &[C], sin: &[C]| {
        if let Some(rotate_lanes) = lanes {
            // SAFETY: the caller checked the CPU for `lanes`; `src` and `dst` hold whole heads
            // of `d` (the shape was checked above), the tables `d / 2` values.
            return unsafe {
                rotate_lanes(
                    src.as_ptr(),
                    dst.as_mut_ptr(),
                    src.len(),
                    d,
                    cos.as_ptr(),
                    sin.as_ptr(),
                )
            };
        }
        for (src, dst) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
            let (x1, x2) = src.split_at(half);
            let (d1, d2) = dst.split_at_mut(half);
            for i in 0..half {
                (d1[i], d2[i]) = rotate((x1[i], x2[i]), (cos[i], sin[i]));
            }
        }
    };
    q.par_chunks_mut(wq.max(1))
        .zip(k.par_chunks_mut(wk.max(1)))
        .zip(v.par_chunks_mut(wv.max(1)))
        .enumerate()
        .for_each(|(token, ((q, k), v))| {
            let row = &src[token * width..(token + 1) * width];
            let (cos, sin) = (
                &cos[token * half..(token + 1) * half],
                &sin[token * half..(token + 1) * half],
            );
            rotate_heads(&row[..wq], q, cos, sin);
            rotate_heads(&row[wq..wq + wk], k, cos, sin);
            v.copy_from_slice(&row[wq + wk..]);
        });
    let [hq, hk, hv] = heads;
    Ok((
        Tensor::from_vec(q, (n, hq, d), &Device::Cpu)?,
        Tensor::from_vec(k, (n, hk, d), &Device::Cpu)?,
        Tensor::from_vec(v, (n, hv, d), &Device::Cpu)?,
    ))
}

/// Rotates `len / d` heads of values at `src` into `dst` with tables `C` (`d / 2` each).
type RotateLanes<T, C> = unsafe fn(*const T, *mut T, usize, usize, *const C, *const C);

/// The vectorised rotation of bf16 values with f32 tables (the vision tower) on CPUs with
/// AVX-512 (F and BW), else `None` (the scalar loop).
fn bf16_f32_lanes() -> Option<RotateLanes<bf16, f32>> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        return Some(rotate_bf16_f32_avx512);
    }
    None
}

/// The vectorised rotation of bf16 values with bf16 tables (the decoder) on CPUs with AVX-512
/// (F and BW), else `None` (the scalar loop).
fn bf16_bf16_lanes() -> Option<RotateLanes<bf16, bf16>> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        return Some(rotate_bf16_bf16_avx512);
    }
    None
}

/// The decoder's rotation sixteen pairs at a time: [`rotate_bf16_bf16`]'s bf16 ops, each product
/// rounded to bf16 and kept in f32, then the difference or sum rounded, so that the bits match
/// it.
///
/// # Safety
/// AVX-512F and BW; `src` and `dst` hold `len` values (whole heads of `d`), the tables `d / 2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rotate_bf16_bf16_avx512(
    src: *const bf16,
    dst: *mut bf16,
    len: usize,
    d: usize,
    cos: *const bf16,
    sin: *const bf16,
) {
    use super::vector_math::{load_bf16_first, round_bf16_avx512 as round};
    use std::arch::x86_64::*;
    let product = |a, b| round(_mm512_mul_ps(a, b));
    // SAFETY: the caller's contract.
    unsafe {
        rotate_heads_avx512(
            (src, dst, len, d),
            (cos, sin),
            |p, count| load_bf16_first(p, count),
            |(x1, x2), (c, s)| {
                (
                    _mm512_sub_ps(product(x1, c), product(x2, s)),
                    _mm512_add_ps(product(x1, s), product(x2, c)),
                )
            },
        )
    }
}

/// The vision tower's rotation sixteen pairs at a time, with the scalar expressions' operations
/// in the same order (a product each, then the difference or sum, no fused multiply-add), so
/// that the bits match them.
///
/// # Safety
/// AVX-512F and BW; `src` and `dst` hold `len` values (whole heads of `d`), the tables `d / 2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rotate_bf16_f32_avx512(
    src: *const bf16,
    dst: *mut bf16,
    len: usize,
    d: usize,
    cos: *const f32,
    sin: *const f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        rotate_heads_avx512(
            (src, dst, len, d),
            (cos, sin),
            // (masked lanes are not read)
            |p, count| match count {
                16 => _mm512_loadu_ps(p),
                _ => _mm512_maskz_loadu_ps(((1u32 << count) - 1) as u16, p),
            },
            |(x1, x2), (c, s)| {
                (
                    _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)),
                    _mm512_add_ps(_mm512_mul_ps(x1, s), _mm512_mul_ps(x2, c)),
                )
            },
        )
    }
}

/// The loops of the vectorised rotations: per head, sixteen pairs at a time through `sixteen`
/// (the halves widened to f32, the tables through `widen`; the results rounded to bf16), and the
/// pairs past the last sixteen (a head size of 80 has 8) the same way in masked lanes: in
/// scalar code they took most of the vision tower's rotation.
///
/// # Safety
/// AVX-512F and BW; `src` and `dst` hold `len` values (whole heads of `d`), the tables `d / 2`;
/// `widen(p, count)` reads `count` (at most 16) table values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn rotate_heads_avx512<C: Copy>(
    (src, dst, len, d): (*const bf16, *mut bf16, usize, usize),
    (cos, sin): (*const C, *const C),
    widen: impl Fn(*const C, usize) -> std::arch::x86_64::__m512,
    sixteen: impl Fn(
        (std::arch::x86_64::__m512, std::arch::x86_64::__m512),
        (std::arch::x86_64::__m512, std::arch::x86_64::__m512),
    ) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512),
) {
    use super::vector_math::{load_bf16_first, store_bf16_first};
    let half = d / 2;
    // SAFETY: every offset stays inside a head (`i + count ≤ half`), the tables' `half`.
    unsafe {
        for head in (0..len).step_by(d) {
            let (x, y) = (src.add(head), dst.add(head));
            for i in (0..half).step_by(16) {
                let count = 16.min(half - i);
                let load = |p: *const bf16| load_bf16_first(p, count);
                let halves = (load(x.add(i)), load(x.add(half + i)));
                let tables = (widen(cos.add(i), count), widen(sin.add(i), count));
                let (first, second) = sixteen(halves, tables);
                store_bf16_first(y.add(i), first, count);
                store_bf16_first(y.add(half + i), second, count);
            }
        }
    }
}

/// The `len` values of a contiguous CPU tensor's storage, from its layout's start.
fn cpu_values<'a, T: WithDType>(
    storage: &'a Storage,
    layout: &Layout,
    len: usize,
) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("rope: expected a CPU tensor");
    };
    let values = T::cpu_storage_as_slice(cpu)?;
    Ok(&values[layout.start_offset()..layout.start_offset() + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotation through candle's ops: widened to the tables' dtype, `rope_thd`, back to `dtype`.
    fn with_candle_ops(t: Tensor, cos: &Tensor, sin: &Tensor, dtype: DType) -> Tensor {
        let t = t.to_dtype(cos.dtype()).unwrap().unsqueeze(0).unwrap();
        candle_nn::rotary_emb::rope_thd(&t.contiguous().unwrap(), cos, sin)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            DType::BF16 => t
                .to_vec1::<bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u32)
                .collect(),
            _ => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        }
    }

    #[test]
    fn one_pass_gives_the_bits_of_candles_ops_in_every_arithmetic() {
        let n = 11;
        // (values, tables, heads, head size): the vision tower's (its head size of 80: two
        // groups of sixteen lanes and eight pairs left over), and the decoder's with grouped
        // kv heads
        let cases = [
            (DType::BF16, DType::F32, [3, 3, 3], 16),
            (DType::BF16, DType::F32, [3, 3, 3], 80),
            (DType::BF16, DType::BF16, [6, 2, 2], 16),
            // the decoder's (12, 2, 2 heads of 128), and heads of 40: sixteen lanes and four
            // pairs left over
            (DType::BF16, DType::BF16, [12, 2, 2], 128),
            (DType::BF16, DType::BF16, [3, 1, 1], 40),
            (DType::F32, DType::F32, [6, 2, 2], 16),
        ];
        for (dtype, table_dtype, heads, d) in cases {
            let width = heads.iter().sum::<usize>() * d;
            let qkv = (Tensor::randn(0f32, 1.0, (1, n, width), &Device::Cpu).unwrap() * 20.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let angles = Tensor::randn(0f32, 3.0, (n, d / 2), &Device::Cpu).unwrap();
            let (cos, sin) = (
                angles.cos().unwrap().to_dtype(table_dtype).unwrap(),
                angles.sin().unwrap().to_dtype(table_dtype).unwrap(),
            );
            let (q, k, v) = split_rotated(&qkv, heads, d, &cos, &sin).unwrap().unwrap();
            let part = |start: usize, h: usize| {
                qkv.narrow(2, start * d, h * d)
                    .unwrap()
                    .reshape((n, h, d))
                    .unwrap()
            };
            let [hq, hk, hv] = heads;
            let case = format!("{dtype:?} with {table_dtype:?} tables");
            let want_q = with_candle_ops(part(0, hq), &cos, &sin, dtype);
            let want_k = with_candle_ops(part(hq, hk), &cos, &sin, dtype);
            assert_eq!(q.dims(), &[n, hq, d]);
            assert_eq!(bits(&q), bits(&want_q), "q, {case}");
            assert_eq!(bits(&k), bits(&want_k), "k, {case}");
            assert_eq!(bits(&v), bits(&part(hq + hk, hv)), "v, {case}");
        }
    }

    #[test]
    fn the_projection_rotated_in_its_epilogue_gives_the_bits_of_the_two_steps() {
        use crate::engine::linear::WeightLayer;
        use candle_core::Module;
        // (rows, heads, head size): the vision tower's head size (five panels per group of
        // whole heads), one that is a power of two (two panels), one that is neither; rows in
        // whole AMX blocks, in macro blocks with a tail, and fewer than a block
        let cases = [
            (300, 2, 80),
            (70, 2, 80),
            (20, 2, 80),
            (130, 3, 64),
            (100, 4, 40),
        ];
        for (n, h, d) in cases {
            let (width, k) = (3 * h * d, 96);
            let random = |shape: (usize, usize), std: f32| {
                Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
            };
            let weight = random((width, k), 0.2).to_dtype(DType::BF16).unwrap();
            let bias = random((1, width), 1.0).squeeze(0).unwrap();
            let mut layer = Linear::new(weight, Some(bias.to_dtype(DType::BF16).unwrap()));
            layer.pack_for_cpu().unwrap();
            let x = random((n, k), 1.0).to_dtype(DType::BF16).unwrap();
            let angles = random((n, d / 2), 3.0);
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let heads = [h; 3];
            let Some((q, kk, v)) =
                projected_split_rotated(&layer, &x, heads, d, &cos, &sin).unwrap()
            else {
                assert!(
                    !layer.is_packed(),
                    "a packed layer must take the fused path"
                );
                eprintln!("no packed bf16 kernel on this CPU: the fused path is not used here");
                return;
            };
            let y = layer.forward(&x).unwrap();
            let (want_q, want_k, want_v) =
                split_rotated(&y, heads, d, &cos, &sin).unwrap().unwrap();
            let case = format!("{n} rows, {h} heads of {d}");
            assert_eq!(q.dims(), &[n, h, d], "{case}");
            assert_eq!(bits(&q), bits(&want_q), "q, {case}");
            assert_eq!(bits(&kk), bits(&want_k), "k, {case}");
            assert_eq!(bits(&v), bits(&want_v), "v, {case}");
        }
    }

    #[test]
    fn other_dtypes_are_left_to_candle_and_bad_tables_are_refused() {
        let qkv = Tensor::zeros((4, 48), DType::F16, &Device::Cpu).unwrap();
        let cos = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(
            split_rotated(&qkv, [2, 2, 2], 8, &cos, &cos)
                .unwrap()
                .is_none()
        );
        let qkv = qkv.to_dtype(DType::BF16).unwrap();
        let short = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let err = split_rotated(&qkv, [2, 2, 2], 8, &short, &short).unwrap_err();
        assert!(err.to_string().contains("[3, 4]"), "{err}");
    }
}
