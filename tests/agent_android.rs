//! `vlad run --agent android` against the fake ADB device (a real adb-protocol server on
//! loopback): recorded replies open an app, type non-ASCII text, press keys and finish; the
//! device's own state proves every action landed, and the trajectory replays.

#[path = "support/fake_adb.rs"]
mod fake_adb;

use std::process::Command;

use anyhow::{Context, Result};
use fake_adb::{FakeAdb, FakeDevice, Screen};
use vlad::agent::{RunStatus, trajectory};

const NOTES: &str = "com.example.notes";
const TEXT: &str = "Grüße, 你好 — ok";

#[test]
fn a_task_on_the_fake_phone_lands_every_action() -> Result<()> {
    let phone = FakeDevice::phone("phone-1").with_adb_keyboard();
    let (w, h) = (phone.width as f64, phone.height as f64);
    let (x, y) = phone.icon_center(NOTES).context("notes icon")?;
    let fake = FakeAdb::start(vec![phone])?;
    // The icon's centre in the model's 0-1000 space.
    let (mx, my) = (
        (x as f64 / w * 1000.0).round(),
        (y as f64 / h * 1000.0).round(),
    );
    let replies = [
        format!("I open Notes. *FUNCTION*: Tap *ARGS*: {{\"point\": ({mx},{my})}}"),
        format!("*FUNCTION*: Type *ARGS*: {{\"text\": \"{TEXT}\"}}"),
        "*FUNCTION*: Enter *ARGS*: {}".to_string(),
        "*FUNCTION*: Back *ARGS*: {}".to_string(),
        "*FUNCTION*: Finish *ARGS*: {\"answer\": \"Noted.\"}".to_string(),
    ];
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("replies.jsonl");
    let lines: Vec<String> = replies
        .iter()
        .map(|r| serde_json::json!({ "reply": r }).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n"))?;
    // A fast copy of the android profile (no settle pause).
    let profile = tmp.path().join("android.toml");
    std::fs::write(
        &profile,
        include_str!("../agents/android.toml").replace("settle_ms = 800", "settle_ms = 0"),
    )?;
    let trace = tmp.path().join("trace");
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["run", "Write a note", "--agent"])
        .arg(&profile)
        .args(["--device", "phone-1", "--backend", "replay", "--replies"])
        .arg(&file)
        .arg("--trace")
        .arg(&trace)
        .env("ANDROID_ADB_SERVER_PORT", fake.port().to_string())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Noted.\n");

    let device = fake.device("phone-1");
    assert_eq!(device.taps, vec![(x, y)]);
    assert_eq!(
        device.launched,
        vec![NOTES.to_string()],
        "the tap opened Notes"
    );
    assert_eq!(device.text, format!("{TEXT}\n"), "typed text, then Enter");
    assert!(
        device.broadcasts.iter().any(|b| b == TEXT),
        "{:?}",
        device.broadcasts
    );
    assert!(
        device.key_events.iter().any(|k| k.contains("BACK")),
        "{:?}",
        device.key_events
    );
    assert_eq!(device.screen, Screen::Home { page: 0 });

    let t = trajectory::read(&trace)?;
    assert_eq!(t.steps.len(), 5);
    assert!(t.meta.environment.identity.contains("phone-1"));
    assert!(matches!(
        t.result.as_ref().map(|r| &r.status),
        Some(RunStatus::Finished { .. })
    ));
    // The write-back gave the model the phone's screen after each action.
    assert_eq!(t.steps[1].prompt.images, 2);
    let home = t.screenshot(&t.steps[0].screenshot)?;
    let in_app = t.screenshot(&t.steps[1].screenshot)?;
    assert_eq!(home.dimensions(), (360, 640));
    assert_ne!(home, in_app);

    // The run replays on a fresh phone, screen by screen.
    let fresh = FakeAdb::start(vec![FakeDevice::phone("phone-1").with_adb_keyboard()])?;
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["replay", "--verify", "--device", "phone-1"])
        .arg(&trace)
        .env("ANDROID_ADB_SERVER_PORT", fresh.port().to_string())
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fresh.device("phone-1").text, format!("{TEXT}\n"));
    Ok(())
}
