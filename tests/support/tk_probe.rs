//! The Tk probe (`tests/desktop_apps/tk_probe.py`) on an [`Xvfb`]: started, and its state file
//! read until it shows what a test waits for.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::xvfb::{Xvfb, python, read_json};

/// Starts the probe (at `geometry`, e.g. `+200+100`, when given) and returns its state file
/// without waiting for it.
pub fn spawn_probe(x: &mut Xvfb, geometry: Option<&str>) -> PathBuf {
    let state = x.path("probe.json");
    let mut cmd = x.command(python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/desktop_apps/tk_probe.py"))
        .arg(&state);
    if let Some(g) = geometry {
        cmd.arg(g);
    }
    x.spawn(cmd);
    state
}

/// Is the probe's window mapped, with its swatch laid out?
fn shown(s: &Value) -> bool {
    s["mapped"] == true && s["swatch"]["width"] == 200
}

/// Starts the probe at +200+100 and waits until it is shown, then a little longer.
pub fn start_probe(x: &mut Xvfb) -> PathBuf {
    let state = spawn_probe(x, Some("+200+100"));
    wait_state(&state, "the probe", shown);
    std::thread::sleep(Duration::from_millis(300));
    state
}

/// Starts the probe and waits until it is shown and has stopped moving (openbox placement).
pub fn start_settled_probe(x: &mut Xvfb, geometry: Option<&str>) -> PathBuf {
    let state = spawn_probe(x, geometry);
    let mut last = None;
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the Tk probe never showed up"
        );
        std::thread::sleep(Duration::from_millis(150));
        let Some(s) = read_json(&state) else { continue };
        if !shown(&s) {
            continue;
        }
        let geo = ["swatch", "button", "entry", "list"].map(|w| s[w].clone());
        if last.as_ref() == Some(&geo) {
            return state;
        }
        last = Some(geo);
    }
}

/// Reads the app's state file until `ok` holds (at most 20 s).
pub fn wait_state(path: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(s) = read_json(path)
            && ok(&s)
        {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}; last state: {:?}",
            read_json(path)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
