//! The desktop: screenshots through xcap (one monitor, or one window), input through enigo.
//!
//! Coordinates: an action's point is a pixel of the last screenshot; [`PointMap`] turns it into
//! the input backend's coordinates exactly once (monitor origin, capture vs physical size, HiDPI
//! scale; see [`mapping`]). On X11 both capture and XTest input are in root-window physical
//! pixels, so `Xft.dpi` (what xcap reports as the scale factor) changes the reported logical
//! geometry but never where a click lands. Physical monitor geometry comes from RandR directly
//! (xcap only reports it divided by the scale and truncated).
//!
//! Platforms: Linux X11 is built and tested (under Xvfb). Wayland, macOS and Windows build through
//! xcap's and enigo's backends but are untested: on Wayland enigo's default backend only reaches
//! X11 (XWayland) clients; on macOS/Windows the input space is assumed to be logical points
//! ([`InputSpace::native`]) — run `vlad calibrate` there before trusting a click.

pub mod keys;
pub mod mapping;

#[cfg(target_os = "linux")]
pub mod calibrate;
mod input;
#[cfg(target_os = "linux")]
mod x11;

use std::time::Duration;

use image::RgbImage;
use serde::Serialize;

use super::{Description, Environment, EnvironmentError, EnvironmentKind, Observation, Outcome};
use crate::action::Action;
pub use input::InputError;
pub use mapping::{InputSpace, MapError, PointMap};

/// Which part of the desktop an environment looks at and acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesktopTarget {
    /// The primary monitor (the first one when none is marked primary).
    Primary,
    /// A monitor by id (as `vlad devices` lists it) or by name (e.g. `screen`, `HDMI-1`).
    Monitor(String),
    /// A window by title (exact, then case-insensitive substring) or app name; the topmost match.
    Window(String),
}

impl std::str::FromStr for DesktopTarget {
    type Err = std::convert::Infallible;

    /// `""` or `primary`: the primary monitor; `window:TITLE`: a window; `monitor:ID` or any other
    /// text: a monitor by id or name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Ok(if s.is_empty() || s.eq_ignore_ascii_case("primary") {
            Self::Primary
        } else if let Some(title) = s.strip_prefix("window:") {
            Self::Window(title.to_string())
        } else {
            Self::Monitor(s.strip_prefix("monitor:").unwrap_or(s).to_string())
        })
    }
}

/// What can go wrong on the desktop.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    #[error(
        "no display: DISPLAY is not set (nor WAYLAND_DISPLAY); run vlad inside a desktop session, or start a virtual one: `Xvfb :99 -screen 0 1600x900x24 -noreset & export DISPLAY=:99`"
    )]
    NoDisplay,
    #[error("cannot reach the display {display:?}: {reason}")]
    Display { display: String, reason: String },
    #[error("screen capture failed: {0}")]
    Capture(String),
    #[error("no monitor {wanted:?}; available: {available}")]
    NoSuchMonitor { wanted: String, available: String },
    #[error("no window matches {wanted:?} (title or app name); open windows: {available}")]
    NoSuchWindow { wanted: String, available: String },
    #[error(
        "cannot list windows: {0} (window listing needs an EWMH window manager such as openbox)"
    )]
    Windows(String),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("calibration failed: {0}")]
    Calibration(String),
}

impl From<DesktopError> for EnvironmentError {
    fn from(e: DesktopError) -> Self {
        match e {
            DesktopError::NoDisplay | DesktopError::Display { .. } => {
                EnvironmentError::Unavailable(e.to_string())
            }
            other => EnvironmentError::Other(other.to_string()),
        }
    }
}

fn capture_err(e: xcap::XCapError) -> DesktopError {
    DesktopError::Capture(e.to_string())
}

/// Fails with [`DesktopError::NoDisplay`] when no display server is named in the environment.
pub fn check_display() -> Result<(), DesktopError> {
    if cfg!(target_os = "linux") {
        let set = |v: &str| std::env::var_os(v).is_some_and(|s| !s.is_empty());
        if !set("DISPLAY") && !set("WAYLAND_DISPLAY") {
            return Err(DesktopError::NoDisplay);
        }
    }
    Ok(())
}

/// A rectangle in global pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rect {
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

/// One monitor as `vlad devices` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonitorInfo {
    pub id: u32,
    pub name: String,
    pub primary: bool,
    /// Where it lies on the desktop, in physical pixels (what a screenshot of it covers).
    pub physical: Rect,
    /// The same in logical points (physical / scale).
    pub logical: Rect,
    pub scale_factor: f64,
}

/// One top-level window as `vlad devices` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowInfo {
    pub id: u32,
    pub title: String,
    pub app_name: String,
    pub pid: Option<u32>,
    /// Position and size in physical pixels.
    pub physical: Rect,
    pub minimized: bool,
    pub focused: bool,
}

/// The monitor list with its xcap handles.
fn monitor_handles() -> Result<Vec<(xcap::Monitor, MonitorInfo)>, DesktopError> {
    check_display()?;
    let all = xcap::Monitor::all().map_err(|e| DesktopError::Display {
        display: std::env::var("DISPLAY").unwrap_or_default(),
        reason: e.to_string(),
    })?;
    #[cfg(target_os = "linux")]
    let randr = x11::monitors().ok();
    let mut out = Vec::with_capacity(all.len());
    for m in all {
        let id = m.id().map_err(capture_err)?;
        let scale = f64::from(m.scale_factor().unwrap_or(1.0));
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        let logical = Rect {
            x: m.x().map_err(capture_err)?,
            y: m.y().map_err(capture_err)?,
            width: m.width().map_err(capture_err)?,
            height: m.height().map_err(capture_err)?,
        };
        let scaled = Rect {
            x: (f64::from(logical.x) * scale).round() as i32,
            y: (f64::from(logical.y) * scale).round() as i32,
            width: (f64::from(logical.width) * scale).round() as u32,
            height: (f64::from(logical.height) * scale).round() as u32,
        };
        // X11: the exact physical rectangle from RandR (xcap divides and truncates).
        #[cfg(target_os = "linux")]
        let physical = randr
            .as_ref()
            .and_then(|r| r.iter().find(|rm| rm.outputs.contains(&id)))
            .map(|rm| rm.rect)
            .unwrap_or(scaled);
        #[cfg(not(target_os = "linux"))]
        let physical = scaled;
        out.push((
            m.clone(),
            MonitorInfo {
                id,
                name: m.name().unwrap_or_default(),
                primary: m.is_primary().unwrap_or(false),
                physical,
                logical,
                scale_factor: scale,
            },
        ));
    }
    Ok(out)
}

/// Every monitor xcap sees.
pub fn monitors() -> Result<Vec<MonitorInfo>, DesktopError> {
    Ok(monitor_handles()?.into_iter().map(|(_, i)| i).collect())
}

fn window_handles() -> Result<Vec<(xcap::Window, WindowInfo)>, DesktopError> {
    check_display()?;
    let all = xcap::Window::all().map_err(|e| DesktopError::Windows(e.to_string()))?;
    let mut out = Vec::with_capacity(all.len());
    for w in all {
        let Ok(id) = w.id() else { continue };
        // A window can vanish between listing and asking; skip it rather than fail the list.
        let (Ok(x), Ok(y), Ok(width), Ok(height)) = (w.x(), w.y(), w.width(), w.height()) else {
            continue;
        };
        out.push((
            w.clone(),
            WindowInfo {
                id,
                title: w.title().unwrap_or_default(),
                app_name: w.app_name().unwrap_or_default(),
                pid: w.pid().ok(),
                physical: Rect {
                    x,
                    y,
                    width,
                    height,
                },
                minimized: w.is_minimized().unwrap_or(false),
                focused: w.is_focused().unwrap_or(false),
            },
        ));
    }
    Ok(out)
}

/// Every top-level window the window manager lists, topmost first.
pub fn windows() -> Result<Vec<WindowInfo>, DesktopError> {
    Ok(window_handles()?.into_iter().map(|(_, i)| i).collect())
}

fn pick_monitor(
    target: &DesktopTarget,
    list: Vec<(xcap::Monitor, MonitorInfo)>,
) -> Result<(xcap::Monitor, MonitorInfo), DesktopError> {
    let available = || {
        list.iter()
            .map(|(_, i)| format!("{} ({})", i.id, i.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let index = match target {
        DesktopTarget::Monitor(wanted) => {
            let w = wanted.trim();
            list.iter()
                .position(|(_, i)| i.id.to_string() == w)
                .or_else(|| {
                    list.iter()
                        .position(|(_, i)| i.name.eq_ignore_ascii_case(w))
                })
                .ok_or_else(|| DesktopError::NoSuchMonitor {
                    wanted: wanted.clone(),
                    available: available(),
                })?
        }
        _ => list
            .iter()
            .position(|(_, i)| i.primary)
            .or(if list.is_empty() { None } else { Some(0) })
            .ok_or_else(|| DesktopError::NoSuchMonitor {
                wanted: "primary".into(),
                available: "none".into(),
            })?,
    };
    list.into_iter()
        .nth(index)
        .ok_or_else(|| DesktopError::Capture("monitor list changed".into()))
}

fn pick_window(
    wanted: &str,
    list: Vec<(xcap::Window, WindowInfo)>,
) -> Result<(xcap::Window, WindowInfo), DesktopError> {
    let lower = wanted.to_lowercase();
    let index = list
        .iter()
        .position(|(_, i)| i.title == wanted)
        .or_else(|| {
            list.iter()
                .position(|(_, i)| i.title.to_lowercase().contains(&lower))
        })
        .or_else(|| {
            list.iter()
                .position(|(_, i)| i.app_name.eq_ignore_ascii_case(wanted))
        });
    match index {
        Some(i) => list
            .into_iter()
            .nth(i)
            .ok_or_else(|| DesktopError::Capture("window list changed".into())),
        None => Err(DesktopError::NoSuchWindow {
            wanted: wanted.to_string(),
            available: list
                .iter()
                .map(|(_, i)| format!("{:?}", i.title))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// A resolved target: where it is and how to capture it.
enum Resolved {
    Monitor(xcap::Monitor, MonitorInfo),
    Window(xcap::Window, WindowInfo, f64),
}

impl Resolved {
    fn identity(&self) -> String {
        match self {
            Self::Monitor(_, i) => format!("desktop:monitor:{}", i.id),
            Self::Window(_, i, _) => format!("desktop:window:{}", i.id),
        }
    }

    fn map(&self) -> PointMap {
        let (rect, scale) = match self {
            Self::Monitor(_, i) => (i.physical, i.scale_factor),
            Self::Window(_, i, s) => (i.physical, *s),
        };
        PointMap::identity_capture(
            (rect.x, rect.y),
            (rect.width, rect.height),
            scale,
            InputSpace::native(),
        )
    }

    fn capture(&self) -> Result<RgbImage, DesktopError> {
        let rgba = match self {
            Self::Monitor(m, _) => m.capture_image(),
            Self::Window(w, _, _) => w.capture_image(),
        }
        .map_err(capture_err)?;
        Ok(image::DynamicImage::ImageRgba8(rgba).into_rgb8())
    }
}

fn resolve(target: &DesktopTarget) -> Result<Resolved, DesktopError> {
    match target {
        DesktopTarget::Window(wanted) => {
            let (w, info) = pick_window(wanted, window_handles()?)?;
            let scale = w
                .current_monitor()
                .ok()
                .and_then(|m| m.scale_factor().ok())
                .map(f64::from)
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or(1.0);
            Ok(Resolved::Window(w, info, scale))
        }
        _ => {
            let (m, info) = pick_monitor(target, monitor_handles()?)?;
            Ok(Resolved::Monitor(m, info))
        }
    }
}

/// The last screenshot's geometry: actions are read in its pixels.
#[derive(Debug, Clone)]
struct Frame {
    map: PointMap,
    identity: String,
}

/// The desktop as an [`Environment`].
pub struct DesktopEnvironment {
    target: DesktopTarget,
    input: Option<input::Input>,
    last: Option<Frame>,
}

impl std::fmt::Debug for DesktopEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesktopEnvironment")
            .field("target", &self.target)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl DesktopEnvironment {
    /// Opens the desktop for `target`; fails at once when there is no display or no such
    /// monitor/window. The input connection is opened at the first action.
    pub fn open(target: DesktopTarget) -> Result<Self, DesktopError> {
        let resolved = resolve(&target)?;
        Ok(Self {
            target,
            input: None,
            last: Some(Frame {
                map: resolved.map(),
                identity: resolved.identity(),
            }),
        })
    }

    /// The current mapping from screenshot pixels to input coordinates (the last screenshot's).
    pub fn point_map(&self) -> Option<PointMap> {
        self.last.as_ref().map(|f| f.map)
    }

    /// Where a screenshot pixel goes, as input coordinates; for `vlad do` reports and tests.
    pub fn input_point(&self, x: i32, y: i32) -> Result<(i32, i32), DesktopError> {
        let frame = self
            .last
            .as_ref()
            .ok_or_else(|| DesktopError::Capture("no screenshot taken yet".into()))?;
        Ok(frame.map.to_input(x, y)?)
    }

    fn input(&mut self) -> Result<&mut input::Input, DesktopError> {
        if self.input.is_none() {
            check_display()?;
            self.input = Some(input::Input::new()?);
        }
        self.input
            .as_mut()
            .ok_or_else(|| DesktopError::Capture("input connection missing".into()))
    }

    fn run(&mut self, action: &Action) -> Result<Outcome, DesktopError> {
        let map = match &self.last {
            Some(f) => f.map,
            None => resolve(&self.target)?.map(),
        };
        let point = |x: i32, y: i32| map.to_input(x, y);
        let failed = |e: MapError| {
            Ok(Outcome::Failed {
                reason: e.to_string(),
            })
        };
        match action {
            Action::Click { x, y } | Action::DoubleClick { x, y } | Action::RightClick { x, y } => {
                let p = match point(*x, *y) {
                    Ok(p) => p,
                    Err(e) => return failed(e),
                };
                let (button, count) = match action {
                    Action::DoubleClick { .. } => (enigo::Button::Left, 2),
                    Action::RightClick { .. } => (enigo::Button::Right, 1),
                    _ => (enigo::Button::Left, 1),
                };
                self.input()?.click(p, button, count)?;
            }
            Action::LongPress { x, y, ms } => {
                let p = match point(*x, *y) {
                    Ok(p) => p,
                    Err(e) => return failed(e),
                };
                self.input()?.long_press(p, Duration::from_millis(*ms))?;
            }
            Action::Drag {
                x,
                y,
                to_x,
                to_y,
                ms,
            }
            | Action::Swipe {
                x,
                y,
                to_x,
                to_y,
                ms,
            } => {
                let (from, to) = match (point(*x, *y), point(*to_x, *to_y)) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(e), _) | (_, Err(e)) => return failed(e),
                };
                let duration = Duration::from_millis(ms.unwrap_or(400).min(10_000));
                self.input()?.drag(from, to, duration)?;
            }
            Action::Scroll {
                x,
                y,
                direction,
                amount,
            } => {
                let p = match point(*x, *y) {
                    Ok(p) => p,
                    Err(e) => return failed(e),
                };
                self.input()?.scroll(p, *direction, *amount)?;
            }
            Action::Type { text } => self.input()?.type_text(text)?,
            Action::Key { keys } => {
                let combo = match keys::resolve_combo(keys) {
                    Ok(c) => c,
                    Err(e) => {
                        return Ok(Outcome::Failed {
                            reason: e.to_string(),
                        });
                    }
                };
                self.input()?.combo(&combo)?;
            }
            Action::Enter => {
                let combo = keys::resolve_combo(&["enter"]).map_err(InputError::from)?;
                self.input()?.combo(&combo)?;
            }
            Action::Wait { seconds } => {
                if !(seconds.is_finite() && *seconds >= 0.0 && *seconds <= 3600.0) {
                    return Ok(Outcome::Failed {
                        reason: format!("cannot wait {seconds} s (0 to 3600)"),
                    });
                }
                std::thread::sleep(Duration::from_secs_f64(*seconds));
            }
            Action::Home | Action::Back | Action::AppSwitch | Action::OpenApp { .. } => {
                return Ok(Outcome::Refused {
                    reason: format!(
                        "{} is a phone action; on the desktop use key (e.g. [\"alt\", \"left\"]) or click",
                        action.tag()
                    ),
                });
            }
            Action::Finish { .. } | Action::CallUser { .. } | Action::Tool { .. } => {
                return Ok(Outcome::Refused {
                    reason: format!("{} is handled by the agent, not the screen", action.tag()),
                });
            }
        }
        Ok(Outcome::Done)
    }
}

impl Environment for DesktopEnvironment {
    fn observe(&mut self) -> Result<Observation, EnvironmentError> {
        let resolved = resolve(&self.target)?;
        let screenshot = resolved.capture()?;
        let map = resolved
            .map()
            .with_capture_size((screenshot.width(), screenshot.height()));
        let identity = resolved.identity();
        self.last = Some(Frame {
            map,
            identity: identity.clone(),
        });
        Ok(Observation {
            screenshot,
            scale_factor: map.scale_factor,
            origin: map.logical_origin(),
            identity,
        })
    }

    fn perform(&mut self, action: &Action) -> Result<Outcome, EnvironmentError> {
        match self.run(action) {
            Ok(outcome) => Ok(outcome),
            // A failed input call leaves the desktop usable: report it as a failed action.
            Err(DesktopError::Input(e)) => Ok(Outcome::Failed {
                reason: e.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn describe(&self) -> Description {
        let (map, identity) = match &self.last {
            Some(f) => (Some(f.map), f.identity.clone()),
            None => (None, "desktop".to_string()),
        };
        Description {
            kind: EnvironmentKind::Desktop,
            identity,
            width: map.map_or(0, |m| m.capture_size.0),
            height: map.map_or(0, |m| m.capture_size.1),
            scale_factor: map.map_or(1.0, |m| m.scale_factor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_a_device_spec() {
        let t = |s: &str| s.parse::<DesktopTarget>().ok();
        assert_eq!(t(""), Some(DesktopTarget::Primary));
        assert_eq!(t("primary"), Some(DesktopTarget::Primary));
        assert_eq!(
            t("window:vlad probe"),
            Some(DesktopTarget::Window("vlad probe".into()))
        );
        assert_eq!(t("monitor:61"), Some(DesktopTarget::Monitor("61".into())));
        assert_eq!(t("HDMI-1"), Some(DesktopTarget::Monitor("HDMI-1".into())));
    }

    #[test]
    fn no_display_maps_to_an_unavailable_environment() {
        let e: EnvironmentError = DesktopError::NoDisplay.into();
        assert!(matches!(e, EnvironmentError::Unavailable(_)));
    }
}
