//! The desktop environment for real: a private Xvfb + openbox per test, real toolkit apps (a Tk
//! probe that records what it receives, zenity's GTK entry), real xcap screenshots and real
//! enigo input. The apps' own records are the truth the tests check against.

#[path = "support/tk_probe.rs"]
mod tk_probe;
#[path = "support/xvfb.rs"]
mod xvfb;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use serde_json::Value;
use tk_probe::{start_settled_probe, wait_state};
use vlad::action::{Action, ScrollDirection};
use vlad::environment::desktop::{self, DesktopEnvironment, DesktopError, DesktopTarget};
use vlad::environment::{Environment, Outcome};
use xvfb::{Xvfb, read_json, serial};

const SWATCH: [u8; 3] = [0x12, 0xab, 0x34];

fn state(path: &Path) -> Value {
    read_json(path).unwrap_or(Value::Null)
}

fn int(v: &Value) -> i32 {
    v.as_i64().unwrap_or(i64::MIN) as i32
}

/// Centre of a widget the app reports, in root-window pixels.
fn centre(s: &Value, widget: &str) -> (i32, i32) {
    let g = &s[widget];
    (
        int(&g["x"]) + int(&g["width"]) / 2,
        int(&g["y"]) + int(&g["height"]) / 2,
    )
}

fn perform(env: &mut DesktopEnvironment, action: Action) {
    let outcome = env.perform(&action);
    assert!(
        matches!(outcome, Ok(Outcome::Done)),
        "{action:?} → {outcome:?}"
    );
}

fn primary() -> DesktopEnvironment {
    DesktopEnvironment::open(DesktopTarget::Primary).unwrap_or_else(|e| panic!("open: {e}"))
}

/// A 1600x900 desktop of this test's own with the probe settled on it, and the primary monitor
/// opened and observed once; also the lock and the server, held as long as the test runs.
fn probe_on_primary() -> (MutexGuard<'static, ()>, Xvfb, PathBuf, DesktopEnvironment) {
    let guard = serial();
    let mut x = Xvfb::with_wm(1600, 900);
    x.use_here();
    let probe = start_settled_probe(&mut x, None);
    let mut env = primary();
    env.observe().unwrap_or_else(|e| panic!("observe: {e}"));
    (guard, x, probe, env)
}

/// The last mouse button event the probe saw (null when none).
fn last_button(s: &Value) -> Value {
    s["buttons"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default()
}

fn key(keys: &[&str]) -> Action {
    Action::Key {
        keys: keys.iter().map(|k| k.to_string()).collect(),
    }
}

fn type_text(text: &str) -> Action {
    Action::Type { text: text.into() }
}

#[test]
fn screenshot_pixels_match_what_the_root_and_the_app_drew() {
    let _g = serial();
    let mut x = Xvfb::with_wm(1600, 900);
    x.use_here();
    x.run("xsetroot", &["-solid", "#336699"]);
    let probe = start_settled_probe(&mut x, None);
    let s = state(&probe);

    let mut env = primary();
    let obs = env.observe().unwrap_or_else(|e| panic!("observe: {e}"));
    assert_eq!((obs.width(), obs.height()), (1600, 900));
    assert_eq!((obs.scale_factor, obs.origin), (1.0, (0, 0)));
    assert!(
        obs.identity.starts_with("desktop:monitor:"),
        "{}",
        obs.identity
    );
    for (px, py) in [(2, 2), (1597, 2), (2, 897), (1597, 897)] {
        assert_eq!(
            obs.screenshot.get_pixel(px, py).0,
            [0x33, 0x66, 0x99],
            "root at {px},{py}"
        );
    }
    // The swatch the app drew: exactly its 200x80 pixels, exactly where the app says it is.
    let (sx, sy) = (int(&s["swatch"]["x"]) as u32, int(&s["swatch"]["y"]) as u32);
    let count = obs.screenshot.pixels().filter(|p| p.0 == SWATCH).count();
    assert_eq!(count, 200 * 80, "swatch pixels in the screenshot");
    assert_eq!(obs.screenshot.get_pixel(sx, sy).0, SWATCH);
    assert_eq!(obs.screenshot.get_pixel(sx + 199, sy + 79).0, SWATCH);
    assert_ne!(obs.screenshot.get_pixel(sx + 200, sy + 80).0, SWATCH);
}

#[test]
fn clicks_land_on_the_widget_aimed_at() {
    let (_g, _x, probe, mut env) = probe_on_primary();
    let s = state(&probe);

    let (bx, by) = centre(&s, "button");
    perform(&mut env, Action::Click { x: bx, y: by });
    let s = wait_state(&probe, "one press", |s| s["presses"] == 1);
    let last = last_button(&s);
    assert_eq!((int(&last["x_root"]), int(&last["y_root"])), (bx, by));
    assert_eq!(last["num"], 1);

    perform(&mut env, Action::DoubleClick { x: bx, y: by });
    wait_state(&probe, "two more presses", |s| s["presses"] == 3);

    let (lx, ly) = centre(&s, "list");
    perform(&mut env, Action::RightClick { x: lx, y: ly });
    let s = wait_state(&probe, "a right click", |s| last_button(s)["num"] == 3);
    let b = last_button(&s);
    assert_eq!((int(&b["x_root"]), int(&b["y_root"])), (lx, ly));
    assert_eq!(
        state(&probe)["presses"],
        3,
        "a right click is not a press of the button"
    );

    // Outside the screenshot: refused as a failed action, nothing clicked.
    let outcome = env.perform(&Action::Click { x: 1600, y: 10 });
    assert!(matches!(outcome, Ok(Outcome::Failed { .. })), "{outcome:?}");
}

#[test]
fn unicode_text_and_key_combos_reach_a_tk_entry() {
    let (_g, _x, probe, mut env) = probe_on_primary();
    let s = state(&probe);

    let (ex, ey) = centre(&s, "entry");
    perform(&mut env, Action::Click { x: ex, y: ey });
    wait_state(&probe, "focus on the entry", |s| {
        s["focus"].as_str().is_some_and(|f| f.contains("entry"))
    });
    perform(&mut env, type_text("héllo 世界"));
    wait_state(&probe, "the typed text", |s| s["text"] == "héllo 世界");
    // Tk's Entry: ctrl+a goes to the line start (emacs binding); then one more character.
    perform(&mut env, key(&["ctrl", "a"]));
    perform(&mut env, type_text(">"));
    wait_state(&probe, "text after ctrl+a", |s| s["text"] == ">héllo 世界");
    perform(&mut env, key(&["end"]));
    perform(&mut env, key(&["backspace"]));
    wait_state(&probe, "text after end, backspace", |s| {
        s["text"] == ">héllo 世"
    });
    perform(&mut env, key(&["shift+home"]));
    perform(&mut env, type_text("ok"));
    wait_state(&probe, "selection replaced", |s| s["text"] == "ok");

    // An unknown key name fails the action and presses nothing.
    let outcome = env.perform(&key(&["ctrl", "hyper"]));
    assert!(matches!(outcome, Ok(Outcome::Failed { .. })), "{outcome:?}");
    perform(&mut env, type_text("!"));
    wait_state(&probe, "no modifier left pressed", |s| s["text"] == "ok!");
}

#[test]
fn ctrl_a_then_typing_replaces_the_text_of_a_gtk_entry() {
    let _g = serial();
    let x = Xvfb::with_wm(1600, 900);
    x.use_here();
    let mut zenity = x
        .command("zenity")
        .args([
            "--entry",
            "--title",
            "vlad zenity",
            "--entry-text",
            "old text",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start zenity (apt-get install zenity): {e}"));
    let start = Instant::now();
    let window = loop {
        let found = desktop::windows()
            .ok()
            .and_then(|ws| ws.into_iter().find(|w| w.title == "vlad zenity"));
        if let Some(w) = found {
            break w;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = zenity.kill();
            panic!("zenity's window never appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(700));
    let mut env = DesktopEnvironment::open(DesktopTarget::Window("vlad zenity".into()))
        .unwrap_or_else(|e| panic!("open window: {e}"));
    let obs = env.observe().unwrap_or_else(|e| panic!("observe: {e}"));
    assert_eq!(
        (obs.width(), obs.height()),
        (window.physical.width, window.physical.height)
    );
    perform(&mut env, key(&["ctrl+a"]));
    perform(&mut env, type_text("héllo 世界"));
    perform(&mut env, Action::Enter);
    let start = Instant::now();
    while zenity.try_wait().ok().flatten().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = zenity.kill();
            panic!("zenity did not close after Enter");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = zenity
        .wait_with_output()
        .unwrap_or_else(|e| panic!("zenity: {e}"));
    assert!(out.status.success(), "zenity exit {:?}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "héllo 世界\n");
}

#[test]
fn a_drag_moves_the_slider() {
    let (_g, _x, probe, mut env) = probe_on_primary();
    let s = state(&probe);
    assert_eq!(s["slider"], 0);
    let (kx, ky) = (int(&s["slider_knob"][0]), int(&s["slider_knob"][1]));
    perform(
        &mut env,
        Action::Drag {
            x: kx,
            y: ky,
            to_x: kx + 140,
            to_y: ky,
            ms: Some(300),
        },
    );
    let s = wait_state(&probe, "the slider to move", |s| s["slider"] != 0);
    std::thread::sleep(Duration::from_millis(200));
    let v = state(&probe)["slider"].as_i64().unwrap_or(-1);
    // 140 of the trough's ~280 usable pixels: about half way.
    assert!((40..=60).contains(&v), "slider at {v}; state {s}");
}

#[test]
fn scrolling_scrolls_the_list_both_ways() {
    let (_g, _x, probe, mut env) = probe_on_primary();
    let s = state(&probe);
    assert_eq!(s["list_top"], 0);
    let (lx, ly) = centre(&s, "list");
    let scroll = |direction, amount| Action::Scroll {
        x: lx,
        y: ly,
        direction,
        amount,
    };
    perform(&mut env, scroll(ScrollDirection::Down, 3));
    wait_state(&probe, "the list to scroll down", |s| s["list_top"] != 0);
    // Let all three notches arrive before reading where the list stopped.
    std::thread::sleep(Duration::from_millis(400));
    let down = state(&probe)["list_top"].as_i64().unwrap_or(0);
    assert!(down >= 3, "top item after 3 notches down: {down}");
    perform(&mut env, scroll(ScrollDirection::Up, 1));
    let s = wait_state(&probe, "the list to scroll up", |s| {
        s["list_top"].as_i64().is_some_and(|t| t < down)
    });
    assert!(s["list_top"].as_i64().unwrap_or(-1) >= 0);
    perform(&mut env, scroll(ScrollDirection::Right, 2));
    wait_state(&probe, "the list to scroll right", |s| {
        s["list_xview"].as_f64().is_some_and(|v| v > 0.0)
    });
    perform(&mut env, scroll(ScrollDirection::Left, 2));
    wait_state(&probe, "the list to scroll back left", |s| {
        s["list_xview"] == 0.0
    });
}

/// A second monitor layout: the screen's only RandR output moved into a monitor at +800+0 of a
/// 1600x900 screen, and `Xft.dpi: 192` so that the system reports a scale factor of 2. X11 input
/// and capture stay in physical pixels: screenshot pixel (x, y) is root (800 + x, y).
#[test]
fn a_monitor_with_an_origin_and_a_reported_scale_maps_clicks_exactly_once() {
    let _g = serial();
    let mut x = Xvfb::with_wm(1600, 900);
    x.use_here();
    x.run(
        "xrandr",
        &["--setmonitor", "right", "800/200x900/200+800+0", "screen"],
    );
    let resources = x.path("resources");
    std::fs::write(&resources, "Xft.dpi: 192\n").unwrap_or_else(|e| panic!("{e}"));
    x.run("xrdb", &["-merge", &resources.to_string_lossy()]);
    let probe = start_settled_probe(&mut x, Some("+1000+150"));
    let s = state(&probe);
    assert!(
        int(&s["swatch"]["x"]) >= 800,
        "the probe must sit on the right monitor: {s}"
    );

    let monitors = desktop::monitors().unwrap_or_else(|e| panic!("monitors: {e}"));
    assert_eq!(monitors.len(), 1, "{monitors:?}");
    let m = &monitors[0];
    assert_eq!(
        (
            m.physical.x,
            m.physical.y,
            m.physical.width,
            m.physical.height
        ),
        (800, 0, 800, 900)
    );
    assert_eq!(m.scale_factor, 2.0);
    assert_eq!((m.logical.x, m.logical.width), (400, 400));

    let mut env = DesktopEnvironment::open(DesktopTarget::Monitor(m.id.to_string()))
        .unwrap_or_else(|e| panic!("open: {e}"));
    let obs = env.observe().unwrap_or_else(|e| panic!("observe: {e}"));
    assert_eq!((obs.width(), obs.height()), (800, 900));
    assert_eq!((obs.scale_factor, obs.origin), (2.0, (400, 0)));
    assert_eq!(env.input_point(0, 0).ok(), Some((800, 0)));
    // Where the screenshot shows the swatch is where the app says it is, minus the origin.
    let (sx, sy) = (int(&s["swatch"]["x"]) - 800, int(&s["swatch"]["y"]));
    assert_eq!(obs.screenshot.get_pixel(sx as u32, sy as u32).0, SWATCH);
    assert_eq!(
        obs.screenshot.pixels().filter(|p| p.0 == SWATCH).count(),
        200 * 80
    );
    let (bx, by) = centre(&s, "button");
    perform(&mut env, Action::Click { x: bx - 800, y: by });
    let s = wait_state(&probe, "the press on the right monitor", |s| {
        s["presses"] == 1
    });
    let b = last_button(&s);
    assert_eq!((int(&b["x_root"]), int(&b["y_root"])), (bx, by));

    // The self-test agrees: no offset, scale 1, although the system reports 2.
    let c = desktop::calibrate::calibrate(DesktopTarget::Monitor(m.id.to_string()), 1.0)
        .unwrap_or_else(|e| panic!("calibrate: {e}"));
    assert!(c.ok, "{c:?}");
    assert_eq!(c.reported_scale_factor, 2.0);
    assert!(c.offset.iter().all(|o| o.abs() <= 1.0), "{c:?}");
    assert!(c.scale.iter().all(|s| (s - 1.0).abs() < 0.01), "{c:?}");
}

#[test]
fn a_window_target_captures_the_window_and_clicks_in_its_pixels() {
    let _g = serial();
    let mut x = Xvfb::with_wm(1280, 1024);
    x.use_here();
    let probe = start_settled_probe(&mut x, Some("+300+200"));
    let s = state(&probe);
    let windows = desktop::windows().unwrap_or_else(|e| panic!("windows: {e}"));
    let w = windows
        .iter()
        .find(|w| w.title == "vlad probe")
        .unwrap_or_else(|| panic!("probe not listed: {windows:?}"));
    let mut env = DesktopEnvironment::open(DesktopTarget::Window("probe".into()))
        .unwrap_or_else(|e| panic!("open: {e}"));
    let obs = env.observe().unwrap_or_else(|e| panic!("observe: {e}"));
    assert_eq!(
        (obs.width(), obs.height()),
        (w.physical.width, w.physical.height)
    );
    let (ox, oy) = (w.physical.x, w.physical.y);
    let (sx, sy) = (int(&s["swatch"]["x"]) - ox, int(&s["swatch"]["y"]) - oy);
    assert_eq!(obs.screenshot.get_pixel(sx as u32, sy as u32).0, SWATCH);
    let (bx, by) = centre(&s, "button");
    perform(
        &mut env,
        Action::Click {
            x: bx - ox,
            y: by - oy,
        },
    );
    wait_state(&probe, "a press through the window target", |s| {
        s["presses"] == 1
    });

    let missing = DesktopEnvironment::open(DesktopTarget::Window("no such window".into()));
    assert!(
        matches!(missing, Err(DesktopError::NoSuchWindow { .. })),
        "{missing:?}"
    );
}

#[test]
fn calibrate_finds_no_offset_on_a_plain_screen() {
    let _g = serial();
    let x = Xvfb::with_wm(1600, 900);
    x.use_here();
    let c = desktop::calibrate::calibrate(DesktopTarget::Primary, 1.0)
        .unwrap_or_else(|e| panic!("calibrate: {e}"));
    assert!(c.ok, "{c:?}");
    assert_eq!(c.markers.len(), 5);
    assert!(c.markers.iter().all(|m| m.landed == Some(m.drawn)), "{c:?}");
    assert!(
        c.capture_scale.iter().all(|s| (s - 1.0).abs() < 0.01),
        "{c:?}"
    );
}

#[test]
fn no_display_is_a_clear_error() {
    let _g = serial();
    // SAFETY: under serial(); see Xvfb::use_here.
    unsafe {
        std::env::remove_var("DISPLAY");
        std::env::remove_var("WAYLAND_DISPLAY");
    }
    let err = DesktopEnvironment::open(DesktopTarget::Primary);
    assert!(matches!(err, Err(DesktopError::NoDisplay)), "{err:?}");
    let text = err
        .map(|_| ())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(text.contains("DISPLAY") && text.contains("Xvfb"), "{text}");
    assert!(matches!(desktop::monitors(), Err(DesktopError::NoDisplay)));
}
