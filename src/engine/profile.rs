//! Where an engine step spends its time, phase by phase (`vlad bench --profile`). Off by default
//! and then free (one relaxed atomic load per phase). Switched on, every phase waits for the
//! device before and after it (a no-op on the CPU), so a GPU's queued work is charged to the
//! phase that queued it — which also stops the host from running ahead, so profiled runs are
//! slower than plain ones on a GPU. Phases do not nest: each names one piece of work.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, Phase>> = Mutex::new(BTreeMap::new());

/// Time spent in one phase since the last [`take`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Phase {
    pub seconds: f64,
    pub calls: u64,
}

/// Starts or stops recording (process-wide).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether phases are being recorded.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `work` as the phase `name`: timed, with the device drained before and after, when
/// recording; as it is otherwise.
pub fn phase<T, E: From<candle_core::Error>>(
    name: &'static str,
    device: &Device,
    work: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !ENABLED.load(Ordering::Relaxed) {
        return work();
    }
    device.synchronize()?;
    let start = Instant::now();
    let out = work()?;
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let entry = totals.entry(name).or_default();
    entry.seconds += seconds;
    entry.calls += 1;
    Ok(out)
}

/// Everything recorded since the last call, by phase name, and forgets it.
pub fn take() -> Vec<(&'static str, Phase)> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *totals).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_recorded_only_while_enabled_and_taken_once() {
        // one test touches the process-wide switch, so no other test sees it on
        let device = Device::Cpu;
        // other tests may run the engine meanwhile: look at this test's phases only
        let mine = || -> Vec<(&'static str, Phase)> {
            take()
                .into_iter()
                .filter(|(name, _)| name.starts_with("unit."))
                .collect()
        };
        mine();
        phase("unit.off", &device, || Ok::<_, candle_core::Error>(())).unwrap();
        assert!(mine().is_empty());
        set_enabled(true);
        for _ in 0..3 {
            phase("unit.sleep", &device, || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok::<_, candle_core::Error>(())
            })
            .unwrap();
        }
        let failed: candle_core::Result<()> =
            phase("unit.fails", &device, || candle_core::bail!("no"));
        set_enabled(false);
        assert!(failed.is_err());
        let taken = mine();
        assert_eq!(taken.len(), 1, "{taken:?}");
        let (name, sleep) = taken[0];
        assert_eq!(name, "unit.sleep");
        assert_eq!(sleep.calls, 3);
        assert!(sleep.seconds >= 0.006, "{sleep:?}");
        assert!(mine().is_empty());
    }
}
