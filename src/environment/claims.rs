//! Which physical devices an agent run holds, so two runs never drive one screen at once: the
//! daemon's task queue and its MCP tools share one [`DeviceClaims`]. Keys name the physical
//! device — `desktop` for the X display whatever monitor or window a run looks at, `adb:SERIAL`
//! for a phone ([`device_key`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

type Listener = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// Key → who holds it (for error messages).
    held: HashMap<String, String>,
    listeners: Vec<Listener>,
}

/// The set of claimed devices. Cheap to clone; clones share the set.
#[derive(Clone, Default)]
pub struct DeviceClaims {
    inner: Arc<Mutex<Inner>>,
}

/// Holds a device until dropped; then the release listeners hear of it.
pub struct Claim {
    claims: DeviceClaims,
    key: String,
}

/// The physical device behind an environment: every desktop target is the one display.
pub fn device_key(kind: &super::EnvironmentKind, serial: Option<&str>) -> String {
    match (kind, serial) {
        (super::EnvironmentKind::Android, Some(serial)) => format!("adb:{serial}"),
        (super::EnvironmentKind::Android, None) => "adb:".to_string(),
        (super::EnvironmentKind::Desktop, _) => "desktop".to_string(),
        (super::EnvironmentKind::Virtual, _) => "virtual".to_string(),
    }
}

impl DeviceClaims {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key` for `holder`, or says who holds it.
    pub fn try_claim(&self, key: &str, holder: &str) -> Result<Claim, String> {
        let mut inner = self.lock();
        if let Some(current) = inner.held.get(key) {
            return Err(current.clone());
        }
        inner.held.insert(key.to_string(), holder.to_string());
        Ok(Claim {
            claims: self.clone(),
            key: key.to_string(),
        })
    }

    /// Who holds `key`, if anyone.
    pub fn holder(&self, key: &str) -> Option<String> {
        self.lock().held.get(key).cloned()
    }

    /// Calls `listener` with the key each time a claim is released (outside the claims' lock,
    /// so it may claim again).
    pub fn on_release(&self, listener: impl Fn(&str) + Send + Sync + 'static) {
        self.lock().listeners.push(Arc::new(listener));
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let listeners = {
            let mut inner = self.claims.lock();
            inner.held.remove(&self.key);
            inner.listeners.clone()
        };
        for listener in listeners {
            listener(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn one_holder_per_device_and_releases_are_announced() {
        let claims = DeviceClaims::new();
        let released = Arc::new(AtomicUsize::new(0));
        let seen = released.clone();
        claims.on_release(move |key| {
            if key == "desktop" {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        });
        let first = claims.try_claim("desktop", "task-1").unwrap();
        assert_eq!(
            claims.try_claim("desktop", "mcp run_task").err().as_deref(),
            Some("task-1")
        );
        let phone = claims.try_claim("adb:emulator-5554", "task-2").unwrap();
        assert_eq!(claims.holder("desktop").as_deref(), Some("task-1"));
        drop(first);
        assert_eq!(released.load(Ordering::SeqCst), 1);
        assert!(claims.holder("desktop").is_none());
        let again = claims.clone().try_claim("desktop", "mcp run_task");
        assert!(again.is_ok());
        drop(phone);
        assert_eq!(released.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn every_desktop_target_is_the_one_display() {
        use super::super::EnvironmentKind;
        assert_eq!(
            device_key(&EnvironmentKind::Desktop, Some("HDMI-1")),
            "desktop"
        );
        assert_eq!(device_key(&EnvironmentKind::Desktop, None), "desktop");
        assert_eq!(
            device_key(&EnvironmentKind::Android, Some("emulator-5554")),
            "adb:emulator-5554"
        );
    }
}
