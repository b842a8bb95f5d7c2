//! The one conversion from screenshot pixels to input coordinates on the desktop.
//!
//! Three spaces meet here:
//! - **screenshot pixels**: what the model saw, `capture_size` wide and high;
//! - **physical pixels**: the monitor's pixels in the global desktop (X11 root window), the
//!   captured area spans `physical_size` from `physical_origin`. A capture path that returns
//!   logical-size images makes the two sizes differ; xcap on X11 does not (they are equal);
//! - **logical points**: physical pixels divided by the scale factor (HiDPI).
//!
//! Which of the last two the input backend wants is [`InputSpace`]: enigo's X11 backend (XTest)
//! moves the pointer in root-window **physical pixels**, whatever `Xft.dpi` says; macOS
//! (CGEvent) wants logical points. [`PointMap::to_input`] applies that choice exactly once:
//!
//! ```text
//! physical = physical_origin + (px + 0.5) * physical_size / capture_size    (continuous)
//! input    = floor(physical)            for InputSpace::Physical
//!          = floor(physical / scale)    for InputSpace::Logical
//! ```
//!
//! (`+ 0.5`: aim at the centre of the screenshot pixel, so that a half-size capture clicks the
//! middle of the 2x2 physical block, and a 1:1 capture clicks exactly that pixel.)

use serde::Serialize;

/// The coordinate space the input backend expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputSpace {
    /// Global physical pixels (X11/XTest; Windows for a DPI-aware process).
    Physical,
    /// Global logical points (macOS; a DPI-unaware process on Windows).
    Logical,
}

impl InputSpace {
    /// What enigo's backend wants on the platform this was built for. Only Linux X11 is tested;
    /// the other answers follow the platforms' documentation.
    pub fn native() -> Self {
        if cfg!(any(target_os = "macos", target_os = "windows")) {
            Self::Logical
        } else {
            Self::Physical
        }
    }
}

/// Where a screenshot lies on the desktop and how its pixels reach the input backend.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PointMap {
    /// Top-left of the captured area in global physical pixels.
    pub physical_origin: (i32, i32),
    /// Size of the captured area in physical pixels.
    pub physical_size: (u32, u32),
    /// Size of the screenshot in pixels.
    pub capture_size: (u32, u32),
    /// Physical pixels per logical point (1.0 when not scaled).
    pub scale_factor: f64,
    pub input_space: InputSpace,
}

/// A point that cannot be mapped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MapError {
    #[error("({x}, {y}) is outside the {width}x{height} screenshot")]
    Outside {
        x: i32,
        y: i32,
        width: u32,
        height: u32,
    },
    #[error("the screen geometry is unusable ({0})")]
    Geometry(String),
    #[error("({x}, {y}) maps to input point ({ix}, {iy}), which the input backend cannot reach")]
    Unreachable { x: i32, y: i32, ix: f64, iy: f64 },
}

impl PointMap {
    /// A map for a capture that is exactly the physical area (the X11 case).
    pub fn identity_capture(
        physical_origin: (i32, i32),
        physical_size: (u32, u32),
        scale_factor: f64,
        input_space: InputSpace,
    ) -> Self {
        Self {
            physical_origin,
            physical_size,
            capture_size: physical_size,
            scale_factor,
            input_space,
        }
    }

    /// The same area, seen through a screenshot of another size.
    pub fn with_capture_size(self, capture_size: (u32, u32)) -> Self {
        Self {
            capture_size,
            ..self
        }
    }

    /// Whether (`x`, `y`) is a pixel of the screenshot.
    pub fn contains(&self, x: i32, y: i32) -> bool {
        x >= 0 && y >= 0 && (x as u32) < self.capture_size.0 && (y as u32) < self.capture_size.1
    }

    /// Screenshot pixel → input coordinates (see the module doc for the formula).
    pub fn to_input(&self, x: i32, y: i32) -> Result<(i32, i32), MapError> {
        let (cw, ch) = self.capture_size;
        let (pw, ph) = self.physical_size;
        if cw == 0 || ch == 0 || pw == 0 || ph == 0 {
            return Err(MapError::Geometry(format!(
                "capture {cw}x{ch}, physical {pw}x{ph}"
            )));
        }
        if !(self.scale_factor.is_finite() && self.scale_factor > 0.0) {
            return Err(MapError::Geometry(format!(
                "scale factor {}",
                self.scale_factor
            )));
        }
        if !self.contains(x, y) {
            return Err(MapError::Outside {
                x,
                y,
                width: cw,
                height: ch,
            });
        }
        let gx = f64::from(self.physical_origin.0)
            + (f64::from(x) + 0.5) * f64::from(pw) / f64::from(cw);
        let gy = f64::from(self.physical_origin.1)
            + (f64::from(y) + 0.5) * f64::from(ph) / f64::from(ch);
        let (ix, iy) = match self.input_space {
            InputSpace::Physical => (gx.floor(), gy.floor()),
            InputSpace::Logical => (
                (gx / self.scale_factor).floor(),
                (gy / self.scale_factor).floor(),
            ),
        };
        let fits = |v: f64| v >= f64::from(i32::MIN) && v <= f64::from(i32::MAX);
        if !fits(ix) || !fits(iy) {
            return Err(MapError::Unreachable { x, y, ix, iy });
        }
        Ok((ix as i32, iy as i32))
    }

    /// The top-left of the captured area in logical points (what
    /// [`Observation::origin`](crate::environment::Observation::origin) reports).
    pub fn logical_origin(&self) -> (i32, i32) {
        let s = if self.scale_factor > 0.0 {
            self.scale_factor
        } else {
            1.0
        };
        (
            (f64::from(self.physical_origin.0) / s).round() as i32,
            (f64::from(self.physical_origin.1) / s).round() as i32,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_to_one_capture_on_x11_adds_only_the_origin() {
        // A 1600x900 monitor at +800+0, Xft.dpi 192 (scale 2): X11 input stays physical.
        let m = PointMap::identity_capture((800, 0), (1600, 900), 2.0, InputSpace::Physical);
        assert_eq!(m.to_input(0, 0), Ok((800, 0)));
        assert_eq!(m.to_input(100, 50), Ok((900, 50)));
        assert_eq!(m.to_input(1599, 899), Ok((2399, 899)));
    }

    #[test]
    fn logical_input_divides_origin_and_offset_by_the_scale() {
        // The brief's formula: origin_logical + (x, y) / scale.
        let m = PointMap::identity_capture((1920, 0), (2560, 1440), 2.0, InputSpace::Logical);
        assert_eq!(m.to_input(100, 50), Ok((960 + 50, 25)));
        assert_eq!(m.to_input(101, 51), Ok((960 + 50, 25)));
        assert_eq!(m.to_input(2559, 1439), Ok((960 + 1279, 719)));
        assert_eq!(m.logical_origin(), (960, 0));
    }

    #[test]
    fn fractional_scale_rounds_toward_the_pixel_centre() {
        let m = PointMap::identity_capture((0, 0), (1500, 900), 1.5, InputSpace::Logical);
        // Pixel 3 spans physical [3, 4); its centre 3.5 / 1.5 = 2.33 → logical 2.
        assert_eq!(m.to_input(3, 3), Ok((2, 2)));
        // Pixel 1499 → 1499.5 / 1.5 = 999.67 → 999, inside the 1000-point-wide monitor.
        assert_eq!(m.to_input(1499, 899), Ok((999, 599)));
    }

    #[test]
    fn a_logical_size_capture_is_stretched_back_to_physical() {
        // A capture path that returned a 1280x720 image of a 2560x1440 monitor at (-2560, 0).
        let m = PointMap::identity_capture((-2560, 0), (2560, 1440), 2.0, InputSpace::Physical)
            .with_capture_size((1280, 720));
        assert_eq!(m.to_input(0, 0), Ok((-2559, 1)));
        assert_eq!(m.to_input(100, 50), Ok((-2560 + 201, 101)));
    }

    #[test]
    fn points_outside_the_screenshot_are_refused() {
        let m = PointMap::identity_capture((0, 0), (100, 50), 1.0, InputSpace::Physical);
        assert!(matches!(m.to_input(100, 0), Err(MapError::Outside { .. })));
        assert!(matches!(m.to_input(-1, 0), Err(MapError::Outside { .. })));
        assert!(matches!(m.to_input(0, 50), Err(MapError::Outside { .. })));
    }

    #[test]
    fn broken_geometry_is_an_error_not_a_division_by_zero() {
        let m = PointMap::identity_capture((0, 0), (0, 50), 1.0, InputSpace::Physical);
        assert!(matches!(m.to_input(0, 0), Err(MapError::Geometry(_))));
        let m = PointMap::identity_capture((0, 0), (10, 10), 0.0, InputSpace::Logical);
        assert!(matches!(m.to_input(0, 0), Err(MapError::Geometry(_))));
    }
}
