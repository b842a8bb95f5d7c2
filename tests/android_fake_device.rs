//! The fake adb server speaks the real protocol: Debian's `adb` client (1.0.41) lists its devices,
//! runs shell commands on them and pulls PNG screenshots through `exec-out`. The fake's own
//! behaviour (screen changes on taps, shell quoting) is checked here too.

#[path = "support/fake_adb.rs"]
mod fake_adb;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fake_adb::{FakeAdb, FakeDevice, Screen};

/// Runs the real `adb` client against the fake on `port`, with a 30 s limit.
fn adb(port: u16, args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new("adb")
        .arg("-P")
        .arg(port.to_string())
        .args(args)
        .env("HOME", home.path())
        .env_remove("ANDROID_SERIAL")
        .env_remove("ANDROID_ADB_SERVER_ADDRESS")
        .env_remove("ANDROID_ADB_SERVER_PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the real `adb` client ({e}); install it with scripts/install-deps.sh (Debian package `adb`)"
            )
        });
    let start = Instant::now();
    while child.try_wait().expect("wait for adb").is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("adb {args:?} did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("adb output")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_real_adb_client_lists_the_fake_devices() {
    let fake = FakeAdb::start(vec![
        FakeDevice::phone("fake-1"),
        FakeDevice::phone("fake-2"),
    ])
    .unwrap();
    let out = adb(fake.port(), &["devices"]);
    assert!(out.status.success(), "adb devices failed: {out:?}");
    let listed = text(&out);
    assert!(listed.contains("List of devices attached"), "{listed}");
    assert!(listed.contains("fake-1\tdevice"), "{listed}");
    assert!(listed.contains("fake-2\tdevice"), "{listed}");

    let out = adb(fake.port(), &["devices", "-l"]);
    assert!(text(&out).contains("model:Fake_Phone"), "{out:?}");
    // It asked the version first, as the real client does, and never tried to kill the server.
    let requests = fake.requests();
    assert_eq!(
        requests.first().map(String::as_str),
        Some("host:version"),
        "{requests:?}"
    );
    assert!(!requests.iter().any(|r| r == "host:kill"), "{requests:?}");
}

#[test]
fn the_real_adb_client_runs_shell_commands_on_one_serial() {
    let fake = FakeAdb::start(vec![
        FakeDevice::phone("fake-1"),
        FakeDevice::phone("fake-2"),
    ])
    .unwrap();
    let out = adb(fake.port(), &["-s", "fake-2", "shell", "echo", "hi"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out), "hi\n");
    assert_eq!(fake.commands("fake-2"), vec!["echo hi".to_string()]);
    assert!(fake.commands("fake-1").is_empty());
    // The real client selects the device with host:tport:serial: and reads the 8-byte id.
    assert!(
        fake.requests()
            .iter()
            .any(|r| r == "host:tport:serial:fake-2"),
        "{:?}",
        fake.requests()
    );

    // A tap through the real client opens the app on the fake's screen.
    let (x, y) = fake
        .device("fake-2")
        .icon_center("com.example.notes")
        .unwrap();
    let out = adb(
        fake.port(),
        &[
            "-s",
            "fake-2",
            "shell",
            "input",
            "tap",
            &x.to_string(),
            &y.to_string(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fake.device("fake-2").screen,
        Screen::App("com.example.notes".into())
    );

    let out = adb(fake.port(), &["-s", "nope", "shell", "echo", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("device 'nope' not found"),
        "{out:?}"
    );
}

#[test]
fn the_real_adb_client_pulls_the_screen_as_png() {
    let fake = FakeAdb::start(vec![FakeDevice::phone("fake-1")]).unwrap();
    let out = adb(
        fake.port(),
        &["-s", "fake-1", "exec-out", "screencap", "-p"],
    );
    assert!(out.status.success(), "{out:?}");
    let img = image::load_from_memory(&out.stdout)
        .expect("adb exec-out screencap -p gave a PNG")
        .to_rgb8();
    assert_eq!(img, fake.device("fake-1").render());
    // The real client quotes exec-out arguments; the fake's shell unquotes them.
    assert_eq!(fake.commands("fake-1"), vec!["screencap '-p'".to_string()]);
}

#[test]
fn taps_change_the_screen_only_in_the_right_place() {
    let mut d = FakeDevice::phone("x");
    let home = d.render();
    let (x, y, w, _) = d.icon_rect("com.example.notes").unwrap();
    d.run_line(&format!("input tap {} {}", x + w + 5, y));
    assert_eq!(d.render(), home, "a tap beside the icon changes nothing");
    d.run_line(&format!("input tap {} {}", x + 1, y + 1));
    assert_eq!(d.screen, Screen::App("com.example.notes".into()));
    assert_ne!(d.render(), home);
}

#[test]
fn the_fake_shell_unquotes_like_sh() {
    let mut d = FakeDevice::phone("x");
    let out = d.run_line(r#"echo 'a  b' "c\"d" e\ f $HOME "$UNSET"x 'it'\''s' # comment; echo no"#);
    assert_eq!(String::from_utf8_lossy(&out), "a  b c\"d e f x it's\n");
    let out = d.run_line("false; echo __RC=$?");
    assert_eq!(String::from_utf8_lossy(&out), "__RC=1\n");
    let out = d.run_line("echo a && rm -rf /");
    assert!(String::from_utf8_lossy(&out).contains("syntax error"));
}
