//! The AVX2 + FMA tiles of [`super`], for x86-64 CPUs without AVX-512 (AMD Zen 2 and 3, Intel's
//! client cores since Alder Lake, older servers). They read the same panels and honour the same
//! tile contract as the AVX-512 tiles (up to [`MR`] rows of A by one panel of [`NR`] columns),
//! done as sub-tiles of up to 6 rows by 16 columns: 12 of the 16 ymm registers hold sums, the
//! rest the weights of one `k` and a broadcast value of A.
//!
//! bf16 has no arithmetic here, so it is widened to f32 in registers: a bf16 is the upper half
//! of an f32, so the even value of a pair (the low 16 bits of its 32-bit word) widens by a shift
//! and the odd one by masking the low half away. Each product then goes through FMA, exact in
//! f32 before its sum is rounded, and the sums stay f32 over the whole `k`, as on the other
//! tiles (bits differ from AVX512-BF16's pairwise dot product only in the order of roundings).
//!
//! Widening in the tile costs about half the f32 tile's rate, so the bf16 tiles serve only
//! products of up to 12 rows: longer ones have A and each panel's block of `k` widened first and
//! run [`tile_f32`] (`PackedWeight::run_bf16_widened`), and one row (a decoded token, where the
//! weights' bandwidth is the limit) has its own kernel ([`one_row_bf16`]).

use std::arch::x86_64::*;

use super::{MR, NR, Start};

/// Rows per sub-tile: 6 rows × 2 registers of sums.
const ROWS: usize = 6;
/// Columns per sub-tile (two 8-lane registers).
const COLS: usize = 16;

/// Lanes `0..cols` of two 8-lane registers (`cols` ≤ 16), as masks for `maskload`/`maskstore`.
/// (The helpers here are target-feature functions themselves, so that the intrinsics inline
/// into them and they into the tiles: called from plain code, each intrinsic was a call.)
#[target_feature(enable = "avx2")]
#[inline]
fn lane_masks(cols: usize) -> [__m256i; 2] {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let limit = |offset: i32| _mm256_set1_epi32(cols as i32 - offset);
    [
        _mm256_cmpgt_epi32(limit(0), lanes),
        _mm256_cmpgt_epi32(limit(8), lanes),
    ]
}

/// The sums a sub-tile starts from: the bias (or zero) in every row, or what C holds.
///
/// # Safety
/// AVX2; with `Accumulate`, C holds `R` rows of `cols` values at stride `ldc`; a bias holds
/// `cols` values.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn start_sums<const R: usize>(
    start: &Start,
    c: *mut f32,
    ldc: usize,
    masks: &[__m256i; 2],
) -> [[__m256; 2]; R] {
    // SAFETY: the caller's contract; masked lanes are not read.
    unsafe {
        match start {
            Start::Bias(Some(bias)) => {
                let first = [
                    _mm256_maskload_ps(bias.as_ptr(), masks[0]),
                    _mm256_maskload_ps(bias.as_ptr().add(8), masks[1]),
                ];
                [first; R]
            }
            Start::Bias(None) => [[_mm256_setzero_ps(); 2]; R],
            Start::Accumulate => {
                let mut sums = [[_mm256_setzero_ps(); 2]; R];
                for (i, row) in sums.iter_mut().enumerate() {
                    row[0] = _mm256_maskload_ps(c.add(i * ldc), masks[0]);
                    row[1] = _mm256_maskload_ps(c.add(i * ldc + 8), masks[1]);
                }
                sums
            }
        }
    }
}

/// Stores a sub-tile's sums: `R` rows of `cols` (≤ 16) values at stride `ldc`.
///
/// # Safety
/// AVX2; C holds `R` rows of `cols` values at stride `ldc`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_sums<const R: usize>(
    acc: &[[__m256; 2]; R],
    c: *mut f32,
    ldc: usize,
    cols: usize,
    masks: &[__m256i; 2],
) {
    // SAFETY: the caller's contract; masked lanes are not written.
    unsafe {
        for (i, row) in acc.iter().enumerate() {
            if cols == COLS {
                _mm256_storeu_ps(c.add(i * ldc), row[0]);
                _mm256_storeu_ps(c.add(i * ldc + 8), row[1]);
            } else {
                _mm256_maskstore_ps(c.add(i * ldc), masks[0], row[0]);
                _mm256_maskstore_ps(c.add(i * ldc + 8), masks[1], row[1]);
            }
        }
    }
}

/// The bias of columns `from..` of a panel (a panel's bias may hold fewer than 32 values).
fn shifted<'a>(start: &Start<'a>, from: usize) -> Start<'a> {
    match start {
        Start::Bias(Some(bias)) => Start::Bias(Some(&bias[from.min(bias.len())..])),
        Start::Bias(None) => Start::Bias(None),
        Start::Accumulate => Start::Accumulate,
    }
}

/// Runs `sub(row, rows, column, cols)` over the sub-tiles of `rows` × `cols`.
#[inline(always)]
fn for_each_sub_tile(rows: usize, cols: usize, mut sub: impl FnMut(usize, usize, usize, usize)) {
    debug_assert!(rows <= MR && cols <= NR);
    for col in (0..cols).step_by(COLS) {
        for row in (0..rows).step_by(ROWS) {
            sub(row, ROWS.min(rows - row), col, COLS.min(cols - col));
        }
    }
}

/// `R` rows (1..=6) as a const parameter.
macro_rules! by_rows {
    ($rows:expr, $f:ident :: <R> ($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            _ => $f::<6>($($arg),*),
        }
    };
}

/// `C (rows × cols) = A · B (+ bias)` or `C += A · B` for f32: A in place (row stride `lda`),
/// B `kc` rows of a panel (`[k][32]`).
///
/// # Safety
/// AVX2 and FMA; A holds `rows` (≤ 12) rows of `kc` values at stride `lda`; B `kc` rows of 32;
/// C `rows` rows of `cols` (≤ 32) at stride `ldc`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_f32(
    a: *const f32,
    lda: usize,
    rows: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    for_each_sub_tile(rows, cols, |row, rows, col, cols| {
        let start = shifted(&start, col);
        let (a, b, c) = (
            a.wrapping_add(row * lda),
            b.wrapping_add(col),
            c.wrapping_add(row * ldc + col),
        );
        // SAFETY: the caller's contract, for this sub-tile's rows and columns.
        unsafe { by_rows!(rows, sub_tile_f32::<R>(a, lda, b, kc, c, ldc, cols, start)) }
    });
}

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn sub_tile_f32<const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    let masks = lane_masks(cols);
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = start_sums::<R>(&start, c, ldc, &masks);
        for kk in 0..kc {
            let w0 = _mm256_loadu_ps(b.add(kk * NR));
            let w1 = _mm256_loadu_ps(b.add(kk * NR + 8));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                row[0] = _mm256_fmadd_ps(x, w0, row[0]);
                row[1] = _mm256_fmadd_ps(x, w1, row[1]);
            }
        }
        store_sums(&acc, c, ldc, cols, &masks);
    }
}

/// `C (rows × cols) = A · B (+ bias)` or `C += A · B` for bf16 A and panel, summed in f32. Pair
/// `q` of row `i` of A is the 32-bit word at `a + i·row_stride + q·pair_stride` (in bf16
/// values): A in place has strides `(lda, 2)`, A packed per tile as `[pair][row]` `(2, 2·MR)`.
/// B is `pairs` pairs of a panel (`[pair][32][2]`).
///
/// # Safety
/// AVX2 and FMA; A holds `rows` (≤ 12) rows of `pairs` pairs at these strides; B `pairs`
/// pairs of 32 columns; C `rows` rows of `cols` (≤ 32) at stride `ldc`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_bf16(
    a: *const u16,
    (row_stride, pair_stride): (usize, usize),
    rows: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    if rows == 1 {
        // SAFETY: the caller's contract, for one row.
        return unsafe { one_row_bf16(a, pair_stride, b, pairs, c, cols, start) };
    }
    for_each_sub_tile(rows, cols, |row, rows, col, cols| {
        let start = shifted(&start, col);
        let a = a.wrapping_add(row * row_stride);
        let (b, c) = (b.wrapping_add(2 * col), c.wrapping_add(row * ldc + col));
        let strides = (row_stride, pair_stride);
        // SAFETY: the caller's contract, for this sub-tile's rows and columns.
        unsafe {
            by_rows!(
                rows,
                sub_tile_bf16::<R>(a, strides, b, pairs, c, ldc, cols, start)
            )
        }
    });
}

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn sub_tile_bf16<const R: usize>(
    a: *const u16,
    (row_stride, pair_stride): (usize, usize),
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    let masks = lane_masks(cols);
    // SAFETY: the caller's contract; words of A are read unaligned.
    unsafe {
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = start_sums::<R>(&start, c, ldc, &masks);
        let word = |i: usize, q: usize| {
            let at = a.add(i * row_stride + q * pair_stride) as *const i32;
            _mm256_set1_epi32(at.read_unaligned())
        };
        for q in 0..pairs {
            let w = b.add(q * 2 * NR) as *const __m256i;
            // the even `k` of the pair for every row, then the odd one: 12 sums, two weights
            // and one value of A in registers at a time
            let even = |x: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x));
            let (w0, w1) = (
                even(_mm256_loadu_si256(w)),
                even(_mm256_loadu_si256(w.add(1))),
            );
            for (i, row) in acc.iter_mut().enumerate() {
                let x = even(word(i, q));
                row[0] = _mm256_fmadd_ps(x, w0, row[0]);
                row[1] = _mm256_fmadd_ps(x, w1, row[1]);
            }
            let odd = |x: __m256i| _mm256_castsi256_ps(_mm256_and_si256(x, high));
            let (w0, w1) = (
                odd(_mm256_loadu_si256(w)),
                odd(_mm256_loadu_si256(w.add(1))),
            );
            for (i, row) in acc.iter_mut().enumerate() {
                let x = odd(word(i, q));
                row[0] = _mm256_fmadd_ps(x, w0, row[0]);
                row[1] = _mm256_fmadd_ps(x, w1, row[1]);
            }
        }
        store_sums(&acc, c, ldc, cols, &masks);
    }
}

/// One row of A (a decoded token) over all 32 columns of a panel: bandwidth-bound, so each of
/// the panel's 128-byte pairs is read once, in order (as two 16-column sub-tiles it was read in
/// two strided passes), and the sums alternate between two sets over the pairs, so that no
/// multiply-add waits on the one before (one set held decoding to 65% of the bandwidth).
///
/// # Safety
/// As [`tile_bf16`] for one row.
#[target_feature(enable = "avx2,fma")]
unsafe fn one_row_bf16(
    a: *const u16,
    pair_stride: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    cols: usize,
    start: Start,
) {
    let (lo, hi) = (
        lane_masks(cols.min(COLS)),
        lane_masks(cols.saturating_sub(COLS)),
    );
    let masks = [lo[0], lo[1], hi[0], hi[1]];
    // SAFETY: the caller's contract; masked lanes are neither read nor written.
    unsafe {
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut sums = [[_mm256_setzero_ps(); 4]; 2];
        match start {
            Start::Bias(Some(bias)) => {
                for (j, lanes) in sums[0].iter_mut().enumerate() {
                    *lanes = _mm256_maskload_ps(bias.as_ptr().add(8 * j), masks[j]);
                }
            }
            Start::Bias(None) => {}
            Start::Accumulate => {
                for (j, lanes) in sums[0].iter_mut().enumerate() {
                    *lanes = _mm256_maskload_ps(c.add(8 * j), masks[j]);
                }
            }
        }
        let step = |set: &mut [__m256; 4], q: usize| {
            let word = _mm256_set1_epi32((a.add(q * pair_stride) as *const i32).read_unaligned());
            let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(word));
            let odd = _mm256_castsi256_ps(_mm256_and_si256(word, high));
            let w = b.add(q * 2 * NR) as *const __m256i;
            for (j, lanes) in set.iter_mut().enumerate() {
                let raw = _mm256_loadu_si256(w.add(j));
                let (we, wo) = (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw)),
                    _mm256_castsi256_ps(_mm256_and_si256(raw, high)),
                );
                *lanes = _mm256_fmadd_ps(odd, wo, _mm256_fmadd_ps(even, we, *lanes));
            }
        };
        let [first, second] = &mut sums;
        let mut q = 0;
        while q + 2 <= pairs {
            step(first, q);
            step(second, q + 1);
            q += 2;
        }
        if q < pairs {
            step(first, q);
        }
        for j in 0..4 {
            let total = _mm256_add_ps(first[j], second[j]);
            if cols == NR {
                _mm256_storeu_ps(c.add(8 * j), total);
            } else {
                _mm256_maskstore_ps(c.add(8 * j), masks[j], total);
            }
        }
    }
}

/// Widens `pairs` pairs of a bf16 panel (`[pair][32][2]`) into f32 rows of `k` (`[k][32]`, as
/// the f32 tiles read a panel).
///
/// # Safety
/// AVX2; `src` holds `pairs · 64` values, `dst` room for `pairs · 64`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn widen_panel(src: *const u16, pairs: usize, dst: *mut f32) {
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    // SAFETY: the caller's contract; each pair is 64 values in and out.
    unsafe {
        for q in 0..pairs {
            let from = src.add(q * 2 * NR) as *const __m256i;
            let (even, odd) = (dst.add(2 * q * NR), dst.add((2 * q + 1) * NR));
            for j in 0..NR / 8 {
                let x = _mm256_loadu_si256(from.add(j));
                _mm256_storeu_ps(
                    even.add(8 * j),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x)),
                );
                _mm256_storeu_ps(
                    odd.add(8 * j),
                    _mm256_castsi256_ps(_mm256_and_si256(x, high)),
                );
            }
        }
    }
}
