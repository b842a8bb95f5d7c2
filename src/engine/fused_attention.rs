//! Attention on the CPU through the [`super::gemm`] kernel: for each head and block of queries,
//! the scores against every visible key go into one small f32 buffer (never a heads × S × T
//! tensor), become exponentials shifted by a reference score (vectorised) and are multiplied
//! with the values; each output row is divided by its sum at the end. bf16 inputs multiply in
//! bf16 with f32 sums, with the exponentials rounded to bf16 before the second product, as
//! PyTorch's CPU flash kernel does; f32 stays f32 throughout.

use half::bf16;
use rayon::prelude::*;

use super::gemm::{self, PackedWeight, Strides};
use super::matvec;
use super::vector_math::{self, exp_shifted, max_of};
use super::weight_buffer::Placement;

/// The scores of one block of queries against one chunk of keys stay under this many f32 values
/// (256 KiB: L2).
const SCORE_BLOCK: usize = 64 * 1024;

/// The sum of one chunk's exponentials (one row) above which the softmax's reference score moves
/// to that chunk's largest: 2⁴⁰, so that no exponential, sum or product with a value comes near
/// f32's range (3·10³⁸) while the first chunk's largest score stays the reference. Taking every
/// chunk's largest score instead (a pass of its own over the scores, a scalar exp per row and a
/// rescaling of the outputs so far, then not vectorised) made `attention_rate` 9% slower at
/// 4,784 patches (95–102 against 87–89 ms, three runs each) and 5% at 1,196.
const REFERENCE_HEADROOM: f32 = (1u64 << 40) as f32;

/// Keys per chunk at most. Longer sequences (a 1280×720 screenshot has 4,784 patches) run as several
/// chunks with an online softmax, so that a chunk's keys, values, scores and probabilities stay
/// in L2 together: over all keys at once they did not, and the products read the keys and
/// values from memory. At 640 a 1280×720 screenshot's chunks are 608 keys and its blocks of
/// queries 128 rows (twice the queries per chunk of keys read, and the products' 64 × 64 macro
/// blocks): on a 2-core Xeon with AMX its vision attention took 6% less time in the whole model
/// than at 1280 (five alternating pairs), and `attention_rate` 10–15% less. A 640×360
/// screenshot's (two chunks instead of one) did not change.
const KEY_CHUNK: usize = 640;

/// Shapes of one attention call: `q` is `(s, heads, d)`, `k` and `v` are `(t, kv_heads, d)`,
/// all contiguous. With `causal_offset`, query `i` sees keys `0..=i + offset`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub s: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub causal_offset: Option<usize>,
    pub scale: f32,
}

impl AttentionShape {
    /// For query head `h` of one query: the keys it sees, its key/value head, and the stride
    /// between two keys' rows.
    fn one_query_head(&self, h: usize) -> (usize, usize, usize) {
        let visible = self.causal_offset.map_or(self.t, |o| (o + 1).min(self.t));
        let g = h / (self.heads / self.kv_heads);
        (visible, g, self.kv_heads * self.d)
    }
}

/// The element types the kernel multiplies.
pub trait Element: bytemuck::Zeroable + Copy + Send + Sync + 'static {
    /// Packs `w` (`n × k`) zero-extended to `extended` (rows, columns).
    fn pack(
        w: &[Self],
        n_k: (usize, usize),
        extended: (usize, usize),
        s: Strides,
    ) -> Option<PackedWeight>;
    /// Products in this type run on AMX where the CPU has it.
    const AMX: bool;
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        w: &PackedWeight,
        a: &[Self],
        m: usize,
        lda: usize,
        out: &mut [f32],
        ldc: usize,
        cols: usize,
        k_used: usize,
    );
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// `dst[i] = from_f32(exp((row[i] - max) · scale))`, returning the sum of the unrounded
    /// exponentials.
    fn exp_shifted_into(row: &[f32], max: f32, scale: f32, dst: &mut [Self]) -> f32;
    /// `dst[i] = from_f32(src[i] · scale)` (round to nearest even, as `from_f32`).
    fn round_scaled(src: &[f32], scale: f32, dst: &mut [Self]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(x * scale);
        }
    }
    const ZERO: Self;
    /// The values as bf16 where they are (for kernels written for bf16 only).
    fn as_bf16(values: &[Self]) -> Option<&[bf16]> {
        let _ = values;
        None
    }
}

impl Element for f32 {
    fn pack(
        w: &[f32],
        n_k: (usize, usize),
        extended: (usize, usize),
        s: Strides,
    ) -> Option<PackedWeight> {
        PackedWeight::pack_f32_extended(w, n_k, extended, s, Placement::Scratch)
    }
    const AMX: bool = false;
    fn matmul(
        w: &PackedWeight,
        a: &[f32],
        m: usize,
        lda: usize,
        out: &mut [f32],
        ldc: usize,
        cols: usize,
        k_used: usize,
    ) {
        w.matmul_f32_serial(a, m, lda, out, ldc, cols, k_used)
    }
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn exp_shifted_into(row: &[f32], max: f32, scale: f32, dst: &mut [f32]) -> f32 {
        vector_math::exp_shifted_to_f32(row, max, scale, dst)
    }
    const ZERO: f32 = 0.0;
}

impl Element for bf16 {
    fn pack(
        w: &[bf16],
        n_k: (usize, usize),
        extended: (usize, usize),
        s: Strides,
    ) -> Option<PackedWeight> {
        PackedWeight::pack_bf16_extended(w, n_k, extended, s, Placement::Scratch)
    }
    const AMX: bool = true;
    fn matmul(
        w: &PackedWeight,
        a: &[bf16],
        m: usize,
        lda: usize,
        out: &mut [f32],
        ldc: usize,
        cols: usize,
        k_used: usize,
    ) {
        w.matmul_bf16_serial(a, m, lda, out, ldc, cols, k_used)
    }
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
    fn round_scaled(src: &[f32], scale: f32, dst: &mut [bf16]) {
        vector_math::round_to_bf16(src, scale, dst)
    }
    fn exp_shifted_into(row: &[f32], max: f32, scale: f32, dst: &mut [bf16]) -> f32 {
        vector_math::exp_shifted_to_bf16(row, max, scale, dst)
    }
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32: widening is a shift, which vectorises
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    const ZERO: bf16 = bf16::ZERO;
    fn as_bf16(values: &[bf16]) -> Option<&[bf16]> {
        Some(values)
    }
}

/// softmax(q·kᵀ·scale)·v, `(s, heads, d)`, or `None` when the CPU lacks the kernel (or `d` is
/// odd in bf16), so the caller falls back to candle.
pub fn attend<T: Element>(q: &[T], k: &[T], v: &[T], shape: AttentionShape) -> Option<Vec<T>> {
    let AttentionShape {
        s,
        t,
        heads,
        kv_heads,
        d,
        ..
    } = shape;
    assert_eq!(q.len(), s * heads * d, "q is not (s, heads, d)");
    assert_eq!(k.len(), t * kv_heads * d, "k is not (t, kv_heads, d)");
    assert_eq!(v.len(), t * kv_heads * d, "v is not (t, kv_heads, d)");
    assert!(
        kv_heads > 0 && heads % kv_heads == 0,
        "heads must be a multiple of kv_heads"
    );
    if std::mem::size_of::<T>() == 2 && d % 2 == 1 {
        return None;
    }
    if s == 1 {
        return Some(attend_one_query(q, k, v, shape));
    }
    // On AMX the products run in 32 × 32 blocks, 32 values of `k` per step: the head size and
    // the keys are zero-extended to multiples of 32 (the extension adds exact zeros), and so are
    // the blocks of queries (copied), so that no remainder falls to the AVX-512 tiles, which
    // are several times slower.
    let tile = if T::AMX { gemm::tile_multiple() } else { 1 };
    let d_ext = d.next_multiple_of(tile);
    // The values' product writes `d` columns where its last panel uses at most 16 of them (the
    // kernel's narrow blocks, half the multiplies: a head size of 80 is two panels and 16
    // columns), `d_ext` otherwise.
    let d_out = if tile > 1 && d % tile > tile / 2 {
        d_ext
    } else {
        d
    };
    // Keys as the "weight" of q·kᵀ (t rows of d) and values transposed for p·v (d rows of t),
    // packed once per key/value head and chunk of keys.
    let kv_stride = kv_heads * d;
    // chunks of equal length (whole tiles), at most KEY_CHUNK: a short last chunk would cost a
    // product of its own for few keys
    let chunk = t
        .div_ceil(t.div_ceil(KEY_CHUNK).max(1))
        .next_multiple_of(tile.max(2))
        .max(tile.max(2));
    let chunks: Vec<std::ops::Range<usize>> = (0..t)
        .step_by(chunk)
        .map(|j0| j0..(j0 + chunk).min(t))
        .collect();
    let packed: Vec<Vec<(PackedWeight, PackedWeight)>> = (0..kv_heads)
        .into_par_iter()
        .map(|g| {
            chunks
                .iter()
                .map(|keys| {
                    let (len, len_ext) = (keys.len(), keys.len().next_multiple_of(tile));
                    let first = keys.start * kv_stride + g * d;
                    let row_major = Strides {
                        row: kv_stride,
                        col: 1,
                    };
                    let transposed = Strides {
                        row: 1,
                        col: kv_stride,
                    };
                    Some((
                        T::pack(&k[first..], (len, d), (len_ext, d_ext), row_major)?,
                        T::pack(&v[first..], (d, len), (d_out, len_ext), transposed)?,
                    ))
                })
                .collect::<Option<Vec<_>>>()
        })
        .collect::<Option<Vec<_>>>()?;

    let row_tile = gemm::row_multiple();
    let rows = (SCORE_BLOCK / chunk)
        .max(1)
        .next_multiple_of(row_tile)
        .min(s.next_multiple_of(row_tile));
    let blocks = s.div_ceil(rows);
    // zeroed pages from the allocator: `vec![T::ZERO; n]` of a bf16 writes every value first
    let mut out: Vec<T> = bytemuck::zeroed_vec(s * heads * d);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let rep = heads / kv_heads;
    (0..heads * blocks)
        .into_par_iter()
        .for_each_init(Scratch::<T>::default, |scratch, task| {
            let (h, block) = (task / blocks, task % blocks);
            let q0 = block * rows;
            let m = rows.min(s - q0);
            // rows the products run: the block's queries, then zero queries up to the tile
            let m_run = m.next_multiple_of(tile);
            // keys row i may see, and keys any row of this block may see
            let limit = |i: usize| match shape.causal_offset {
                Some(offset) => (offset + q0 + i + 1).min(t),
                None => t,
            };
            let visible = limit(m - 1);
            let Scratch {
                queries,
                scores,
                probs,
                chunk_out,
                head_out,
                maxima,
                sums,
                rescale,
            } = scratch;
            // buffers reused across tasks, grown but never cleared: the products overwrite
            // every value read, and the probabilities' unused tails are zeroed row by row
            let q_rows = &q[q0 * heads * d + h * d..];
            let (a, lda) = if tile > 1 {
                grow(queries, m_run * d_ext, T::ZERO);
                let queries = &mut queries[..m_run * d_ext];
                for (i, dst) in queries.chunks_exact_mut(d_ext).enumerate() {
                    if i < m {
                        dst[..d].copy_from_slice(&q_rows[i * heads * d..i * heads * d + d]);
                        dst[d..].fill(T::ZERO);
                    } else {
                        dst.fill(T::ZERO);
                    }
                }
                (&queries[..], d_ext)
            } else {
                (q_rows, heads * d)
            };
            grow(head_out, m_run * d_ext, 0.0);
            let head_out = &mut head_out[..m_run * d_ext];
            grow(chunk_out, m_run * d_ext, 0.0);
            let chunk_out = &mut chunk_out[..m_run * d_ext];
            maxima.clear();
            maxima.resize(m, f32::NEG_INFINITY);
            sums.clear();
            sums.resize(m, 0.0);
            rescale.clear();
            rescale.resize(m, 0.0);
            for (keys, (packed_keys, packed_values)) in chunks.iter().zip(&packed[h / rep]) {
                if keys.start >= visible {
                    break;
                }
                let seen = visible.min(keys.end) - keys.start;
                let width = seen.next_multiple_of(tile.max(2));
                grow(scores, m_run * width, 0.0);
                let scores = &mut scores[..m_run * width];
                T::matmul(packed_keys, a, m_run, lda, scores, width, width, d_ext);
                grow(probs, m_run * width, T::ZERO);
                let probs = &mut probs[..m_run * width];
                for i in 0..m {
                    let probs_row = &mut probs[i * width..(i + 1) * width];
                    let seen_i = limit(i).saturating_sub(keys.start).min(seen);
                    rescale[i] = 1.0;
                    if seen_i == 0 {
                        // a causal row that sees none of these keys: nothing to add
                        probs_row.fill(T::ZERO);
                        continue;
                    }
                    // online softmax over the chunks: the exponentials are taken against a
                    // reference score, the first chunk's largest (so that none overflows)
                    let row = &scores[i * width..i * width + seen_i];
                    let seen_probs = &mut probs_row[..seen_i];
                    if maxima[i] == f32::NEG_INFINITY {
                        maxima[i] = max_of(row);
                    }
                    let mut sum = T::exp_shifted_into(row, maxima[i], shape.scale, seen_probs);
                    // Later chunks keep that reference while their exponentials stay far from
                    // overflowing in the sums (the sum bounds each of them): no pass for their
                    // maximum and no rescaling. Above the bound (or at infinity) the reference
                    // moves to this chunk's largest score, and what was summed against the old
                    // one is scaled down to it, as flash attention does for every chunk.
                    if sum.is_nan() || sum > REFERENCE_HEADROOM {
                        let max = max_of(row).max(maxima[i]);
                        rescale[i] = ((maxima[i] - max) * shape.scale).exp();
                        maxima[i] = max;
                        sum = T::exp_shifted_into(row, max, shape.scale, seen_probs);
                    }
                    sums[i] = sums[i] * rescale[i] + sum;
                    probs_row[seen_i..].fill(T::ZERO);
                }
                probs[m * width..].fill(T::ZERO);
                let k_used = if tile > 1 { width } else { seen };
                let first = keys.start == 0;
                let target = if first {
                    &mut *head_out
                } else {
                    &mut *chunk_out
                };
                T::matmul(
                    packed_values,
                    probs,
                    m_run,
                    width,
                    target,
                    d_ext,
                    d_out,
                    k_used,
                );
                if !first {
                    for (i, &factor) in rescale.iter().enumerate() {
                        let row = i * d_ext..i * d_ext + d;
                        vector_math::scale_add(&mut head_out[row.clone()], factor, &chunk_out[row]);
                    }
                }
            }
            for i in 0..m {
                let dst = (q0 + i) * heads * d + h * d;
                // SAFETY: (row q0+i, head h) is written by this task only, inside `out`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(dst), d) };
                T::round_scaled(&head_out[i * d_ext..i * d_ext + d], 1.0 / sums[i], dst);
            }
        });
    Some(out)
}

/// One thread's buffers, reused across its tasks.
struct Scratch<T> {
    /// A block of queries copied with zero rows and columns up to whole tiles (AMX only).
    queries: Vec<T>,
    /// One chunk's scores and probabilities.
    scores: Vec<f32>,
    probs: Vec<T>,
    /// One chunk's product with the values, and the sum over the chunks so far.
    chunk_out: Vec<f32>,
    head_out: Vec<f32>,
    /// Per row: the largest score so far, the sum of exponentials against it, and the factor
    /// that moves earlier chunks' sums to the latest maximum.
    maxima: Vec<f32>,
    sums: Vec<f32>,
    rescale: Vec<f32>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            queries: Vec::new(),
            scores: Vec::new(),
            probs: Vec::new(),
            chunk_out: Vec::new(),
            head_out: Vec::new(),
            maxima: Vec::new(),
            sums: Vec::new(),
            rescale: Vec::new(),
        }
    }
}

/// Makes `buffer` at least `len` long (new values `fill`; old ones stay as they are).
fn grow<T: Copy>(buffer: &mut Vec<T>, len: usize, fill: T) {
    if buffer.len() < len {
        buffer.resize(len, fill);
    }
}

/// The output shared by the tasks, each writing its own (rows, head) cells.
struct OutPtr<T>(*mut T);
// SAFETY: tasks write disjoint cells (one head, one block of rows each).
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// One query (a decoded token): the keys and values are read in place, once, instead of being
/// packed for the matrix kernel (which would copy the whole cache every step).
fn attend_one_query<T: Element>(q: &[T], k: &[T], v: &[T], shape: AttentionShape) -> Vec<T> {
    let AttentionShape { heads, d, .. } = shape;
    let mut out = vec![0f32; heads * d];
    out.par_chunks_mut(d).enumerate().for_each(|(h, out)| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            if d == 128
                && let (Some(q), Some(k), Some(v)) = (T::as_bf16(q), T::as_bf16(k), T::as_bf16(v))
            {
                // SAFETY: the CPU has AVX-512F (checked just above), and `d` is 32 · 4.
                unsafe { attend_one_head_bf16_avx512::<4>(q, k, v, shape, h, out) };
            } else {
                // SAFETY: the CPU has AVX-512F (checked just above).
                unsafe { attend_one_head_avx512(q, k, v, shape, h, out) };
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA were detected just above.
            unsafe { attend_one_head_avx2(q, k, v, shape, h, out) };
            return;
        }
        attend_one_head(q, k, v, shape, h, out);
    });
    out.into_iter().map(T::from_f32).collect()
}

/// [`attend_one_head`] compiled for AVX-512: its loops then run on 16 lanes, where the
/// baseline's are 4 wide (the decode attention of a 2B step took 4 ms a token that way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_one_head_avx512<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttentionShape,
    h: usize,
    out: &mut [f32],
) {
    attend_one_head(q, k, v, shape, h, out)
}

/// [`attend_one_head`] compiled for AVX2 and FMA (CPUs without AVX-512): eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_head_avx2<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttentionShape,
    h: usize,
    out: &mut [f32],
) {
    attend_one_head(q, k, v, shape, h, out)
}

/// Head `h` of [`attend_one_query`] in bf16 with a head size of `32 · CH` (128 in every Qwen2-VL
/// decoder), held in registers: the query and the output row stay in vectors while the keys and
/// then the values stream past once. 32 bf16 load as 16 pairs and widen without a shuffle:
/// the even values by a shift, the odd ones by a mask (a widening shuffle per 16 values held
/// the loop to one port); the query is split the same way, and the output is interleaved back
/// at the end.
///
/// # Safety
/// The CPU has AVX-512F; `shape.d == 32 · CH`; the slices are as [`attend`] checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_one_head_bf16_avx512<const CH: usize>(
    q: &[half::bf16],
    k: &[half::bf16],
    v: &[half::bf16],
    shape: AttentionShape,
    h: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let AttentionShape { t, heads, d, .. } = shape;
    assert!(d == 32 * CH && out.len() == d && h < heads);
    let (visible, g, stride) = shape.one_query_head(h);
    assert!(q.len() >= heads * d && k.len() >= t * stride && v.len() >= t * stride);
    // 32 bf16 as f32: (values 0, 2, .., 30; values 1, 3, .., 31)
    let load = |p: *const half::bf16| -> (__m512, __m512) {
        // SAFETY: callers pass 32 readable values (the asserts above bound every row).
        unsafe {
            let pairs = _mm512_loadu_si512(p as *const _);
            let even = _mm512_slli_epi32::<16>(pairs);
            let odd = _mm512_and_si512(pairs, _mm512_set1_epi32(0xffff_0000_u32 as i32));
            (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
        }
    };
    let query: [(__m512, __m512); CH] = std::array::from_fn(|c| load(q[h * d + 32 * c..].as_ptr()));
    let mut scores = vec![0f32; visible];
    for (j, score) in scores.iter_mut().enumerate() {
        let key = k[j * stride + g * d..].as_ptr();
        let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (c, (q_even, q_odd)) in query.iter().enumerate() {
            let (k_even, k_odd) = load(key.wrapping_add(32 * c));
            even = _mm512_fmadd_ps(k_even, *q_even, even);
            odd = _mm512_fmadd_ps(k_odd, *q_odd, odd);
        }
        *score = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
    }
    let max = max_of(&scores);
    let sum = exp_shifted(&mut scores, max, shape.scale);
    let mut sums = [(_mm512_setzero_ps(), _mm512_setzero_ps()); CH];
    for (j, &p) in scores.iter().enumerate() {
        let value = v[j * stride + g * d..].as_ptr();
        let p = _mm512_set1_ps(p);
        for (c, (even, odd)) in sums.iter_mut().enumerate() {
            let (v_even, v_odd) = load(value.wrapping_add(32 * c));
            *even = _mm512_fmadd_ps(v_even, p, *even);
            *odd = _mm512_fmadd_ps(v_odd, p, *odd);
        }
    }
    let inv = _mm512_set1_ps(1.0 / sum);
    let (mut even, mut odd) = ([0f32; 16], [0f32; 16]);
    for ((e, o), out) in sums.iter().zip(out.chunks_exact_mut(32)) {
        // SAFETY: 16 values each.
        unsafe {
            _mm512_storeu_ps(even.as_mut_ptr(), _mm512_mul_ps(*e, inv));
            _mm512_storeu_ps(odd.as_mut_ptr(), _mm512_mul_ps(*o, inv));
        }
        for ((pair, e), o) in out.chunks_exact_mut(2).zip(even).zip(odd) {
            pair[0] = e;
            pair[1] = o;
        }
    }
}

/// Head `h` of [`attend_one_query`] into `out` (`d` values).
#[inline(always)]
fn attend_one_head<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttentionShape,
    h: usize,
    out: &mut [f32],
) {
    let d = shape.d;
    let (visible, g, stride) = shape.one_query_head(h);
    // plain loops: an iterator's `collect` or `fold` is a function of its own, compiled
    // without the caller's AVX-512 (the scores ran 4 wide that way)
    let mut query = vec![0f32; d];
    for (x, q) in query.iter_mut().zip(&q[h * d..(h + 1) * d]) {
        *x = q.to_f32();
    }
    let mut scores = vec![0f32; visible];
    for (j, score) in scores.iter_mut().enumerate() {
        let key = &k[j * stride + g * d..j * stride + (g + 1) * d];
        *score = matvec::dot(&query, key, |x: &T| x.to_f32());
    }
    softmax_in_place(&mut scores, shape.scale);
    for (j, p) in scores.iter().enumerate() {
        let value = &v[j * stride + g * d..j * stride + (g + 1) * d];
        for (o, x) in out.iter_mut().zip(value) {
            *o += p * x.to_f32();
        }
    }
}

/// `row ← softmax(row · scale)`, computed in f32 with the maximum subtracted first.
fn softmax_in_place(row: &mut [f32], scale: f32) {
    let max = max_of(row);
    let sum = exp_shifted(row, max, scale);
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate of vision attention at 1280×720 (4,784 patches, 16 heads of 80) on this machine
    /// (`cargo test --release --lib attention_rate -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn attention_rate() {
        let (heads, d) = (16, 80);
        // a 640×360 and a 1280×720 screenshot's patches
        for s in [1196, 4784] {
            let value =
                |i: usize| bf16::from_f32(((i * 2_654_435_761) % 4099) as f32 / 2049.0 - 1.0);
            let q: Vec<bf16> = (0..s * heads * d).map(value).collect();
            let k: Vec<bf16> = (0..s * heads * d).map(|i| value(i + 3)).collect();
            let v: Vec<bf16> = (0..s * heads * d).map(|i| value(i + 5)).collect();
            let shape = AttentionShape {
                s,
                t: s,
                heads,
                kv_heads: heads,
                d,
                causal_offset: None,
                scale: 1.0 / (d as f32).sqrt(),
            };
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                if attend(&q, &k, &v, shape).is_none() {
                    return;
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gflop = 4.0 * (s * s * heads * d) as f64 / 1e9;
            eprintln!(
                "{s} patches: {:.1} ms, {:.0} GFLOP/s",
                best * 1e3,
                gflop / best
            );
        }
    }

    /// One bf16 query over `t` keys, `(t, heads, kv_heads, d)`, seeing keys `0..=offset`.
    fn one_query(
        (t, heads, kv_heads, d): (usize, usize, usize, usize),
        offset: usize,
    ) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>, AttentionShape) {
        let value = |i: usize| bf16::from_f32(((i * 2_654_435_761) % 4099) as f32 / 1024.0 - 2.0);
        let q: Vec<bf16> = (0..heads * d).map(value).collect();
        let k: Vec<bf16> = (0..t * kv_heads * d).map(|i| value(i + 3)).collect();
        let v: Vec<bf16> = (0..t * kv_heads * d).map(|i| value(i + 5)).collect();
        let shape = AttentionShape {
            s: 1,
            t,
            heads,
            kv_heads,
            d,
            causal_offset: Some(offset),
            scale: 1.0 / (d as f32).sqrt(),
        };
        (q, k, v, shape)
    }

    #[test]
    fn one_bf16_query_with_heads_of_128_matches_the_f32_kernel() {
        // heads of 128 take the register kernel where the CPU has AVX-512; the f32 kernel on the
        // same values is the truth (its output rounded to bf16 once)
        let widen = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        for offset in [36, 20] {
            let (q, k, v, shape) = one_query((37, 4, 2, 128), offset);
            let Some(got) = attend(&q, &k, &v, shape) else {
                return; // no AVX-512 here
            };
            let want = attend(&widen(&q), &widen(&k), &widen(&v), shape).expect("same CPU");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (g, w) = (g.to_f32(), bf16::from_f32(*w).to_f32());
                // one bf16 step of rounding apart at most
                assert!(
                    (g - w).abs() <= w.abs() / 128.0 + 1e-6,
                    "offset {offset}, value {i}: {g} against {w}"
                );
            }
        }
    }

    /// The time of one decoded token's attention in one layer of the 2B decoder (12 heads of
    /// 128 over 2 key/value heads) after a 1280×720 screenshot's prompt
    /// (`cargo test --release --lib decode_attention_rate -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn decode_attention_rate() {
        let t = 1300;
        let (q, k, v, shape) = one_query((t, 12, 2, 128), t - 1);
        let calls = 200;
        let start = std::time::Instant::now();
        for _ in 0..calls {
            std::hint::black_box(attend(&q, &k, &v, shape));
        }
        let each = start.elapsed().as_secs_f64() / calls as f64;
        eprintln!("{t} keys: {:.1} µs a layer", each * 1e6);
    }
}
