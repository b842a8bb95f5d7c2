//! The screens the MCP tools act on, by the `device` argument: `desktop` (the primary monitor),
//! `desktop:MONITOR` or `desktop:window:TITLE`, or an Android serial as `adb devices` lists it.
//!
//! Each device's environment is opened on first use and kept, so a click lands in the pixels of
//! that device's last screenshot. An environment that breaks (display or connection gone) is
//! dropped and opened again on the next call. A device running a task refuses other actions
//! until the task ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::environment::android::AndroidDevice;
use crate::environment::claims::{Claim, DeviceClaims, device_key};
use crate::environment::desktop::{DesktopEnvironment, DesktopTarget};
use crate::environment::{Environment, EnvironmentError, EnvironmentKind};

/// The device a tool call names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `desktop` (`None`: the primary monitor) or `desktop:SPEC` (a monitor, or `window:TITLE`).
    Desktop(Option<String>),
    /// An Android device by serial.
    Android(String),
}

impl DeviceSpec {
    /// Reads a `device` argument; `None` or empty is the desktop.
    pub fn parse(device: Option<&str>) -> Result<Self, String> {
        let device = device.map(str::trim).unwrap_or("");
        if device.is_empty() || device == "desktop" {
            return Ok(Self::Desktop(None));
        }
        if let Some(spec) = device.strip_prefix("desktop:") {
            let spec = spec.trim();
            if spec.is_empty() {
                return Err(
                    "device \"desktop:\" names no monitor; use \"desktop\", \"desktop:MONITOR\" or \"desktop:window:TITLE\""
                        .into(),
                );
            }
            return Ok(Self::Desktop(Some(spec.to_string())));
        }
        if device.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "device {device:?} is not an adb serial (serials have no spaces); use \"desktop\" or a serial the devices tool lists"
            ));
        }
        Ok(Self::Android(device.to_string()))
    }

    /// The physical device, as runs claim it ([`device_key`]): every desktop target is the
    /// one display.
    fn claim_key(&self) -> String {
        match self {
            Self::Desktop(_) => device_key(&EnvironmentKind::Desktop, None),
            Self::Android(serial) => device_key(&EnvironmentKind::Android, Some(serial)),
        }
    }

    /// The canonical name (the key environments are kept under).
    pub fn key(&self) -> String {
        match self {
            Self::Desktop(None) => "desktop".to_string(),
            Self::Desktop(Some(spec)) => format!("desktop:{spec}"),
            Self::Android(serial) => serial.clone(),
        }
    }

    pub fn kind(&self) -> EnvironmentKind {
        match self {
            Self::Desktop(_) => EnvironmentKind::Desktop,
            Self::Android(_) => EnvironmentKind::Android,
        }
    }

    fn open(&self) -> Result<Box<dyn Environment>, String> {
        match self {
            Self::Desktop(spec) => {
                let target = match spec {
                    None => DesktopTarget::Primary,
                    Some(s) => s.parse().unwrap_or(DesktopTarget::Primary),
                };
                let env = DesktopEnvironment::open(target).map_err(|e| e.to_string())?;
                Ok(Box::new(env))
            }
            Self::Android(serial) => {
                let env = AndroidDevice::connect(Some(serial)).map_err(|e| e.to_string())?;
                Ok(Box::new(env))
            }
        }
    }
}

type Shared = Arc<Mutex<Box<dyn Environment>>>;

/// The open environments, by device, and which devices run a task.
pub struct Devices {
    open: Mutex<HashMap<String, Shared>>,
    claims: DeviceClaims,
}

/// Marks a device as running a task until dropped.
pub struct TaskGuard<'a> {
    _devices: &'a Devices,
    _claim: Claim,
}

impl Devices {
    /// `claims` is shared with whatever else runs tasks on these devices (the daemon's queue).
    pub fn new(claims: DeviceClaims) -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            claims,
        }
    }

    fn busy_error(key: &str, holder: &str) -> String {
        format!(
            "device {key} is running a task ({holder}); wait until it ends (or cancel it) and try again"
        )
    }

    fn environment(&self, spec: &DeviceSpec) -> Result<Shared, String> {
        let key = spec.key();
        if let Some(env) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(env.clone());
        }
        // Opened without the map locked: opening a phone can take a while.
        let env = Arc::new(Mutex::new(spec.open()?));
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        Ok(open.entry(key).or_insert(env).clone())
    }

    fn forget(&self, spec: &DeviceSpec) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&spec.key());
    }

    /// Runs `f` on the device's environment (blocking). An [`EnvironmentError`] from `f` drops
    /// the environment so the next call opens it again.
    pub fn with<R>(
        &self,
        spec: &DeviceSpec,
        f: impl FnOnce(&mut dyn Environment) -> Result<R, EnvironmentError>,
    ) -> Result<R, String> {
        if let Some(holder) = self.claims.holder(&spec.claim_key()) {
            return Err(Self::busy_error(&spec.key(), &holder));
        }
        self.with_unchecked(spec, f)
    }

    fn with_unchecked<R>(
        &self,
        spec: &DeviceSpec,
        f: impl FnOnce(&mut dyn Environment) -> Result<R, EnvironmentError>,
    ) -> Result<R, String> {
        let env = self.environment(spec)?;
        let mut env = env.lock().unwrap_or_else(|e| e.into_inner());
        match f(env.as_mut()) {
            Ok(r) => Ok(r),
            Err(e) => {
                drop(env);
                self.forget(spec);
                Err(format!("{}: {e}", spec.key()))
            }
        }
    }

    /// Claims the device for a task: other tool calls on it are refused until the guard drops.
    pub fn claim(&self, spec: &DeviceSpec) -> Result<TaskGuard<'_>, String> {
        let claim = self
            .claims
            .try_claim(&spec.claim_key(), "an MCP run_task")
            .map_err(|holder| Self::busy_error(&spec.key(), &holder))?;
        Ok(TaskGuard {
            _devices: self,
            _claim: claim,
        })
    }

    /// Runs a task's `f` on a device claimed with [`Self::claim`].
    pub fn with_claimed<R>(
        &self,
        _guard: &TaskGuard<'_>,
        spec: &DeviceSpec,
        f: impl FnOnce(&mut dyn Environment) -> Result<R, EnvironmentError>,
    ) -> Result<R, String> {
        self.with_unchecked(spec, f)
    }
}

/// Everything the tools can act on: monitors and windows of the desktop, Android devices, and
/// the sources that could not be reached with why (blocking).
pub fn list() -> Value {
    let crate::environment::Inventory {
        monitors,
        windows,
        android: phones,
        errors,
    } = crate::environment::inventory();
    let mut devices = Vec::new();
    if let Some(monitors) = &monitors {
        devices
            .push(json!({"device": "desktop", "kind": "desktop", "note": "the primary monitor"}));
        for m in monitors {
            devices.push(json!({
                "device": format!("desktop:{}", m.name),
                "kind": "desktop",
                "width": m.physical.width,
                "height": m.physical.height,
                "primary": m.primary,
            }));
        }
    }
    for w in windows.iter().flatten() {
        devices.push(json!({
            "device": format!("desktop:window:{}", w.title),
            "kind": "window",
            "width": w.physical.width,
            "height": w.physical.height,
            "app": w.app_name,
        }));
    }
    for d in phones.iter().flatten() {
        devices.push(json!({
            "device": d.serial,
            "kind": "android",
            "state": d.state,
            "model": d.model,
        }));
    }
    json!({"devices": devices, "errors": errors})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arguments_parse() {
        assert_eq!(DeviceSpec::parse(None), Ok(DeviceSpec::Desktop(None)));
        assert_eq!(
            DeviceSpec::parse(Some(" desktop ")),
            Ok(DeviceSpec::Desktop(None))
        );
        assert_eq!(
            DeviceSpec::parse(Some("desktop:window:vlad probe")),
            Ok(DeviceSpec::Desktop(Some("window:vlad probe".into())))
        );
        assert_eq!(
            DeviceSpec::parse(Some("emulator-5554")),
            Ok(DeviceSpec::Android("emulator-5554".into()))
        );
        assert!(DeviceSpec::parse(Some("desktop:")).is_err());
        assert!(DeviceSpec::parse(Some("two words")).is_err());
        assert_eq!(
            DeviceSpec::parse(Some("desktop:screen")).map(|d| d.key()),
            Ok("desktop:screen".to_string())
        );
    }

    #[test]
    fn a_claimed_device_refuses_other_calls() {
        let devices = Devices::new(DeviceClaims::new());
        let spec = DeviceSpec::Android("serial-1".into());
        let guard = devices.claim(&spec);
        assert!(guard.is_ok());
        assert!(
            devices
                .claim(&spec)
                .is_err_and(|e| e.contains("running a task"))
        );
        let busy = devices.with(&spec, |_| Ok(()));
        assert!(busy.is_err_and(|e| e.contains("running a task")));
        drop(guard);
        assert!(devices.claim(&spec).is_ok());
    }
}
