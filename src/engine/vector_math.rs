//! Elementwise f32 helpers of the CPU kernels, sixteen lanes at a time with AVX-512 where the
//! CPU has it (scalar otherwise): the softmax's max and shifted exp, and the rounding passes
//! that turn a kernel's f32 sums into bf16 — plain, through the vision MLP's quick-GELU, through
//! the decoder MLP's SiLU gate, or as a residual sum. Rounding is to nearest even on the bits,
//! `(x + 0x7fff + lsb) >> 16`, which is what `bf16::from_f32` does for every finite value; the
//! vector exp is within about 1 ulp of libm's.

use half::bf16;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Whether the CPU runs [`avx2`]'s helpers (where it lacks AVX-512).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The largest value of `row` (NaN-free scores).
pub fn max_of(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above.
        return unsafe { max_avx512(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 was detected just above.
        return unsafe { avx2::max_of(row) };
    }
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_avx512(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let whole = row.len() / 16 * 16;
    let mut max = f32::NEG_INFINITY;
    unsafe {
        // four independent maxima: one alone waits on its own latency every sixteen lanes
        let mut acc = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        let p = row.as_ptr();
        let mut i = 0;
        while i + 64 <= whole {
            acc[0] = _mm512_max_ps(acc[0], _mm512_loadu_ps(p.add(i)));
            acc[1] = _mm512_max_ps(acc[1], _mm512_loadu_ps(p.add(i + 16)));
            acc[2] = _mm512_max_ps(acc[2], _mm512_loadu_ps(p.add(i + 32)));
            acc[3] = _mm512_max_ps(acc[3], _mm512_loadu_ps(p.add(i + 48)));
            i += 64;
        }
        while i < whole {
            acc[0] = _mm512_max_ps(acc[0], _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        let pairs = [_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3])];
        max = max.max(_mm512_reduce_max_ps(_mm512_max_ps(pairs[0], pairs[1])));
    }
    row[whole..].iter().copied().fold(max, f32::max)
}

/// `dst[i] = dst[i] · factor + src[i]` (a fused multiply-add per lane with AVX-512).
pub fn scale_add(dst: &mut [f32], factor: f32, src: &[f32]) {
    let len = dst.len().min(src.len());
    let mut whole = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        whole = len / 16 * 16;
        // SAFETY: AVX-512F was detected just above; `whole` ≤ both lengths.
        unsafe { scale_add_avx512(&mut dst[..whole], factor, &src[..whole]) };
    } else if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected just above.
        whole = unsafe { avx2::scale_add(&mut dst[..len], factor, &src[..len]) };
    }
    for (d, &x) in dst[whole..len].iter_mut().zip(&src[whole..len]) {
        *d = *d * factor + x;
    }
}

/// [`scale_add`] on whole groups of sixteen (the lengths are equal multiples of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_add_avx512(dst: &mut [f32], factor: f32, src: &[f32]) {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_storeu_ps};
    let f = _mm512_set1_ps(factor);
    for (d, s) in dst.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
        // SAFETY: sixteen values each.
        unsafe {
            let y = _mm512_fmadd_ps(_mm512_loadu_ps(d.as_ptr()), f, _mm512_loadu_ps(s.as_ptr()));
            _mm512_storeu_ps(d.as_mut_ptr(), y);
        }
    }
}

/// `dst[i] = bf16(src[i] · scale)`, rounded to nearest even as `bf16::from_f32`.
pub fn round_to_bf16(src: &[f32], scale: f32, dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above.
        return unsafe { round_scaled_bf16_avx512(src, scale, dst) };
    }
    let mut whole = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        let len = src.len().min(dst.len());
        // SAFETY: AVX2 was detected just above.
        whole = unsafe { avx2::round_to_bf16(&src[..len], scale, &mut dst[..len]) };
    }
    for (d, &x) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = bf16::from_f32(x * scale);
    }
}

/// [`round_to_bf16`] sixteen lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_scaled_bf16_avx512(src: &[f32], scale: f32, dst: &mut [bf16]) {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_mul_ps, _mm512_set1_ps};
    let len = src.len().min(dst.len());
    let whole = len / 16 * 16;
    unsafe {
        let vscale = _mm512_set1_ps(scale);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < whole {
            let x = _mm512_mul_ps(_mm512_loadu_ps(s.add(i)), vscale);
            store_bf16(d.add(i), x);
            i += 16;
        }
    }
    for (d, &x) in dst[whole..len].iter_mut().zip(&src[whole..len]) {
        *d = bf16::from_f32(x * scale);
    }
}

/// `x ← exp((x - max) · scale)`, returning the sum.
pub fn exp_shifted(row: &mut [f32], max: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let (src, len) = (row.as_ptr(), row.len());
        // SAFETY: AVX-512F was detected just above; `row` is read and written in place, lane
        // block by lane block.
        return unsafe {
            exp_shifted_avx512::<false>(src, len, max, scale, row.as_mut_ptr().cast())
        };
    }
    let (mut whole, mut sum) = (0, 0.0);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        let (src, len) = (row.as_ptr(), row.len());
        // SAFETY: AVX2 and FMA were detected just above; `row` is read and written in place,
        // lane block by lane block.
        (whole, sum) =
            unsafe { avx2::exp_shifted::<false>(src, len, max, scale, row.as_mut_ptr().cast()) };
    }
    for x in row[whole..].iter_mut() {
        *x = ((*x - max) * scale).exp();
        sum += *x;
    }
    sum
}

/// `dst[i] = exp((src[i] - max) · scale)`, returning the sum.
pub fn exp_shifted_to_f32(src: &[f32], max: f32, scale: f32, dst: &mut [f32]) -> f32 {
    let len = src.len().min(dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above; both slices hold `len` values.
        return unsafe {
            exp_shifted_avx512::<false>(src.as_ptr(), len, max, scale, dst.as_mut_ptr().cast())
        };
    }
    let (mut whole, mut sum) = (0, 0.0);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr().cast());
        // SAFETY: AVX2 and FMA were detected just above; both slices hold `len` values.
        (whole, sum) = unsafe { avx2::exp_shifted::<false>(s, len, max, scale, d) };
    }
    for (d, &x) in dst[whole..len].iter_mut().zip(&src[whole..]) {
        *d = ((x - max) * scale).exp();
        sum += *d;
    }
    sum
}

/// `dst[i] = bf16(exp((src[i] - max) · scale))`, returning the sum of the unrounded values.
pub fn exp_shifted_to_bf16(src: &[f32], max: f32, scale: f32, dst: &mut [bf16]) -> f32 {
    let len = src.len().min(dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512dq")
    {
        // SAFETY: AVX512-BF16 and AVX512-DQ (and so AVX-512F) were detected just above; `len` ≤
        // both lengths.
        return unsafe { exp2_shifted_to_bf16_avx512(&src[..len], max, scale, &mut dst[..len]) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above; both slices hold `len` values.
        return unsafe {
            exp_shifted_avx512::<true>(src.as_ptr(), len, max, scale, dst.as_mut_ptr().cast())
        };
    }
    let (mut whole, mut sum) = (0, 0.0);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr().cast());
        // SAFETY: AVX2 and FMA were detected just above; both slices hold `len` values.
        (whole, sum) = unsafe { avx2::exp_shifted::<true>(s, len, max, scale, d) };
    }
    for (d, &x) in dst[whole..len].iter_mut().zip(&src[whole..]) {
        let e = ((x - max) * scale).exp();
        *d = bf16::from_f32(e);
        sum += e;
    }
    sum
}

/// [`exp_shifted`] (`BF16 = false`, f32 out, `dst` may be `src`) or [`exp_shifted_to_bf16`]
/// sixteen lanes at a time: `exp(r + n·ln 2) = 2ⁿ · exp(r)` with `|r| ≤ ln 2 / 2` and Cephes'
/// degree-6 polynomial for `exp(r)` (about 1 ulp).
///
/// # Safety
/// `src` holds `len` readable values, `dst` room for `len` of the output type.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512<const BF16: bool>(
    src: *const f32,
    len: usize,
    max: f32,
    scale: f32,
    dst: *mut u8,
) -> f32 {
    use std::arch::x86_64::*;
    let whole = len / 16 * 16;
    let mut sum = 0.0f32;
    let shifted = |x: f32| ((x - max) * scale).exp();
    unsafe {
        let vmax = _mm512_set1_ps(max);
        let vscale = _mm512_set1_ps(scale);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < whole {
            let x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(src.add(i)), vmax), vscale);
            let e = if BF16 {
                exp_coarse_avx512(x)
            } else {
                exp_avx512(x)
            };
            if BF16 {
                store_bf16(dst.cast::<half::bf16>().add(i), e);
            } else {
                _mm512_storeu_ps(dst.cast::<f32>().add(i), e);
            }
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        sum += _mm512_reduce_add_ps(acc);
        for i in whole..len {
            let e = shifted(*src.add(i));
            if BF16 {
                *dst.cast::<half::bf16>().add(i) = half::bf16::from_f32(e);
            } else {
                *dst.cast::<f32>().add(i) = e;
            }
            sum += e;
        }
    }
    sum
}

/// [`exp_shifted_to_bf16`] on CPUs with AVX512-BF16, with fewer operations per lane than
/// [`exp_shifted_avx512`]:
/// - the shift, scale and change to base 2 are one multiply-add, `u = x·s·log₂e − max·s·log₂e + ½`,
///   so that `exp((x − max)·s) = 2ᵘ⁻½ = 2^⌊u⌋ · 2^(f−½)` with `f = u − ⌊u⌋` in `[0, 1)`;
/// - one instruction (`vreduceps`) takes `f`, a degree-4 polynomial fitted to `2^(f−½)` (within
///   3·10⁻⁶ relative, for values about to be rounded to bf16, whose step is a thousand times
///   coarser) is four multiply-adds, and `vscalefps` multiplies by `2^⌊u⌋`, taking the floor
///   itself;
/// - one instruction rounds thirty-two lanes to bf16 (nearest even; values under 2⁻¹²⁶, which no
///   product will notice, become zero).
///
/// There is no clamp: `u` is at most ½ (or −∞) when `max` is the largest value, a very negative
/// one underflows to zero in the scaling, and above 128 (a `max` far below the values, which
/// attention allows) the values and the sum become infinite. About nine vector operations per
/// sixteen lanes; the exponentials are the largest part of attention's time after the products.
///
/// # Safety
/// AVX512-BF16 and AVX512-DQ; `dst` is as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bf16")]
unsafe fn exp2_shifted_to_bf16_avx512(src: &[f32], max: f32, scale: f32, dst: &mut [bf16]) -> f32 {
    use std::arch::x86_64::*;
    let len = src.len();
    let s = scale * std::f32::consts::LOG2_E;
    let (vs, vshift) = (_mm512_set1_ps(s), _mm512_set1_ps(max * s - 0.5));
    // 2^(f − ½) on [0, 1), relative minimax, highest power first
    let c = [
        0.009_570_083,
        0.036_777_68,
        0.170_725_81,
        0.490_027_7,
        0.707_108_6,
    ];
    let exp2 = |x: __m512| {
        let u = _mm512_fmsub_ps(x, vs, vshift);
        let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(u);
        let mut y = _mm512_set1_ps(c[0]);
        for &ck in &c[1..] {
            y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(ck));
        }
        _mm512_scalef_ps(y, u)
    };
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= len {
        // SAFETY: `i + 32` ≤ `len` = both lengths.
        unsafe {
            let e0 = exp2(_mm512_loadu_ps(src.as_ptr().add(i)));
            let e1 = exp2(_mm512_loadu_ps(src.as_ptr().add(i + 16)));
            acc0 = _mm512_add_ps(acc0, e0);
            acc1 = _mm512_add_ps(acc1, e1);
            let rounded: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
            _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast(), rounded);
        }
        i += 32;
    }
    if i + 16 <= len {
        // SAFETY: `i + 16` ≤ `len` = both lengths.
        unsafe {
            let e = exp2(_mm512_loadu_ps(src.as_ptr().add(i)));
            acc0 = _mm512_add_ps(acc0, e);
            let rounded: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), rounded);
        }
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for (d, &x) in dst[i..].iter_mut().zip(&src[i..]) {
        let e = ((x - max) * scale).exp();
        *d = half::bf16::from_f32(e);
        sum += e;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-103.0));
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.72));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(
        y,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(y, n)
}

/// `exp(x)` to about 2·10⁻⁶ relative (degree-5 Taylor polynomial after the same reduction as
/// [`exp_avx512`]), for values about to be rounded to bf16, whose step is 2000 times coarser:
/// three operations fewer per lane than the 1-ulp version. Inputs below -103 give the same
/// underflow as the accurate one; there is no upper clamp (large inputs overflow to infinity).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp_coarse_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-103.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(std::f32::consts::LN_2), x);
    let mut y = _mm512_set1_ps(1.0 / 120.0);
    for c in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(y, n)
}

/// Sixteen f32 lanes rounded to bf16 (nearest even), as the upper halves of 32-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn round_bf16_bits(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let x = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
    _mm512_srli_epi32::<16>(_mm512_add_epi32(x, bias))
}

/// Sixteen f32 lanes rounded to bf16 (nearest even) and widened back: a bf16 op's result, kept
/// in f32 for the next op.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn round_bf16_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(round_bf16_bits(x)))
}

/// Rounds sixteen f32 lanes to bf16 (nearest even) and stores them at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn store_bf16(dst: *mut bf16, x: std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let rounded = round_bf16_bits(x);
    // SAFETY: the caller hands sixteen writable values at `dst`.
    unsafe { _mm256_storeu_si256(dst.cast(), _mm512_cvtepi32_epi16(rounded)) };
}

/// Sixteen bf16 values at `src` widened to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn load_bf16(src: *const bf16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller hands sixteen readable values at `src`.
    let raw = unsafe { _mm256_loadu_si256(src.cast()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
}

/// The first `count` (at most 16) bf16 values at `src` widened to f32, the other lanes zero (and
/// not read).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(crate) unsafe fn load_bf16_first(src: *const bf16, count: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    debug_assert!(count <= 16);
    if count == 16 {
        // SAFETY: as below, all sixteen.
        return unsafe { load_bf16(src) };
    }
    // SAFETY: the caller hands `count` readable values at `src`; masked lanes are not read.
    let raw = unsafe { _mm512_maskz_loadu_epi16((1u32 << count) - 1, src.cast()) };
    let raw = _mm512_castsi512_si256(raw);
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
}

/// Rounds the first `count` (at most 16) f32 lanes to bf16 (nearest even) and stores them at
/// `dst`; nothing past them is written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(crate) unsafe fn store_bf16_first(dst: *mut bf16, x: std::arch::x86_64::__m512, count: usize) {
    use std::arch::x86_64::*;
    debug_assert!(count <= 16);
    if count == 16 {
        // SAFETY: as below, all sixteen.
        return unsafe { store_bf16(dst, x) };
    }
    let rounded = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(round_bf16_bits(x)));
    // SAFETY: the caller hands `count` writable values at `dst`; masked lanes are not written.
    unsafe { _mm512_mask_storeu_epi16(dst.cast(), (1u32 << count) - 1, rounded) };
}

/// `1 / (1 + exp(x · k))` on sixteen lanes, to about 2 ulp: `exp(x · k) = 2ᵘ⁻½` with
/// `u = x · k · log₂e + ½` (`k_log2e` is `k · log₂e`), `2ᵘ⁻½ = 2^⌊u⌋ · 2^(f−½)` with `f` from
/// `vreduceps` and a degree-5 polynomial (10⁻⁷ relative), and the reciprocal from `vrcp14ps`
/// and one Newton step: no division, whose one port made it the slowest part of the activations.
/// `u` is clamped below 127, so that `1 + 2ᵘ⁻½` stays finite (its reciprocal is then zero to f32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
fn recip_one_plus_exp_avx512(
    x: std::arch::x86_64::__m512,
    k_log2e: f32,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let u = _mm512_fmadd_ps(x, _mm512_set1_ps(k_log2e), _mm512_set1_ps(0.5));
    let u = _mm512_min_ps(u, _mm512_set1_ps(127.0));
    let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(u);
    // 2^(f − ½) on [0, 1), relative minimax, highest power first
    let mut y = _mm512_set1_ps(0.001_327_646_2);
    for c in [
        0.006_356_425,
        0.039_475_17,
        0.169_814_24,
        0.490_133_23,
        std::f32::consts::FRAC_1_SQRT_2,
    ] {
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(c));
    }
    let d = _mm512_add_ps(_mm512_set1_ps(1.0), _mm512_scalef_ps(y, u));
    let r = _mm512_rcp14_ps(d);
    // r · (2 − d·r): the 14 bits of the estimate become about 24
    _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0)), r)
}

/// `x · sigmoid(1.702 · x)` on sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
fn quick_gelu_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let k = -1.702 * std::f32::consts::LOG2_E;
    _mm512_mul_ps(x, recip_one_plus_exp_avx512(x, k))
}

/// `silu(g) · u = g · u / (1 + exp(-g))` on sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
fn silu_gate_avx512(
    g: std::arch::x86_64::__m512,
    u: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let sigmoid = recip_one_plus_exp_avx512(g, -std::f32::consts::LOG2_E);
    _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), u)
}

/// `x · sigmoid(1.702 · x)`, the vision MLP's activation, in f32.
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

/// `silu(g) · u` in f32.
pub fn silu_gate(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// `dst[i] = bf16(quick_gelu(src[i]))`.
pub fn quick_gelu_to_bf16(src: &[f32], dst: &mut [bf16]) {
    let len = src.len().min(dst.len());
    let mut whole = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
    {
        whole = len / 16 * 16;
        // SAFETY: AVX-512F and DQ were detected just above; `whole` ≤ both lengths.
        unsafe { quick_gelu_to_bf16_avx512(&src[..whole], &mut dst[..whole]) };
    } else if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected just above.
        whole = unsafe { avx2::quick_gelu_to_bf16(&src[..len], &mut dst[..len]) };
    }
    for (d, &x) in dst[whole..len].iter_mut().zip(&src[whole..len]) {
        *d = bf16::from_f32(quick_gelu(x));
    }
}

/// [`quick_gelu_to_bf16`] on whole groups of sixteen (the lengths are equal multiples of 16).
/// The loops over lanes are target-feature functions of their own, so that the lane helpers
/// inline into them (called from plain code, each helper was a call per sixteen values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn quick_gelu_to_bf16_avx512(src: &[f32], dst: &mut [bf16]) {
    for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        // SAFETY: sixteen values each.
        unsafe {
            let x = std::arch::x86_64::_mm512_loadu_ps(s.as_ptr());
            store_bf16(d.as_mut_ptr(), quick_gelu_avx512(x));
        }
    }
}

/// `dst[i] = bf16(silu(gate[i]) · up[i])`.
pub fn silu_gate_to_bf16(gate: &[f32], up: &[f32], dst: &mut [bf16]) {
    let len = gate.len().min(up.len()).min(dst.len());
    let mut whole = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
    {
        whole = len / 16 * 16;
        // SAFETY: AVX-512F and DQ were detected just above; `whole` ≤ every length.
        unsafe { silu_gate_to_bf16_avx512(&gate[..whole], &up[..whole], &mut dst[..whole]) };
    } else if has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected just above.
        whole = unsafe { avx2::silu_gate_to_bf16(&gate[..len], &up[..len], &mut dst[..len]) };
    }
    for ((d, &g), &u) in dst[whole..len]
        .iter_mut()
        .zip(&gate[whole..len])
        .zip(&up[whole..len])
    {
        *d = bf16::from_f32(silu_gate(g, u));
    }
}

/// [`silu_gate_to_bf16`] on whole groups of sixteen (see [`quick_gelu_to_bf16_avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn silu_gate_to_bf16_avx512(gate: &[f32], up: &[f32], dst: &mut [bf16]) {
    use std::arch::x86_64::_mm512_loadu_ps;
    for ((g, u), d) in gate
        .chunks_exact(16)
        .zip(up.chunks_exact(16))
        .zip(dst.chunks_exact_mut(16))
    {
        // SAFETY: sixteen values each.
        unsafe {
            let (g, u) = (_mm512_loadu_ps(g.as_ptr()), _mm512_loadu_ps(u.as_ptr()));
            store_bf16(d.as_mut_ptr(), silu_gate_avx512(g, u));
        }
    }
}

/// `dst[i] = bf16(bf16(src[i]) + residual[i])`: a layer's output rounded, then the residual
/// added and rounded again, as two separate bf16 ops would (the same bits).
pub fn add_rounded_to_bf16(src: &[f32], residual: &[bf16], dst: &mut [bf16]) {
    let len = src.len().min(residual.len()).min(dst.len());
    let mut whole = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        whole = len / 16 * 16;
        // SAFETY: AVX-512F was detected just above; `whole` ≤ every length.
        unsafe { add_rounded_to_bf16_avx512(&src[..whole], &residual[..whole], &mut dst[..whole]) };
    } else if has_avx2_fma() {
        // SAFETY: AVX2 was detected just above.
        whole =
            unsafe { avx2::add_rounded_to_bf16(&src[..len], &residual[..len], &mut dst[..len]) };
    }
    for ((d, &x), &r) in dst[whole..len]
        .iter_mut()
        .zip(&src[whole..len])
        .zip(&residual[whole..len])
    {
        *d = bf16::from_f32(bf16::from_f32(x).to_f32() + r.to_f32());
    }
}

/// [`add_rounded_to_bf16`] on whole groups of sixteen (see [`quick_gelu_to_bf16_avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_rounded_to_bf16_avx512(src: &[f32], residual: &[bf16], dst: &mut [bf16]) {
    use std::arch::x86_64::{_mm512_add_ps, _mm512_loadu_ps};
    for ((s, r), d) in src
        .chunks_exact(16)
        .zip(residual.chunks_exact(16))
        .zip(dst.chunks_exact_mut(16))
    {
        // SAFETY: sixteen values each. The first rounding goes through `d` (written, then
        // read back and overwritten).
        unsafe {
            let d = d.as_mut_ptr();
            store_bf16(d, _mm512_loadu_ps(s.as_ptr()));
            store_bf16(d, _mm512_add_ps(load_bf16(d), load_bf16(r.as_ptr())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_rounding_to_bf16_gives_the_bits_of_from_f32() {
        // halfway cases both ways, tiny and subnormal values, large ones, and a ragged tail
        let mut src: Vec<f32> = (0..1000)
            .map(|i| f32::from_bits(0x3f80_0000 + i * 0x8000 + (i % 3) * 0x4000))
            .collect();
        src.extend([1e-40, -1e-40, 3.0e38, -0.0, 0.0, 1.0 + f32::EPSILON * 64.0]);
        for scale in [1.0, 0.37, 1.0 / 3.0] {
            let mut fast = vec![bf16::ZERO; src.len()];
            round_to_bf16(&src, scale, &mut fast);
            for (i, (&x, f)) in src.iter().zip(&fast).enumerate() {
                let want = bf16::from_f32(x * scale);
                assert_eq!(
                    f.to_bits(),
                    want.to_bits(),
                    "value {i} ({x}) at scale {scale}"
                );
            }
        }
    }

    fn ragged(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0)
            .collect()
    }

    fn bf16_bits(values: &[bf16]) -> Vec<u16> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn vector_quick_gelu_and_silu_gate_stay_within_one_bf16_step_of_the_scalar_ones() {
        // [-10, 10) and a tail of magnitudes where the exponential over- or underflows
        let mut x = ragged(1003);
        x.extend([-200.0, -95.0, -60.0, 60.0, 95.0, 200.0, 1e-30, -1e-30, 0.0]);
        let u: Vec<f32> = x.iter().rev().map(|v| v.clamp(-10.0, 10.0)).collect();
        let mut gelu = vec![bf16::ZERO; x.len()];
        quick_gelu_to_bf16(&x, &mut gelu);
        let mut gated = vec![bf16::ZERO; x.len()];
        silu_gate_to_bf16(&x, &u, &mut gated);
        // and almost always exactly the scalar value rounded: a 10⁻⁷ error moves the rounding of
        // about one value in ten thousand, a 14-bit reciprocal without its Newton step of 3%
        let exact = |got: &[bf16], f: &dyn Fn(usize) -> f32| {
            (0..x.len())
                .filter(|&i| got[i] == bf16::from_f32(f(i)))
                .count()
        };
        let most = x.len() - x.len() / 200;
        assert!(exact(&gelu, &|i| quick_gelu(x[i])) >= most);
        assert!(exact(&gated, &|i| silu_gate(x[i], u[i])) >= most);
        for i in 0..x.len() {
            for (name, got, want) in [
                ("quick_gelu", gelu[i], quick_gelu(x[i])),
                ("silu_gate", gated[i], silu_gate(x[i], u[i])),
            ] {
                let (got, want) = (got.to_f32(), want);
                // the vector exp is ~1 ulp of f32 off libm's: at most one bf16 step after rounding
                assert!(
                    (got - want).abs() <= want.abs() / 128.0 + 1e-30,
                    "{name}({}) = {got}, want {want}",
                    x[i]
                );
            }
        }
    }

    #[test]
    fn residual_sum_gives_the_bits_of_two_separate_roundings() {
        let x = ragged(1001);
        let residual: Vec<bf16> = ragged(1001)
            .iter()
            .rev()
            .map(|&r| bf16::from_f32(r * 37.0))
            .collect();
        let mut got = vec![bf16::ZERO; x.len()];
        add_rounded_to_bf16(&x, &residual, &mut got);
        let want: Vec<bf16> = x
            .iter()
            .zip(&residual)
            .map(|(&x, r)| bf16::from_f32(bf16::from_f32(x).to_f32() + r.to_f32()))
            .collect();
        assert_eq!(bf16_bits(&got), bf16_bits(&want));
    }

    #[test]
    fn exponentials_rounded_to_bf16_stay_within_one_step_of_libm_and_sum_unrounded() {
        for len in [1, 15, 16, 33, 48, 50, 200] {
            let row: Vec<f32> = ragged(len).iter().map(|x| x * 40.0).collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut fast = vec![bf16::ZERO; len];
            let sum = exp_shifted_to_bf16(&row, max, 0.3, &mut fast);
            let exact: Vec<f64> = row
                .iter()
                .map(|&x| ((x - max) as f64 * 0.3).exp())
                .collect();
            let want: f64 = exact.iter().sum();
            assert!(
                (sum as f64 - want).abs() < 1e-5 * want,
                "len {len}: sum {sum} vs {want}"
            );
            for (i, (&got, &e)) in fast.iter().zip(&exact).enumerate() {
                let want = bf16::from_f64(e);
                let steps = (got.to_bits() as i32 - want.to_bits() as i32).abs();
                // below f32's smallest normal value the rounding instruction may flush to zero
                let flushed = e < f32::MIN_POSITIVE as f64 && got.to_f32() == 0.0;
                assert!(steps <= 1 || flushed, "len {len} at {i}: {got} vs {want}");
            }
            // far below the maximum: underflow to zero or a tiny value, never garbage
            let mut tiny = [bf16::ONE; 17];
            exp_shifted_to_bf16(&[-1e30; 17], 0.0, 1.0, &mut tiny);
            assert!(tiny.iter().all(|x| x.to_f32() == 0.0), "{tiny:?}");
        }
    }

    /// The AVX2 helpers checked directly, so that CPUs with AVX-512 (which never reach them
    /// through the public functions) test them too.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_helpers_match_the_scalar_results() {
        if !has_avx2_fma() {
            return;
        }
        let x = ragged(1003);
        let whole = x.len() / 8 * 8;
        let (mut got, mut want) = (vec![bf16::ZERO; x.len()], vec![bf16::ZERO; x.len()]);
        // SAFETY (every call below): AVX2 and FMA were detected above.
        assert_eq!(unsafe { avx2::round_to_bf16(&x, 0.37, &mut got) }, whole);
        for (w, &v) in want.iter_mut().zip(&x) {
            *w = bf16::from_f32(v * 0.37);
        }
        assert_eq!(bf16_bits(&got[..whole]), bf16_bits(&want[..whole]));
        let residual: Vec<bf16> = x.iter().rev().map(|&r| bf16::from_f32(r * 37.0)).collect();
        unsafe { avx2::add_rounded_to_bf16(&x, &residual, &mut got) };
        for ((w, &v), r) in want.iter_mut().zip(&x).zip(&residual) {
            *w = bf16::from_f32(bf16::from_f32(v).to_f32() + r.to_f32());
        }
        assert_eq!(bf16_bits(&got[..whole]), bf16_bits(&want[..whole]));
        // activations: within one bf16 step of the scalar ones, over- and underflow included
        let mut wide = x.clone();
        wide.extend([-200.0, -95.0, -60.0, 60.0, 95.0, 200.0, 1e-30, -1e-30]);
        let whole = wide.len() / 8 * 8;
        let up: Vec<f32> = wide.iter().rev().map(|v| v.clamp(-10.0, 10.0)).collect();
        let mut act = vec![bf16::ZERO; wide.len()];
        for (name, f) in [
            (
                "quick_gelu",
                &(|i: usize| quick_gelu(wide[i])) as &dyn Fn(usize) -> f32,
            ),
            ("silu_gate", &|i: usize| silu_gate(wide[i], up[i])),
        ] {
            let done = if name == "quick_gelu" {
                unsafe { avx2::quick_gelu_to_bf16(&wide, &mut act) }
            } else {
                unsafe { avx2::silu_gate_to_bf16(&wide, &up, &mut act) }
            };
            assert_eq!(done, whole);
            for (i, got) in act[..whole].iter().enumerate() {
                let want = f(i);
                let got = got.to_f32();
                assert!(
                    (got - want).abs() <= want.abs() / 128.0 + 1e-30,
                    "{name}({}) = {got}, want {want}",
                    wide[i]
                );
            }
        }
        // shifted exponentials, f32 (to ~1 ulp) and bf16 (one step), with their sums
        let row: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
        let (max, whole) = (max_of(&row), row.len() / 8 * 8);
        // (the argument as the helper computes it in f32: its rounding alone moves exp by
        // several ulp at these magnitudes)
        let exact: Vec<f64> = row
            .iter()
            .map(|&v| (((v - max) * 0.3) as f64).exp())
            .collect();
        let want_sum: f64 = exact[..whole].iter().sum();
        let mut e32 = vec![0f32; row.len()];
        let (done, sum) = unsafe {
            avx2::exp_shifted::<false>(row.as_ptr(), row.len(), max, 0.3, e32.as_mut_ptr().cast())
        };
        assert_eq!(done, whole);
        assert!(
            (sum as f64 - want_sum).abs() < 1e-5 * want_sum,
            "{sum} vs {want_sum}"
        );
        for (i, (&g, &e)) in e32[..whole].iter().zip(&exact).enumerate() {
            assert!((g as f64 - e).abs() <= 2.5e-7 * e, "exp at {i}: {g} vs {e}");
        }
        let (done, sum) = unsafe {
            avx2::exp_shifted::<true>(row.as_ptr(), row.len(), max, 0.3, got.as_mut_ptr().cast())
        };
        assert_eq!(done, whole);
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum);
        for (i, (&g, &e)) in got[..whole].iter().zip(&exact).enumerate() {
            let steps = (g.to_bits() as i32 - bf16::from_f64(e).to_bits() as i32).abs();
            assert!(steps <= 1, "bf16 exp at {i}: {g} vs {e}");
        }
        // far below the reference: zero or a subnormal, never garbage
        let far = [-1e30f32; 8];
        let (_, sum) = unsafe {
            avx2::exp_shifted::<false>(far.as_ptr(), 8, 0.0, 1.0, e32.as_mut_ptr().cast())
        };
        assert!(sum < 1e-40 && e32[..8].iter().all(|&v| (0.0..1e-40).contains(&v)));
        // reductions and the multiply-add
        for (len, at) in [(1003, 1002), (64, 3), (17, 9)] {
            let mut row: Vec<f32> = (0..len).map(|i| -(i as f32)).collect();
            row[at] = 5.0;
            assert_eq!(unsafe { avx2::max_of(&row) }, 5.0, "len {len}, at {at}");
        }
        let mut dst = x.clone();
        let done = unsafe { avx2::scale_add(&mut dst, 0.5, &up) };
        assert_eq!(done, x.len() / 8 * 8);
        for i in 0..done {
            assert!((dst[i] - (x[i] * 0.5 + up[i])).abs() <= 1e-6 * (1.0 + dst[i].abs()));
        }
    }

    #[test]
    fn max_of_finds_the_largest_anywhere() {
        for len in [1, 15, 16, 17, 64, 100, 200] {
            for at in 0..len {
                let mut row: Vec<f32> = (0..len).map(|i| -(i as f32)).collect();
                row[at] = 5.0;
                assert_eq!(max_of(&row), 5.0, "len {len}, at {at}");
            }
        }
    }
}
