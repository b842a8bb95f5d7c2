//! Android phones and emulators over ADB: [`AndroidDevice`] is an [`Environment`] bound to one
//! device serial; [`list_devices`] lists what the adb server sees.
//!
//! vlad speaks the adb server protocol itself ([`AdbServer`]), found the way `adb` finds it
//! (`ANDROID_ADB_SERVER_ADDRESS`, `ANDROID_ADB_SERVER_PORT`, default 127.0.0.1:5037). Every command
//! opens a new connection with its own deadline, so a restarted server just works.
//!
//! Screens come from raw `screencap` (header parsed; 3× faster than PNG), falling back to
//! `screencap -p` when the raw output cannot be decoded. Input is `input tap|swipe|keyevent|text`;
//! text that `input text` cannot type (non-ASCII, a literal `%s`) goes through the ADBKeyboard IME's
//! base64 broadcast, switching to that IME and back; without ADBKeyboard such text fails with a
//! reason naming it, never silently dropped. Apps open with `monkey`; see the `apps` module for how names
//! resolve to packages. Screenshot pixels are device pixels: scale 1, origin 0,0.
//!
//! Limits: screenshots use the `exec:` service (Android 5+); devices are selected with
//! `host:transport:SERIAL`, which every adb server version understands; key combinations are not
//! sent (`input keycombination` exists only on Android 13+).

mod adb;
mod apps;
mod screencap;
pub mod text;

use std::time::Duration;

use image::RgbImage;
use tracing::{debug, warn};

pub use adb::{AdbServer, DEFAULT_PORT, DeviceInfo, ShellOutput};
pub use text::ADB_KEYBOARD_IME;

use super::{Description, Environment, EnvironmentError, EnvironmentKind, Observation, Outcome};
use crate::action::Action;
use text::Piece;

/// What can go wrong talking to the adb server or a device.
#[derive(Debug, thiserror::Error)]
pub enum AndroidError {
    #[error("{0}")]
    BadAddress(String),
    #[error(
        "no adb server at {address} ({reason}); start it with `adb start-server`, or point ANDROID_ADB_SERVER_ADDRESS / ANDROID_ADB_SERVER_PORT at the one you run"
    )]
    NoServer { address: String, reason: String },
    #[error("{what} timed out after {seconds:.1} s (adb server {address})")]
    Timeout {
        what: String,
        address: String,
        seconds: f64,
    },
    #[error("{what}: the connection to the adb server at {address} failed: {source}")]
    Io {
        what: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the adb server at {address} refused {request:?}: {message}")]
    Refused {
        address: String,
        request: String,
        message: String,
    },
    #[error("unexpected reply from the adb server at {address} to {request:?}: {detail}")]
    Protocol {
        address: String,
        request: String,
        detail: String,
    },
    #[error(
        "no Android device is connected to the adb server at {address}; plug one in with USB debugging on (or start an emulator) and check `adb devices`"
    )]
    NoDevice { address: String },
    #[error(
        "{count} Android devices are connected ({serials}); choose one by serial (--device SERIAL)"
    )]
    SeveralDevices { count: usize, serials: String },
    #[error("no device {serial:?} on the adb server at {address}; connected: {known}")]
    UnknownSerial {
        serial: String,
        address: String,
        known: String,
    },
    #[error("device {serial} is {state}{hint}")]
    NotReady {
        serial: String,
        state: String,
        hint: &'static str,
    },
    #[error("device {serial} went away during {what}: {detail}")]
    DeviceGone {
        serial: String,
        what: String,
        detail: String,
    },
    #[error("the screenshot of {serial} could not be decoded: {detail}")]
    Screenshot { serial: String, detail: String },
}

impl AndroidError {
    /// The server's `FAIL` to `host:transport:SERIAL`, as the error it means.
    fn device_refused(serial: &str, address: &str, message: String) -> Self {
        let lower = message.to_lowercase();
        if lower.contains("not found") || lower.contains("no devices") {
            Self::DeviceGone {
                serial: serial.to_owned(),
                what: "connecting to it".into(),
                detail: message,
            }
        } else if lower.contains("offline") {
            Self::not_ready(serial, "offline")
        } else if lower.contains("unauthorized") {
            Self::not_ready(serial, "unauthorized")
        } else {
            Self::Refused {
                address: address.to_owned(),
                request: format!("host:transport:{serial}"),
                message,
            }
        }
    }

    fn not_ready(serial: &str, state: &str) -> Self {
        let hint = if state.starts_with("unauthorized") {
            "; unlock it and accept the USB debugging prompt"
        } else if state.starts_with("offline") {
            "; reconnect it (or run `adb reconnect`)"
        } else if state.starts_with("no permissions") {
            "; give the adb server's user access to the USB device (udev rules)"
        } else {
            "; it must be in the `device` state"
        };
        Self::NotReady {
            serial: serial.to_owned(),
            state: state.to_owned(),
            hint,
        }
    }
}

impl From<AndroidError> for EnvironmentError {
    fn from(e: AndroidError) -> Self {
        match e {
            AndroidError::Timeout {
                what,
                address,
                seconds,
            } => EnvironmentError::Timeout {
                what: format!("{what} (adb server {address})"),
                seconds,
            },
            AndroidError::NoServer { .. }
            | AndroidError::NoDevice { .. }
            | AndroidError::UnknownSerial { .. }
            | AndroidError::NotReady { .. }
            | AndroidError::DeviceGone { .. } => EnvironmentError::Unavailable(e.to_string()),
            other => EnvironmentError::Other(other.to_string()),
        }
    }
}

/// Every device the adb server (found through the environment variables) knows, in any state.
pub fn list_devices() -> Result<Vec<DeviceInfo>, AndroidError> {
    AdbServer::from_env()?.devices()
}

/// How screenshots are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScreenshotMode {
    /// Raw `screencap`, falling back to PNG for good once raw output cannot be decoded.
    #[default]
    Auto,
    Raw,
    Png,
}

/// Limits and pacing for one device.
#[derive(Debug, Clone, PartialEq)]
pub struct AndroidOptions {
    /// Limit for one shell command (launching an app gets twice this).
    pub command_timeout: Duration,
    /// Limit for one screenshot.
    pub screenshot_timeout: Duration,
    pub screenshot: ScreenshotMode,
    /// Pause after switching to ADBKeyboard, so it is bound to the focused field before typing.
    pub ime_settle: Duration,
    /// Swipe duration when the action gives none.
    pub swipe_ms: u64,
    /// Drag duration when the action gives none (a drag is a slow swipe).
    pub drag_ms: u64,
}

impl Default for AndroidOptions {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(10),
            screenshot_timeout: Duration::from_secs(15),
            screenshot: ScreenshotMode::Auto,
            ime_settle: Duration::from_millis(500),
            swipe_ms: 300,
            drag_ms: 1000,
        }
    }
}

/// One Android device, by serial, as an [`Environment`].
#[derive(Debug, Clone)]
pub struct AndroidDevice {
    server: AdbServer,
    info: DeviceInfo,
    options: AndroidOptions,
    /// Screen size in device pixels: from `wm size`, then from each screenshot.
    size: Option<(u32, u32)>,
    raw_failed: bool,
}

/// A shell command's failure, as the reason of an outcome.
type Reason = String;

impl AndroidDevice {
    /// Opens `serial` (None: the only ready device) on the server the environment names.
    pub fn connect(serial: Option<&str>) -> Result<Self, AndroidError> {
        Self::connect_to(AdbServer::from_env()?, serial, AndroidOptions::default())
    }

    /// Opens `serial` (None: the only ready device) on `server`.
    pub fn connect_to(
        server: AdbServer,
        serial: Option<&str>,
        options: AndroidOptions,
    ) -> Result<Self, AndroidError> {
        let devices = server.devices()?;
        let serials = |list: &[DeviceInfo]| {
            list.iter()
                .map(|d| format!("{} ({})", d.serial, d.state))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let info = match serial {
            Some(serial) => match devices.iter().find(|d| d.serial == serial) {
                Some(d) => d.clone(),
                None => {
                    return Err(AndroidError::UnknownSerial {
                        serial: serial.to_owned(),
                        address: server.address(),
                        known: if devices.is_empty() {
                            "none".into()
                        } else {
                            serials(&devices)
                        },
                    });
                }
            },
            None => {
                let ready: Vec<_> = devices.iter().filter(|d| d.is_ready()).cloned().collect();
                match (ready.as_slice(), devices.first()) {
                    ([one], _) => one.clone(),
                    ([], None) => {
                        return Err(AndroidError::NoDevice {
                            address: server.address(),
                        });
                    }
                    ([], Some(first)) => first.clone(),
                    (several, _) => {
                        return Err(AndroidError::SeveralDevices {
                            count: several.len(),
                            serials: serials(several),
                        });
                    }
                }
            }
        };
        if !info.is_ready() {
            return Err(AndroidError::not_ready(&info.serial, &info.state));
        }
        let mut device = Self {
            server,
            info,
            options,
            size: None,
            raw_failed: false,
        };
        device.size = device.wm_size()?;
        Ok(device)
    }

    pub fn serial(&self) -> &str {
        &self.info.serial
    }

    /// The device as the server listed it when connecting.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn server(&self) -> &AdbServer {
        &self.server
    }

    /// Screen size in device pixels, when known.
    pub fn size(&self) -> Option<(u32, u32)> {
        self.size
    }

    /// Runs `command` in the device's shell.
    pub fn shell(&self, command: &str) -> Result<ShellOutput, AndroidError> {
        self.shell_with(command, self.options.command_timeout)
    }

    fn shell_with(&self, command: &str, timeout: Duration) -> Result<ShellOutput, AndroidError> {
        debug!(serial = %self.info.serial, command, "adb shell");
        self.server.shell(&self.info.serial, command, timeout)
    }

    /// Runs `command`; Err(reason) when it exits non-zero or prints an error (`input` and `am`
    /// exit 0 on some errors).
    fn run(&self, command: &str) -> Result<Result<String, Reason>, AndroidError> {
        let out = self.shell(command)?;
        let text = out.output.trim();
        let complained =
            text.contains("Exception") || text.starts_with("Error") || text.contains("\nError");
        Ok(if out.success() && !complained {
            Ok(out.output)
        } else {
            Err(format!(
                "`{command}` failed (status {}): {}",
                out.status,
                last_lines(text)
            ))
        })
    }

    /// `wm size`: the override size when set, else the physical size.
    fn wm_size(&self) -> Result<Option<(u32, u32)>, AndroidError> {
        let out = self.shell("wm size")?;
        let parse = |prefix: &str| {
            out.output.lines().find_map(|l| {
                let (w, h) = l.trim().strip_prefix(prefix)?.trim().split_once('x')?;
                Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
            })
        };
        Ok(parse("Override size:").or_else(|| parse("Physical size:")))
    }

    /// Takes a screenshot (raw or PNG, per [`AndroidOptions::screenshot`]).
    pub fn screenshot(&mut self) -> Result<RgbImage, AndroidError> {
        let img = match (self.options.screenshot, self.raw_failed) {
            (ScreenshotMode::Png, _) | (ScreenshotMode::Auto, true) => self.capture(true)?,
            (ScreenshotMode::Raw, _) => self.capture(false)?,
            (ScreenshotMode::Auto, false) => match self.capture(false) {
                Ok(img) => img,
                Err(AndroidError::Screenshot { detail, .. }) => {
                    warn!(serial = %self.info.serial, %detail, "raw screencap unusable; using screencap -p from now on");
                    self.raw_failed = true;
                    self.capture(true)?
                }
                Err(e) => return Err(e),
            },
        };
        self.size = Some(img.dimensions());
        Ok(img)
    }

    /// One capture: `screencap -p` when `png`, else raw `screencap`.
    pub fn capture(&self, png: bool) -> Result<RgbImage, AndroidError> {
        let command = if png { "screencap -p" } else { "screencap" };
        debug!(serial = %self.info.serial, command, "adb exec");
        let bytes =
            self.server
                .exec(&self.info.serial, command, self.options.screenshot_timeout)?;
        let decoded = if png {
            screencap::decode_png(&bytes)
        } else {
            screencap::decode_raw(&bytes)
        };
        decoded.map_err(|screencap::DecodeError(detail)| {
            self.gone_or(AndroidError::Screenshot {
                serial: self.info.serial.clone(),
                detail,
            })
        })
    }

    /// `err`, unless the device is no longer ready, which is the better explanation.
    fn gone_or(&self, err: AndroidError) -> AndroidError {
        match self.server.devices() {
            Ok(list)
                if list
                    .iter()
                    .any(|d| d.serial == self.info.serial && d.is_ready()) =>
            {
                err
            }
            Ok(_) => AndroidError::DeviceGone {
                serial: self.info.serial.clone(),
                what: "a screenshot".into(),
                detail: format!("the adb server no longer lists it as ready ({err})"),
            },
            Err(e) => e,
        }
    }

    fn outside(&self, x: i32, y: i32) -> Option<Outcome> {
        let (w, h) = self.size?;
        let inside = x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h;
        (!inside).then(|| Outcome::Failed {
            reason: format!(
                "({x}, {y}) is outside the {w}x{h} screen of {}",
                self.info.serial
            ),
        })
    }

    fn outcome(result: Result<String, Reason>) -> Outcome {
        match result {
            Ok(_) => Outcome::Done,
            Err(reason) => Outcome::Failed { reason },
        }
    }

    fn swipe(&self, from: (i32, i32), to: (i32, i32), ms: u64) -> Result<Outcome, AndroidError> {
        if let Some(out) = self
            .outside(from.0, from.1)
            .or_else(|| self.outside(to.0, to.1))
        {
            return Ok(out);
        }
        let command = format!("input swipe {} {} {} {} {ms}", from.0, from.1, to.0, to.1);
        Ok(Self::outcome(self.run(&command)?))
    }

    fn key(&self, code: &str) -> Result<Outcome, AndroidError> {
        Ok(Self::outcome(self.run(&format!("input keyevent {code}"))?))
    }

    fn act(&mut self, action: &Action) -> Result<Outcome, AndroidError> {
        let refuse = |reason: String| Ok(Outcome::Refused { reason });
        match action {
            Action::Click { x, y } => {
                if let Some(out) = self.outside(*x, *y) {
                    return Ok(out);
                }
                Ok(Self::outcome(self.run(&format!("input tap {x} {y}"))?))
            }
            Action::LongPress { x, y, ms } => self.swipe((*x, *y), (*x, *y), *ms),
            Action::Swipe {
                x,
                y,
                to_x,
                to_y,
                ms,
            } => self.swipe(
                (*x, *y),
                (*to_x, *to_y),
                ms.unwrap_or(self.options.swipe_ms),
            ),
            Action::Drag {
                x,
                y,
                to_x,
                to_y,
                ms,
            } => self.swipe((*x, *y), (*to_x, *to_y), ms.unwrap_or(self.options.drag_ms)),
            Action::DoubleClick { .. } | Action::RightClick { .. } => refuse(format!(
                "{} is a desktop action; on Android tap or long-press",
                action.tag()
            )),
            Action::Scroll { .. } => refuse("scroll is a desktop action; on Android swipe".into()),
            Action::Type { text } => self.type_text(text),
            Action::Key { keys } => match keys.as_slice() {
                [one] => match keycode(one) {
                    Some(code) => self.key(&code),
                    None => refuse(format!(
                        "unknown key {one:?} for Android; use a name such as home, back, enter, tab, backspace, delete, space, escape, up, down, left, right, menu, search, power, volume_up, volume_down, a-z, 0-9, or KEYCODE_…"
                    )),
                },
                [] => refuse("a key action needs a key".into()),
                _ => refuse(format!(
                    "key combinations ({}) cannot be sent over adb input; send one key",
                    keys.join("+")
                )),
            },
            Action::Home => self.key("KEYCODE_HOME"),
            Action::Back => self.key("KEYCODE_BACK"),
            Action::Enter => self.key("KEYCODE_ENTER"),
            Action::AppSwitch => self.key("KEYCODE_APP_SWITCH"),
            Action::Wait { seconds } => match Duration::try_from_secs_f64(*seconds) {
                Ok(d) => {
                    std::thread::sleep(d);
                    Ok(Outcome::Done)
                }
                Err(_) => Ok(Outcome::Failed {
                    reason: format!("cannot wait {seconds} seconds"),
                }),
            },
            Action::OpenApp { name } => self.open_app(name),
            Action::Finish { .. } | Action::CallUser { .. } | Action::Tool { .. } => refuse(
                format!("{} is handled by the agent, not the device", action.tag()),
            ),
        }
    }

    /// Launches an app by package or name through `monkey`.
    pub fn open_app(&self, name: &str) -> Result<Outcome, AndroidError> {
        let installed = match self.run("pm list packages")? {
            Ok(out) => out
                .lines()
                .filter_map(|l| l.trim().strip_prefix("package:"))
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            Err(reason) => return Ok(Outcome::Failed { reason }),
        };
        let package = match apps::resolve(name, &installed) {
            Ok(p) => p,
            Err(reason) => return Ok(Outcome::Failed { reason }),
        };
        let command = format!(
            "monkey -p {} -c android.intent.category.LAUNCHER 1",
            text::shell_quote(&package)
        );
        let out = self.shell_with(&command, self.options.command_timeout * 2)?;
        if out.success()
            && !out.output.contains("No activities found")
            && !out.output.contains("aborted")
        {
            Ok(Outcome::Done)
        } else {
            Ok(Outcome::Failed {
                reason: format!(
                    "{package} could not be launched (monkey status {}): {}",
                    out.status,
                    last_lines(out.output.trim())
                ),
            })
        }
    }

    /// Types `text`: `input text` when it can, else ADBKeyboard, else a Failed outcome.
    fn type_text(&mut self, text: &str) -> Result<Outcome, AndroidError> {
        let pieces = text::pieces(text);
        let plain = pieces.iter().all(|p| match p {
            Piece::Text(t) => text::input_text_can_type(t),
            _ => true,
        });
        if plain {
            for piece in &pieces {
                let command = match piece {
                    Piece::Text(t) => text::input_text_command(t),
                    Piece::Enter => "input keyevent KEYCODE_ENTER".into(),
                    Piece::Tab => "input keyevent KEYCODE_TAB".into(),
                };
                if let Err(reason) = self.run(&command)? {
                    return Ok(Outcome::Failed {
                        reason: format!("typing {} stopped: {reason}", text::preview(text)),
                    });
                }
            }
            return Ok(Outcome::Done);
        }
        let all = self.shell("ime list -a -s")?;
        if !all.success() || !all.output.lines().any(|l| l.trim() == ADB_KEYBOARD_IME) {
            return Ok(Outcome::Failed {
                reason: format!(
                    "cannot type {} on {}: `input text` types only printable ASCII (and never a literal \"%s\"), and the ADBKeyboard input method ({ADB_KEYBOARD_IME}) that types everything else is not installed; install ADBKeyBoard (https://github.com/senzhk/ADBKeyBoard) and try again",
                    text::preview(text),
                    self.info.serial
                ),
            });
        }
        let was_enabled = self
            .shell("ime list -s")?
            .output
            .lines()
            .any(|l| l.trim() == ADB_KEYBOARD_IME);
        let previous = self
            .shell("settings get secure default_input_method")?
            .output
            .trim()
            .to_owned();
        let switch = previous != ADB_KEYBOARD_IME;
        if switch {
            let mut steps = Vec::new();
            if !was_enabled {
                steps.push(format!("ime enable {ADB_KEYBOARD_IME}"));
            }
            steps.push(format!("ime set {ADB_KEYBOARD_IME}"));
            for step in steps {
                if let Err(reason) = self.run(&step)? {
                    let _ = self.restore_ime(&previous, was_enabled);
                    return Ok(Outcome::Failed {
                        reason: format!(
                            "cannot switch to ADBKeyboard to type {}: {reason}",
                            text::preview(text)
                        ),
                    });
                }
            }
            std::thread::sleep(self.options.ime_settle);
        }
        let typed = self.type_with_keyboard(&pieces);
        let restored = if switch {
            self.restore_ime(&previous, was_enabled)
        } else {
            Ok(Ok(()))
        };
        let typed = typed?;
        let restored = restored?;
        Ok(match (typed, restored) {
            (Ok(()), Ok(())) => Outcome::Done,
            (Err(reason), restore) => Outcome::Failed {
                reason: format!(
                    "typing {} with ADBKeyboard stopped: {reason}{}",
                    text::preview(text),
                    restore
                        .err()
                        .map(|r| format!("; and restoring the input method failed: {r}"))
                        .unwrap_or_default()
                ),
            },
            (Ok(()), Err(reason)) => Outcome::Failed {
                reason: format!(
                    "typed {}, but could not restore the input method {previous:?}: {reason}",
                    text::preview(text)
                ),
            },
        })
    }

    fn type_with_keyboard(&self, pieces: &[Piece<'_>]) -> Result<Result<(), Reason>, AndroidError> {
        for piece in pieces {
            let command = match piece {
                Piece::Text(t) => text::broadcast_command(t),
                Piece::Enter => "input keyevent KEYCODE_ENTER".into(),
                Piece::Tab => "input keyevent KEYCODE_TAB".into(),
            };
            match self.run(&command)? {
                Ok(out)
                    if matches!(piece, Piece::Text(_)) && !out.contains("Broadcast completed") =>
                {
                    return Ok(Err(format!(
                        "`{command}` was not delivered: {}",
                        last_lines(out.trim())
                    )));
                }
                Ok(_) => {}
                Err(reason) => return Ok(Err(reason)),
            }
        }
        Ok(Ok(()))
    }

    /// Puts back the input method that was current before typing, and disables ADBKeyboard again
    /// when it was not enabled before.
    fn restore_ime(
        &self,
        previous: &str,
        was_enabled: bool,
    ) -> Result<Result<(), Reason>, AndroidError> {
        if !previous.is_empty()
            && previous != "null"
            && let Err(reason) = self.run(&format!("ime set {}", text::shell_quote(previous)))?
        {
            return Ok(Err(reason));
        }
        if !was_enabled && let Err(reason) = self.run(&format!("ime disable {ADB_KEYBOARD_IME}"))? {
            return Ok(Err(reason));
        }
        Ok(Ok(()))
    }
}

/// The `input keyevent` code for a key name.
fn keycode(name: &str) -> Option<String> {
    let lower = name.trim().to_lowercase();
    let code = match lower.as_str() {
        "home" => "KEYCODE_HOME",
        "back" => "KEYCODE_BACK",
        "enter" | "return" => "KEYCODE_ENTER",
        "app_switch" | "appswitch" | "recents" | "recent_apps" | "overview" => "KEYCODE_APP_SWITCH",
        "tab" => "KEYCODE_TAB",
        "backspace" => "KEYCODE_DEL",
        "delete" | "del" | "forward_delete" => "KEYCODE_FORWARD_DEL",
        "space" => "KEYCODE_SPACE",
        "escape" | "esc" => "KEYCODE_ESCAPE",
        "up" => "KEYCODE_DPAD_UP",
        "down" => "KEYCODE_DPAD_DOWN",
        "left" => "KEYCODE_DPAD_LEFT",
        "right" => "KEYCODE_DPAD_RIGHT",
        "menu" => "KEYCODE_MENU",
        "search" => "KEYCODE_SEARCH",
        "power" => "KEYCODE_POWER",
        "volume_up" | "volumeup" => "KEYCODE_VOLUME_UP",
        "volume_down" | "volumedown" => "KEYCODE_VOLUME_DOWN",
        "mute" | "volume_mute" => "KEYCODE_VOLUME_MUTE",
        "page_up" | "pageup" => "KEYCODE_PAGE_UP",
        "page_down" | "pagedown" => "KEYCODE_PAGE_DOWN",
        "camera" => "KEYCODE_CAMERA",
        _ => {
            let upper = name.trim().to_uppercase();
            let valid =
                |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            return if lower.len() == 1 && lower.chars().all(|c| c.is_ascii_alphanumeric()) {
                Some(format!("KEYCODE_{upper}"))
            } else if upper.starts_with("KEYCODE_") && valid(&upper) {
                Some(upper)
            } else if !lower.is_empty() && lower.chars().all(|c| c.is_ascii_digit()) {
                Some(lower)
            } else {
                None
            };
        }
    };
    Some(code.to_owned())
}

/// The last few lines of command output, for a reason.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "no output".into()
    } else {
        tail.join(" / ")
    }
}

impl Environment for AndroidDevice {
    fn observe(&mut self) -> Result<Observation, EnvironmentError> {
        Ok(Observation {
            screenshot: self.screenshot()?,
            scale_factor: 1.0,
            origin: (0, 0),
            identity: format!("android:{}", self.info.serial),
        })
    }

    fn perform(&mut self, action: &Action) -> Result<Outcome, EnvironmentError> {
        Ok(self.act(action)?)
    }

    fn describe(&self) -> Description {
        let (width, height) = self.size.unwrap_or((0, 0));
        Description {
            kind: EnvironmentKind::Android,
            identity: format!("android:{}", self.info.serial),
            width,
            height,
            scale_factor: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        assert_eq!(keycode("Home").as_deref(), Some("KEYCODE_HOME"));
        assert_eq!(keycode("backspace").as_deref(), Some("KEYCODE_DEL"));
        assert_eq!(keycode("a").as_deref(), Some("KEYCODE_A"));
        assert_eq!(keycode("7").as_deref(), Some("KEYCODE_7"));
        assert_eq!(keycode("keycode_camera").as_deref(), Some("KEYCODE_CAMERA"));
        assert_eq!(keycode("66").as_deref(), Some("66"));
        assert_eq!(keycode("ctrl"), None);
        assert_eq!(keycode("KEYCODE_A; reboot"), None);
    }

    #[test]
    fn server_errors_map_to_clear_errors() {
        let gone = AndroidError::device_refused("X", "a", "device 'X' not found".into());
        assert!(matches!(gone, AndroidError::DeviceGone { .. }));
        let off = AndroidError::device_refused("X", "a", "device offline".into());
        assert!(off.to_string().contains("adb reconnect"));
    }
}
