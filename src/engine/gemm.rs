//! A CPU matrix-matrix kernel for prompts and the vision tower: `C = A · Wᵀ (+ bias)` with the
//! weight `W` (`n × k`, a linear layer's layout) packed once into panels of 32 output columns.
//!
//! candle's CPU matmul goes through the `gemm` crate, which has AVX2 kernels only and no native
//! bf16 arithmetic (bf16 is widened to f32 first). On CPUs with AVX-512 this kernel keeps 12×32
//! output tiles in the 32 vector registers: f32 with FMA, bf16 with the AVX512-BF16 dot-product
//! instruction (pairs of bf16 products summed into f32 lanes), twice the f32 rate. Both
//! accumulate in f32 over the whole `k` before the result is rounded once to the output dtype.
//! Where the CPU has AMX-BF16 (and Linux grants it), bf16 products of 32 rows or more run their
//! 32 × 32 blocks on the tiles ([`super::amx`]) and only the remainders on the AVX-512 tiles.
//! CPUs with AVX2 and FMA but no AVX-512 run the same loops on 6 × 16 sub-tiles of the 16 ymm
//! registers ([`avx2`]), bf16 widened to f32 there. The kernel is chosen at run time
//! ([`Kernel::detect`]); without AVX2 callers fall back to candle.
//!
//! Loops: threads split the panels; each walks `k` in blocks, then groups of panels, then rows in
//! blocks of [`MC`] (bf16: copied as `[pair][row]` per 12-row tile, one contiguous stream for the
//! broadcasts), then the panels of the group, then the tiles. One row (decoding) streams each
//! panel whole instead. The block sizes were measured on a 2-core Zen 4: bf16 reaches 350–390
//! GFLOP/s on the vision tower's shapes, torch's own bf16 matmul 386–407 on the same machine.

use half::bf16;
use rayon::prelude::*;

use super::amx;
use super::weight_buffer::{Placement, WeightBuffer};

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Output columns per panel (two 16-lane registers).
const NR: usize = 32;
/// Rows per register tile: 24 accumulators + 2 weight registers + 1 broadcast fit in 32.
const MR: usize = 12;
/// Rows whose `k` block is reused while the panels of a group go by.
const MC: usize = 96;
/// Panels per group: their `k` block is reused while the row blocks go by.
const NC_PANELS: usize = 16;
/// bf16 `k` values per block: the whole `k` of every decoder and vision layer but the decoder's
/// down projection (8960), so C is written once (smaller blocks measured slower).
const KC_BF16: usize = 2048;
/// f32 `k` values per block (attention only): one panel's block is 32 × 128 × 4 bytes = 16 KiB.
const KC_F32: usize = 128;
/// `k` values per block of the AVX2 kernel's bf16 products, whose panels are widened to f32 a
/// block at a time (32 KiB, L1) and whose rows of A, widened, take 96 KiB per [`MC`] rows (L2).
const KC_WIDE: usize = 256;

/// Which instruction set the kernel can use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512F: f32 tiles.
    Avx512,
    /// AVX-512F and AVX512-BF16: f32 and bf16 tiles.
    Avx512Bf16,
    /// AVX2 and FMA, no AVX-512: f32 and bf16 tiles, bf16 widened to f32 in registers
    /// ([`avx2`]).
    Avx2,
}

impl Kernel {
    /// The best kernel this CPU runs, or `None` (no AVX2 and FMA: callers use candle's matmul).
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                if std::arch::is_x86_feature_detected!("avx512bf16") {
                    return Some(Self::Avx512Bf16);
                }
                return Some(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Self::Avx2);
            }
        }
        None
    }

    /// Whether bf16 weights pack and multiply on this kernel.
    pub fn has_bf16(self) -> bool {
        matches!(self, Self::Avx512Bf16 | Self::Avx2)
    }
}

/// The weight's values, packed per panel: f32 as `[panel][k][32]`, bf16 as
/// `[panel][k / 2][32][2]` (the two `k` neighbours of a column side by side, as the dot-product
/// instruction reads them). Columns past `n` and the odd `k` past the end are zero.
enum Panels {
    F32(WeightBuffer<f32>),
    Bf16(WeightBuffer<u16>),
}

/// A weight `W` (`n × k`) packed for [`PackedWeight::matmul_bf16_then`] or
/// [`PackedWeight::matmul_f32_serial`].
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `k` rounded up to the packing's step (2 for bf16).
    k_padded: usize,
    panels: Panels,
    /// The tiles that multiply it (the panels are the same for every kernel).
    kernel: Kernel,
}

/// How one element of the source matrix is addressed: `W[r][c]` at `r * row_stride + c * col_stride`.
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub row: usize,
    pub col: usize,
}

impl Strides {
    /// A contiguous row-major matrix with `cols` columns.
    pub fn row_major(cols: usize) -> Self {
        Self { row: cols, col: 1 }
    }
}

/// Writes rows `rows` of `W` (`k` columns, addressed through `s`) into one zeroed bf16 panel,
/// laid out `[pair of k][32 rows][2]`. Contiguous sources get loops the compiler vectorises:
/// a transposed one (attention's values: `s.row == 1`) interleaves two runs of `W`'s columns
/// per pair, a row-major one (its keys: `s.col == 1`) moves each pair as one 32-bit word. Other
/// strides take the element-by-element loop, which was 8% of attention's time for those two.
fn fill_bf16_panel(
    dst: &mut [u16],
    w: &[bf16],
    rows: std::ops::Range<usize>,
    k: usize,
    s: Strides,
) {
    let cols = rows.len();
    if cols == 0 {
        return;
    }
    let pairs = k / 2;
    if s.row == 1 {
        for (q, out) in dst.chunks_exact_mut(2 * NR).take(k.div_ceil(2)).enumerate() {
            let even = &w[rows.start + 2 * q * s.col..][..cols];
            let out = &mut out[..2 * cols];
            if 2 * q + 1 < k {
                let odd = &w[rows.start + (2 * q + 1) * s.col..][..cols];
                for ((pair, e), o) in out.chunks_exact_mut(2).zip(even).zip(odd) {
                    pair[0] = e.to_bits();
                    pair[1] = o.to_bits();
                }
            } else {
                for (pair, e) in out.chunks_exact_mut(2).zip(even) {
                    pair[0] = e.to_bits();
                }
            }
        }
    } else if s.col == 1 {
        let word = |lo: bf16, hi: bf16| u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16);
        let source: Vec<&[bf16]> = rows.clone().map(|r| &w[r * s.row..r * s.row + k]).collect();
        let words: &mut [u32] = bytemuck::cast_slice_mut(&mut dst[..pairs * 2 * NR]);
        for (q, out) in words.chunks_exact_mut(NR).enumerate() {
            for (x, row) in out.iter_mut().zip(&source) {
                *x = word(row[2 * q], row[2 * q + 1]);
            }
        }
        if k % 2 == 1 {
            let out = &mut dst[pairs * 2 * NR..];
            for (c, row) in source.iter().enumerate() {
                out[2 * c] = row[k - 1].to_bits();
            }
        }
    } else {
        // `k` outermost: the panel's source rows stay in cache while `k` advances
        for kk in 0..k {
            let out = &mut dst[(kk / 2) * 2 * NR + kk % 2..];
            for (c, r) in rows.clone().enumerate() {
                out[c * 2] = w[r * s.row + kk * s.col].to_bits();
            }
        }
    }
}

impl PackedWeight {
    /// Packs `W` (`n × k`, element `(r, c)` at `r * s.row + c * s.col` of `w`) in f32; `None`
    /// when this CPU lacks AVX-512F.
    #[cfg(test)]
    pub fn pack_f32(
        w: &[f32],
        n: usize,
        k: usize,
        s: Strides,
        placement: Placement,
    ) -> Option<Self> {
        Self::pack_f32_extended(w, (n, k), (n, k), s, placement)
    }

    /// [`Self::pack_f32`] of `W` (`n × k`) zero-extended to `n_total × k_total`: a product over
    /// the extension adds exact zeros.
    pub fn pack_f32_extended(
        w: &[f32],
        (n, k): (usize, usize),
        (n_total, k_total): (usize, usize),
        s: Strides,
        placement: Placement,
    ) -> Option<Self> {
        let kernel = Kernel::detect()?;
        assert!(
            n <= n_total && k <= k_total,
            "extension smaller than the matrix"
        );
        let panels = n_total.div_ceil(NR);
        let mut out = WeightBuffer::zeroed(panels * k_total * NR, placement);
        out.par_chunks_mut(k_total * NR)
            .enumerate()
            .for_each(|(p, dst)| {
                for c in 0..NR.min(n.saturating_sub(p * NR)) {
                    let r = p * NR + c;
                    for kk in 0..k {
                        dst[kk * NR + c] = w[r * s.row + kk * s.col];
                    }
                }
            });
        Some(Self {
            n: n_total,
            k: k_total,
            k_padded: k_total,
            panels: Panels::F32(out),
            kernel,
        })
    }

    /// Packs `W` in bf16 (addressed as in [`Self::pack_f32`]); `None` when this CPU lacks
    /// AVX512-BF16.
    pub fn pack_bf16(
        w: &[bf16],
        n: usize,
        k: usize,
        s: Strides,
        placement: Placement,
    ) -> Option<Self> {
        Self::pack_bf16_extended(w, (n, k), (n, k), s, placement)
    }

    /// [`Self::pack_bf16`] of `W` (`n × k`) zero-extended to `n_total × k_total`: a product over
    /// the extension adds exact zeros. Attention extends its keys and head size to whole AMX
    /// blocks this way ([`tile_multiple`]).
    pub fn pack_bf16_extended(
        w: &[bf16],
        (n, k): (usize, usize),
        (n_total, k_total): (usize, usize),
        s: Strides,
        placement: Placement,
    ) -> Option<Self> {
        let kernel = Kernel::detect().filter(|k| k.has_bf16())?;
        assert!(
            n <= n_total && k <= k_total,
            "extension smaller than the matrix"
        );
        let panels = n_total.div_ceil(NR);
        let k_padded = k_total.next_multiple_of(2);
        let mut out = WeightBuffer::zeroed(panels * k_padded * NR, placement);
        out.par_chunks_mut(k_padded * NR)
            .enumerate()
            .for_each(|(p, dst)| {
                let cols = NR.min(n.saturating_sub(p * NR));
                fill_bf16_panel(dst, w, p * NR..p * NR + cols, k, s);
            });
        Some(Self {
            n: n_total,
            k: k_total,
            k_padded,
            panels: Panels::Bf16(out),
            kernel,
        })
    }

    /// Packs the `n × k` matrix whose row `r` the source writes into a buffer of `k` values
    /// (`row(r, buffer)`), in bf16 (quantized weights are unpacked this way for a prompt: a
    /// whole row converts in one vectorised loop); `None` when this CPU lacks AVX512-BF16.
    pub fn pack_bf16_rows(
        n: usize,
        k: usize,
        placement: Placement,
        row: impl Fn(usize, &mut [bf16]) + Sync,
    ) -> Option<Self> {
        let kernel = Kernel::detect().filter(|k| k.has_bf16())?;
        let panels = n.div_ceil(NR);
        let k_padded = k.next_multiple_of(2);
        let mut out = WeightBuffer::<u16>::zeroed(panels * k_padded * NR, placement);
        out.par_chunks_mut(k_padded * NR).enumerate().for_each_init(
            // the panel's rows, unpacked one after the other (an odd `k` ends in a zero)
            || vec![bf16::ZERO; NR * k_padded],
            |rows, (p, dst)| {
                let cols = NR.min(n - p * NR);
                for (c, values) in rows.chunks_exact_mut(k_padded).take(cols).enumerate() {
                    row(p * NR + c, &mut values[..k]);
                }
                // then written pair by pair, each pair's 32 columns in one run: written row by
                // row instead, every row touched every line of the panel (a third of a q8_0
                // prompt's unpacking time)
                for (q, out) in dst.chunks_exact_mut(2 * NR).enumerate() {
                    for (c, pair) in out.chunks_exact_mut(2).take(cols).enumerate() {
                        let at = c * k_padded + 2 * q;
                        pair[0] = rows[at].to_bits();
                        pair[1] = rows[at + 1].to_bits();
                    }
                }
            },
        );
        Some(Self {
            n,
            k,
            k_padded,
            panels: Panels::Bf16(out),
            kernel,
        })
    }

    /// The same weight multiplied by another kernel's tiles (tests run the AVX2 tiles on CPUs
    /// with AVX-512 this way). The CPU must run `kernel`.
    #[cfg(test)]
    fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Whether a product of `m` rows of A runs on AMX.
    fn uses_amx(&self, m: usize) -> bool {
        self.kernel != Kernel::Avx2 && uses_amx(m)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `r` of `W` (`k` values) read back out of bf16 panels into `out`: the embedding
    /// lookup of a tied output layer, which is held packed only. `None` for f32 panels.
    pub fn row_bf16(&self, r: usize, out: &mut [bf16]) -> Option<()> {
        let Panels::Bf16(panels) = &self.panels else {
            return None;
        };
        assert!(
            r < self.n && out.len() == self.k,
            "row {r} of {} into {} values (k = {})",
            self.n,
            out.len(),
            self.k
        );
        let (p, c) = (r / NR, r % NR);
        let panel = &panels[p * self.k_padded * NR..(p + 1) * self.k_padded * NR];
        for (pair, values) in panel.chunks_exact(2 * NR).zip(out.chunks_mut(2)) {
            for (v, &bits) in values.iter_mut().zip(&pair[2 * c..2 * c + 2]) {
                *v = bf16::from_bits(bits);
            }
        }
        Some(())
    }

    /// `C (m × cols) = A (m × k_used) · W[..cols, ..k_used]ᵀ` with f32 weights on the calling
    /// thread: A row-major with row stride `lda`, C with row stride `ldc`. Without bias, for the first `cols`
    /// columns of C and the first `k_used` columns of A and W (the rest taken as zero).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_f32_serial(
        &self,
        a: &[f32],
        m: usize,
        lda: usize,
        out: &mut [f32],
        ldc: usize,
        cols: usize,
        k_used: usize,
    ) {
        let cols = cols.min(self.n);
        let k_used = k_used.min(self.k);
        self.check(m, (a.len(), lda, k_used), out.len(), ldc, cols, None);
        let c = SharedOut(out.as_mut_ptr());
        // SAFETY: C holds `m` rows of `cols` columns (checked); one thread.
        unsafe { self.run_f32(a, m, lda, None, &c, ldc, cols, k_used, 0, cols.div_ceil(NR)) }
    }

    /// `A · Wᵀ + bias` for bf16 `A` and weights, accumulated in f32, split over rayon's threads
    /// by panels. Each thread calls `finish(row, first_column, values)` for every row of the
    /// columns it computed, while they are still in its cache: rounding to bf16 or an activation
    /// costs no second pass over the threads. On AMX that happens per block of 32 rows and a
    /// group of panels as soon as their sums are final; `out` (`m` rows at stride `ldc`) is the
    /// products' working space, and what it holds afterwards is unspecified. Threads get whole
    /// groups of `group` panels (`group · 32` columns), so an epilogue can pair columns inside a
    /// group.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_then(
        &self,
        a: &[bf16],
        m: usize,
        lda: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        ldc: usize,
        group: usize,
        finish: impl Fn(usize, usize, &[f32]) + Sync,
    ) {
        self.check(m, (a.len(), lda, self.k), out.len(), ldc, self.n, bias);
        let padded = self.pad_odd_k(a, m, lda);
        let (a, lda) = match &padded {
            Some(v) => (v.as_slice(), self.k_padded),
            None => (a, lda),
        };
        let c = SharedOut(out.as_mut_ptr());
        let panels = self.n.div_ceil(NR);
        let group = group.max(1);
        // A is packed once for all threads (each used to pack it for every group of panels); the
        // AVX2 kernel widens it to f32 instead
        let avx2 = self.kernel == Kernel::Avx2;
        let packed_a = (m > MR && !avx2 && !self.uses_amx(m))
            .then(|| PackedRows::pack(a, m, lda, self.k_padded, true));
        let wide_a = (m > MR && avx2).then(|| widen_rows(a, m, lda, self.k_padded, true));
        for_each_thread(panels.div_ceil(group), |g0, g1| {
            let (p0, p1) = (g0 * group, (g1 * group).min(panels));
            let (k_used, packed_a) = (self.k_padded, packed_a.as_ref());
            let streamed = (Some(&finish as Done<'_>), group);
            let finished = if let Some(wide) = &wide_a {
                // SAFETY: C was checked to hold `m` rows; each thread writes only its panels'
                // columns; the kernel is AVX2, which this CPU runs.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let (a, sizes) = ((wide.as_slice(), k_used), (self.n, k_used));
                    self.run_bf16_widened(a, m, bias, (&c, ldc), sizes, (p0, p1))
                };
                false
            } else {
                // SAFETY: C was checked to hold `m` rows; each thread writes only its panels'
                // columns.
                unsafe {
                    self.run_bf16(
                        a,
                        m,
                        lda,
                        bias,
                        &c,
                        ldc,
                        self.n,
                        k_used,
                        (p0, p1),
                        packed_a,
                        streamed,
                    )
                }
            };
            if finished {
                return;
            }
            let cols = p0 * NR..(p1 * NR).min(self.n);
            for row in 0..m {
                // SAFETY: these columns of C are this thread's and fully written above.
                let values = unsafe { c.slice(row * ldc + cols.start, cols.len()) };
                finish(row, cols.start, values);
            }
        });
        if let Some(wide) = wide_a {
            WIDE_ROWS.set(wide);
        }
    }

    /// As [`Self::matmul_bf16_then`] on the calling thread only, without bias, for the first `cols`
    /// columns of C and the first `k_used` columns of A and W. Rows of A must be readable up to
    /// `k_used` rounded up to even (the value there multiplies a zero weight or must be zero).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16_serial(
        &self,
        a: &[bf16],
        m: usize,
        lda: usize,
        out: &mut [f32],
        ldc: usize,
        cols: usize,
        k_used: usize,
    ) {
        let cols = cols.min(self.n);
        let k_used = k_used.min(self.k).next_multiple_of(2);
        self.check(m, (a.len(), lda, k_used), out.len(), ldc, cols, None);
        let c = SharedOut(out.as_mut_ptr());
        // SAFETY: C holds `m` rows of `cols` columns (checked); one thread.
        unsafe {
            let panels = (0, cols.div_ceil(NR));
            self.run_bf16(
                a,
                m,
                lda,
                None,
                &c,
                ldc,
                cols,
                k_used,
                panels,
                None,
                (None, 1),
            );
        }
    }

    /// With an odd `k` the last pair would read one value past a row of A: such A goes through a
    /// copy whose rows end in a zero.
    fn pad_odd_k(&self, a: &[bf16], m: usize, lda: usize) -> Option<Vec<bf16>> {
        (self.k % 2 == 1).then(|| {
            let kp = self.k_padded;
            let mut v = vec![bf16::ZERO; m * kp];
            for r in 0..m {
                v[r * kp..r * kp + self.k].copy_from_slice(&a[r * lda..r * lda + self.k]);
            }
            v
        })
    }

    /// The loops of one thread over panels `p0..p1` (f32).
    ///
    /// # Safety
    /// The CPU runs this weight's kernel; C holds `m` rows at stride `ldc` covering these
    /// panels' columns, which no other thread writes meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_f32(
        &self,
        a: &[f32],
        m: usize,
        lda: usize,
        bias: Option<&[f32]>,
        c: &SharedOut,
        ldc: usize,
        n_cols: usize,
        k_used: usize,
        p0: usize,
        p1: usize,
    ) {
        let Panels::F32(panels) = &self.panels else {
            panic!("f32 matmul on bf16-packed weights");
        };
        // one row tile: no reuse to block for; stream each panel whole
        let kc_step = if m <= MR { k_used.max(1) } else { KC_F32 };
        let block = |p: usize, k0: usize, _| panels[p * self.k * NR + k0 * NR..].as_ptr();
        // SAFETY: the caller's contract; each block is a panel's rows of `k` from `k0`.
        unsafe {
            let sizes = (n_cols, k_used, kc_step);
            self.run_f32_blocks((a, lda), m, bias, (c, ldc), sizes, (p0, p1), block)
        }
    }

    /// The loops of one thread over panels `p0..p1` for the AVX2 kernel's bf16 products, whose
    /// f32 tiles run faster than widening bf16 inside the tile (`avx2_tile_rates`: 90–98
    /// against 43–54 GFLOP/s a core): A comes widened (`wide`, row-major at stride `lda`), and
    /// each panel's block of `k` is widened into a buffer once per [`MC`] rows.
    ///
    /// # Safety
    /// As [`Self::run_f32`], for the AVX2 kernel; `k_used` is even.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_bf16_widened(
        &self,
        (wide, lda): (&[f32], usize),
        m: usize,
        bias: Option<&[f32]>,
        (c, ldc): (&SharedOut, usize),
        (n_cols, k_used): (usize, usize),
        (p0, p1): (usize, usize),
    ) {
        let Panels::Bf16(panels) = &self.panels else {
            panic!("bf16 matmul on f32-packed weights");
        };
        let kp = self.k_padded;
        let mut buffer = vec![0f32; KC_WIDE * NR];
        let block = |p: usize, k0: usize, kc: usize| {
            // SAFETY: the panel holds `kp` values of `k` (pairs) from `k0`, the buffer room
            // for `kc` ≤ KC_WIDE rows of 32; AVX2 (the caller's contract).
            unsafe {
                let src = panels[p * kp * NR + k0 * NR..].as_ptr();
                avx2::widen_panel(src, kc / 2, buffer.as_mut_ptr());
            }
            buffer.as_ptr()
        };
        // SAFETY: the caller's contract; each block is a panel's rows of `k` from `k0`.
        unsafe {
            let sizes = (n_cols, k_used, KC_WIDE);
            self.run_f32_blocks((wide, lda), m, bias, (c, ldc), sizes, (p0, p1), block)
        }
    }

    /// The f32 loops of one thread over panels `p0..p1`: `k` in blocks of `kc_step`, then
    /// groups of [`NC_PANELS`] panels, then [`MC`] rows, then the panels of the group, then the
    /// tiles of [`MR`] rows. `block(p, k0, kc)` gives panel `p`'s `kc` rows of `k` from `k0`
    /// (`[k][32]` f32), once per panel and block of rows.
    ///
    /// # Safety
    /// As [`Self::run_f32`]; each block holds `kc` rows of 32 values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_f32_blocks(
        &self,
        (a, lda): (&[f32], usize),
        m: usize,
        bias: Option<&[f32]>,
        (c, ldc): (&SharedOut, usize),
        (n_cols, k_used, kc_step): (usize, usize, usize),
        (p0, p1): (usize, usize),
        mut block: impl FnMut(usize, usize, usize) -> *const f32,
    ) {
        for k0 in (0..k_used).step_by(kc_step) {
            let kc = kc_step.min(k_used - k0);
            for g0 in (p0..p1).step_by(NC_PANELS) {
                for m0 in (0..m).step_by(MC) {
                    let rows = m0..(m0 + MC).min(m);
                    for p in g0..(g0 + NC_PANELS).min(p1) {
                        let b = block(p, k0, kc);
                        let cols = NR.min(n_cols - p * NR);
                        for row in rows.clone().step_by(MR) {
                            let start = if k0 == 0 {
                                Start::Bias(bias.map(|b| &b[p * NR..p * NR + cols]))
                            } else {
                                Start::Accumulate
                            };
                            // SAFETY: rows `row..` of A exist at `k0..k0+kc`; the block holds
                            // `kc` rows of 32; the C tile is inside this thread's columns
                            // (caller's contract).
                            unsafe {
                                tile_f32(
                                    self.kernel,
                                    a.as_ptr().add(row * lda + k0),
                                    lda,
                                    MR.min(rows.end - row),
                                    b,
                                    kc,
                                    c.0.add(row * ldc + p * NR),
                                    ldc,
                                    cols,
                                    start,
                                )
                            };
                        }
                    }
                }
            }
        }
    }

    /// The loops of one thread over panels `p0..p1` (bf16).
    ///
    /// # Safety
    /// As [`Self::run_f32`], plus AVX512-BF16; `k_used` is even and rows of A are readable up
    /// to it.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_bf16(
        &self,
        a: &[bf16],
        m: usize,
        lda: usize,
        bias: Option<&[f32]>,
        c: &SharedOut,
        ldc: usize,
        n_cols: usize,
        k_used: usize,
        (p0, p1): (usize, usize),
        packed_a: Option<&PackedRows>,
        finish: (Option<Done<'_>>, usize),
    ) -> bool {
        let Panels::Bf16(panels) = &self.panels else {
            panic!("bf16 matmul on f32-packed weights");
        };
        let kp = self.k_padded;
        let a16 = a.as_ptr() as *const u16;
        if self.uses_amx(m) {
            let amx = (amx::TILES, true);
            // SAFETY: the caller's contract, and AMX is enabled.
            return unsafe {
                self.run_bf16_amx(
                    a16,
                    m,
                    lda,
                    bias,
                    c,
                    ldc,
                    n_cols,
                    k_used,
                    (p0, p1),
                    amx,
                    finish,
                )
            };
        }
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx2 && m > MR {
            // a product on one thread (attention): A and each panel widened to f32 here, as
            // `matmul_bf16_then` does for all threads (`attention_rate` at 1,196 patches: see
            // `run_bf16_widened`)
            let wide = widen_rows(a, m, lda, k_used, false);
            // SAFETY: the caller's contract; `wide` holds `m` rows of `k_used`.
            unsafe {
                let sizes = (n_cols, k_used);
                self.run_bf16_widened((&wide, k_used), m, bias, (c, ldc), sizes, (p0, p1))
            };
            WIDE_ROWS.set(wide);
            return false;
        }
        let Some(packed_a) = packed_a.filter(|_| m > MR) else {
            // A read in place, each panel whole: one row tile (decoding), or a product on one
            // thread (attention), where packing A would cost as much as the few panels it meets
            let pairs = 0..k_used / 2;
            // SAFETY: the caller's contract.
            unsafe {
                self.run_bf16_in_place(a16, 0..m, lda, bias, (c, ldc), n_cols, pairs, p0..p1)
            };
            return false;
        };
        // A packed per row tile as [pair][row] by the caller, so a tile reads one stream
        for k0 in (0..k_used).step_by(KC_BF16) {
            let pairs = KC_BF16.min(k_used - k0) / 2;
            for g0 in (p0..p1).step_by(NC_PANELS) {
                for m0 in (0..m).step_by(MC) {
                    let tiles = MC.min(m - m0).div_ceil(MR);
                    for p in g0..(g0 + NC_PANELS).min(p1) {
                        let b = &panels[p * kp * NR + k0 * NR..];
                        let cols = NR.min(n_cols - p * NR);
                        for t in 0..tiles {
                            let row = m0 + t * MR;
                            let rows = MR.min(m - row);
                            let start = if k0 == 0 {
                                Start::Bias(bias.map(|b| &b[p * NR..p * NR + cols]))
                            } else {
                                Start::Accumulate
                            };
                            let tile = packed_a.tile(k0, row / MR, k_used);
                            // SAFETY: the packed tile holds MR rows of `pairs`; the C tile is
                            // inside this thread's columns and the first `rows` rows.
                            unsafe {
                                tile_bf16_packed(
                                    self.kernel,
                                    tile.as_ptr(),
                                    b.as_ptr(),
                                    pairs,
                                    c.0.add(row * ldc + p * NR),
                                    ldc,
                                    rows,
                                    cols,
                                    start,
                                )
                            };
                        }
                    }
                }
            }
        }
        false
    }

    /// AVX-512 tiles over `rows` of A read in place (row stride `lda`), for the pairs of `k` in
    /// `pairs` and the panels in `panels`: from the bias when the pairs start at 0, else adding
    /// to C.
    ///
    /// # Safety
    /// As [`Self::run_bf16`] for these rows, panels and pairs.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_bf16_in_place(
        &self,
        a: *const u16,
        rows: std::ops::Range<usize>,
        lda: usize,
        bias: Option<&[f32]>,
        (c, ldc): (&SharedOut, usize),
        n_cols: usize,
        pairs: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
    ) {
        let Panels::Bf16(packed) = &self.panels else {
            panic!("bf16 matmul on f32-packed weights");
        };
        if pairs.is_empty() {
            return;
        }
        for p in panels {
            let cols = NR.min(n_cols - p * NR);
            for row in rows.clone().step_by(MR) {
                let start = if pairs.start == 0 {
                    Start::Bias(bias.map(|b| &b[p * NR..p * NR + cols]))
                } else {
                    Start::Accumulate
                };
                // SAFETY: as in `run_f32`; pairs stay inside rows (caller).
                unsafe {
                    tile_bf16(
                        self.kernel,
                        a.add(row * lda + 2 * pairs.start),
                        lda,
                        MR.min(rows.end - row),
                        packed[p * self.k_padded * NR + pairs.start * 2 * NR..].as_ptr(),
                        pairs.len(),
                        c.0.add(row * ldc + p * NR),
                        ldc,
                        cols,
                        start,
                    )
                };
            }
        }
    }

    /// [`Self::run_bf16`] on AMX: 32 × 32 blocks over the whole panels and the rows and pairs of
    /// `k` that fill them, in groups of panels that stay in L2 while the rows pass; the rest (the
    /// last pairs, a narrow last panel) on the AVX-512 tiles, A read in place.
    ///
    /// With `done`, when every panel is whole and every pair of `k` fills the blocks (the
    /// model's shapes), each block row of a group is handed to `done(row, first_column,
    /// values)` as soon as its sums are final, while they are in this core's cache, and returns
    /// true; a product in one pass over `k` then keeps its sums in a small buffer and never
    /// writes C. Otherwise (and without `done`) C receives every sum and it returns false.
    /// Groups hold whole multiples of `finish_group` panels.
    ///
    /// `blocks` are [`amx::TILES`] (run with this thread's tiles configured), or in tests their
    /// models.
    ///
    /// # Safety
    /// As [`Self::run_bf16`]; [`amx::enabled`] returned true, or `blocks` are not the AMX ones.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_bf16_amx(
        &self,
        a: *const u16,
        m: usize,
        lda: usize,
        bias: Option<&[f32]>,
        c: &SharedOut,
        ldc: usize,
        n_cols: usize,
        k_used: usize,
        (p0, p1): (usize, usize),
        (blocks, tiles_configured): (amx::Blocks, bool),
        (done, finish_group): (Option<Done<'_>>, usize),
    ) -> bool {
        let Panels::Bf16(packed) = &self.panels else {
            panic!("bf16 matmul on f32-packed weights");
        };
        let pairs = k_used / 2;
        let main_pairs = pairs / amx::PAIRS_PER_STEP * amx::PAIRS_PER_STEP;
        let main_rows = m / amx::BLOCK * amx::BLOCK;
        // panels p0..whole have all 32 columns
        let whole = (n_cols / NR).clamp(p0, p1);
        // A last panel with at most 16 columns used runs as narrow blocks (half the multiplies
        // of a full one) where no epilogue takes whole panels and no tail rows take the 32
        // columns of their block: attention's values for a head size of 80.
        let narrow_panel = (done.is_none()
            && m.is_multiple_of(amx::BLOCK)
            && (1..=NR / 2).contains(&(n_cols % NR))
            && whole < p1)
            .then_some(whole);
        let blocked_end = whole + usize::from(narrow_panel.is_some());
        let (blocked_panels, rest) = if main_pairs == 0 {
            (p0..p0, p0..p1)
        } else {
            (p0..blocked_end, blocked_end..p1)
        };
        let done =
            done.filter(|_| main_pairs == pairs && rest.is_empty() && !blocked_panels.is_empty());
        // passes of equal length over `k`, at most AMX_KC_PAIRS each
        let passes = main_pairs.div_ceil(AMX_KC_PAIRS).max(1);
        let step = main_pairs
            .div_ceil(passes)
            .next_multiple_of(amx::PAIRS_PER_STEP)
            .max(amx::PAIRS_PER_STEP);
        // panels per group: what fits AMX_GROUP_BYTES, in whole multiples of `finish_group`
        let finish_group = finish_group.max(1);
        let group = ((AMX_GROUP_BYTES / (step * 2 * NR * 2)) / finish_group).max(1) * finish_group;
        // one pass with `done`: a group's block row of sums (two in macro blocks) lives in
        // `local` only
        // Products of fewer than 4 block rows (attention's blocks of queries: 64 rows, a few
        // panels) run block row by block row over all of a group's panels with `k` whole, as
        // before the macro blocks: there the reuse gained nothing and the order and the round
        // trips of the sums cost attention 5–9% (`attention_rate`).
        let (macro_rows, macro_panels, inner_pairs) = if main_rows >= 4 * amx::BLOCK {
            (2, 2, AMX_INNER_PAIRS)
        } else {
            (1, group, step)
        };
        let local_sums = done.is_some() && passes == 1;
        let mut local = if local_sums {
            vec![0f32; macro_rows * amx::BLOCK * group * NR]
        } else {
            Vec::new()
        };
        // The last rows (fewer than 32) are copied into a block of zero rows and run on the
        // tiles too, inside the same groups: on the AVX-512 tiles they would stream every
        // panel from memory once more (for a 331-token prompt that doubled the time of the
        // decoder's MLP), and a zero row only adds a row of C that is thrown away.
        let tail_rows = main_rows..m;
        let mut tail_a = Vec::<u16>::new();
        if !tail_rows.is_empty() && !blocked_panels.is_empty() {
            let width = 2 * main_pairs;
            tail_a = vec![0u16; amx::BLOCK * width];
            for (i, r) in tail_rows.clone().enumerate() {
                // SAFETY: row `r` of A is readable to `2·pairs` ≥ `width` (the caller's contract).
                let src = unsafe { std::slice::from_raw_parts(a.add(r * lda), width) };
                tail_a[i * width..(i + 1) * width].copy_from_slice(src);
            }
        }
        // at most 16 rows left: one tile of A, half the multiplies
        let tail_block = if tail_rows.len() <= amx::BLOCK / 2 {
            blocks.half
        } else {
            blocks.full
        };
        // the tail's sums, 32 rows of this thread's blocked columns, kept between the passes
        let tail_ld = (blocked_panels.end - p0) * NR;
        let mut tail_c = if tail_a.is_empty() {
            Vec::new()
        } else {
            vec![0f32; amx::BLOCK * tail_ld]
        };
        // the sums of one 64 × 64 macro block between its sub-chunks of `k` (this thread's,
        // reused across products rather than allocated for each)
        const MACRO: usize = 2 * amx::BLOCK;
        let mut macro_sums = MACRO_SUMS.take();
        if step > inner_pairs {
            macro_sums.resize(MACRO * MACRO, 0.0);
        }
        let mut blocks = || {
            for q0 in (0..main_pairs).step_by(step) {
                let chunk = step.min(main_pairs - q0);
                let last_pass = q0 + chunk == main_pairs;
                let start = |p: usize| match bias {
                    _ if q0 > 0 => amx::Start::Accumulate,
                    // (a narrow panel's bias is shorter than 32 values: its block reads 16)
                    Some(b) => amx::Start::Bias(&b[p * NR..((p + 1) * NR).min(b.len())]),
                    None => amx::Start::Zero,
                };
                let panel = |p: usize| packed[p * self.k_padded * NR + q0 * 2 * NR..].as_ptr();
                for g0 in blocked_panels.clone().step_by(group) {
                    let panels = g0..(g0 + group).min(blocked_panels.end);
                    let cols = panels.len() * NR;
                    // 64 × 64 at a time (two block rows by two panels), `k` in sub-chunks of
                    // AMX_INNER_PAIRS: each sub-chunk's A and B tiles are used twice while in
                    // cache, where block by block each came from L2 for one use (large
                    // products only, see `macro_rows`)
                    for row in (0..main_rows).step_by(macro_rows * amx::BLOCK) {
                        let row_blocks =
                            (row..main_rows.min(row + macro_rows * amx::BLOCK)).step_by(amx::BLOCK);
                        // where a block row's sums go: `local` (one pass, `done`), else C
                        let local_base = local.as_mut_ptr();
                        let target = |r: usize| {
                            if local_sums {
                                (local_base.wrapping_add((r - row) * cols), cols)
                            } else {
                                (c.0.wrapping_add(r * ldc + g0 * NR), ldc)
                            }
                        };
                        for p_pair in panels.clone().step_by(macro_panels) {
                            let pair_panels = p_pair..(p_pair + macro_panels).min(panels.end);
                            for k0 in (0..chunk).step_by(inner_pairs) {
                                let pairs_here = inner_pairs.min(chunk - k0);
                                let (first, last) = (k0 == 0, k0 + pairs_here == chunk);
                                for (bi, r) in row_blocks.clone().enumerate() {
                                    let (c_row, c_ld) = target(r);
                                    for (pi, p) in pair_panels.clone().enumerate() {
                                        let sums = c_row.wrapping_add((p - g0) * NR);
                                        // between sub-chunks the four blocks' sums stay in
                                        // `macro_sums` (L1), not in C or `local`
                                        let kept = macro_sums
                                            .as_mut_ptr()
                                            .wrapping_add(bi * amx::BLOCK * MACRO + pi * NR);
                                        let from = match start(p) {
                                            _ if !first => amx::Start::From(kept, MACRO),
                                            amx::Start::Accumulate => amx::Start::From(sums, c_ld),
                                            other => other,
                                        };
                                        let (dest, dest_ld) =
                                            if last { (sums, c_ld) } else { (kept, MACRO) };
                                        // SAFETY: 32 rows of A from `r`, readable to
                                        // `2·main_pairs`; panel `p` has all 32 columns (or
                                        // is the narrow panel, whose block writes 16) and
                                        // `main_pairs` pairs; the block of sums is inside
                                        // `local`, this thread's columns of C, or
                                        // `macro_sums`.
                                        let block = if narrow_panel == Some(p) {
                                            blocks.narrow
                                        } else {
                                            blocks.full
                                        };
                                        unsafe {
                                            block(
                                                a.add(r * lda + 2 * (q0 + k0)),
                                                lda,
                                                panel(p).add(k0 * 2 * NR),
                                                pairs_here,
                                                dest,
                                                dest_ld,
                                                from,
                                            )
                                        }
                                    }
                                }
                            }
                        }
                        if let Some(done) = done.filter(|_| last_pass) {
                            for r in row_blocks.clone() {
                                let (c_row, c_ld) = target(r);
                                for i in 0..amx::BLOCK {
                                    // SAFETY: the block row just computed, `cols` sums per row.
                                    let values = unsafe {
                                        std::slice::from_raw_parts(c_row.add(i * c_ld), cols)
                                    };
                                    done(r + i, g0 * NR, values);
                                }
                            }
                        }
                    }
                    if tail_a.is_empty() {
                        continue;
                    }
                    let width = 2 * main_pairs;
                    let tail_group = tail_c[(g0 - p0) * NR..].as_mut_ptr();
                    for p in panels.clone() {
                        // SAFETY: the tail block holds 32 rows of `width`; `tail_c` 32 rows of
                        // this thread's blocked columns.
                        unsafe {
                            tail_block(
                                tail_a.as_ptr().add(2 * q0),
                                width,
                                panel(p),
                                chunk,
                                tail_group.add((p - g0) * NR),
                                tail_ld,
                                start(p),
                            )
                        }
                    }
                    if !last_pass {
                        continue;
                    }
                    for (i, r) in tail_rows.clone().enumerate() {
                        // SAFETY: row `i` of the tail's sums, this group's columns; row `r` of
                        // C, this thread's columns.
                        unsafe {
                            let values =
                                std::slice::from_raw_parts(tail_group.add(i * tail_ld), cols);
                            match done {
                                Some(done) => done(r, g0 * NR, values),
                                None => c.slice(r * ldc + g0 * NR, cols).copy_from_slice(values),
                            }
                        }
                    }
                }
            }
        };
        if tiles_configured && !blocked_panels.is_empty() {
            // SAFETY: AMX is enabled (caller).
            unsafe { amx::with_tiles(blocks) };
        } else {
            blocks();
        }
        MACRO_SUMS.set(macro_sums);
        if done.is_some() {
            return true;
        }
        let in_place = |rows, pairs, panels| {
            // SAFETY: the caller's contract, on a part of the same product.
            unsafe { self.run_bf16_in_place(a, rows, lda, bias, (c, ldc), n_cols, pairs, panels) }
        };
        if tail_a.is_empty() {
            in_place(0..main_rows, main_pairs..pairs, blocked_panels.clone());
            in_place(tail_rows, 0..pairs, blocked_panels);
        } else {
            in_place(0..m, main_pairs..pairs, blocked_panels);
        }
        in_place(0..m, 0..pairs, rest);
        false
    }

    /// Panics unless A holds `m` rows of `k` and C `m` rows of `cols` at the given strides.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        m: usize,
        (a_len, lda, k_used): (usize, usize, usize),
        c_len: usize,
        ldc: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        assert!(lda >= k_used && ldc >= cols, "strides shorter than a row");
        if m > 0 {
            assert!(
                a_len >= (m - 1) * lda + k_used,
                "A is shorter than {m} rows"
            );
            assert!(c_len >= (m - 1) * ldc + cols, "C is shorter than {m} rows");
        }
        if let Some(b) = bias {
            assert_eq!(b.len(), self.n, "bias length");
        }
    }
}

/// A (`m × k_used`, bf16) copied the way the 12-row tiles read it: per block of [`KC_BF16`]
/// values of `k`, per tile of [`MR`] rows, `[pair][row]` with the two values of a pair in one
/// `u32` (rows past `m` are zero).
struct PackedRows {
    data: Vec<u32>,
    tiles: usize,
}

impl PackedRows {
    /// `k_used` must be even (a row of A is readable up to it).
    fn pack(a: &[bf16], m: usize, lda: usize, k_used: usize, parallel: bool) -> Self {
        let tiles = m.div_ceil(MR);
        let mut data = vec![0u32; tiles * MR * k_used / 2];
        let mut parts = Vec::with_capacity(tiles * k_used.div_ceil(KC_BF16));
        let mut rest = data.as_mut_slice();
        for k0 in (0..k_used).step_by(KC_BF16) {
            let pairs = KC_BF16.min(k_used - k0) / 2;
            for t in 0..tiles {
                let (part, tail) = rest.split_at_mut(MR * pairs);
                parts.push((k0, t, part));
                rest = tail;
            }
        }
        let fill = |(k0, t, dst): (usize, usize, &mut [u32])| {
            let pairs = dst.len() / MR;
            for i in 0..MR.min(m - t * MR) {
                let start = (t * MR + i) * lda + k0;
                let src = &a[start..start + 2 * pairs];
                for (q, pair) in src.chunks_exact(2).enumerate() {
                    dst[q * MR + i] =
                        (pair[0].to_bits() as u32) | ((pair[1].to_bits() as u32) << 16);
                }
            }
        };
        if parallel {
            parts.into_par_iter().for_each(fill);
        } else {
            parts.into_iter().for_each(fill);
        }
        Self { data, tiles }
    }

    /// Tile `t` of the `k` block that starts at `k0`.
    fn tile(&self, k0: usize, t: usize, k_used: usize) -> &[u32] {
        let pairs = KC_BF16.min(k_used - k0) / 2;
        let start = self.tiles * MR * (k0 / 2) + t * MR * pairs;
        &self.data[start..start + MR * pairs]
    }
}

/// `m` rows of A (row stride `lda`) widened to f32, `k_padded` values a row (zero past `lda`'s
/// used part is not needed: `k_padded` ≤ the readable row, the caller's contract).
/// The buffer comes from this thread's [`WIDE_ROWS`]; the caller hands it back.
fn widen_rows(a: &[bf16], m: usize, lda: usize, k_padded: usize, parallel: bool) -> Vec<f32> {
    let mut wide = WIDE_ROWS.take();
    // every value is written below; only growth is zeroed (once)
    if wide.len() < m * k_padded {
        wide.resize(m * k_padded, 0.0);
    }
    let widen = |(r, row): (usize, &mut [f32])| {
        for (w, v) in row.iter_mut().zip(&a[r * lda..r * lda + k_padded]) {
            *w = v.to_f32();
        }
    };
    let rows = &mut wide[..m * k_padded];
    if parallel {
        rows.par_chunks_mut(k_padded).enumerate().for_each(widen);
    } else {
        rows.chunks_mut(k_padded).enumerate().for_each(widen);
    }
    wide
}

thread_local! {
    /// A product's rows of A widened to f32 ([`widen_rows`]), kept for the next product: a
    /// fresh buffer each time (24 MB for the vision tower's q/k/v at 1280×720) faulted in
    /// zeroed pages on every call (8% of a 640×360 step's samples).
    static WIDE_ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `work(first, end)` on rayon's threads, `0..units` split evenly.
fn for_each_thread(units: usize, work: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads().clamp(1, units.max(1));
    (0..threads).into_par_iter().for_each(|t| {
        let p0 = units * t / threads;
        let p1 = units * (t + 1) / threads;
        if p0 < p1 {
            work(p0, p1);
        }
    });
}

/// What a product hands each row of its sums to once they are final: `(row, first_column,
/// values)`.
type Done<'a> = &'a (dyn Fn(usize, usize, &[f32]) + Sync);

/// The output pointer shared by the threads, which write disjoint column ranges.
pub(crate) struct SharedOut<T = f32>(pub(crate) *mut T);
// SAFETY: every thread writes only its own panels' columns (see `for_each_thread`).
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The `len` values from `offset` on.
    ///
    /// # Safety
    /// They must lie inside the buffer, and no other thread may touch them meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

enum Start<'a> {
    /// First `k` block: start from the bias (or zero).
    Bias(Option<&'a [f32]>),
    /// Later blocks: add to what C holds.
    Accumulate,
}

/// At most this many pairs of `k` per pass of the AMX blocks: C is added to between passes, so
/// that for the decoder's down projection (8960 values of `k`) a pass's share of A (a prompt's
/// rows) stays in L2 while the panels go by (the other layers' `k` takes one pass).
const AMX_KC_PAIRS: usize = 768;

thread_local! {
    /// One 64 × 64 block of f32 sums per thread, for `run_bf16_amx`.
    static MACRO_SUMS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Pairs of `k` per sub-chunk of a 64 × 64 macro block (see `run_bf16_amx`): the sub-chunk's
/// A and B (32 KiB each) are read from L2 once and used twice. Measured on a 2-core Xeon with
/// AMX against full-`k` blocks: 64 pairs +2–10%, 128 pairs +5–25%, 256 pairs no better.
const AMX_INNER_PAIRS: usize = 128;

/// The panels of one AMX group take at most this much (half of a Sapphire Rapids core's L2).
const AMX_GROUP_BYTES: usize = 1 << 20;

/// The matrix kernels the CPU paths use on this machine, for reports.
pub fn describe() -> &'static str {
    match Kernel::detect() {
        Some(Kernel::Avx512Bf16) if amx::enabled() => "AMX tiles + AVX512-BF16",
        Some(Kernel::Avx512Bf16) => "AVX512-BF16 (no AMX)",
        Some(Kernel::Avx512) => "AVX-512 f32 (no AVX512-BF16: bf16 goes through candle)",
        Some(Kernel::Avx2) => "AVX2 + FMA (bf16 widened in registers)",
        None => "candle's (no AVX2 and FMA)",
    }
}

/// The number of rows of A that blocks of a product come in: AMX's 32 where it is used, else the
/// AVX-512 tiles' 12.
pub fn row_multiple() -> usize {
    if amx::enabled() { amx::BLOCK } else { MR }
}

/// What bf16 products' rows, columns and `k` come in multiples of to run on AMX alone: 32 where
/// AMX is used (a 32 × 32 block, 16 pairs of `k` per step), else 1 (no block to fill).
pub fn tile_multiple() -> usize {
    if amx::enabled() { amx::BLOCK } else { 1 }
}

/// Whether a product of `m` rows of A runs on AMX.
fn uses_amx(m: usize) -> bool {
    m >= amx::BLOCK && amx::enabled()
}

/// Mask of the first `cols` (≤ 32) lanes, split over the two 16-lane registers.
#[inline(always)]
fn lane_masks(cols: usize) -> (u16, u16) {
    let full = if cols >= 32 {
        u32::MAX
    } else {
        (1u32 << cols) - 1
    };
    (full as u16, (full >> 16) as u16)
}

/// Fewer rows than a tile: runs `tile` (a full [`MR`]-row tile over A with row stride `kc` and C
/// with row stride [`NR`]) on a zero-padded copy of the `rows` rows, then copies the valid part
/// of C back.
///
/// # Safety
/// A holds `rows` rows of `kc` values at stride `lda`; C holds `rows` rows of `cols` at `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn padded_tile<T: Copy + Default>(
    a: *const T,
    lda: usize,
    rows: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
    tile: impl FnOnce(*const T, *mut f32, Start),
) {
    let mut ta = vec![T::default(); MR * kc];
    let mut tc = [0f32; MR * NR];
    for i in 0..rows {
        for kk in 0..kc {
            ta[i * kc + kk] = unsafe { *a.add(i * lda + kk) };
        }
        if matches!(start, Start::Accumulate) {
            for j in 0..cols {
                tc[i * NR + j] = unsafe { *c.add(i * ldc + j) };
            }
        }
    }
    tile(ta.as_ptr(), tc.as_mut_ptr(), start);
    for i in 0..rows {
        for j in 0..cols {
            unsafe { *c.add(i * ldc + j) = tc[i * NR + j] };
        }
    }
}

/// A tile of f32 products on `kernel`'s registers ([`tile_f32_avx512`] or [`avx2::tile_f32`]).
///
/// # Safety
/// The CPU runs `kernel`; the tiles' contract on A, B and C.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32(
    kernel: Kernel,
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
    // SAFETY: the caller's contract.
    unsafe {
        match kernel {
            Kernel::Avx2 => avx2::tile_f32(a, lda, rows, b, kc, c, ldc, cols, start),
            _ => tile_f32_avx512(a, lda, rows, b, kc, c, ldc, cols, start),
        }
    }
}

/// A tile of bf16 products over A read in place, on `kernel`'s registers.
///
/// # Safety
/// As [`tile_f32`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16(
    kernel: Kernel,
    a: *const u16,
    lda: usize,
    rows: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match kernel {
            Kernel::Avx2 => avx2::tile_bf16(a, (lda, 2), rows, b, pairs, c, ldc, cols, start),
            _ => tile_bf16_avx512(a, lda, rows, b, pairs, c, ldc, cols, start),
        }
    }
}

/// A tile of bf16 products over a tile of A packed as `[pair][row]` ([`PackedRows`]), on
/// `kernel`'s registers.
///
/// # Safety
/// As [`tile_f32`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16_packed(
    kernel: Kernel,
    a: *const u32,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    start: Start,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match kernel {
            Kernel::Avx2 => {
                let strides = (2, 2 * MR);
                avx2::tile_bf16(
                    a as *const u16,
                    strides,
                    rows,
                    b,
                    pairs,
                    c,
                    ldc,
                    cols,
                    start,
                )
            }
            _ => tile_bf16_packed_avx512(a, b, pairs, c, ldc, rows, cols, start),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32_avx512(
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
    match rows {
        12 => unsafe { tile_f32_rows::<12>(a, lda, b, kc, c, ldc, cols, start) },
        1 => unsafe { tile_f32_rows::<1>(a, lda, b, kc, c, ldc, cols, start) },
        // SAFETY: the caller's contract on A and C, passed on to the padded tile.
        r => unsafe {
            padded_tile(a, lda, r, kc, c, ldc, cols, start, |ta, tc, start| {
                tile_f32_rows::<12>(ta, kc, b, kc, tc, NR, cols, start)
            })
        },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32_rows<const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = lane_masks(cols);
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        match start {
            Start::Bias(Some(bias)) => {
                let b0 = _mm512_maskz_loadu_ps(m0, bias.as_ptr());
                let b1 = _mm512_maskz_loadu_ps(m1, bias.as_ptr().add(16));
                for row in acc.iter_mut() {
                    *row = [b0, b1];
                }
            }
            Start::Bias(None) => {}
            Start::Accumulate => {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
                    row[1] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
                }
            }
        }
        for kk in 0..kc {
            let w0 = _mm512_loadu_ps(b.add(kk * NR));
            let w1 = _mm512_loadu_ps(b.add(kk * NR + 16));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(i * lda + kk));
                row[0] = _mm512_fmadd_ps(x, w0, row[0]);
                row[1] = _mm512_fmadd_ps(x, w1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(i * ldc), m0, row[0]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, row[1]);
        }
    }
}

/// A tile over A read in place (row stride `lda`). A panel with at most 16 columns (the last of
/// an `n` such as attention's head size 80) runs on half the registers instead of multiplying
/// 16 columns of padding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16_avx512(
    a: *const u16,
    lda: usize,
    rows: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    /// Twelve rows over the first `W` halves of the panel (in place, or on a padded copy).
    unsafe fn twelve<const W: usize>(
        a: *const u16,
        lda: usize,
        rows: usize,
        (b, pairs): (*const u16, usize),
        (c, ldc, cols): (*mut f32, usize, usize),
        start: Start,
    ) {
        // SAFETY: the caller's contract on A and C, passed on (to the padded tile for fewer rows).
        unsafe {
            if rows == MR {
                tile_bf16_rows::<MR, W>(a, lda, b, pairs, c, ldc, cols, start)
            } else {
                let kc = pairs * 2;
                padded_tile(a, lda, rows, kc, c, ldc, cols, start, |ta, tc, start| {
                    tile_bf16_rows::<MR, W>(ta, kc, b, pairs, tc, NR, cols, start)
                })
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe {
        match (rows, cols) {
            (1, _) => tile_bf16_one_row(a, b, pairs, c, cols, start),
            (_, ..=16) => twelve::<1>(a, lda, rows, (b, pairs), (c, ldc, cols), start),
            _ => twelve::<2>(a, lda, rows, (b, pairs), (c, ldc, cols), start),
        }
    }
}

/// `R` rows of A in place over the first `W` sixteen-column halves of a panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16_rows<const R: usize, const W: usize>(
    a: *const u16,
    lda: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = lane_masks(cols);
    let masks = [m0, m1];
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        match start {
            Start::Bias(Some(bias)) => {
                let mut first = [_mm512_setzero_ps(); W];
                for (h, lanes) in first.iter_mut().enumerate() {
                    *lanes = _mm512_maskz_loadu_ps(masks[h], bias.as_ptr().add(16 * h));
                }
                acc = [first; R];
            }
            Start::Bias(None) => {}
            Start::Accumulate => {
                for (i, row) in acc.iter_mut().enumerate() {
                    for (h, lanes) in row.iter_mut().enumerate() {
                        *lanes = _mm512_maskz_loadu_ps(masks[h], c.add(i * ldc + 16 * h));
                    }
                }
            }
        }
        for q in 0..pairs {
            let w: [__m512bh; W] = std::array::from_fn(|h| {
                let half = _mm512_loadu_si512(b.add(q * 2 * NR + h * NR) as *const _);
                std::mem::transmute::<__m512i, __m512bh>(half)
            });
            for (i, row) in acc.iter_mut().enumerate() {
                let pair = (a.add(i * lda + 2 * q) as *const i32).read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for (lanes, &wh) in row.iter_mut().zip(&w) {
                    *lanes = _mm512_dpbf16_ps(*lanes, x, wh);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (h, lanes) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(i * ldc + 16 * h), masks[h], *lanes);
            }
        }
    }
}

/// One row (a decoded token): bandwidth-bound, so four independent pairs of sums keep several
/// weight loads in flight instead of one chain of dependent dot products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16_one_row(
    a: *const u16,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    cols: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = lane_masks(cols);
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
        match start {
            Start::Bias(Some(bias)) => {
                acc[0] = [
                    _mm512_maskz_loadu_ps(m0, bias.as_ptr()),
                    _mm512_maskz_loadu_ps(m1, bias.as_ptr().add(16)),
                ];
            }
            Start::Bias(None) => {}
            Start::Accumulate => {
                acc[0] = [
                    _mm512_maskz_loadu_ps(m0, c),
                    _mm512_maskz_loadu_ps(m1, c.add(16)),
                ];
            }
        }
        let whole = pairs / 4 * 4;
        let load = |q: usize, half: usize| -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(b.add(q * 2 * NR + half * NR) as *const _))
        };
        let x = |q: usize| -> __m512bh {
            std::mem::transmute(_mm512_set1_epi32(
                (a.add(2 * q) as *const i32).read_unaligned(),
            ))
        };
        let mut q = 0;
        // no software prefetch: the hardware's streams the panel in order, and asking for
        // each line 8 KiB ahead as well cost 15-25% (`decode_rates`: 22-25 against 28-30 GB/s,
        // on huge pages and on small ones)
        while q < whole {
            for (j, sums) in acc.iter_mut().enumerate() {
                let xv = x(q + j);
                sums[0] = _mm512_dpbf16_ps(sums[0], xv, load(q + j, 0));
                sums[1] = _mm512_dpbf16_ps(sums[1], xv, load(q + j, 1));
            }
            q += 4;
        }
        while q < pairs {
            let xv = x(q);
            acc[0][0] = _mm512_dpbf16_ps(acc[0][0], xv, load(q, 0));
            acc[0][1] = _mm512_dpbf16_ps(acc[0][1], xv, load(q, 1));
            q += 1;
        }
        let lo = _mm512_add_ps(
            _mm512_add_ps(acc[0][0], acc[1][0]),
            _mm512_add_ps(acc[2][0], acc[3][0]),
        );
        let hi = _mm512_add_ps(
            _mm512_add_ps(acc[0][1], acc[1][1]),
            _mm512_add_ps(acc[2][1], acc[3][1]),
        );
        _mm512_mask_storeu_ps(c, m0, lo);
        _mm512_mask_storeu_ps(c.add(16), m1, hi);
    }
}

/// A full 12-row tile over A packed as `[pair][row]` (rows past `rows` are zeros and not stored).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16_packed_avx512(
    a: *const u32,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = lane_masks(cols);
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        match start {
            Start::Bias(Some(bias)) => {
                let b0 = _mm512_maskz_loadu_ps(m0, bias.as_ptr());
                let b1 = _mm512_maskz_loadu_ps(m1, bias.as_ptr().add(16));
                for row in acc.iter_mut() {
                    *row = [b0, b1];
                }
            }
            Start::Bias(None) => {}
            Start::Accumulate => {
                for (i, row) in acc.iter_mut().enumerate().take(rows) {
                    row[0] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
                    row[1] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
                }
            }
        }
        for q in 0..pairs {
            let w0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(q * 2 * NR) as *const _));
            let w1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(q * 2 * NR + NR) as *const _));
            let ap = a.add(q * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, w0);
                row[1] = _mm512_dpbf16_ps(row[1], x, w1);
            }
        }
        for (i, row) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_ps(c.add(i * ldc), m0, row[0]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Sizes around every tile, panel and block edge, odd `k` included.
    const SIZES: [(usize, usize, usize); 13] = [
        // on AMX (32 rows or more), the last rows (fewer than 32) run as a block of 16 rows when
        // at most 16 are left (97, 200, 48), else of 32 (59)
        (48, 96, 320),
        (59, 64, 256),
        (1, 1, 1),
        (5, 33, 7),
        (13, 70, 300),
        (12, 32, 256),
        (25, 64, 513),
        (97, 65, 130),
        (200, 40, 1000),
        (1, 100, 1536),
        (3, 70, 64),
        (30, 40, 2100),
        (1, 200, 66),
    ];

    /// The kernels this CPU runs: the one it is given, and the AVX2 tiles too where that is
    /// AVX-512 (so that they are checked on every machine the tests run on).
    fn kernels_here() -> Vec<Kernel> {
        let mut kernels: Vec<Kernel> = Kernel::detect().into_iter().collect();
        if kernels.first().is_some_and(|&k| k != Kernel::Avx2)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            kernels.push(Kernel::Avx2);
        }
        kernels
    }

    #[test]
    fn bf16_and_f32_products_match_exact_sums() {
        if Kernel::detect().is_none() {
            eprintln!("no AVX2 and FMA on this CPU: the kernel is not used here");
            return;
        }
        for (kernel, (m, n, k)) in kernels_here()
            .into_iter()
            .flat_map(|kernel| SIZES.map(|s| (kernel, s)))
        {
            let (a, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            let ab: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let exact = |i: usize, j: usize, bf: bool| -> f64 {
                (0..k)
                    .map(|kk| {
                        if bf {
                            ab[i * k + kk].to_f64() * wb[j * k + kk].to_f64()
                        } else {
                            a[i * k + kk] as f64 * w[j * k + kk] as f64
                        }
                    })
                    .sum()
            };
            // f32 weights given transposed (k × n), as attention packs its values
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let packed =
                PackedWeight::pack_f32(&wt, n, k, Strides { row: 1, col: n }, Placement::Model)
                    .unwrap()
                    .with_kernel(kernel);
            let mut out = vec![0f32; m * n];
            packed.matmul_f32_serial(&a, m, k, &mut out, n, n, k);
            for i in 0..m {
                for j in 0..n {
                    let e = (out[i * n + j] as f64 - exact(i, j, false)).abs();
                    assert!(
                        e < 1e-4,
                        "{kernel:?} f32 {m}x{n}x{k} at ({i},{j}): off by {e}"
                    );
                }
            }
            if let Some(packed) =
                PackedWeight::pack_bf16(&wb, n, k, Strides::row_major(k), Placement::Model)
                    .map(|p| p.with_kernel(kernel))
            {
                // the epilogue sees every value once, in whole groups of 2 panels per thread
                let seen = std::sync::Mutex::new(vec![f32::NAN; m * n]);
                packed.matmul_bf16_then(&ab, m, k, Some(&bias), &mut out, n, 2, |i, j0, vals| {
                    assert!(j0 % (2 * NR) == 0, "a thread's columns start at {j0}");
                    let mut seen = seen.lock().unwrap();
                    for (j, &v) in vals.iter().enumerate() {
                        assert!(seen[i * n + j0 + j].is_nan(), "({i},{}) twice", j0 + j);
                        seen[i * n + j0 + j] = v;
                    }
                });
                // every value reached the epilogue (C itself is only working space)
                let seen = seen.into_inner().unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want = exact(i, j, true) + bias[j] as f64;
                        let e = (seen[i * n + j] as f64 - want).abs();
                        assert!(
                            e < 1e-4,
                            "{kernel:?} bf16 {m}x{n}x{k} at ({i},{j}): off by {e}"
                        );
                    }
                }
                // on the calling thread, A read in place (attention's products); rows of A
                // must be readable to an even `k`
                if k % 2 == 0 {
                    let mut serial = vec![f32::NAN; m * n];
                    packed.matmul_bf16_serial(&ab, m, k, &mut serial, n, n, k);
                    for i in 0..m {
                        for j in 0..n {
                            let e = (serial[i * n + j] as f64 - exact(i, j, true)).abs();
                            assert!(e < 1e-4, "{kernel:?} serial {m}x{n}x{k} ({i},{j}): {e}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn serial_products_limit_columns_and_k() {
        if Kernel::detect().is_none() {
            return;
        }
        let (m, n, k) = (14, 50, 40);
        let (a, w) = (values(m * k, 4), values(n * k, 5));
        let packed =
            PackedWeight::pack_f32(&w, n, k, Strides::row_major(k), Placement::Scratch).unwrap();
        let (cols, k_used) = (37, 25);
        let mut out = vec![f32::NAN; m * cols];
        packed.matmul_f32_serial(&a, m, k, &mut out, cols, cols, k_used);
        for i in 0..m {
            for j in 0..cols {
                let want: f64 = (0..k_used)
                    .map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum();
                assert!((out[i * cols + j] as f64 - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn amx_blocks_and_their_avx512_tails_give_exact_sums() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        // (m, n, k): whole blocks; rows, pairs and a narrow panel left over; fewer pairs than
        // one step; odd k; several panel groups; several passes over `k`
        let shapes = [
            (32, 32, 32),
            (45, 80, 40),
            (70, 64, 100),
            (33, 40, 20),
            (64, 96, 33),
            (40, 32 * 18, 2048),
            // `k` in two passes, rows and pairs left over
            (50, 96, 3100),
            // one pass, two groups of panels, rows left over
            (70, 32 * 20, 1024),
            // 64 × 64 macro blocks (4 block rows or more): sub-chunks of `k`, an odd panel and
            // a block row left over, in one pass and in two
            (150, 32 * 5, 1024),
            (130, 96, 3100),
            // an odd number of block rows (of 32, then of 64) in each of two groups of panels,
            // rows left over
            (100, 32 * 20, 1024),
            (200, 32 * 20, 1024),
            // a last panel of at most 16 columns as narrow blocks (whole block rows, no
            // epilogue): after two panels, after one in 64 × 64 macro blocks, alone
            (64, 80, 96),
            (128, 48, 1024),
            (160, 16, 64),
        ];
        for (m, n, k) in shapes {
            let bf = |v: Vec<f32>| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
            let (a, w, bias) = (bf(values(m * k, 8)), bf(values(n * k, 9)), values(n, 10));
            let packed =
                PackedWeight::pack_bf16(&w, n, k, Strides::row_major(k), Placement::Scratch)
                    .unwrap();
            let padded = packed.pad_odd_k(&a, m, k);
            let (a_rows, lda) = match &padded {
                Some(v) => (v.as_slice(), packed.k_padded),
                None => (a.as_slice(), k),
            };
            for bias in [None, Some(bias.as_slice())] {
                for streamed in [false, true] {
                    let mut out = vec![f32::NAN; m * n];
                    let c = SharedOut(out.as_mut_ptr());
                    let panels = (0, n.div_ceil(NR));
                    let model = (amx::MODELS, false);
                    // with `done`: each value handed over once, at group starts of 3 panels
                    let seen = std::sync::Mutex::new(vec![f32::NAN; m * n]);
                    let done = |i: usize, j0: usize, values: &[f32]| {
                        assert_eq!(j0 % (3 * NR), 0, "a group starts at column {j0}");
                        let mut seen = seen.lock().unwrap();
                        for (j, &v) in values.iter().enumerate() {
                            assert!(seen[i * n + j0 + j].is_nan(), "({i},{}) twice", j0 + j);
                            seen[i * n + j0 + j] = v;
                        }
                    };
                    let finish = (streamed.then_some(&done as Done<'_>), 3);
                    // SAFETY: A holds m rows of `lda` ≥ k_padded, C m rows of n; the model block
                    // needs no tiles.
                    let finished = unsafe {
                        let a16 = a_rows.as_ptr() as *const u16;
                        let kp = packed.k_padded;
                        packed.run_bf16_amx(a16, m, lda, bias, &c, n, n, kp, panels, model, finish)
                    };
                    // streamed exactly when every pair of `k` and every panel fills the blocks
                    assert_eq!(
                        finished,
                        streamed && k % 32 == 0 && n % 32 == 0,
                        "{m}x{n}x{k}"
                    );
                    let out = if finished {
                        seen.into_inner().unwrap()
                    } else {
                        out
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|kk| a[i * k + kk].to_f64() * w[j * k + kk].to_f64())
                                .sum::<f64>()
                                + bias.map_or(0.0, |b| b[j] as f64);
                            let got = out[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-3,
                                "{m}x{n}x{k} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn serial_bf16_products_read_a_in_place_on_whole_and_half_panels() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        let (n, k) = (80, 40);
        let w: Vec<bf16> = values(n * k, 6)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let packed =
            PackedWeight::pack_bf16(&w, n, k, Strides::row_major(k), Placement::Scratch).unwrap();
        // (rows: one, a partial tile, tiles and a rest; columns: whole panels, a half panel
        // after whole ones, a half panel alone, 18 columns after a whole panel; k: all, fewer);
        // whole blocks of 32 rows run on AMX where the CPU has it, a half panel as a narrow
        // block (with pairs of `k` left past the tiles' steps, and without)
        for (m, cols, k_used) in [
            (1, 80, 40),
            (5, 37, 26),
            (26, 80, 40),
            (24, 16, 40),
            (13, 50, 12),
            (64, 80, 40),
            (32, 16, 40),
            (96, 80, 32),
        ] {
            let lda = k + 3;
            let a: Vec<bf16> = values(m * lda, 7)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let ldc = cols + 2;
            let mut out = vec![f32::NAN; m * ldc];
            packed.matmul_bf16_serial(&a, m, lda, &mut out, ldc, cols, k_used);
            for i in 0..m {
                for j in 0..cols {
                    let want: f64 = (0..k_used)
                        .map(|kk| a[i * lda + kk].to_f64() * w[j * k + kk].to_f64())
                        .sum();
                    let got = out[i * ldc + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{m}x{cols}x{k_used} ({i},{j}): {got}"
                    );
                }
                assert!(
                    out[i * ldc + cols].is_nan(),
                    "{m}x{cols}: wrote past the columns"
                );
            }
        }
    }

    #[test]
    fn packing_reads_every_layout_of_a_matrix_the_same() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        // odd sizes: a half-empty last panel and a lone last value of `k`
        let (n, k, n_ext, k_ext) = (45, 71, 64, 96);
        let w: Vec<bf16> = values(n * k, 23)
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        let at = |r: usize, c: usize| w[r * k + c];
        // the same W stored row-major (as attention's keys), transposed (its values), and with
        // every element two apart (no contiguous direction)
        let transposed: Vec<bf16> = (0..k * n).map(|i| at(i % n, i / n)).collect();
        let spread: Vec<bf16> = (0..2 * n * k)
            .map(|i| {
                if i % 2 == 0 {
                    w[i / 2]
                } else {
                    bf16::from_f32(f32::NAN)
                }
            })
            .collect();
        let layouts = [
            (&w, Strides { row: k, col: 1 }),
            (&transposed, Strides { row: 1, col: n }),
            (&spread, Strides { row: 2 * k, col: 2 }),
        ];
        let packed: Vec<Vec<u16>> = layouts
            .iter()
            .map(|(src, strides)| {
                let p = PackedWeight::pack_bf16_extended(
                    src,
                    (n, k),
                    (n_ext, k_ext),
                    *strides,
                    Placement::Scratch,
                )
                .unwrap();
                let Panels::Bf16(panels) = &p.panels else {
                    panic!("bf16 panels expected")
                };
                panels.to_vec()
            })
            .collect();
        // against the layout's definition: [panel][pair][32 rows][2], zeros outside W
        let k_padded = k_ext.next_multiple_of(2);
        for (layout, got) in packed.iter().enumerate() {
            assert_eq!(got.len(), n_ext.div_ceil(NR) * k_padded * NR);
            for (i, &bits) in got.iter().enumerate() {
                let (panel, rest) = (i / (k_padded * NR), i % (k_padded * NR));
                let (pair, row, half) = (rest / (2 * NR), rest % (2 * NR) / 2, rest % 2);
                let (r, c) = (panel * NR + row, 2 * pair + half);
                let want = if r < n && c < k {
                    at(r, c).to_bits()
                } else {
                    0
                };
                assert_eq!(bits, want, "layout {layout}: W[{r}][{c}]");
            }
        }
    }

    #[test]
    fn rows_read_back_from_bf16_panels_are_the_packed_rows() {
        // a partial last panel and an odd k (the pair's second half is padding)
        for (n, k) in [(70, 9), (64, 32), (33, 1)] {
            let w: Vec<bf16> = values(n * k, 3).into_iter().map(bf16::from_f32).collect();
            let Some(packed) =
                PackedWeight::pack_bf16(&w, n, k, Strides::row_major(k), Placement::Scratch)
            else {
                return; // no AVX512-BF16 here
            };
            let mut row = vec![bf16::ZERO; k];
            for r in 0..n {
                packed.row_bf16(r, &mut row).expect("bf16 panels");
                assert_eq!(row, &w[r * k..(r + 1) * k], "row {r} of ({n}, {k})");
            }
        }
    }

    #[test]
    fn zero_extended_packing_adds_exact_zeros() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        // a transposed source (as attention's values), extended to whole 32-wide blocks
        let (m, n, k, n_ext, k_ext) = (40, 45, 70, 64, 96);
        let bf = |v: Vec<f32>| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
        let (w_t, a) = (bf(values(k * n, 21)), bf(values(m * k, 22)));
        let strides = Strides { row: 1, col: n };
        let plain =
            PackedWeight::pack_bf16_extended(&w_t, (n, k), (n, k), strides, Placement::Scratch)
                .unwrap();
        let extended = PackedWeight::pack_bf16_extended(
            &w_t,
            (n, k),
            (n_ext, k_ext),
            strides,
            Placement::Scratch,
        )
        .unwrap();
        assert_eq!((extended.n(), extended.k()), (n_ext, k_ext));
        let mut a_ext = vec![bf16::ZERO; m * k_ext];
        for r in 0..m {
            a_ext[r * k_ext..r * k_ext + k].copy_from_slice(&a[r * k..(r + 1) * k]);
        }
        let mut want = vec![0f32; m * n];
        plain.matmul_bf16_serial(&a, m, k, &mut want, n, n, k);
        let mut got = vec![f32::NAN; m * n_ext];
        extended.matmul_bf16_serial(&a_ext, m, k_ext, &mut got, n_ext, n_ext, k_ext);
        for i in 0..m {
            for j in 0..n_ext {
                let g = got[i * n_ext + j];
                if j < n {
                    let w = want[i * n + j];
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "({i},{j}): {g} vs {w}"
                    );
                    // and against the source read through its strides
                    let exact: f64 = (0..k)
                        .map(|kk| a[i * k + kk].to_f64() * w_t[kk * n + j].to_f64())
                        .sum();
                    assert!((g as f64 - exact).abs() < 1e-3, "({i},{j}): {g} vs {exact}");
                } else {
                    assert_eq!(g, 0.0, "extension column {j}");
                }
            }
        }
    }

    /// One decoded token's product against the 2B decoder's weights (600 MB of gate/up-sized
    /// copies, each read once) next to a plain two-thread sum over as many bytes: the share of
    /// the read bandwidth the decode kernel reaches
    /// (`cargo test --release --lib decode_rates -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn decode_rates() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        let (n, k) = (17920, 1536);
        let value = |i: usize| bf16::from_f32(((i * 2_654_435_761) % 4099) as f32 / 4099.0 - 0.5);
        let w: Vec<bf16> = (0..n * k).map(value).collect();
        let copies = (600 << 20) / (n * k * 2) + 1;
        let packed: Vec<PackedWeight> = (0..copies)
            .map(|_| {
                PackedWeight::pack_bf16(&w, n, k, Strides::row_major(k), Placement::Model).unwrap()
            })
            .collect();
        let bytes = (copies * n * k * 2) as f64;
        let mut plain = WeightBuffer::<f32>::zeroed(copies * n * k / 2, Placement::Model);
        plain
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i % 7) as f32);
        let (a, mut c) = (vec![bf16::ONE; k], vec![0f32; n]);
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for w in &packed {
                w.matmul_bf16_then(&a, 1, k, None, &mut c, n, 1, |_, _, _| {});
            }
            let products = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let sum: f32 = plain
                .par_chunks(1 << 16)
                .map(|c| {
                    // 64 independent lanes: vectorised without reordering any one sum
                    let mut lanes = [0f32; 64];
                    for chunk in c.chunks_exact(64) {
                        for (l, v) in lanes.iter_mut().zip(chunk) {
                            *l += v;
                        }
                    }
                    lanes.iter().sum::<f32>()
                })
                .sum();
            let summed = t.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            eprintln!(
                "decode products {:.1} GB/s, plain sum {:.1} GB/s",
                bytes / products / 1e9,
                bytes / summed / 1e9
            );
        }
    }

    /// Rates of the bf16 products on this machine (`cargo test --release --lib gemm_rates --
    /// --ignored --nocapture`): the vision tower's and the decoder's shapes, and attention's.
    /// One 12 × 32 tile of the AVX2 kernel with its operands in L1, one thread: the rate the
    /// loops above can reach per core
    /// (`cargo test --release --lib avx2_tile_rates -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    #[cfg(target_arch = "x86_64")]
    fn avx2_tile_rates() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return;
        }
        let pairs = 128;
        let a = vec![0x3f80u16; MR * 2 * pairs];
        let b = vec![0x3f80u16; pairs * 2 * NR];
        let (af, bf) = (vec![1f32; MR * 2 * pairs], vec![1f32; 2 * pairs * NR]);
        let mut c = vec![0f32; MR * NR];
        let reps = 20_000;
        let flops = (2 * MR * NR * 2 * pairs * reps) as f64;
        for (name, packed) in [
            ("bf16 in place", false),
            ("bf16 packed", true),
            ("f32", false),
        ] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    // SAFETY: AVX2 and FMA (checked); A holds 12 rows of `pairs` pairs (in place
                    // at stride 2·pairs, or packed), B `pairs` pairs of 32, C 12 × 32.
                    unsafe {
                        if name == "f32" {
                            let (a, b, c) = (af.as_ptr(), bf.as_ptr(), c.as_mut_ptr());
                            avx2::tile_f32(
                                a,
                                2 * pairs,
                                MR,
                                b,
                                2 * pairs,
                                c,
                                NR,
                                NR,
                                Start::Bias(None),
                            );
                        } else {
                            let strides = if packed { (2, 2 * MR) } else { (2 * pairs, 2) };
                            let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
                            avx2::tile_bf16(a, strides, MR, b, pairs, c, NR, NR, Start::Bias(None));
                        }
                    }
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            std::hint::black_box(&c);
            eprintln!("{name:>14}: {:.1} GFLOP/s on one core", flops / best / 1e9);
        }
    }

    #[test]
    #[ignore = "a measurement, not a check"]
    fn gemm_rates() {
        if !Kernel::detect().is_some_and(Kernel::has_bf16) {
            return;
        }
        let value = |i: usize| bf16::from_f32(((i * 2_654_435_761) % 4099) as f32 / 4099.0 - 0.5);
        for (name, m, n, k) in [
            ("vision fc1", 1196, 5120, 1280),
            ("vision fc2", 1196, 1280, 5120),
            ("vision qkv", 4784, 3840, 1280),
            ("text gate_up", 331, 17920, 1536),
            ("text down", 331, 1536, 8960),
            ("gate_up 320", 320, 17920, 1536),
            ("gate_up 1228", 1228, 17920, 1536),
        ] {
            let w: Vec<bf16> = (0..n * k).map(value).collect();
            let a: Vec<bf16> = (0..m * k).map(|i| value(i + 7)).collect();
            // warm: one weight, in cache after the first run; cold: as many copies as fill
            // 600 MB, each used once, as a model's layers are
            let copies = (600 << 20) / (n * k * 2) + 1;
            let packed: Vec<PackedWeight> = (0..copies)
                .map(|_| {
                    PackedWeight::pack_bf16(&w, n, k, Strides::row_major(k), Placement::Model)
                        .unwrap()
                })
                .collect();
            let mut c = vec![0f32; m * n];
            let mut time = |w: &PackedWeight| {
                let t = std::time::Instant::now();
                w.matmul_bf16_then(&a, m, k, None, &mut c, n, 1, |_, _, _| {});
                t.elapsed().as_secs_f64()
            };
            let warm = (0..5).map(|_| time(&packed[0])).fold(f64::MAX, f64::min);
            let cold = packed.iter().map(&mut time).sum::<f64>() / copies as f64;
            let rate = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
            eprintln!(
                "{name:>14} {m}x{n}x{k}: warm {:.2} ms, {:.0} GFLOP/s; cold {:.2} ms, {:.0} GFLOP/s",
                warm * 1e3,
                rate(warm),
                cold * 1e3,
                rate(cold)
            );
        }
    }
}
