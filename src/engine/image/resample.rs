//! Bicubic resampling of 8-bit RGB images, bit-exact with Pillow's `Image.resize(size, BICUBIC)`.
//!
//! A port of the 8-bit path of Pillow's `libImaging/Resample.c`: double-precision filter weights
//! normalised per output pixel, converted to 22-bit fixed point, a horizontal pass over the rows the
//! vertical pass needs, rounded and clipped to `u8`, then a vertical pass. Output rows are
//! independent, so each pass spreads them over rayon's threads.

use image::RgbImage;
use rayon::prelude::*;

/// Bicubic kernel support (taps on each side of the centre at scale 1).
const BICUBIC_SUPPORT: f64 = 2.0;

/// Fixed-point fraction bits of the filter weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `bicubic_filter` with `a = -0.5`, evaluated in the same order.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis: output pixel `i` reads `len[i]` input pixels starting at
/// `start[i]` with weights `weights[i * ksize..][..len[i]]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` for the box `[0, in_size)` followed by `normalize_coeffs_8bpc`.
fn precompute_coeffs(in_size: u32, out_size: u32) -> Coeffs {
    let out = out_size as usize;
    // Pillow takes the box as C floats: `(double)(in1 - in0) / outSize`.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / f64::from(out_size);
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    // `(int)ceil(support) * 2 + 1`
    let ksize = support.ceil() as usize * 2 + 1;

    let mut start = Vec::with_capacity(out);
    let mut len = Vec::with_capacity(out);
    let mut weights = vec![0i32; out * ksize];
    let mut k = vec![0.0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let n = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (dst, &kx) in row.iter_mut().zip(&k).take(n) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let fixed = kx * f64::from(1u32 << PRECISION_BITS);
            *dst = if kx < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        start.push(xmin as usize);
        len.push(n);
    }
    Coeffs {
        ksize,
        start,
        len,
        weights,
    }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift) and clamp to `0..=255`.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding bias every accumulator starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resamples rows `row_offset..row_offset + out_h` of `src` (width `src_w`) horizontally.
fn resample_horizontal(
    src: &[u8],
    src_w: usize,
    row_offset: usize,
    out_h: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let out_w = c.start.len();
    let mut out = vec![0u8; out_w * out_h * 3];
    if out.is_empty() {
        return out;
    }
    // rows are independent: one output row per task, the same arithmetic as one thread
    out.par_chunks_exact_mut(out_w * 3)
        .enumerate()
        .for_each(|(yy, out_row)| {
            let src_row = &src[(yy + row_offset) * src_w * 3..][..src_w * 3];
            for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
                let k = &c.weights[xx * c.ksize..][..c.len[xx]];
                let taps = &src_row[c.start[xx] * 3..][..c.len[xx] * 3];
                let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
                for (&w, p) in k.iter().zip(taps.chunks_exact(3)) {
                    s0 = s0.wrapping_add(i32::from(p[0]).wrapping_mul(w));
                    s1 = s1.wrapping_add(i32::from(p[1]).wrapping_mul(w));
                    s2 = s2.wrapping_add(i32::from(p[2]).wrapping_mul(w));
                }
                px[0] = clip8(s0);
                px[1] = clip8(s1);
                px[2] = clip8(s2);
            }
        });
    out
}

/// Resamples `src` (width `w`) vertically; `row_shift` is subtracted from every tap start because
/// `src` may begin at that source row (Pillow's bounding-box optimisation).
fn resample_vertical(src: &[u8], w: usize, row_shift: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.start.len();
    let stride = w * 3;
    let mut out = vec![0u8; stride * out_h];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_exact_mut(stride).enumerate().for_each_init(
        || vec![0i32; stride],
        |acc, (yy, out_row)| {
            let k = &c.weights[yy * c.ksize..][..c.len[yy]];
            let first = c.start[yy] - row_shift;
            acc.fill(HALF);
            for (y, &w) in k.iter().enumerate() {
                let row = &src[(first + y) * stride..][..stride];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
                }
            }
            for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
                *o = clip8(a);
            }
        },
    );
    out
}

/// Which Pillow release's bicubic resize to reproduce. Releases differ only in the order of the
/// two separable passes, which changes results by rounding (the passes round to `u8` in between).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PillowCompat {
    /// Pillow 13.0 and later: the vertical pass runs first when the height shrinks by more than
    /// twice as many pixels as the width does (e.g. portrait phone screenshots), else horizontal
    /// first. What `pip install pillow` gives today.
    #[default]
    Pillow13,
    /// Pillow 12.x and earlier: always horizontal, then vertical (the Pillow of Qwen2-VL's release).
    Pillow12,
}

/// Resizes `src` to `new_w`×`new_h` with Pillow's bicubic filter (`a = -0.5`), bit-exact with
/// `Image.resize((new_w, new_h), Image.BICUBIC)` of Pillow 13 on an `RGB` image. See
/// [`resize_bicubic_compat`] for earlier Pillow releases.
pub fn resize_bicubic(src: &RgbImage, new_w: u32, new_h: u32) -> RgbImage {
    resize_bicubic_compat(src, new_w, new_h, PillowCompat::default())
}

/// [`resize_bicubic`] bit-exact with the given Pillow release.
///
/// Like Pillow, an unchanged size returns a copy and an axis whose size is unchanged is not
/// resampled. A zero target size gives an empty image; an empty source gives a black image.
pub fn resize_bicubic_compat(
    src: &RgbImage,
    new_w: u32,
    new_h: u32,
    compat: PillowCompat,
) -> RgbImage {
    let (in_w, in_h) = src.dimensions();
    if (in_w, in_h) == (new_w, new_h) {
        return src.clone();
    }
    if new_w == 0 || new_h == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(new_w, new_h);
    }
    let need_horizontal = new_w != in_w;
    let need_vertical = new_h != in_h;
    let shrink_h = i64::from(in_h) - i64::from(new_h);
    let shrink_w = i64::from(in_w) - i64::from(new_w);
    let horizontal_first = match compat {
        PillowCompat::Pillow12 => true,
        PillowCompat::Pillow13 => !(shrink_h > 0 && shrink_h > shrink_w * 2),
    };
    let raw: &[u8] = src.as_raw();
    let pixels = if !need_vertical {
        resample_horizontal(
            raw,
            in_w as usize,
            0,
            in_h as usize,
            &precompute_coeffs(in_w, new_w),
        )
    } else if !need_horizontal {
        resample_vertical(raw, in_w as usize, 0, &precompute_coeffs(in_h, new_h))
    } else if horizontal_first {
        let vert = precompute_coeffs(in_h, new_h);
        // Only the source rows the vertical pass reads are resampled horizontally.
        let first = vert.start[0];
        let last = vert.start.len() - 1;
        let end = vert.start[last] + vert.len[last];
        let horiz = precompute_coeffs(in_w, new_w);
        let tmp = resample_horizontal(raw, in_w as usize, first, end - first, &horiz);
        resample_vertical(&tmp, new_w as usize, first, &vert)
    } else {
        let tmp = resample_vertical(raw, in_w as usize, 0, &precompute_coeffs(in_h, new_h));
        resample_horizontal(
            &tmp,
            in_w as usize,
            0,
            new_h as usize,
            &precompute_coeffs(in_w, new_w),
        )
    };
    RgbImage::from_raw(new_w, new_h, pixels).expect("a resampled image has new_w·new_h pixels")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_keys_cubic() {
        assert_eq!(bicubic_filter(0.0), 1.0);
        assert_eq!(bicubic_filter(1.0), 0.0);
        assert_eq!(bicubic_filter(2.0), 0.0);
        assert_eq!(bicubic_filter(0.5), 0.5625);
        assert_eq!(bicubic_filter(-1.5), -0.0625);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(100, 37), (37, 100), (1000, 1008), (5, 1), (1, 9)] {
            let c = precompute_coeffs(i, o);
            for xx in 0..o as usize {
                let s: i64 = c.weights[xx * c.ksize..][..c.len[xx]]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= c.len[xx] as i64,
                    "{i}->{o} @{xx}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = RgbImage::from_pixel(13, 7, image::Rgb([200, 3, 77]));
        let out = resize_bicubic(&src, 29, 4);
        assert!(out.pixels().all(|p| p.0 == [200, 3, 77]));
    }

    #[test]
    fn same_size_is_a_copy_and_degenerate_sizes_do_not_panic() {
        let src = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 9]));
        assert_eq!(resize_bicubic(&src, 5, 4), src);
        assert_eq!(resize_bicubic(&src, 0, 4).dimensions(), (0, 4));
        let empty = RgbImage::new(0, 3);
        assert_eq!(resize_bicubic(&empty, 2, 2), RgbImage::new(2, 2));
    }
}
