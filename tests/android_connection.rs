//! Finding the adb server and the device: listing, choosing a serial, several devices at once,
//! the server address from the environment, no server, timeouts, a device that disappears
//! mid-command, and a server restarted between commands.

#[path = "support/fake_adb.rs"]
mod fake_adb;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use fake_adb::{FakeAdb, FakeDevice, Screen, fast_options};
use vlad::action::Action;
use vlad::environment::android::{
    AdbServer, AndroidDevice, AndroidError, AndroidOptions, list_devices,
};
use vlad::environment::{Environment, EnvironmentError, Outcome};

fn phone(serial: &str, model: &str) -> FakeDevice {
    let mut d = FakeDevice::phone(serial);
    d.model = model.into();
    d
}

#[test]
fn lists_every_device_with_state_and_model() {
    let mut locked = FakeDevice::phone("locked-1");
    locked.state = "unauthorized".into();
    let fake = FakeAdb::start(vec![
        phone("a-1", "Pixel_7"),
        phone("emulator-5554", "sdk_gphone"),
        locked,
    ])
    .unwrap();
    let devices = fake.server().devices().unwrap();
    let summary: Vec<(&str, &str, Option<&str>)> = devices
        .iter()
        .map(|d| (d.serial.as_str(), d.state.as_str(), d.model.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            ("a-1", "device", Some("Pixel_7")),
            ("emulator-5554", "device", Some("sdk_gphone")),
            ("locked-1", "unauthorized", Some("Fake_Phone")),
        ]
    );
    assert_eq!(fake.server().version().unwrap(), 41);
}

#[test]
fn choosing_a_device_explains_every_wrong_choice() {
    let mut locked = FakeDevice::phone("locked-1");
    locked.state = "unauthorized".into();
    let fake = FakeAdb::start(vec![phone("a-1", "A"), phone("b-2", "B"), locked]).unwrap();
    let connect = |serial| AndroidDevice::connect_to(fake.server(), serial, fast_options());

    let err = connect(None).unwrap_err();
    assert!(
        matches!(err, AndroidError::SeveralDevices { count: 2, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("a-1") && err.to_string().contains("--device"),
        "{err}"
    );

    let err = connect(Some("nope")).unwrap_err();
    assert!(matches!(err, AndroidError::UnknownSerial { .. }), "{err}");
    assert!(err.to_string().contains("b-2 (device)"), "{err}");

    let err = connect(Some("locked-1")).unwrap_err();
    assert!(
        err.to_string().contains("accept the USB debugging prompt"),
        "{err}"
    );

    assert_eq!(connect(Some("b-2")).unwrap().serial(), "b-2");

    let empty = FakeAdb::start(vec![]).unwrap();
    let err = AndroidDevice::connect_to(empty.server(), None, fast_options()).unwrap_err();
    assert!(matches!(err, AndroidError::NoDevice { .. }), "{err}");
    assert!(err.to_string().contains("adb devices"), "{err}");
}

#[test]
fn two_devices_at_once_each_get_their_own_actions() {
    let fake = FakeAdb::start(vec![phone("a-1", "A"), phone("b-2", "B")]).unwrap();
    let mut a = AndroidDevice::connect_to(fake.server(), Some("a-1"), fast_options()).unwrap();
    let mut b = AndroidDevice::connect_to(fake.server(), Some("b-2"), fast_options()).unwrap();
    let (x, y) = fake.device("a-1").icon_center("com.example.notes").unwrap();
    let (sx, sy) = fake
        .device("b-2")
        .icon_center("com.android.settings")
        .unwrap();
    // Interleaved, and from two threads at the same time.
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(a.perform(&Action::Click { x, y }).unwrap(), Outcome::Done));
        s.spawn(|| {
            assert_eq!(
                b.perform(&Action::Click { x: sx, y: sy }).unwrap(),
                Outcome::Done
            )
        });
    });
    assert_eq!(
        b.perform(&Action::Type {
            text: "only b".into()
        })
        .unwrap(),
        Outcome::Done
    );
    assert_eq!(
        fake.device("a-1").screen,
        Screen::App("com.example.notes".into())
    );
    assert_eq!(
        fake.device("b-2").screen,
        Screen::App("com.android.settings".into())
    );
    assert_eq!(fake.device("a-1").text, "");
    assert_eq!(fake.device("b-2").text, "only b");
    assert_eq!(a.observe().unwrap().identity, "android:a-1");
    assert_eq!(b.observe().unwrap().screenshot, fake.device("b-2").render());
}

#[test]
fn no_server_says_how_to_start_one() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = AdbServer::new("127.0.0.1", port).devices().unwrap_err();
    assert!(matches!(err, AndroidError::NoServer { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("adb start-server") && message.contains(&port.to_string()),
        "{message}"
    );
    let env_err = EnvironmentError::from(err);
    assert!(matches!(env_err, EnvironmentError::Unavailable(_)));
}

#[test]
fn a_stalled_server_times_out() {
    let fake = FakeAdb::start(vec![phone("a-1", "A")]).unwrap();
    fake.set_host_delay(Duration::from_secs(5));
    let mut server = fake.server();
    server.request_timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = server.devices().unwrap_err();
    assert!(matches!(err, AndroidError::Timeout { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("timed out after 0.3 s"), "{err}");
}

#[test]
fn a_slow_device_times_out_on_actions_and_screenshots() {
    let fake = FakeAdb::start(vec![phone("a-1", "A")]).unwrap();
    let options = AndroidOptions {
        command_timeout: Duration::from_millis(300),
        screenshot_timeout: Duration::from_millis(300),
        ..fast_options()
    };
    let mut env = AndroidDevice::connect_to(fake.server(), None, options).unwrap();
    fake.with_device("a-1", |d| d.delay = Duration::from_secs(5));
    let start = Instant::now();
    match env.perform(&Action::Home) {
        Err(EnvironmentError::Timeout { what, seconds }) => {
            assert!(
                what.contains("input keyevent KEYCODE_HOME") && what.contains("a-1"),
                "{what}"
            );
            assert!((seconds - 0.3).abs() < 1e-9);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(matches!(
        env.observe(),
        Err(EnvironmentError::Timeout { .. })
    ));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // Once the device answers again, the same environment works.
    fake.with_device("a-1", |d| d.delay = Duration::ZERO);
    assert_eq!(env.perform(&Action::Home).unwrap(), Outcome::Done);
}

#[test]
fn a_device_that_disappears_mid_command_is_reported_by_serial() {
    let fake = FakeAdb::start(vec![phone("a-1", "A")]).unwrap();
    let mut env = AndroidDevice::connect_to(fake.server(), None, fast_options()).unwrap();

    fake.with_device("a-1", |d| d.vanish_mid_command = true);
    match env.perform(&Action::Click { x: 10, y: 10 }) {
        Err(EnvironmentError::Unavailable(message)) => {
            assert!(
                message.contains("a-1") && message.contains("went away"),
                "{message}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Gone for good: the next command is refused by the server, with the same clear error.
    match env.perform(&Action::Home) {
        Err(EnvironmentError::Unavailable(message)) => {
            assert!(message.contains("not found"), "{message}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // It comes back; a screenshot is cut off halfway.
    fake.add_device(phone("a-1", "A"));
    fake.with_device("a-1", |d| d.vanish_mid_command = true);
    match env.observe() {
        Err(EnvironmentError::Unavailable(message)) => {
            assert!(
                message.contains("a-1") && message.contains("no longer lists it"),
                "{message}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    fake.add_device(phone("a-1", "A"));
    assert!(env.observe().is_ok(), "works again once the device is back");
}

#[test]
fn a_server_restart_between_commands_just_works() {
    let fake = FakeAdb::start(vec![phone("a-1", "A")]).unwrap();
    let port = fake.port();
    let mut env = AndroidDevice::connect_to(fake.server(), None, fast_options()).unwrap();
    assert_eq!(env.perform(&Action::Home).unwrap(), Outcome::Done);
    drop(fake);
    let err = env.perform(&Action::Home).unwrap_err();
    assert!(err.to_string().contains("adb start-server"), "{err}");
    let restarted = FakeAdb::start_on(port, vec![phone("a-1", "A")]).unwrap();
    assert_eq!(env.perform(&Action::Back).unwrap(), Outcome::Done);
    assert_eq!(restarted.device("a-1").key_events, ["KEYCODE_BACK"]);
}

/// Runs in a child process (so that setting the variables races with nothing): the library finds
/// the fake through ANDROID_ADB_SERVER_ADDRESS / ANDROID_ADB_SERVER_PORT.
#[test]
fn the_server_address_comes_from_the_environment() {
    if let Ok(expect) = std::env::var("VLAD_TEST_EXPECT") {
        match expect.as_str() {
            "ok" => {
                let devices = list_devices().unwrap();
                assert_eq!(devices.len(), 1);
                assert_eq!(devices[0].model.as_deref(), Some("From_Env"));
                let env = AndroidDevice::connect(None).unwrap();
                assert_eq!(env.serial(), "env-1");
            }
            _ => {
                let err = list_devices().unwrap_err();
                assert!(err.to_string().contains("ANDROID_ADB_SERVER_PORT"), "{err}");
            }
        }
        return;
    }
    let fake = FakeAdb::start(vec![phone("env-1", "From_Env")]).unwrap();
    let run = |port: &str, address: &str, expect: &str| {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_server_address_comes_from_the_environment",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VLAD_TEST_EXPECT", expect)
            .env("ANDROID_ADB_SERVER_PORT", port)
            .env("ANDROID_ADB_SERVER_ADDRESS", address)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "child with port {port:?} address {address:?} failed"
        );
    };
    // `localhost` may resolve to ::1 first, where the fake does not listen; the next address works.
    run(&fake.port().to_string(), "localhost", "ok");
    assert!(
        fake.requests().iter().any(|r| r == "host:devices-l"),
        "the child reached this fake"
    );
    run("not-a-port", "127.0.0.1", "bad");
}
