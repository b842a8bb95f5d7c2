//! Decoding `screencap` output: PNG (`screencap -p`) or the raw fast path, whose header is
//! width, height, pixel format (u32 little-endian each) and, since Android 9 or so, a fourth u32
//! colour space — 12 or 16 bytes. The header length is told apart by the payload size.

use image::{Rgb, RgbImage};

/// Android `PixelFormat` values screencap writes.
const RGBA_8888: u32 = 1;
const RGBX_8888: u32 = 2;
const RGB_888: u32 = 3;
const RGB_565: u32 = 4;
const BGRA_8888: u32 = 5;

/// Why a capture could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub String);

/// Decodes PNG bytes into RGB.
pub(crate) fn decode_png(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError("screencap -p wrote nothing".into()));
    }
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map(|img| img.to_rgb8())
        .map_err(|e| {
            let start = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
            DecodeError(format!(
                "not a PNG ({e}; {} bytes starting {start:?})",
                bytes.len()
            ))
        })
}

/// Decodes raw `screencap` output into RGB.
pub(crate) fn decode_raw(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let word = |i: usize| -> Option<u32> {
        let b = bytes.get(4 * i..4 * i + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (Some(width), Some(height), Some(format)) = (word(0), word(1), word(2)) else {
        return Err(DecodeError(format!(
            "raw screencap output is {} bytes, shorter than its 12-byte header",
            bytes.len()
        )));
    };
    let bpp: usize = match format {
        RGBA_8888 | RGBX_8888 | BGRA_8888 => 4,
        RGB_888 => 3,
        RGB_565 => 2,
        other => {
            return Err(DecodeError(format!(
                "raw screencap pixel format {other} is not supported"
            )));
        }
    };
    if width == 0 || height == 0 || width > 16384 || height > 16384 {
        return Err(DecodeError(format!(
            "raw screencap header says {width}x{height}"
        )));
    }
    let (w, h) = (width as usize, height as usize);
    let row = w * bpp;
    // Prefer an exact payload after a 16- or 12-byte header; accept row padding (older versions
    // wrote the buffer's stride) only when nothing exact fits.
    let mut layout = None;
    for header in [16usize, 12] {
        if bytes.len() >= header && bytes.len() - header == row * h {
            layout = Some((header, row));
            break;
        }
    }
    if layout.is_none() {
        for header in [16usize, 12] {
            let payload = bytes.len().saturating_sub(header);
            if payload > row * h && payload % h == 0 && (payload / h) % bpp == 0 {
                layout = Some((header, payload / h));
                break;
            }
        }
    }
    let Some((header, stride)) = layout else {
        return Err(DecodeError(format!(
            "raw screencap output is {} bytes; a {width}x{height} image in format {format} needs {} after a 12- or 16-byte header (cut short?)",
            bytes.len(),
            row * h
        )));
    };
    let pixels = &bytes[header..];
    let mut img = RgbImage::new(width, height);
    for (y, line) in pixels.chunks_exact(stride).take(h).enumerate() {
        for (x, px) in line[..row].chunks_exact(bpp).enumerate() {
            let rgb = match format {
                BGRA_8888 => [px[2], px[1], px[0]],
                RGB_565 => {
                    let v = u16::from_le_bytes([px[0], px[1]]);
                    let r = ((v >> 11) & 0x1f) as u8;
                    let g = ((v >> 5) & 0x3f) as u8;
                    let b = (v & 0x1f) as u8;
                    [
                        (r << 3) | (r >> 2),
                        (g << 2) | (g >> 4),
                        (b << 3) | (b >> 2),
                    ]
                }
                _ => [px[0], px[1], px[2]],
            };
            img.put_pixel(x as u32, y as u32, Rgb(rgb));
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(header: &[u32], pixels: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.extend_from_slice(pixels);
        out
    }

    #[test]
    fn twelve_and_sixteen_byte_headers_decode_alike() {
        let px = [10, 20, 30, 255, 40, 50, 60, 255];
        let a = decode_raw(&raw(&[2, 1, RGBA_8888], &px)).unwrap();
        let b = decode_raw(&raw(&[2, 1, RGBA_8888, 1], &px)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.get_pixel(1, 0), &Rgb([40, 50, 60]));
    }

    #[test]
    fn other_formats_and_padding() {
        let bgra = decode_raw(&raw(&[1, 1, BGRA_8888], &[1, 2, 3, 255])).unwrap();
        assert_eq!(bgra.get_pixel(0, 0), &Rgb([3, 2, 1]));
        let white565 = decode_raw(&raw(&[1, 1, RGB_565], &[0xff, 0xff])).unwrap();
        assert_eq!(white565.get_pixel(0, 0), &Rgb([255, 255, 255]));
        // 1x2 image with rows padded to a stride of 2 pixels.
        let padded = decode_raw(&raw(
            &[1, 2, RGBX_8888],
            &[1, 1, 1, 0, 9, 9, 9, 9, 2, 2, 2, 0, 9, 9, 9, 9],
        ))
        .unwrap();
        assert_eq!(padded.get_pixel(0, 1), &Rgb([2, 2, 2]));
    }

    #[test]
    fn short_or_strange_output_is_an_error() {
        assert!(decode_raw(&[1, 2, 3]).is_err());
        assert!(decode_raw(&raw(&[2, 2, RGBA_8888], &[0; 7])).is_err());
        assert!(decode_raw(&raw(&[2, 2, 99], &[0; 16])).is_err());
        assert!(decode_png(b"").is_err());
        assert!(decode_png(b"/system/bin/sh: screencap: not found").is_err());
    }
}
