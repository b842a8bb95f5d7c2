//! `vlad devices`, `vlad screenshot`, `vlad do` and `vlad calibrate` as a user runs them, against
//! a private Xvfb + openbox and a real Tk app that records what it receives.

#[path = "support/tk_probe.rs"]
mod tk_probe;
#[path = "support/xvfb.rs"]
mod xvfb;

use std::process::{Command, Output};

use serde_json::Value;
use tk_probe::{start_probe, wait_state};
use xvfb::{Xvfb, read_json};

fn vlad(x: &Xvfb, args: &[&str]) -> Output {
    let mut cmd = x.command(env!("CARGO_BIN_EXE_vlad"));
    // No adb server here: point the Android side at a closed loopback port so it fails fast.
    cmd.env("ANDROID_ADB_SERVER_PORT", "1").args(args);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run vlad: {e}"))
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn int(v: &Value) -> i32 {
    v.as_i64().unwrap_or(i64::MIN) as i32
}

#[test]
fn screenshot_writes_the_screen_as_png() {
    let x = Xvfb::with_wm(1600, 900);
    x.run("xsetroot", &["-solid", "#336699"]);
    let file = x.path("shot.png");
    let out = vlad(&x, &["screenshot", "-o", &file.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout_json(&out);
    assert_eq!(
        (summary["width"].clone(), summary["height"].clone()),
        (1600.into(), 900.into())
    );
    let img = image::open(&file)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_rgb8();
    assert_eq!(img.dimensions(), (1600, 900));
    let other: Vec<_> = img
        .enumerate_pixels()
        .filter(|(_, _, p)| p.0 != [0x33, 0x66, 0x99])
        .take(5)
        .collect();
    assert!(
        other.is_empty(),
        "pixels that are not the root colour: {other:?}"
    );
}

#[test]
fn screenshot_of_a_window_and_usage_errors() {
    let mut x = Xvfb::with_wm(1600, 900);
    let state = start_probe(&mut x);
    let s = read_json(&state).unwrap_or_default();
    let file = x.path("window.png");
    let out = vlad(
        &x,
        &[
            "screenshot",
            "--window",
            "vlad probe",
            "-o",
            &file.to_string_lossy(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&file)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_rgb8();
    let swatch = img.pixels().filter(|p| p.0 == [0x12, 0xab, 0x34]).count();
    assert_eq!(
        swatch,
        200 * 80,
        "the window capture holds the whole swatch; state {s}"
    );

    // Two targets at once is a usage error (2); an unknown window is a failure (1).
    let out = vlad(
        &x,
        &[
            "screenshot",
            "--monitor",
            "0",
            "--window",
            "x",
            "-o",
            "a.png",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = vlad(
        &x,
        &["screenshot", "--window", "no such window", "-o", "a.png"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such window"));
}

#[test]
fn do_clicks_and_types_into_a_real_app() {
    let mut x = Xvfb::with_wm(1600, 900);
    let state = start_probe(&mut x);
    let s = read_json(&state).unwrap_or_default();
    let centre = |w: &str| {
        (
            int(&s[w]["x"]) + int(&s[w]["width"]) / 2,
            int(&s[w]["y"]) + int(&s[w]["height"]) / 2,
        )
    };
    let (bx, by) = centre("button");
    let click = format!(r#"{{"action":"click","x":{bx},"y":{by}}}"#);
    let out = vlad(&x, &["do", &click]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out)["results"][0]["result"]["outcome"], "done");
    wait_state(&state, "the press", |s| s["presses"] == 1);

    // The whole output of `vlad parse` is accepted: its actions run in order.
    let (ex, ey) = centre("entry");
    let parsed = format!(
        r#"{{"thought":"type it","actions":[{{"action":"click","x":{ex},"y":{ey}}},{{"action":"type","text":"héllo 世界"}}],"errors":[]}}"#
    );
    let out = vlad(&x, &["do", &parsed]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(&state, "the text", |s| s["text"] == "héllo 世界");

    let out = vlad(
        &x,
        &[
            "do",
            r#"{"action":"key","keys":["ctrl","a"]}"#,
            "--monitor",
            "screen",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Bad JSON: usage (2). A point off the screen or a phone action: failure (1), reason shown.
    assert_eq!(vlad(&x, &["do", "{not json"]).status.code(), Some(2));
    assert_eq!(
        vlad(&x, &["do", r#"{"action":"teleport"}"#]).status.code(),
        Some(2)
    );
    let out = vlad(&x, &["do", r#"{"action":"click","x":5000,"y":1}"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout_json(&out)["results"][0]["result"]["outcome"],
        "failed"
    );
    let out = vlad(&x, &["do", r#"{"action":"home"}"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout_json(&out)["results"][0]["result"]["outcome"],
        "refused"
    );
    assert_eq!(read_json(&state).unwrap_or_default()["presses"], 1);
}

#[test]
fn devices_lists_monitors_and_windows() {
    let mut x = Xvfb::with_wm(1600, 900);
    start_probe(&mut x);
    let out = vlad(&x, &["devices", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = stdout_json(&out);
    let monitors = d["monitors"].as_array().cloned().unwrap_or_default();
    assert_eq!(monitors.len(), 1, "{d}");
    assert_eq!(monitors[0]["physical"]["width"], 1600);
    assert_eq!(monitors[0]["physical"]["height"], 900);
    assert_eq!(monitors[0]["scale_factor"], 1.0);
    let titles: Vec<&str> = d["windows"]
        .as_array()
        .map(|a| a.iter().filter_map(|w| w["title"].as_str()).collect())
        .unwrap_or_default();
    assert!(titles.contains(&"vlad probe"), "{d}");
    // No adb server on port 1: reported, not fatal.
    assert!(d["errors"]["android"].is_string(), "{d}");

    let text = vlad(&x, &["devices"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("1600x900+0+0") && text.contains("vlad probe"),
        "{text}"
    );
}

#[test]
fn calibrate_reports_offset_and_scale_as_json() {
    let x = Xvfb::with_wm(1600, 900);
    let out = vlad(&x, &["calibrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = stdout_json(&out);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["offset"], serde_json::json!([0.0, 0.0]), "{c}");
    assert_eq!(c["scale"], serde_json::json!([1.0, 1.0]), "{c}");
}

#[test]
fn without_a_display_the_commands_say_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["screenshot", "-o", "/tmp/never.png"])
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DISPLAY is not set"), "{err}");
}
