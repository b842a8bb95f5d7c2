//! `vlad devices`, `vlad screenshot --device` and `vlad do --device` against the fake adb server,
//! found through ANDROID_ADB_SERVER_PORT as `adb` would find it.

#[path = "support/fake_adb.rs"]
mod fake_adb;

use std::net::TcpListener;
use std::process::{Command, Output};

use fake_adb::{FakeAdb, FakeDevice, Screen};
use serde_json::Value;

/// Runs `vlad` with the adb server on `port` and no display.
fn vlad(port: u16, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(args)
        .env("ANDROID_ADB_SERVER_PORT", port.to_string())
        .env_remove("ANDROID_ADB_SERVER_ADDRESS")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .expect("run vlad")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn two_phones() -> FakeAdb {
    let mut b = FakeDevice::phone("phone-b");
    b.model = "Other_Phone".into();
    FakeAdb::start(vec![FakeDevice::phone("phone-a"), b]).unwrap()
}

#[test]
fn devices_lists_the_android_devices() {
    let fake = two_phones();
    let out = vlad(fake.port(), &["devices", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report = stdout_json(&out);
    let android = report["android"].as_array().expect("android array");
    let listed: Vec<(&str, &str, &str)> = android
        .iter()
        .map(|d| {
            (
                d["serial"].as_str().unwrap_or(""),
                d["state"].as_str().unwrap_or(""),
                d["model"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("phone-a", "device", "Fake_Phone"),
            ("phone-b", "device", "Other_Phone")
        ]
    );

    let out = vlad(fake.port(), &["devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("phone-b") && text.contains("Other_Phone"),
        "{text}"
    );
}

#[test]
fn devices_without_an_adb_server_says_how_to_start_one() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = vlad(port, &["devices", "--json"]);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(all.contains("adb start-server"), "{all}");
}

#[test]
fn screenshot_of_a_device_writes_its_screen() {
    let fake = two_phones();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shot.png");
    let path_text = path.to_str().unwrap();
    let out = vlad(
        fake.port(),
        &["screenshot", "--device", "phone-b", "-o", path_text],
    );
    assert!(out.status.success(), "{out:?}");
    let summary = stdout_json(&out);
    assert_eq!(summary["identity"], "android:phone-b");
    assert_eq!(
        (summary["width"].as_u64(), summary["height"].as_u64()),
        (Some(360), Some(640))
    );
    let saved = image::open(&path).unwrap().to_rgb8();
    assert_eq!(saved, fake.device("phone-b").render());
    assert!(fake.commands("phone-a").is_empty(), "only phone-b was used");

    let out = vlad(
        fake.port(),
        &["screenshot", "--device", "nope", "-o", path_text],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\"nope\"") && stderr(&out).contains("phone-a (device)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn do_performs_actions_on_the_device() {
    let fake = two_phones();
    let (x, y) = fake
        .device("phone-a")
        .icon_center("com.example.notes")
        .unwrap();
    let actions =
        format!(r#"[{{"action":"click","x":{x},"y":{y}}},{{"action":"type","text":"hi there"}}]"#);
    let out = vlad(fake.port(), &["do", &actions, "--device", "phone-a"]);
    assert!(out.status.success(), "{out:?}");
    let report = stdout_json(&out);
    assert_eq!(report["identity"], "android:phone-a");
    assert_eq!(report["results"][1]["result"]["outcome"], "done");
    let device = fake.device("phone-a");
    assert_eq!(device.screen, Screen::App("com.example.notes".into()));
    assert_eq!(device.text, "hi there");

    // Non-ASCII without ADBKeyboard: a failed outcome naming the text, exit 1, nothing typed.
    let out = vlad(
        fake.port(),
        &[
            "do",
            r#"{"action":"type","text":"héllo"}"#,
            "--device",
            "phone-a",
        ],
    );
    assert!(!out.status.success());
    let report = stdout_json(&out);
    assert_eq!(report["results"][0]["result"]["outcome"], "failed");
    let reason = report["results"][0]["result"]["reason"]
        .as_str()
        .unwrap_or("");
    assert!(
        reason.contains("\"héllo\"") && reason.contains("ADBKeyboard"),
        "{reason}"
    );
    assert_eq!(fake.device("phone-a").text, "hi there");
}
