//! Where actions happen: the [`Environment`] trait and its implementations — the desktop (xcap +
//! enigo), Android over ADB, and an in-memory virtual screen for tests and dry runs.
//!
//! Coordinates: an [`Action`] given to [`Environment::perform`] is in the pixel space of the last
//! [`Observation`]'s screenshot (x right, y down, from its top-left). The environment alone turns
//! that into input coordinates (monitor origin, HiDPI scale), exactly once. The protocol layer maps
//! model coordinates into screenshot pixels.

pub mod android;
pub mod claims;
pub mod desktop;
pub mod virtual_screen;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::action::Action;

/// What kind of environment this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentKind {
    Desktop,
    Android,
    Virtual,
}

/// One look at the screen.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The captured pixels, RGB, in physical pixels.
    pub screenshot: RgbImage,
    /// Physical pixels per logical point of the captured screen (1.0 when not scaled).
    pub scale_factor: f64,
    /// Where the screenshot's top-left lies in the environment's global input space (logical
    /// points on the desktop; 0,0 on a phone).
    pub origin: (i32, i32),
    /// Which screen this is, e.g. `desktop:monitor:1` or `android:emulator-5554`.
    pub identity: String,
}

impl Observation {
    pub fn width(&self) -> u32 {
        self.screenshot.width()
    }
    pub fn height(&self) -> u32 {
        self.screenshot.height()
    }
}

/// What became of one action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Done,
    /// Not performed on purpose (not supported here, not allowed); the reason says which.
    Refused {
        reason: String,
    },
    /// Tried and failed; the environment is usable again.
    Failed {
        reason: String,
    },
}

/// A short account of an environment for logs, prompts and `vlad devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub kind: EnvironmentKind,
    pub identity: String,
    /// Screen size in physical pixels, when known.
    pub width: u32,
    pub height: u32,
    pub scale_factor: f64,
}

/// Errors that leave the environment unusable until it is opened again (no display, no device,
/// the connection lost). Ordinary action failures are [`Outcome::Failed`].
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{what} timed out after {seconds} s")]
    Timeout { what: String, seconds: f64 },
    #[error("{0}")]
    Other(String),
}

/// A screen to look at and act on.
pub trait Environment: Send {
    /// Captures the screen.
    fn observe(&mut self) -> Result<Observation, EnvironmentError>;
    /// Performs one action given in the last observation's screenshot pixels.
    fn perform(&mut self, action: &Action) -> Result<Outcome, EnvironmentError>;
    /// What this environment is.
    fn describe(&self) -> Description;
}

/// What can be acted on now: the desktop's monitors and windows and the Android devices, and
/// each source that could not be reached with why (`monitors`, `windows`, `android`).
pub struct Inventory {
    pub monitors: Option<Vec<desktop::MonitorInfo>>,
    pub windows: Option<Vec<desktop::WindowInfo>>,
    pub android: Option<Vec<android::DeviceInfo>>,
    pub errors: serde_json::Map<String, serde_json::Value>,
}

/// Asks the display and the adb server what they have (blocking); windows are listed only when
/// the display answered.
pub fn inventory() -> Inventory {
    let mut errors = serde_json::Map::new();
    let mut note = |source: &str, e: String| {
        errors.insert(source.into(), serde_json::Value::String(e));
    };
    let monitors = desktop::monitors()
        .map_err(|e| note("monitors", e.to_string()))
        .ok();
    let windows = match monitors {
        Some(_) => desktop::windows()
            .map_err(|e| note("windows", e.to_string()))
            .ok(),
        None => None,
    };
    let android = android::list_devices()
        .map_err(|e| note("android", e.to_string()))
        .ok();
    Inventory {
        monitors,
        windows,
        android,
        errors,
    }
}
