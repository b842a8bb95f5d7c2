//! Every Android action against the fake device: what the device received, and what its screen
//! shows afterwards.

#[path = "support/fake_adb.rs"]
mod fake_adb;

use fake_adb::{FakeAdb, FakeDevice, Screen, fast_options};
use vlad::action::{Action, ScrollDirection};
use vlad::environment::android::{AndroidDevice, ScreenshotMode};
use vlad::environment::{Environment, EnvironmentKind, Outcome};

const NOTES: &str = "com.example.notes";

fn setup() -> (FakeAdb, AndroidDevice) {
    let fake = FakeAdb::start(vec![FakeDevice::phone("phone-1")]).unwrap();
    let env = AndroidDevice::connect_to(fake.server(), None, fast_options()).unwrap();
    (fake, env)
}

fn failed(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Failed { reason } => reason,
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn refused(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Refused { reason } => reason,
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn observe_gives_the_device_screen_in_device_pixels() {
    let (fake, mut env) = setup();
    let obs = env.observe().unwrap();
    assert_eq!(obs.screenshot, fake.device("phone-1").render());
    assert_eq!((obs.width(), obs.height()), (360, 640));
    assert_eq!(obs.scale_factor, 1.0);
    assert_eq!(obs.origin, (0, 0));
    assert_eq!(obs.identity, "android:phone-1");
    let d = env.describe();
    assert_eq!(d.kind, EnvironmentKind::Android);
    assert_eq!(
        (d.width, d.height, d.identity.as_str()),
        (360, 640, "android:phone-1")
    );
    // Raw screencap is the default path.
    assert!(fake.commands("phone-1").iter().any(|c| c == "screencap"));
}

#[test]
fn a_tap_on_the_icon_opens_the_app_and_the_screenshot_shows_it() {
    let (fake, mut env) = setup();
    let home = env.observe().unwrap().screenshot;
    let (x, y) = fake.device("phone-1").icon_center(NOTES).unwrap();
    assert_eq!(env.perform(&Action::Click { x, y }).unwrap(), Outcome::Done);
    let device = fake.device("phone-1");
    assert_eq!(device.taps, vec![(x, y)]);
    assert_eq!(device.screen, Screen::App(NOTES.into()));
    assert!(
        device
            .commands
            .contains(&format!("input tap {x} {y}; echo __VLAD_RC=$?"))
    );
    let after = env.observe().unwrap().screenshot;
    assert_ne!(after, home);
    // The app's green title bar is where the fake draws it.
    assert_eq!(after.get_pixel(5, 5).0, [40, 170, 80]);
}

#[test]
fn points_outside_the_screen_fail_without_touching_the_device() {
    let (fake, mut env) = setup();
    let out = env.perform(&Action::Click { x: 360, y: 10 }).unwrap();
    assert!(failed(&out).contains("outside the 360x640 screen"));
    let out = env
        .perform(&Action::Swipe {
            x: 10,
            y: 10,
            to_x: 10,
            to_y: -1,
            ms: None,
        })
        .unwrap();
    assert!(failed(&out).contains("(10, -1)"));
    assert!(fake.device("phone-1").taps.is_empty());
    assert!(fake.device("phone-1").swipes.is_empty());
}

#[test]
fn long_press_is_a_swipe_in_place_and_opens_the_icon_menu() {
    let (fake, mut env) = setup();
    let (x, y) = fake.device("phone-1").icon_center(NOTES).unwrap();
    assert_eq!(
        env.perform(&Action::LongPress { x, y, ms: 800 }).unwrap(),
        Outcome::Done
    );
    let device = fake.device("phone-1");
    assert_eq!(device.swipes, vec![(x, y, x, y, 800)]);
    assert_eq!(device.screen, Screen::Menu(NOTES.into()));
}

#[test]
fn swipe_and_drag_send_input_swipe_with_their_durations() {
    let (fake, mut env) = setup();
    let before = env.observe().unwrap().screenshot;
    let swipe = Action::Swipe {
        x: 300,
        y: 400,
        to_x: 40,
        to_y: 400,
        ms: None,
    };
    assert_eq!(env.perform(&swipe).unwrap(), Outcome::Done);
    assert_eq!(fake.device("phone-1").screen, Screen::Home { page: 1 });
    assert_ne!(env.observe().unwrap().screenshot, before);
    let drag = Action::Drag {
        x: 40,
        y: 300,
        to_x: 300,
        to_y: 300,
        ms: Some(1500),
    };
    assert_eq!(env.perform(&drag).unwrap(), Outcome::Done);
    assert_eq!(
        fake.device("phone-1").swipes,
        vec![(300, 400, 40, 400, 300), (40, 300, 300, 300, 1500)]
    );
    assert_eq!(fake.device("phone-1").screen, Screen::Home { page: 0 });
}

#[test]
fn keys_go_home_back_enter_and_to_recents() {
    let (fake, mut env) = setup();
    assert_eq!(env.perform(&Action::AppSwitch).unwrap(), Outcome::Done);
    assert_eq!(fake.device("phone-1").screen, Screen::Recents);
    assert_eq!(env.perform(&Action::Home).unwrap(), Outcome::Done);
    assert_eq!(fake.device("phone-1").screen, Screen::Home { page: 0 });
    env.perform(&Action::OpenApp { name: NOTES.into() })
        .unwrap();
    assert_eq!(env.perform(&Action::Enter).unwrap(), Outcome::Done);
    assert_eq!(fake.device("phone-1").text, "\n");
    assert_eq!(
        env.perform(&Action::Key {
            keys: vec!["backspace".into()]
        })
        .unwrap(),
        Outcome::Done
    );
    assert_eq!(fake.device("phone-1").text, "");
    assert_eq!(env.perform(&Action::Back).unwrap(), Outcome::Done);
    assert_eq!(fake.device("phone-1").screen, Screen::Home { page: 0 });
    assert_eq!(
        fake.device("phone-1").key_events,
        [
            "KEYCODE_APP_SWITCH",
            "KEYCODE_HOME",
            "KEYCODE_ENTER",
            "KEYCODE_DEL",
            "KEYCODE_BACK"
        ]
    );
    let out = env
        .perform(&Action::Key {
            keys: vec!["ctrl".into(), "s".into()],
        })
        .unwrap();
    assert!(refused(&out).contains("ctrl+s"));
    let out = env
        .perform(&Action::Key {
            keys: vec!["hyper".into()],
        })
        .unwrap();
    assert!(refused(&out).contains("\"hyper\""));
}

#[test]
fn open_app_by_package_and_by_label() {
    let (fake, mut env) = setup();
    assert_eq!(
        env.perform(&Action::OpenApp {
            name: "com.android.settings".into()
        })
        .unwrap(),
        Outcome::Done
    );
    assert_eq!(
        fake.device("phone-1").screen,
        Screen::App("com.android.settings".into())
    );
    assert_eq!(
        env.perform(&Action::OpenApp {
            name: "Notes".into()
        })
        .unwrap(),
        Outcome::Done
    );
    assert_eq!(fake.device("phone-1").screen, Screen::App(NOTES.into()));
    assert!(fake.commands("phone-1").iter().any(|c| {
        c.starts_with("monkey -p com.example.notes -c android.intent.category.LAUNCHER 1")
    }));
    assert_eq!(
        fake.device("phone-1").launched,
        ["com.android.settings", NOTES]
    );
}

#[test]
fn open_app_failures_say_why() {
    let (fake, mut env) = setup();
    let out = env
        .perform(&Action::OpenApp {
            name: "Spreadsheet".into(),
        })
        .unwrap();
    assert!(failed(&out).contains("package name"), "{out:?}");
    let out = env
        .perform(&Action::OpenApp {
            name: "com.missing.app".into(),
        })
        .unwrap();
    assert!(failed(&out).contains("not installed"), "{out:?}");
    let out = env
        .perform(&Action::OpenApp {
            name: "com.example.service".into(),
        })
        .unwrap();
    assert!(failed(&out).contains("No activities found"), "{out:?}");
    assert!(fake.device("phone-1").launched.is_empty());
}

#[test]
fn desktop_only_and_agent_actions_are_refused() {
    let (fake, mut env) = setup();
    for action in [
        Action::DoubleClick { x: 1, y: 1 },
        Action::RightClick { x: 1, y: 1 },
        Action::Scroll {
            x: 1,
            y: 1,
            direction: ScrollDirection::Down,
            amount: 1,
        },
        Action::Finish { answer: "x".into() },
        Action::CallUser {
            question: "x".into(),
        },
    ] {
        refused(&env.perform(&action).unwrap());
    }
    // Only the `wm size` at connect reached the device.
    assert_eq!(fake.commands("phone-1").len(), 1);
    assert_eq!(
        env.perform(&Action::Wait { seconds: 0.01 }).unwrap(),
        Outcome::Done
    );
    failed(&env.perform(&Action::Wait { seconds: -1.0 }).unwrap());
}

#[test]
fn raw_and_png_screenshots_agree_for_both_header_sizes_and_formats() {
    let fake = FakeAdb::start(vec![FakeDevice::phone("p")]).unwrap();
    let truth = fake.device("p").render();
    let png = AndroidDevice::connect_to(fake.server(), None, fast_options())
        .unwrap()
        .capture(true)
        .unwrap();
    assert_eq!(png, truth);
    for (header, format) in [(16, 1), (12, 1), (12, 2), (16, 5)] {
        fake.with_device("p", |d| {
            d.raw_header = header;
            d.raw_format = format;
        });
        let options = vlad::environment::android::AndroidOptions {
            screenshot: ScreenshotMode::Raw,
            ..fast_options()
        };
        let mut env = AndroidDevice::connect_to(fake.server(), None, options).unwrap();
        assert_eq!(
            env.observe().unwrap().screenshot,
            truth,
            "header {header}, format {format}"
        );
    }
}

#[test]
fn undecodable_raw_output_falls_back_to_png_for_good() {
    let fake = FakeAdb::start(vec![FakeDevice::phone("p")]).unwrap();
    fake.with_device("p", |d| d.raw_broken = true);
    let mut env = AndroidDevice::connect_to(fake.server(), None, fast_options()).unwrap();
    assert_eq!(env.observe().unwrap().screenshot, fake.device("p").render());
    env.observe().unwrap();
    let shots: Vec<String> = fake
        .commands("p")
        .into_iter()
        .filter(|c| c.starts_with("screencap"))
        .collect();
    assert_eq!(shots, ["screencap", "screencap -p", "screencap -p"]);
    // Forced raw mode reports the problem instead.
    let options = vlad::environment::android::AndroidOptions {
        screenshot: ScreenshotMode::Raw,
        ..fast_options()
    };
    let mut raw = AndroidDevice::connect_to(fake.server(), None, options).unwrap();
    let err = raw.observe().unwrap_err().to_string();
    assert!(err.contains("could not be decoded"), "{err}");
}

#[test]
fn pty_line_endings_and_exit_codes_come_back_clean() {
    let (fake, env) = setup();
    fake.with_device("phone-1", |d| d.pty = true);
    let out = env.shell("echo one; echo two").unwrap();
    assert_eq!((out.output.as_str(), out.status), ("one\ntwo", 0));
    let out = env.shell("no-such-tool").unwrap();
    assert_eq!(out.status, 127);
    assert!(out.output.contains("not found"));
}
