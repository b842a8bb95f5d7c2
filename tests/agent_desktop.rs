//! `vlad run --agent desktop` under Xvfb against a real Tk application: recorded replies click
//! its entry, type non-ASCII text, press a key combination and click its button; the app's own
//! state file proves every action landed, and the trajectory records the run.

#[path = "support/tk_probe.rs"]
mod tk_probe;
#[path = "support/xvfb.rs"]
mod xvfb;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use tk_probe::start_settled_probe;
use vlad::agent::{RunStatus, trajectory};
use xvfb::{Xvfb, read_json, serial};

const W: u32 = 1600;
const H: u32 = 900;

/// A widget's centre in the model's 0-1000 space of a W x H screenshot.
fn model_point(s: &Value, widget: &str) -> Result<(i64, i64)> {
    let g = &s[widget];
    let n = |k: &str| g[k].as_i64().context("widget geometry");
    let (cx, cy) = (n("x")? + n("width")? / 2, n("y")? + n("height")? / 2);
    Ok((cx * 1000 / i64::from(W), cy * 1000 / i64::from(H)))
}

#[test]
fn a_task_in_a_real_tk_app_lands_every_action() -> Result<()> {
    let _g = serial();
    let mut x = Xvfb::with_wm(W, H);
    let probe = start_settled_probe(&mut x, None);
    let s = read_json(&probe).context("probe state")?;
    let (ex, ey) = model_point(&s, "entry")?;
    let (bx, by) = model_point(&s, "button")?;
    let replies = [
        format!("I click the entry. *FUNCTION*: Click *ARGS*: {{\"point\": ({ex},{ey})}}"),
        "*FUNCTION*: Type *ARGS*: {\"text\": \"héllo 世界\"}".to_string(),
        // Tk's Entry: ctrl+a moves to the line start (emacs binding).
        "*FUNCTION*: Key *ARGS*: {\"keys\": \"ctrl+a\"}".to_string(),
        "*FUNCTION*: Type *ARGS*: {\"text\": \">\"}".to_string(),
        format!("*FUNCTION*: Click *ARGS*: {{\"point\": ({bx},{by})}}"),
        "*FUNCTION*: Finish *ARGS*: {\"answer\": \"Pressed.\"}".to_string(),
    ];
    let replies_path = x.path("replies.jsonl");
    let lines: Vec<String> = replies
        .iter()
        .map(|r| serde_json::json!({ "reply": r }).to_string())
        .collect();
    std::fs::write(&replies_path, lines.join("\n"))?;
    let profile = x.path("desktop.toml");
    std::fs::write(
        &profile,
        include_str!("../agents/desktop.toml").replace("settle_ms = 500", "settle_ms = 300"),
    )?;
    let trace = x.path("trace");
    let out = x
        .command(env!("CARGO_BIN_EXE_vlad"))
        .args(["run", "Type a greeting and press the button", "--agent"])
        .arg(&profile)
        .args(["--backend", "replay", "--replies"])
        .arg(&replies_path)
        .arg("--trace")
        .arg(&trace)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Pressed.\n");

    // The application's own view.
    let start = Instant::now();
    let state = loop {
        let s = read_json(&probe).unwrap_or(Value::Null);
        if s["presses"] == 1 || start.elapsed() > Duration::from_secs(5) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(state["text"], ">héllo 世界", "{state}");
    assert_eq!(state["presses"], 1, "{state}");

    let t = trajectory::read(&trace)?;
    assert_eq!(t.steps.len(), 6);
    assert!(matches!(
        t.result.as_ref().map(|r| &r.status),
        Some(RunStatus::Finished { .. })
    ));
    assert_eq!((t.steps[0].screen_width, t.steps[0].screen_height), (W, H));
    assert_eq!(
        t.steps.iter().map(|s| s.prompt.images).collect::<Vec<_>>(),
        vec![1, 2, 2, 2, 2, 2]
    );
    // Typing changed what the screen shows between the step's screenshots.
    let before = t.screenshot(&t.steps[1].screenshot)?;
    let after = t.screenshot(t.steps[1].screenshot_after.as_deref().context("after")?)?;
    assert_ne!(before, after);
    Ok(())
}
