//! [`super`]'s helpers eight lanes at a time, for CPUs with AVX2 and FMA but no AVX-512. Each
//! function takes slices of equal length and handles only their whole groups of eight, returning
//! how many values it did (the callers finish the tail with the scalar code), except the
//! reductions, which return their result over the whole slices.
//!
//! The exponential is Cephes' (range reduction by `n·ln 2` in two parts, degree-6 polynomial,
//! about 1 ulp); without `vscalefps`, `2ⁿ` is built in the exponent bits, in two factors so that
//! results down to f32's subnormals are right. Rounding to bf16 is to nearest even on the bits,
//! as `bf16::from_f32`.

use std::arch::x86_64::*;

use half::bf16;

/// `exp(x)` on eight lanes, to about 1 ulp; below −103 it underflows to zero and above 88.7 it
/// saturates at f32's largest finite exponential (as [`super::exp_avx512`] clamps).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn exp(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-103.0));
    let x = _mm256_min_ps(x, _mm256_set1_ps(88.72));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2ⁿ as 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋): each factor's exponent stays inside f32's normal range
    // for n in [−149, 128]
    let n = _mm256_cvtps_epi32(n);
    let half = _mm256_srai_epi32::<1>(n);
    let power = |e: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            e,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_mul_ps(
        _mm256_mul_ps(y, power(half)),
        power(_mm256_sub_epi32(n, half)),
    )
}

/// Eight f32 lanes rounded to bf16 (nearest even) and stored at `dst`.
///
/// # Safety
/// Eight writable values at `dst`.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn store_bf16(dst: *mut bf16, x: __m256) {
    let x = _mm256_castps_si256(x);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(x, bias));
    let packed = _mm_packus_epi32(
        _mm256_castsi256_si128(rounded),
        _mm256_extracti128_si256::<1>(rounded),
    );
    // SAFETY: the caller hands eight writable values.
    unsafe { _mm_storeu_si128(dst.cast(), packed) };
}

/// Eight bf16 values at `src` widened to f32.
///
/// # Safety
/// Eight readable values at `src`.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn load_bf16(src: *const bf16) -> __m256 {
    // SAFETY: the caller hands eight readable values.
    let raw = unsafe { _mm_loadu_si128(src.cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
}

/// The largest value of `row`.
#[target_feature(enable = "avx2")]
pub(super) fn max_of(row: &[f32]) -> f32 {
    let whole = row.len() / 8 * 8;
    // four independent maxima, as the AVX-512 version
    let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    let mut chunks = row[..whole].chunks_exact(32);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: eight of the chunk's 32 values.
            *a = _mm256_max_ps(*a, unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * j)) });
        }
    }
    for c in chunks.remainder().chunks_exact(8) {
        // SAFETY: eight values.
        acc[0] = _mm256_max_ps(acc[0], unsafe { _mm256_loadu_ps(c.as_ptr()) });
    }
    let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: eight writable values.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    lanes
        .into_iter()
        .chain(row[whole..].iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `dst[i] = dst[i] · factor + src[i]` on the whole groups of eight; returns how many.
#[target_feature(enable = "avx2,fma")]
pub(super) fn scale_add(dst: &mut [f32], factor: f32, src: &[f32]) -> usize {
    let f = _mm256_set1_ps(factor);
    let mut done = 0;
    for (d, s) in dst.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
        // SAFETY: eight values each.
        unsafe {
            let y = _mm256_fmadd_ps(_mm256_loadu_ps(d.as_ptr()), f, _mm256_loadu_ps(s.as_ptr()));
            _mm256_storeu_ps(d.as_mut_ptr(), y);
        }
        done += 8;
    }
    done
}

/// `dst[i] = bf16(src[i] · scale)` on the whole groups of eight; returns how many.
#[target_feature(enable = "avx2")]
pub(super) fn round_to_bf16(src: &[f32], scale: f32, dst: &mut [bf16]) -> usize {
    let vscale = _mm256_set1_ps(scale);
    let mut done = 0;
    for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        // SAFETY: eight values each.
        unsafe {
            store_bf16(
                d.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(s.as_ptr()), vscale),
            )
        };
        done += 8;
    }
    done
}

/// `dst[i] = exp((src[i] − max) · scale)` as f32 (`BF16 = false`, `dst` may be `src`) or
/// rounded to bf16, on the whole groups of eight; returns how many and the sum of the unrounded
/// values.
///
/// # Safety
/// `src` holds `len` readable values, `dst` room for `len` of the output type.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_shifted<const BF16: bool>(
    src: *const f32,
    len: usize,
    max: f32,
    scale: f32,
    dst: *mut u8,
) -> (usize, f32) {
    let whole = len / 8 * 8;
    let (vmax, vscale) = (_mm256_set1_ps(max), _mm256_set1_ps(scale));
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: `i + 8` ≤ `len` in each step (the caller's contract on both pointers).
    unsafe {
        while i < whole {
            let e = exp(_mm256_mul_ps(
                _mm256_sub_ps(_mm256_loadu_ps(src.add(i)), vmax),
                vscale,
            ));
            if BF16 {
                store_bf16(dst.cast::<bf16>().add(i), e);
            } else {
                _mm256_storeu_ps(dst.cast::<f32>().add(i), e);
            }
            // two sums alternating, so that the adds do not wait on each other
            if i % 16 == 0 {
                acc0 = _mm256_add_ps(acc0, e);
            } else {
                acc1 = _mm256_add_ps(acc1, e);
            }
            i += 8;
        }
    }
    (whole, horizontal_sum(_mm256_add_ps(acc0, acc1)))
}

/// The sum of eight lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn horizontal_sum(x: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

/// `x / (1 + exp(x · k))` on eight lanes: `k = −1.702` is quick-GELU, `k = −1` SiLU. A huge
/// exponential makes the quotient zero (as the scalar code's `x / inf`).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn over_one_plus_exp(x: __m256, k: f32) -> __m256 {
    let e = exp(_mm256_mul_ps(x, _mm256_set1_ps(k)));
    _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
}

/// `dst[i] = bf16(quick_gelu(src[i]))` on the whole groups of eight; returns how many.
#[target_feature(enable = "avx2,fma")]
pub(super) fn quick_gelu_to_bf16(src: &[f32], dst: &mut [bf16]) -> usize {
    let mut done = 0;
    for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        // SAFETY: eight values each.
        unsafe {
            let x = _mm256_loadu_ps(s.as_ptr());
            store_bf16(d.as_mut_ptr(), over_one_plus_exp(x, -1.702));
        }
        done += 8;
    }
    done
}

/// `dst[i] = bf16(silu(gate[i]) · up[i])` on the whole groups of eight; returns how many.
#[target_feature(enable = "avx2,fma")]
pub(super) fn silu_gate_to_bf16(gate: &[f32], up: &[f32], dst: &mut [bf16]) -> usize {
    let mut done = 0;
    for ((g, u), d) in gate
        .chunks_exact(8)
        .zip(up.chunks_exact(8))
        .zip(dst.chunks_exact_mut(8))
    {
        // SAFETY: eight values each.
        unsafe {
            let (g, u) = (_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
            store_bf16(d.as_mut_ptr(), _mm256_mul_ps(over_one_plus_exp(g, -1.0), u));
        }
        done += 8;
    }
    done
}

/// `dst[i] = bf16(bf16(src[i]) + residual[i])` on the whole groups of eight; returns how many.
#[target_feature(enable = "avx2")]
pub(super) fn add_rounded_to_bf16(src: &[f32], residual: &[bf16], dst: &mut [bf16]) -> usize {
    let mut done = 0;
    for ((s, r), d) in src
        .chunks_exact(8)
        .zip(residual.chunks_exact(8))
        .zip(dst.chunks_exact_mut(8))
    {
        // SAFETY: eight values each; the first rounding goes through `d` (written, read back
        // and overwritten).
        unsafe {
            let d = d.as_mut_ptr();
            store_bf16(d, _mm256_loadu_ps(s.as_ptr()));
            store_bf16(d, _mm256_add_ps(load_bf16(d), load_bf16(r.as_ptr())));
        }
        done += 8;
    }
    done
}
