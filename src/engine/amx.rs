//! Intel AMX for the bf16 products of [`super::gemm`], on CPUs that have it (Xeon Sapphire
//! Rapids and later): a 32 × 32 block of C is four 16 × 16 f32 tiles, fed by two 16-row tiles of
//! A read in place and two 16-pair tiles of a packed weight panel. The panels' `[pair][column][2]`
//! layout is the one `TDPBF16PS` reads, so the weights need no second packing; one instruction
//! does 16 · 16 · 32 multiply-adds (f32 sums, as the AVX-512 tiles).
//!
//! AMX is used only when CPUID reports AMX-TILE and AMX-BF16, Linux grants this process the tile
//! state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and a self-test gives the exact sums: first in a
//! forked child, so that a fault cannot take the process down, then here. `VLAD_AMX=0` turns it
//! off. The tile instructions are written as inline assembly (Rust's AMX intrinsics are not
//! stable).

use std::sync::OnceLock;

/// Rows and columns of C one [`block`] computes.
pub const BLOCK: usize = 32;
/// Pairs of `k` one step of a block consumes (a 16-row tile of 64 bytes per row).
pub const PAIRS_PER_STEP: usize = 16;
/// The packed panels' width in columns (two 16-column tiles).
const PANEL: usize = 32;

/// Whether the bf16 products may use AMX on this machine (decided once per process).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| match probe() {
        Ok(()) => {
            tracing::info!("bf16 products use Intel AMX");
            true
        }
        Err(why) => {
            tracing::debug!("bf16 products stay on AVX-512: {why}");
            false
        }
    })
}

/// How C starts before a block adds its products.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// From zero.
    Zero,
    /// From the 32 bias values of the block's columns, on every row.
    Bias(&'a [f32]),
    /// From what C holds.
    Accumulate,
    /// From a 32 × 32 block of sums elsewhere: its first value and its row stride (in values).
    From(*const f32, usize),
}

/// Runs `work` with this thread's tiles configured (four C, two A, two B tiles of 16 rows of
/// 64 bytes) and releases them afterwards.
///
/// # Safety
/// Linux granted the tile state: [`enabled`] returned true (or, inside the probe, the CPUID and
/// `arch_prctl` checks passed).
pub unsafe fn with_tiles<R>(work: impl FnOnce() -> R) -> R {
    let config = TileConfig::new();
    // SAFETY: AMX is enabled (caller); the configuration is a valid palette-1 layout.
    unsafe { arch::load_config(&config) };
    let result = work();
    // SAFETY: as above.
    unsafe { arch::release() };
    result
}

/// The signature of [`block`] (and of the model of it that tests use off AMX machines).
pub type BlockFn = unsafe fn(*const u16, usize, *const u16, usize, *mut f32, usize, Start);

/// `C[32 × 32] = start + A[32 × 2·pairs] · panel`: A row-major bf16 with row stride `lda`
/// elements, the panel packed `[pair][32 columns][2]`, C f32 with row stride `ldc`.
///
/// # Safety
/// Inside [`with_tiles`]; `pairs` is a positive multiple of [`PAIRS_PER_STEP`]; A holds 32 rows
/// readable up to `2·pairs`, the panel `pairs` pairs, C 32 rows of 32 writable columns (and a
/// bias, 32 values).
pub use arch::block;

/// [`block`] on 16 rows (one tile of A, two of C): `C[16 × 32] = start + A[16 × 2·pairs] · panel`,
/// half the multiplies, for the last rows of a product when at most 16 are left (a 331-token
/// prompt's 11, a 1280×720 screenshot's 4,784 patches' 16). Rows 16–31 of C are not touched.
///
/// # Safety
/// As [`block`], with 16 rows of A and C.
pub use arch::half_block;

/// [`block`] on its first 16 columns (two tiles of A, one of the panel, two of C):
/// `C[32 × 16] = start + A[32 × 2·pairs] · panel[.., 0..16]`, half the multiplies, for a product's
/// last panel when at most 16 of its columns are used (attention's values for a head size of 80:
/// two panels and this instead of three panels). Columns 16–31 of C are not touched.
///
/// # Safety
/// As [`block`], with 16 columns of C (and of the bias).
pub use arch::narrow_block;

/// The block functions a product runs: the tiles', or in tests their models.
#[derive(Clone, Copy)]
pub struct Blocks {
    /// 32 rows ([`block`]).
    pub full: BlockFn,
    /// 16 rows ([`half_block`]).
    pub half: BlockFn,
    /// 16 columns ([`narrow_block`]).
    pub narrow: BlockFn,
}

/// [`block`], [`half_block`] and [`narrow_block`].
pub const TILES: Blocks = Blocks {
    full: block,
    half: half_block,
    narrow: narrow_block,
};

/// [`model_block`], [`model_half_block`] and [`model_narrow_block`].
#[cfg(test)]
pub const MODELS: Blocks = Blocks {
    full: model_block,
    half: model_half_block,
    narrow: model_narrow_block,
};

/// A model block: [`model_rows`] on a block's rows and columns.
macro_rules! model_block_fn {
    ($(#[$doc:meta])* $name:ident, $shape:expr) => {
        $(#[$doc])*
        #[cfg(test)]
        pub unsafe fn $name(
            a: *const u16,
            lda: usize,
            panel: *const u16,
            pairs: usize,
            c: *mut f32,
            ldc: usize,
            start: Start,
        ) {
            // SAFETY: the caller's contract, for the block's rows and columns.
            unsafe { model_rows($shape, a, lda, panel, pairs, c, ldc, start) }
        }
    };
}

model_block_fn!(
    /// [`block`] in plain Rust, in `TDPBF16PS`'s order (per row, per pair, both products added
    /// to the f32 sum), for testing the code around the tiles on machines without AMX.
    ///
    /// # Safety
    /// As [`block`], without the tiles.
    model_block,
    (BLOCK, PANEL)
);

model_block_fn!(
    /// [`half_block`] in plain Rust (see [`model_block`]).
    ///
    /// # Safety
    /// As [`half_block`], without the tiles.
    model_half_block,
    (BLOCK / 2, PANEL)
);

model_block_fn!(
    /// [`narrow_block`] in plain Rust (see [`model_block`]).
    ///
    /// # Safety
    /// As [`narrow_block`], without the tiles.
    model_narrow_block,
    (BLOCK, PANEL / 2)
);

/// The first `rows` rows and `cols` columns of [`model_block`].
///
/// # Safety
/// As [`block`], for `rows` rows and `cols` columns, without the tiles.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
unsafe fn model_rows(
    (rows, cols): (usize, usize),
    a: *const u16,
    lda: usize,
    panel: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    let f = |bits: u16| f32::from_bits((bits as u32) << 16);
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: the caller's contract on A, the panel and C.
            unsafe {
                let out = c.add(i * ldc + j);
                let mut sum = match start {
                    Start::Zero => 0.0,
                    Start::Bias(b) => b[j],
                    Start::Accumulate => *out,
                    Start::From(from, ld) => *from.add(i * ld + j),
                };
                for q in 0..pairs {
                    let x = a.add(i * lda + 2 * q);
                    let w = panel.add(q * 2 * PANEL + 2 * j);
                    sum += f(*x) * f(*w);
                    sum += f(*x.add(1)) * f(*w.add(1));
                }
                *out = sum;
            }
        }
    }
}

/// The 64-byte operand of `LDTILECFG` (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of tiles 0..16.
    colsb: [u16; 16],
    /// Rows of tiles 0..16.
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles 0–7: 16 rows of 64 bytes (16 f32 or 32 bf16).
    fn new() -> Self {
        let mut config = Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            config.colsb[t] = 64;
            config.rows[t] = 16;
        }
        config
    }
}

/// Checks CPUID, asks Linux for the tile state, and runs the self-test (in a child first).
fn probe() -> Result<(), String> {
    if std::env::var("VLAD_AMX").is_ok_and(|v| v == "0") {
        return Err("VLAD_AMX=0".into());
    }
    arch::supported()?;
    let test = SelfTest::new();
    arch::in_child(|| test.run(TILES, true))?;
    test.run(TILES, true)
}

/// A 32 × 32 product over 48 pairs (three steps) from each start, against sums in f64.
struct SelfTest {
    a: Vec<u16>,
    panel: Vec<u16>,
    bias: Vec<f32>,
    want: Vec<f64>,
}

impl SelfTest {
    const PAIRS: usize = 3 * PAIRS_PER_STEP;
    /// A's row stride, longer than a row so that the stride is exercised.
    const LDA: usize = 2 * Self::PAIRS + 6;

    fn new() -> Self {
        let value = |i: usize, salt: usize| {
            let x = ((i * 2_654_435_761 + salt * 40_503) % 4099) as f32 / 4099.0 - 0.5;
            half::bf16::from_f32(x).to_bits()
        };
        let a: Vec<u16> = (0..BLOCK * Self::LDA).map(|i| value(i, 1)).collect();
        let panel: Vec<u16> = (0..Self::PAIRS * PANEL * 2).map(|i| value(i, 2)).collect();
        let bias: Vec<f32> = (0..PANEL).map(|j| j as f32 * 0.25 - 4.0).collect();
        let f = |bits: u16| half::bf16::from_bits(bits).to_f64();
        let mut want = vec![0f64; BLOCK * PANEL];
        for i in 0..BLOCK {
            for j in 0..PANEL {
                want[i * PANEL + j] = (0..Self::PAIRS)
                    .map(|q| {
                        let x = &a[i * Self::LDA + 2 * q..];
                        let w = &panel[q * 2 * PANEL + 2 * j..];
                        f(x[0]) * f(w[0]) + f(x[1]) * f(w[1])
                    })
                    .sum();
            }
        }
        Self {
            a,
            panel,
            bias,
            want,
        }
    }

    /// Zero, bias and accumulate starts, each compared with the exact sums.
    /// `block` is [`block`] (`tiles`: run inside [`with_tiles`]), or in tests its model.
    /// The full block, then the half block, which must leave rows 16–31 of C as they were, and
    /// the narrow one, which must leave columns 16–31.
    fn run(&self, blocks: Blocks, tiles: bool) -> Result<(), String> {
        let shapes = [
            (blocks.full, (BLOCK, PANEL)),
            (blocks.half, (BLOCK / 2, PANEL)),
            (blocks.narrow, (BLOCK, PANEL / 2)),
        ];
        for (block, shape) in shapes {
            let mut c = vec![f32::NAN; BLOCK * PANEL];
            let product = |c: &mut [f32], start| {
                let (a, panel) = (self.a.as_ptr(), self.panel.as_ptr());
                // SAFETY: `supported` passed (or `block` is the model); A holds 32 rows of
                // LDA ≥ 2·PAIRS, the panel PAIRS pairs, C 32 × 32 values and the bias 32.
                unsafe {
                    let c = c.as_mut_ptr();
                    let run = || block(a, Self::LDA, panel, Self::PAIRS, c, PANEL, start);
                    if tiles { with_tiles(run) } else { run() }
                }
            };
            product(&mut c, Start::Zero);
            self.check(&c, shape, 0.0, 1.0, "zero")?;
            product(&mut c, Start::Bias(&self.bias));
            self.check(&c, shape, 1.0, 1.0, "bias")?;
            product(&mut c, Start::Accumulate);
            self.check(&c, shape, 1.0, 2.0, "accumulate")?;
        }
        Ok(())
    }

    /// The first `rows` rows and `cols` columns of `c` should hold `biases` times the bias plus
    /// `products` times the exact product, and the others their NaN.
    fn check(
        &self,
        c: &[f32],
        (rows, cols): (usize, usize),
        biases: f64,
        products: f64,
        start: &str,
    ) -> Result<(), String> {
        let shape = || format!("{start} start, {rows} × {cols}");
        for (i, (&got, &sum)) in c.iter().zip(&self.want).enumerate() {
            if i / PANEL >= rows || i % PANEL >= cols {
                if !got.is_nan() {
                    return Err(format!("{}: {got} at {i}", shape()));
                }
                continue;
            }
            let want = biases * self.bias[i % PANEL] as f64 + products * sum;
            if (got as f64 - want).abs() > 1e-3 {
                return Err(format!("{}: {got} at {i}, want {want}", shape()));
            }
        }
        Ok(())
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod arch {
    use super::{PAIRS_PER_STEP, PANEL, Start, TileConfig};
    use std::arch::asm;

    /// AMX-TILE and AMX-BF16 in CPUID, and the tile state granted by the kernel.
    pub fn supported() -> Result<(), String> {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        if !(amx_bf16 && amx_tile) {
            return Err("the CPU has no AMX-BF16".into());
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if granted != 0 {
            return Err(format!(
                "Linux did not grant the AMX tile state: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Runs `test` in a forked child and reports how it ended: a crash there (a fault in the
    /// tile code) becomes an error here.
    pub fn in_child(test: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        // SAFETY: the child runs only `test` (its buffers were allocated before the fork) and
        // leaves through `_exit`, without unwinding or running the parent's destructors.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(test)) {
                Ok(Ok(())) => 0,
                Ok(Err(_)) => 1,
                Err(_) => 2,
            };
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
        }
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(())
        } else if libc::WIFSIGNALED(status) {
            Err(format!(
                "the self-test died of signal {}",
                libc::WTERMSIG(status)
            ))
        } else {
            Err("the self-test's sums were wrong".into())
        }
    }

    /// # Safety
    /// The tile state was granted.
    pub unsafe fn load_config(config: &TileConfig) {
        // SAFETY: a valid palette-1 configuration (caller: AMX granted).
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) config as *const TileConfig, options(nostack, readonly))
        };
    }

    /// # Safety
    /// The tile state was granted.
    pub unsafe fn release() {
        // SAFETY: AMX granted (caller).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// The start and the store of one C tile: 16 rows of 16 columns of the block, from row
    /// `ROW0` and column `COL0` of C (the bias has no rows: its 16 values at `COL0` repeat on
    /// every row).
    macro_rules! c_tile {
        ($start:ident, $store:ident, $row0:literal, $col0:literal, $tile:literal) => {
            /// # Safety
            /// Inside configured tiles; C (or `From`'s block) holds these 16 rows of 16 values.
            #[inline(always)]
            unsafe fn $start(start: Start, c: *mut f32, ldc: usize) {
                let (rows, ld) = match start {
                    Start::Zero => {
                        // SAFETY: the tiles are configured (caller).
                        unsafe { asm!(concat!("tilezero tmm", $tile), options(nostack, nomem)) };
                        return;
                    }
                    Start::Bias(bias) => {
                        debug_assert!(bias.len() >= $col0 + 16);
                        // a row stride of zero repeats the 16 bias values on every row
                        (bias.as_ptr().wrapping_add($col0), 0)
                    }
                    Start::Accumulate => (c.wrapping_add($row0 * ldc + $col0).cast_const(), ldc),
                    Start::From(from, ld) => (from.wrapping_add($row0 * ld + $col0), ld),
                };
                // SAFETY: 16 rows of 16 values at `rows`, `ld` apart (caller).
                unsafe {
                    asm!(
                        concat!("tileloadd tmm", $tile, ", [{c} + {s}*1]"),
                        c = in(reg) rows,
                        s = in(reg) ld * 4,
                        options(nostack, readonly)
                    )
                };
            }

            /// # Safety
            /// Inside configured tiles; C holds these 16 rows of 16 writable values.
            #[inline(always)]
            unsafe fn $store(c: *mut f32, ldc: usize) {
                // SAFETY: the caller's contract.
                unsafe {
                    asm!(
                        concat!("tilestored [{c} + {s}*1], tmm", $tile),
                        c = in(reg) c.wrapping_add($row0 * ldc + $col0),
                        s = in(reg) ldc * 4,
                        options(nostack)
                    )
                };
            }
        };
    }
    // rows 0–15 in tiles 0 (columns 0–15) and 1 (16–31), rows 16–31 in tiles 2 and 3
    c_tile!(start_c0, store_c0, 0, 0, 0);
    c_tile!(start_c1, store_c1, 0, 16, 1);
    c_tile!(start_c2, store_c2, 16, 0, 2);
    c_tile!(start_c3, store_c3, 16, 16, 3);

    /// A block function: its C tiles started, then per step (16 pairs of `k`: 64 bytes of each
    /// A row, and 16 rows of 128 bytes of the panel, its left 16 columns in the first 64 bytes
    /// of a row and the right 16 in the next 64) the given tile loads and multiplies (A's rows
    /// 0–15 at `{a}`, 16–31 at `{a2}`, the panel at `{b}`), then its C tiles stored.
    macro_rules! amx_block {
        ($(#[$doc:meta])* $name:ident, [$(($start:ident, $store:ident)),+], [$($step:literal),+ $(,)?]) => {
            $(#[$doc])*
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $name(
                a: *const u16,
                lda: usize,
                panel: *const u16,
                pairs: usize,
                c: *mut f32,
                ldc: usize,
                start: Start,
            ) {
                debug_assert!(pairs > 0 && pairs.is_multiple_of(PAIRS_PER_STEP));
                // SAFETY: the caller's contract on A, the panel and C (the rows and columns
                // this block's tiles cover); the tiles are configured as 16 rows of 64 bytes.
                unsafe {
                    $($start(start, c, ldc);)+
                    asm!(
                        ".p2align 6",
                        "2:",
                        $($step,)+
                        "add {a}, 64",
                        "add {a2}, 64",
                        "add {b}, {b_step}",
                        "dec {steps}",
                        "jnz 2b",
                        a = inout(reg) a => _,
                        a2 = inout(reg) a.wrapping_add(16 * lda) => _,
                        sa = in(reg) lda * 2,
                        b = inout(reg) panel => _,
                        sb = in(reg) 2 * PANEL * 2,
                        b_step = in(reg) PAIRS_PER_STEP * 2 * PANEL * 2,
                        steps = inout(reg) pairs / PAIRS_PER_STEP => _,
                        options(nostack, readonly)
                    );
                    $($store(c, ldc);)+
                }
            }
        };
    }

    amx_block!(
        /// See [`super::block`] (re-exported there, documented there).
        block,
        [(start_c0, store_c0), (start_c1, store_c1), (start_c2, store_c2), (start_c3, store_c3)],
        [
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm5, [{a2} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tileloadd tmm7, [{b} + {sb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
        ]
    );

    amx_block!(
        /// See [`super::half_block`]: [`block`]'s upper half (tiles 0, 1, 4, 6 and 7).
        half_block,
        [(start_c0, store_c0), (start_c1, store_c1)],
        [
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tileloadd tmm7, [{b} + {sb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
        ]
    );

    amx_block!(
        /// See [`super::narrow_block`]: [`block`]'s left half (tiles 0, 2, 4, 5 and 6).
        narrow_block,
        [(start_c0, store_c0), (start_c2, store_c2)],
        [
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm5, [{a2} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
        ]
    );
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod arch {
    use super::{Start, TileConfig};

    pub fn supported() -> Result<(), String> {
        Err("AMX is used on x86-64 Linux only".into())
    }
    pub fn in_child(_: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        Err("AMX is used on x86-64 Linux only".into())
    }
    pub unsafe fn load_config(_: &TileConfig) {}
    pub unsafe fn release() {}
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        _: *const u16,
        _: usize,
        _: *const u16,
        _: usize,
        _: *mut f32,
        _: usize,
        _: Start,
    ) {
        unreachable!("AMX is never enabled off x86-64 Linux")
    }
    pub use block as half_block;
    pub use block as narrow_block;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_test_accepts_the_model_of_the_tiles_and_rejects_a_wrong_one() {
        let test = SelfTest::new();
        assert_eq!(test.run(MODELS, false), Ok(()));
        /// The tiles with the two values of each pair of A swapped.
        unsafe fn swapped(
            a: *const u16,
            lda: usize,
            panel: *const u16,
            pairs: usize,
            c: *mut f32,
            ldc: usize,
            start: Start,
        ) {
            let mut a_swapped = vec![0u16; BLOCK * lda];
            for (i, x) in a_swapped.iter_mut().enumerate() {
                // SAFETY: A holds 32 rows of `lda` (the self-test's).
                *x = unsafe { *a.add(i ^ 1) };
            }
            // SAFETY: as `model_block`, on the copy.
            unsafe { model_block(a_swapped.as_ptr(), lda, panel, pairs, c, ldc, start) }
        }
        let swapped_full = Blocks {
            full: swapped,
            ..MODELS
        };
        assert!(test.run(swapped_full, false).is_err());
        // a "half" block that writes all 32 rows
        let full_as_half = Blocks {
            half: model_block,
            ..MODELS
        };
        assert!(test.run(full_as_half, false).is_err());
        // a "narrow" block that writes all 32 columns
        let full_as_narrow = Blocks {
            narrow: model_block,
            ..MODELS
        };
        assert!(test.run(full_as_narrow, false).is_err());
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn a_self_test_in_a_child_reports_success_wrong_sums_and_crashes() {
        assert_eq!(arch::in_child(|| Ok(())), Ok(()));
        assert!(arch::in_child(|| Err("wrong".into())).is_err());
        let crash = arch::in_child(|| {
            // SAFETY: ends the child (only) by a signal, as a faulting tile load would.
            unsafe { libc::abort() }
        });
        assert!(
            crash.as_ref().is_err_and(|e| e.contains("signal")),
            "{crash:?}"
        );
    }

    #[test]
    fn amx_is_used_exactly_where_the_cpu_and_the_kernel_offer_it() {
        match arch::supported() {
            // the tiles exist here: then the self-test, fork included, must pass
            Ok(()) => assert_eq!(probe(), Ok(()), "AMX present but rejected"),
            Err(why) => {
                eprintln!("no AMX here ({why}): the tile code is not exercised");
                assert!(!enabled());
            }
        }
    }

    /// The rate of one 32 × 32 [`block`] over its operands in L1 (up to 128 pairs: A and the
    /// panel 16 KiB each) and in L2 (256 and 768 pairs), one thread
    /// (`cargo test --release --lib block_rates -- --ignored --nocapture`). On a 2-core Xeon:
    /// 6.2–7.3 ns per `TDPBF16PS` from L1, 9–10.7 ns from L2.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn block_rates() {
        if !enabled() {
            return;
        }
        for pairs in [64, 128, 256, 768] {
            let lda = 2 * pairs;
            let a = vec![0x3f80u16; BLOCK * lda];
            let panel = vec![0x3f80u16; pairs * 2 * PANEL];
            let mut c = vec![0f32; BLOCK * PANEL];
            let reps = 200_000 / (pairs / PAIRS_PER_STEP);
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                let (a, panel, c) = (a.as_ptr(), panel.as_ptr(), c.as_mut_ptr());
                // SAFETY: AMX is enabled; A holds 32 rows of `lda`, the panel `pairs` pairs and
                // C 32 × 32 values.
                unsafe {
                    with_tiles(|| {
                        for _ in 0..reps {
                            block(a, lda, panel, pairs, c, PANEL, Start::Zero);
                        }
                    })
                };
                best = best.min(t.elapsed().as_secs_f64());
            }
            let multiplies = (reps * pairs / PAIRS_PER_STEP * 4) as f64;
            eprintln!(
                "{pairs} pairs: {:.2} ns per TDPBF16PS ({:.0} GFLOP/s)",
                best / multiplies * 1e9,
                16384.0 * multiplies / best / 1e9
            );
        }
    }
}
