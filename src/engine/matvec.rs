//! A CPU matrix-vector kernel for decoding: one token's activations `x` (`in`) times a row-major
//! weight `w` (`out × in`), the shape of every decoder projection while decoding.
//!
//! Decoding reads every weight once per token, so it is bound by memory bandwidth. A general
//! gemm packs the weight matrix into blocks first, which reads and writes it again; this kernel
//! streams each weight row once into a dot product instead, split over rayon's threads, with AVX2
//! when the CPU has it (detected at run time). f32 and bf16 weights; the sum is kept in f32.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::weight_buffer::{Placement, WeightBuffer};

/// Lanes kept apart in a dot product: enough independent sums for the compiler to use whole
/// vector registers without reordering a single sum (no fast-math needed).
const LANES: usize = 16;

/// `x · wᵀ` for `x` with one row (`[.., 1, in]` of any leading dims that multiply to 1) and a
/// contiguous `w` of shape `(out, in)`, both on the CPU in f32 or both in bf16. The result has
/// `x`'s shape with `in` replaced by `out`, in `x`'s dtype. `None` when the kernel does not
/// apply (another device, dtype or layout), so the caller falls back to a general matmul.
pub fn matvec(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != w.dtype() {
        return Ok(None);
    }
    let Some((&k, lead)) = x.dims().split_last() else {
        return Ok(None);
    };
    if lead.iter().product::<usize>() != 1 || !x.is_contiguous() || !w.is_contiguous() {
        return Ok(None);
    }
    let (n, wk) = w.dims2()?;
    if wk != k {
        return Ok(None);
    }
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has a last dim") = n;

    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*x_storage, &*w_storage) else {
        return Ok(None);
    };
    let x_start = x_layout.start_offset();
    let w_start = w_layout.start_offset();
    let out = match (xs, ws, x.dtype()) {
        (CpuStorage::F32(xv), CpuStorage::F32(wv), DType::F32) => {
            let x = &xv[x_start..x_start + k];
            let w = &wv[w_start..w_start + n * k];
            Tensor::from_vec(rows_f32(x, w, n, k), out_shape, &Device::Cpu)?
        }
        (CpuStorage::BF16(xv), CpuStorage::BF16(wv), DType::BF16) => {
            let x: Vec<f32> = xv[x_start..x_start + k]
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let w = &wv[w_start..w_start + n * k];
            let out: Vec<bf16> = rows_bf16(&x, w, n, k)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            Tensor::from_vec(out, out_shape, &Device::Cpu)?
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// Rows per rayon task: big enough that a task streams a few hundred KiB, small enough that
/// every thread gets several.
fn rows_per_task(n: usize, k: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = n.div_ceil(threads * 8);
    let by_bytes = (256 * 1024 / (k * 4).max(1)).max(1);
    by_threads.min(by_bytes).max(1)
}

fn rows_f32(x: &[f32], w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let chunk = rows_per_task(n, k);
    out.par_chunks_mut(chunk).enumerate().for_each(|(i, dst)| {
        let rows = &w[i * chunk * k..(i * chunk + dst.len()) * k];
        dots_f32(x, rows, dst);
    });
    out
}

fn rows_bf16(x: &[f32], w: &[bf16], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let chunk = rows_per_task(n, k);
    out.par_chunks_mut(chunk).enumerate().for_each(|(i, dst)| {
        let rows = &w[i * chunk * k..(i * chunk + dst.len()) * k];
        dots_bf16(x, rows, dst);
    });
    out
}

fn dots_f32(x: &[f32], rows: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { dots_f32_avx2(x, rows, dst) };
        return;
    }
    dots_f32_generic(x, rows, dst);
}

fn dots_bf16(x: &[f32], rows: &[bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { dots_bf16_avx2(x, rows, dst) };
        return;
    }
    dots_bf16_generic(x, rows, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_f32_avx2(x: &[f32], rows: &[f32], dst: &mut [f32]) {
    dots_f32_generic(x, rows, dst)
}

/// bf16 rows with explicit AVX2: eight weights widen to f32 by a zero-extend and a shift (the
/// compiler does not find this on its own), four independent sums hide the FMA latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_bf16_avx2(x: &[f32], rows: &[bf16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = x.len();
    let whole = k / 32 * 32;
    for (row, out) in rows.chunks_exact(k).zip(dst.iter_mut()) {
        let w = row.as_ptr() as *const u16;
        let xp = x.as_ptr();
        // SAFETY: every load reads 8 values inside `row` / `x` (i + 32 <= whole <= k).
        let mut sum = unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < whole {
                for (j, a) in acc.iter_mut().enumerate() {
                    let wi = _mm_loadu_si128(w.add(i + 8 * j) as *const __m128i);
                    let wf =
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(wi)));
                    *a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xp.add(i + 8 * j)), *a);
                }
                i += 32;
            }
            horizontal_sum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        };
        for (a, b) in x[whole..].iter().zip(&row[whole..]) {
            sum += a * b.to_f32();
        }
        *out = sum;
    }
}

#[inline(always)]
fn dots_f32_generic(x: &[f32], rows: &[f32], dst: &mut [f32]) {
    let k = x.len();
    for (row, out) in rows.chunks_exact(k).zip(dst.iter_mut()) {
        *out = dot(x, row, |v: &f32| *v);
    }
}

#[inline(always)]
fn dots_bf16_generic(x: &[f32], rows: &[bf16], dst: &mut [f32]) {
    let k = x.len();
    for (row, out) in rows.chunks_exact(k).zip(dst.iter_mut()) {
        // bf16 is the upper half of an f32: widening is a shift, which vectorises.
        *out = dot(x, row, |v: &bf16| {
            f32::from_bits((v.to_bits() as u32) << 16)
        });
    }
}

/// `x · w` with the weights widened to f32 by `widen`, in [`LANES`] partial sums.
#[inline(always)]
pub(super) fn dot<W>(x: &[f32], w: &[W], widen: impl Fn(&W) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut wc = w.chunks_exact(LANES);
    for (xs, ws) in (&mut xc).zip(&mut wc) {
        for l in 0..LANES {
            acc[l] += xs[l] * widen(&ws[l]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in xc.remainder().iter().zip(wc.remainder()) {
        sum += a * widen(b);
    }
    sum
}

/// Weights in blocks of 32 values sharing one scale (`w ≈ scale · q`, `q` an `i8` in
/// [-127, 127], scale = max |w| / 127 of the block): the layout and rounding of GGML's Q8_0, with
/// an f32 scale (1.125 bytes per weight instead of 4). Decoding multiplies them with the
/// activations quantized the same way where the CPU has AVX512-VNNI, else with f32 activations.
pub struct Int8Rows {
    n: usize,
    k: usize,
    q: WeightBuffer<i8>,
    scales: Vec<f32>,
}

/// Values per Q8_0 block.
pub const Q8_BLOCK: usize = 32;

impl Int8Rows {
    /// Quantizes the row-major `(n, k)` matrix `w` at once; `k` must be a multiple of
    /// [`Q8_BLOCK`]. (Models use [`Self::quantize_chunks`]; tests compare the two.)
    #[cfg(test)]
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "({n}, {k}) values");
        let whole = |_, _| Ok::<_, ()>(w.to_vec());
        Self::quantize_chunks(n, k, n.max(1), whole).expect("the copy cannot fail")
    }

    /// Quantizes an `(n, k)` matrix handed over `chunk_rows` rows at a time by `fill(first_row,
    /// rows)` (row-major f32), so that a large matrix (a tied output layer: 933 MB in f32) is
    /// never held in f32 whole; `k` must be a multiple of [`Q8_BLOCK`].
    pub fn quantize_chunks<E>(
        n: usize,
        k: usize,
        chunk_rows: usize,
        mut fill: impl FnMut(usize, usize) -> Result<Vec<f32>, E>,
    ) -> Result<Self, E> {
        assert!(
            k.is_multiple_of(Q8_BLOCK) && chunk_rows > 0,
            "({n}, {k}) in blocks of 32"
        );
        let mut q = WeightBuffer::zeroed(n * k, Placement::Model);
        let mut scales = vec![0f32; n * k / Q8_BLOCK];
        for r0 in (0..n).step_by(chunk_rows) {
            let rows = chunk_rows.min(n - r0);
            let w = fill(r0, rows)?;
            assert_eq!(w.len(), rows * k, "a chunk of {rows} rows of {k}");
            // Q8_0 blocks on all threads: the values, and one scale per block
            q[r0 * k..(r0 + rows) * k]
                .par_chunks_mut(Q8_BLOCK)
                .zip(scales[r0 * k / Q8_BLOCK..(r0 + rows) * k / Q8_BLOCK].par_iter_mut())
                .zip(w.par_chunks(Q8_BLOCK))
                .for_each(|((qb, scale), wb)| {
                    let amax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    for (qv, wv) in qb.iter_mut().zip(wb) {
                        *qv = (wv * inv).round() as i8;
                    }
                    *scale = d;
                });
        }
        Ok(Self { n, k, q, scales })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (values and scales).
    pub fn bytes(&self) -> usize {
        self.q.len() + self.scales.len() * 4
    }

    /// Row `r` of the approximated matrix rounded to bf16 into `out` (`k` values; as the f32
    /// matrix of [`Self::dequantize`] cast to bf16).
    pub fn row_bf16(&self, r: usize, out: &mut [half::bf16]) {
        let k = self.k;
        let blocks = k / Q8_BLOCK;
        let q = &self.q[r * k..(r + 1) * k];
        let scales = &self.scales[r * blocks..(r + 1) * blocks];
        let mut values = [0f32; Q8_BLOCK];
        for ((out, q), &d) in out
            .chunks_exact_mut(Q8_BLOCK)
            .zip(q.chunks_exact(Q8_BLOCK))
            .zip(scales)
        {
            for (v, &q) in values.iter_mut().zip(q) {
                *v = q as f32;
            }
            super::vector_math::round_to_bf16(&values, d, out);
        }
    }

    /// The approximated matrix, row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(Q8_BLOCK)
            .zip(self.q.par_chunks(Q8_BLOCK))
            .zip(self.scales.par_iter())
            .for_each(|((ob, qb), d)| {
                for (o, q) in ob.iter_mut().zip(qb) {
                    *o = *q as f32 * d;
                }
            });
        out
    }

    /// `w · x` for one f32 vector of length `k`. With AVX512-VNNI, `x` is quantized to Q8_0
    /// blocks first and multiplied in 8-bit (llama.cpp's Q8_0 path); otherwise in f32.
    pub fn matvec(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.k);
        let (k, blocks) = (self.k, self.k / Q8_BLOCK);
        let mut out = vec![0f32; self.n];
        let chunk = rows_per_task(self.n, k / 4);
        let quantized = has_vnni().then(|| QuantizedActivations::new(x));
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, dst)| {
            let rows = i * chunk..i * chunk + dst.len();
            let q = &self.q[rows.start * k..rows.end * k];
            let scales = &self.scales[rows.start * blocks..rows.end * blocks];
            match &quantized {
                // SAFETY: `quantized` exists only where `has_vnni` found the instructions.
                #[cfg(target_arch = "x86_64")]
                Some(xq) => unsafe { dots_q8_vnni(xq, q, scales, dst) },
                _ => dots_q8(x, q, scales, dst),
            }
        });
        out
    }
}

/// The activations quantized like the weights (GGML's Q8_0 for the other operand, as llama.cpp's
/// CPU path does): per block of 32, `|x|` as unsigned bytes, the signs, and one scale.
struct QuantizedActivations {
    magnitudes: Vec<u8>,
    signs: Vec<i8>,
    scales: Vec<f32>,
}

impl QuantizedActivations {
    fn new(x: &[f32]) -> Self {
        let mut magnitudes = vec![0u8; x.len()];
        let mut signs = vec![0i8; x.len()];
        let mut scales = vec![0f32; x.len() / Q8_BLOCK];
        for (b, xb) in x.chunks_exact(Q8_BLOCK).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (j, v) in xb.iter().enumerate() {
                let q = (v * inv).round() as i32;
                magnitudes[b * Q8_BLOCK + j] = q.unsigned_abs() as u8;
                signs[b * Q8_BLOCK + j] = q.signum() as i8;
            }
            scales[b] = d;
        }
        Self {
            magnitudes,
            signs,
            scales,
        }
    }
}

/// Whether this CPU has the 8-bit dot-product instruction (AVX512-VNNI on 256-bit registers).
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Q8_0 rows against Q8_0 activations with VNNI: per block one sign fix-up of the weights, one
/// 8-bit dot product into eight 32-bit sums, one conversion and one scaled add (a third of the
/// instructions of widening every weight to f32). (Four rows at a time sharing the activation
/// loads measured slower: 8 against 11 tokens/s on the 2B shapes.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn dots_q8_vnni(x: &QuantizedActivations, q: &[i8], scales: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = x.magnitudes.len();
    let blocks = k / Q8_BLOCK;
    for ((row, row_scales), out) in q
        .chunks_exact(k)
        .zip(scales.chunks_exact(blocks))
        .zip(dst.iter_mut())
    {
        // SAFETY: block b reads bytes b*32 .. b*32+32 of `row` and of the activations.
        *out = unsafe {
            let (qp, mp, sp) = (row.as_ptr(), x.magnitudes.as_ptr(), x.signs.as_ptr());
            let mut totals = [_mm256_setzero_ps(); 2];
            for (b, d) in row_scales.iter().enumerate() {
                let o = b * Q8_BLOCK;
                let w = _mm256_loadu_si256(qp.add(o) as *const __m256i);
                let signs = _mm256_loadu_si256(sp.add(o) as *const __m256i);
                let magnitudes = _mm256_loadu_si256(mp.add(o) as *const __m256i);
                let sums = _mm256_dpbusd_epi32(
                    _mm256_setzero_si256(),
                    magnitudes,
                    _mm256_sign_epi8(w, signs),
                );
                let scale = _mm256_set1_ps(*d * x.scales[b]);
                totals[b % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, totals[b % 2]);
            }
            let total = _mm256_add_ps(totals[0], totals[1]);
            horizontal_sum(total)
        };
    }
}

/// The sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

fn dots_q8(x: &[f32], q: &[i8], scales: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { dots_q8_avx2(x, q, scales, dst) };
        return;
    }
    dots_q8_generic(x, q, scales, dst);
}

/// Q8_0 rows with explicit AVX2: each block's 32 values widen to f32 in four groups of eight,
/// multiply the activations, and the block's sum is scaled into the running total.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_q8_avx2(x: &[f32], q: &[i8], scales: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = x.len();
    let blocks = k / Q8_BLOCK;
    for ((row, row_scales), out) in q
        .chunks_exact(k)
        .zip(scales.chunks_exact(blocks))
        .zip(dst.iter_mut())
    {
        // SAFETY: block b reads values b*32 .. b*32+32 of `row` and `x` (k = blocks * 32).
        *out = unsafe {
            let (qp, xp) = (row.as_ptr(), x.as_ptr());
            let mut total = _mm256_setzero_ps();
            for (b, d) in row_scales.iter().enumerate() {
                let o = b * Q8_BLOCK;
                let mut block = _mm256_setzero_ps();
                for j in 0..4 {
                    let qi = _mm_loadl_epi64(qp.add(o + 8 * j) as *const __m128i);
                    let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qi));
                    block = _mm256_fmadd_ps(qf, _mm256_loadu_ps(xp.add(o + 8 * j)), block);
                }
                total = _mm256_fmadd_ps(block, _mm256_set1_ps(*d), total);
            }
            horizontal_sum(total)
        };
    }
}

#[inline(always)]
fn dots_q8_generic(x: &[f32], q: &[i8], scales: &[f32], dst: &mut [f32]) {
    let k = x.len();
    let blocks = k / Q8_BLOCK;
    for ((row, row_scales), out) in q
        .chunks_exact(k)
        .zip(scales.chunks_exact(blocks))
        .zip(dst.iter_mut())
    {
        let mut acc = [0f32; LANES];
        for ((xb, qb), d) in x
            .chunks_exact(Q8_BLOCK)
            .zip(row.chunks_exact(Q8_BLOCK))
            .zip(row_scales)
        {
            let mut block = [0f32; LANES];
            for l in 0..LANES {
                block[l] = xb[l] * qb[l] as f32 + xb[l + LANES] * qb[l + LANES] as f32;
            }
            for l in 0..LANES {
                acc[l] += block[l] * d;
            }
        }
        *out = acc.iter().sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &Tensor, w: &Tensor) -> Tensor {
        x.to_dtype(DType::F32)
            .unwrap()
            .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap()
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = b
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// The bf16 matrix-vector rate on the 2B model's output layer, in GB/s of weights read, on
    /// small pages and on huge ones (`cargo test --release --lib matvec_rate -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn matvec_rate() {
        let (n, k) = (151_936, 1536);
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(((i * 2_654_435_761) % 4099) as f32 / 4099.0 - 0.5))
            .collect();
        let small = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let huge = super::super::weight_buffer::tensor_on_huge_pages(&small).unwrap();
        let x = Tensor::ones((1, 1, k), DType::BF16, &Device::Cpu).unwrap();
        // the same matrix packed for the bf16 kernel (as the tied output layer is where that
        // kernel runs)
        let values: Vec<bf16> = small.flatten_all().unwrap().to_vec1().unwrap();
        let packed = super::super::gemm::PackedWeight::pack_bf16(
            &values,
            n,
            k,
            super::super::gemm::Strides::row_major(k),
            Placement::Model,
        );
        let report = |what: &str, run: &mut dyn FnMut()| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                run();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gb = (n * k * 2) as f64 / 1e9;
            eprintln!(
                "{n}x{k} bf16, {what}: {:.1} ms, {:.1} GB/s",
                best * 1e3,
                gb / best
            );
        };
        if let Some(packed) = packed {
            let (ones, mut c) = (vec![bf16::ONE; k], vec![0f32; n]);
            report("packed", &mut || {
                packed.matmul_bf16_then(&ones, 1, k, None, &mut c, n, 1, |_, _, _| {})
            });
        }
        for (pages, w) in [("small pages", &small), ("huge pages", &huge)] {
            report(pages, &mut || {
                matvec(&x, w).unwrap().expect("applies");
            });
        }
    }

    #[test]
    fn matches_matmul_in_f32_and_bf16_for_odd_sizes() {
        for (n, k) in [(1, 1), (7, 33), (300, 1536), (129, 17)] {
            let x = Tensor::randn(0f32, 1.0, (1, 1, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let got = matvec(&x, &w).unwrap().expect("applies");
            assert_eq!(got.dims(), &[1, 1, n]);
            assert!(max_rel_diff(&got, &reference(&x, &w)) < 1e-5);

            let (xb, wb) = (
                x.to_dtype(DType::BF16).unwrap(),
                w.to_dtype(DType::BF16).unwrap(),
            );
            let got = matvec(&xb, &wb).unwrap().expect("applies");
            assert_eq!(got.dtype(), DType::BF16);
            // Only the final rounding to bf16 differs from an f32 sum of the same values.
            assert!(max_rel_diff(&got, &reference(&xb, &wb)) < 1e-2);
        }
    }

    #[test]
    fn int8_rows_round_like_q8_0_and_multiply_close_to_f32() {
        let (n, k) = (70, 96);
        // fixed values (a hash of the index, uniform in [-1, 1)): with fresh random ones the
        // quantization error of this small product now and then passed the 2% bound
        let values = |len: usize, seed: u64| -> Vec<f32> {
            (0..len as u64)
                .map(|i| {
                    let h = (i ^ seed)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .rotate_left(29);
                    let h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        };
        let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(values(k, 2), k, &Device::Cpu).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let xv: Vec<f32> = x.to_vec1().unwrap();
        let q = Int8Rows::quantize(&wv, n, k);
        assert_eq!(q.bytes(), n * k + n * k / 32 * 4);
        // Each block's largest magnitude maps to ±127 exactly; every value within half a step.
        let back = q.dequantize();
        for (b, (orig, approx)) in wv.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (o, a) in orig.iter().zip(approx) {
                assert!((o - a).abs() <= amax / 127.0 * 0.5 + 1e-6, "block {b}");
            }
        }
        let exact = reference(&x.unsqueeze(0).unwrap(), &w);
        let got = Tensor::from_vec(q.matvec(&xv), (1, n), &Device::Cpu).unwrap();
        let error = max_rel_diff(&got, &exact);
        assert!(error < 0.02, "{error}");
        let from_dequantized = Tensor::from_vec(back, (n, k), &Device::Cpu).unwrap();
        // With VNNI the activations are quantized too: the product is exactly that of the two
        // dequantized operands.
        let x_used: Vec<f32> = if has_vnni() {
            let xq = QuantizedActivations::new(&xv);
            (0..k)
                .map(|i| xq.magnitudes[i] as f32 * xq.signs[i] as f32 * xq.scales[i / Q8_BLOCK])
                .collect()
        } else {
            xv.clone()
        };
        let x_used = Tensor::from_vec(x_used, (1, k), &Device::Cpu).unwrap();
        let same = reference(&x_used, &from_dequantized);
        assert!(
            max_rel_diff(&got, &same) < 1e-5,
            "matvec = dequantize both operands, then multiply"
        );
        // the f32-activation path, used where VNNI is missing
        let mut f32_path = vec![0f32; n];
        dots_q8(&xv, &q.q, &q.scales, &mut f32_path);
        let f32_path = Tensor::from_vec(f32_path, (1, n), &Device::Cpu).unwrap();
        let same = reference(&x.unsqueeze(0).unwrap(), &from_dequantized);
        assert!(max_rel_diff(&f32_path, &same) < 1e-5);
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let w = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let two_rows = Tensor::zeros((1, 2, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(matvec(&two_rows, &w).unwrap().is_none());
        let other_dtype = Tensor::zeros((1, 1, 8), DType::BF16, &Device::Cpu).unwrap();
        assert!(matvec(&other_dtype, &w).unwrap().is_none());
        let x = Tensor::zeros((1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let transposed = Tensor::zeros((8, 4), DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(matvec(&x, &transposed).unwrap().is_none());
    }
}
