//! Coordinate spaces, end to end: the model's space (0–1000 relative, or pixels of the resized
//! image it saw) → the captured screenshot → the environment's input pixels (scale factor,
//! monitor origin).
//!
//! The conversion happens exactly once, in [`CoordMap::map_point`], with a single rounding
//! (half to even) at the end. Values outside the model's range are errors, never clamped; the
//! only adjustment is that a value on the far edge (exactly 1000, or the image width) lands on
//! the last pixel instead of one past it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A width and height in pixels. Reads and prints as `WxH` (`1080x2400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Size {
    type Err = CoordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CoordError::BadSize {
            text: s.to_string(),
        };
        let (w, h) = s.trim().split_once(['x', 'X', '×']).ok_or_else(bad)?;
        let width = w.trim().parse::<u32>().map_err(|_| bad())?;
        let height = h.trim().parse::<u32>().map_err(|_| bad())?;
        if width == 0 || height == 0 {
            return Err(bad());
        }
        Ok(Size { width, height })
    }
}

/// The space the model's numbers live in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordSpace {
    /// Qwen2-VL and UI-TARS 1.0: 0–1000 of the image, whatever its size.
    Relative1000,
    /// Qwen2.5-VL and UI-TARS 1.5: pixels of the image the model saw (after smart_resize).
    ImagePixels(Size),
}

impl CoordSpace {
    /// The largest valid value on each axis (the range is `0..=max`).
    pub fn max(&self) -> (f64, f64) {
        match self {
            Self::Relative1000 => (1000.0, 1000.0),
            Self::ImagePixels(size) => (f64::from(size.width), f64::from(size.height)),
        }
    }
}

/// An axis, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    X,
    Y,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X => "x",
            Self::Y => "y",
        })
    }
}

/// Why a coordinate or a mapping is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoordError {
    #[error("{axis} = {value} is outside the coordinate range 0 to {max}")]
    OutOfRange { axis: Axis, value: f64, max: f64 },
    #[error("{axis} is not a finite number")]
    NotFinite { axis: Axis },
    #[error("`{text}` is not a size; write WIDTHxHEIGHT with both above 0, e.g. 1080x2400")]
    BadSize { text: String },
    #[error("scale factor {scale} is not usable; give a finite number above 0, e.g. 1 or 2")]
    BadScale { scale: f64 },
    #[error("the screen is too large to address: {width}x{height} pixels")]
    TooLarge { width: f64, height: f64 },
    #[error("{axis} plus the monitor origin is beyond the addressable pixel range")]
    Overflow { axis: Axis },
}

/// How to turn model-space points into environment pixels for one screenshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoordMap {
    space: CoordSpace,
    /// Environment pixels covered by the screenshot (screenshot size × scale).
    target: (i64, i64),
    origin: (i32, i32),
}

impl CoordMap {
    /// `screenshot`: the captured screenshot's size; `scale`: environment pixels per screenshot
    /// pixel (2 when a HiDPI screen was captured at its logical size and input wants physical
    /// pixels, 1 when both agree); `origin`: the monitor's top-left in environment pixels.
    pub fn new(
        space: CoordSpace,
        screenshot: Size,
        scale: f64,
        origin: (i32, i32),
    ) -> Result<Self, CoordError> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(CoordError::BadScale { scale });
        }
        if let CoordSpace::ImagePixels(size) = space
            && (size.width == 0 || size.height == 0)
        {
            return Err(CoordError::BadSize {
                text: size.to_string(),
            });
        }
        let width = (f64::from(screenshot.width) * scale).round_ties_even();
        let height = (f64::from(screenshot.height) * scale).round_ties_even();
        let limit = f64::from(i32::MAX);
        if width < 1.0 || height < 1.0 || width > limit || height > limit {
            return Err(CoordError::TooLarge { width, height });
        }
        // Exact: both are integers within i32 range.
        Ok(Self {
            space,
            target: (width as i64, height as i64),
            origin,
        })
    }

    /// The identity-like map of the CLI: model space onto a screen of `screen` pixels.
    pub fn onto_screen(space: CoordSpace, screen: Size) -> Result<Self, CoordError> {
        Self::new(space, screen, 1.0, (0, 0))
    }

    pub fn space(&self) -> CoordSpace {
        self.space
    }

    /// Maps one model-space point to environment pixels.
    pub fn map_point(&self, x: f64, y: f64) -> Result<(i32, i32), CoordError> {
        let (max_x, max_y) = self.space.max();
        let px = map_axis(Axis::X, x, max_x, self.target.0, self.origin.0)?;
        let py = map_axis(Axis::Y, y, max_y, self.target.1, self.origin.1)?;
        Ok((px, py))
    }
}

fn map_axis(axis: Axis, value: f64, max: f64, target: i64, origin: i32) -> Result<i32, CoordError> {
    if !value.is_finite() {
        return Err(CoordError::NotFinite { axis });
    }
    if !(0.0..=max).contains(&value) {
        return Err(CoordError::OutOfRange { axis, value, max });
    }
    // One rounding: value * target is exact for integer inputs, the division rounds once.
    let scaled = (value * target as f64 / max).round_ties_even();
    // In range by the check above: 0 <= scaled <= target, both below 2^31.
    let pixel = (scaled as i64).min(target - 1) + i64::from(origin);
    i32::try_from(pixel).map_err(|_| CoordError::Overflow { axis })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_rounds_half_to_even_after_scaling() -> Result<(), CoordError> {
        let map = CoordMap::onto_screen(CoordSpace::Relative1000, "1080x2400".parse()?)?;
        assert_eq!(map.map_point(348.0, 291.0)?, (376, 698));
        // 500 * 1081 / 1000 = 540.5 -> 540 (even), 500 * 1083 / 1000 = 541.5 -> 542.
        let odd = CoordMap::onto_screen(CoordSpace::Relative1000, Size::new(1081, 1083))?;
        assert_eq!(odd.map_point(500.0, 500.0)?, (540, 542));
        Ok(())
    }

    #[test]
    fn absolute_pixels_scale_and_origin() -> Result<(), CoordError> {
        let space = CoordSpace::ImagePixels(Size::new(1288, 728));
        let map = CoordMap::new(space, Size::new(2576, 1456), 1.0, (0, 0))?;
        assert_eq!(map.map_point(644.0, 364.0)?, (1288, 728));
        // A logical-size capture on a 2x screen, second monitor at x = 2560.
        let hidpi = CoordMap::new(
            CoordSpace::Relative1000,
            Size::new(1280, 800),
            2.0,
            (2560, 0),
        )?;
        assert_eq!(hidpi.map_point(500.0, 500.0)?, (2560 + 1280, 800));
        Ok(())
    }

    #[test]
    fn edges_land_inside_and_outside_is_an_error() -> Result<(), CoordError> {
        let map = CoordMap::onto_screen(CoordSpace::Relative1000, Size::new(1080, 2400))?;
        assert_eq!(map.map_point(1000.0, 0.0)?, (1079, 0));
        assert_eq!(
            map.map_point(1000.5, 0.0),
            Err(CoordError::OutOfRange {
                axis: Axis::X,
                value: 1000.5,
                max: 1000.0
            })
        );
        assert!(matches!(
            map.map_point(5.0, -1.0),
            Err(CoordError::OutOfRange { axis: Axis::Y, .. })
        ));
        assert!(map.map_point(f64::NAN, 1.0).is_err());
        Ok(())
    }

    #[test]
    fn sizes_and_scales_are_validated() {
        assert_eq!("1000x2000".parse::<Size>(), Ok(Size::new(1000, 2000)));
        assert!("1000".parse::<Size>().is_err());
        assert!("0x5".parse::<Size>().is_err());
        assert!("-1x5".parse::<Size>().is_err());
        assert!(CoordMap::new(CoordSpace::Relative1000, Size::new(5, 5), 0.0, (0, 0)).is_err());
        assert!(
            CoordMap::new(CoordSpace::Relative1000, Size::new(5, 5), f64::NAN, (0, 0)).is_err()
        );
    }
}
