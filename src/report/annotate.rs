//! Drawing a grounding on a screenshot: the box as an outline and the click point as a filled
//! dot with a dark ring, in the marker colours the HTML report uses too ([`BOX_COLOR`],
//! [`POINT_COLOR`]), so a box looks the same in `vlad ground --annotate` and in a report.

use image::{Rgba, RgbaImage};

/// The outline of a box the model gave (magenta: rare in user interfaces).
pub const BOX_COLOR: [u8; 3] = [255, 0, 255];
/// The fill of a click point (cyan).
pub const POINT_COLOR: [u8; 3] = [0, 229, 255];
/// The ring around a click point, for contrast on light screens.
pub const RING_COLOR: [u8; 3] = [20, 20, 20];
/// Outline width of a box, in pixels (centred on the box edge).
pub const BOX_STROKE: i32 = 3;
/// Radius of the filled part of a click point, in pixels.
pub const POINT_RADIUS: i32 = 5;

/// A colour as CSS `#rrggbb`.
pub fn css(color: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", color[0], color[1], color[2])
}

fn put(img: &mut RgbaImage, x: i32, y: i32, color: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(
            x as u32,
            y as u32,
            Rgba([color[0], color[1], color[2], 255]),
        );
    }
}

/// Outlines the box `[x1, y1, x2, y2]` (corners in image pixels, in any order) with a
/// [`BOX_STROKE`]-pixel line centred on its edges. Parts outside the image are clipped.
pub fn draw_box(img: &mut RgbaImage, bbox: [i32; 4], color: [u8; 3]) {
    let (x1, x2) = (bbox[0].min(bbox[2]), bbox[0].max(bbox[2]));
    let (y1, y2) = (bbox[1].min(bbox[3]), bbox[1].max(bbox[3]));
    let half = BOX_STROKE / 2;
    for d in -half..=half {
        for x in (x1 - half)..=(x2 + half) {
            put(img, x, y1 + d, color);
            put(img, x, y2 + d, color);
        }
        for y in (y1 - half)..=(y2 + half) {
            put(img, x1 + d, y, color);
            put(img, x2 + d, y, color);
        }
    }
}

/// Draws a click point: a disc of [`POINT_RADIUS`] in `color` inside a 2-pixel dark ring.
pub fn draw_point(img: &mut RgbaImage, (cx, cy): (i32, i32), color: [u8; 3]) {
    let outer = POINT_RADIUS + 2;
    for dy in -outer..=outer {
        for dx in -outer..=outer {
            let d2 = dx * dx + dy * dy;
            if d2 <= POINT_RADIUS * POINT_RADIUS {
                put(img, cx + dx, cy + dy, color);
            } else if d2 <= outer * outer {
                put(img, cx + dx, cy + dy, RING_COLOR);
            }
        }
    }
}

/// A copy of `img` with a box and its click point drawn in the report's marker colours.
pub fn annotate(img: &RgbaImage, bbox: [i32; 4], point: (i32, i32)) -> RgbaImage {
    let mut out = img.clone();
    draw_box(&mut out, bbox, BOX_COLOR);
    draw_point(&mut out, point, POINT_COLOR);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_edges_and_point_centre_carry_the_marker_colours() {
        let img = RgbaImage::from_pixel(100, 80, Rgba([240, 240, 240, 255]));
        let out = annotate(&img, [10, 20, 60, 50], (35, 35));
        let rgb = |x: u32, y: u32| {
            let p = out.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        };
        for (x, y) in [(10, 35), (60, 35), (30, 20), (30, 50), (9, 20), (61, 50)] {
            assert_eq!(rgb(x, y), BOX_COLOR, "({x}, {y})");
        }
        assert_eq!(rgb(35, 35), POINT_COLOR);
        assert_eq!(rgb(35 + POINT_RADIUS as u32 + 1, 35), RING_COLOR);
        // Inside the box, away from the point, nothing changed.
        assert_eq!(rgb(15, 25), [240, 240, 240]);
        assert_eq!(rgb(80, 70), [240, 240, 240]);
    }

    #[test]
    fn shapes_past_the_edges_are_clipped() {
        let img = RgbaImage::new(20, 20);
        let out = annotate(&img, [-5, -5, 30, 30], (-3, 25));
        assert_eq!(out.dimensions(), (20, 20));
    }

    #[test]
    fn css_colours_are_hex() {
        assert_eq!(css(BOX_COLOR), "#ff00ff");
        assert_eq!(css(POINT_COLOR), "#00e5ff");
    }
}
