//! `vlad test` under Xvfb against a real Tk login form (tests/desktop_apps/tk_login.py):
//!
//! 1. recorded with the replay backend (the recorded replies are the model's groundings and
//!    answers): the app's own state shows every step landed, and the JUnit XML validates
//!    against the JUnit schema Jenkins uses (xmllint);
//! 2. re-run with no model at all: every answer comes from the cache and the app gets the
//!    same input;
//! 3. the same form in dark colours: a cache miss, reported as "the screen changed" (an
//!    error without a model); with a model the changed steps are asked again and recorded, and
//!    the next run without a model passes;
//! 4. a failing assertion and an ambiguous answer: failing JUnit cases that still validate.
//!
//! Also: an Android target on the fake adb server (the app restarted, a field located, tapped
//! and typed into, an assertion, then the same from the cache), every example under
//! examples/ui-tests/ is a valid test file, and an invalid file stops the run before anything
//! starts.

#[path = "support/fake_adb.rs"]
mod fake_adb;
#[path = "support/xvfb.rs"]
mod xvfb;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vlad::agent::trajectory;
use xvfb::{Xvfb, python, read_json, serial};

const W: u32 = 1024;
const H: u32 = 768;
const VLAD: &str = env!("CARGO_BIN_EXE_vlad");

fn app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/desktop_apps/tk_login.py")
}

fn xmllint() -> &'static str {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("xmllint").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "xmllint is not installed: the JUnit output is validated with it. Run \
         scripts/install-deps.sh (it installs the Debian package `libxml2-utils`)."
    );
    "xmllint"
}

/// Validates `xml` against the committed JUnit schema; `Err` holds xmllint's complaint.
fn validate(xml: &Path) -> Result<(), String> {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/junit/junit-10.xsd");
    let out = Command::new(xmllint())
        .arg("--noout")
        .arg("--schema")
        .arg(&schema)
        .arg(xml)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Starts the form once to learn where its widgets are, then closes it.
fn probe(x: &Xvfb, dir: &Path) -> Result<Value> {
    let state = dir.join("probe.json");
    let mut child = x
        .command(python())
        .arg(app())
        .arg(&state)
        .stdin(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    let mut last = None;
    let geometry = loop {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            bail!("the Tk login form never showed up");
        }
        std::thread::sleep(Duration::from_millis(150));
        let Some(s) = read_json(&state) else { continue };
        if s["mapped"] != true || s["entry"]["width"].as_i64().unwrap_or(0) < 10 {
            continue;
        }
        let geo = (
            s["entry"].clone(),
            s["button"].clone(),
            s["message_box"].clone(),
        );
        if last.as_ref() == Some(&geo) {
            break s;
        }
        last = Some(geo);
    };
    let _ = child.kill();
    let _ = child.wait();
    // Wait until the window manager has let go of it, so the next launch is alone on screen.
    x.wait_until("the probe window to close", Duration::from_secs(10), |x| {
        let out = x.output("xprop", &["-root", "_NET_CLIENT_LIST"]);
        !String::from_utf8_lossy(&out.stdout).contains("0x")
    });
    Ok(geometry)
}

/// A widget's box in the model's 0-1000 space of a screenshot of the app's window (what the
/// tests capture), as a grounding reply.
fn box_reply(s: &Value, widget: &str, label: &str) -> Result<String> {
    let n = |w: &str, k: &str| s[w][k].as_i64().context("widget geometry");
    let (ww, wh) = (n("window", "width")?, n("window", "height")?);
    let x = n(widget, "x")? - n("window", "x")?;
    let y = n(widget, "y")? - n("window", "y")?;
    let (w, h) = (n(widget, "width")?, n(widget, "height")?);
    let (x1, y1) = ((x + 2) * 1000 / ww, (y + 2) * 1000 / wh);
    let (x2, y2) = ((x + w - 2) * 1000 / ww, (y + h - 2) * 1000 / wh);
    Ok(format!(
        "<|object_ref_start|>{label}<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    ))
}

fn replies(path: &Path, replies: &[String]) -> Result<PathBuf> {
    let lines: Vec<String> = replies
        .iter()
        .map(|r| serde_json::json!({ "reply": r }).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n")?;
    Ok(path.to_path_buf())
}

/// A test file for the form: `dark` picks its colours; `state` is where the app writes its state.
fn script(path: &Path, state: &Path, dark: bool, tests: &str) -> Result<PathBuf> {
    let python = python();
    let mut command = format!(
        "['{}', '{}', '{}'",
        python.display(),
        app().display(),
        state.display()
    );
    if dark {
        command.push_str(", '--dark'");
    }
    command.push(']');
    std::fs::write(
        path,
        format!(
            "name = \"login\"\n\n[target]\ncommand = {command}\nwindow = \"vlad login\"\n\n\
             [settings]\ntimeout = 4\npoll_interval = 0.3\nsettle = 0.4\n\n{tests}"
        ),
    )?;
    Ok(path.to_path_buf())
}

const GREETS: &str = r#"[[test]]
name = "greets the user by name"
steps = [
  'type "Ana" into the name field',
  'click the "Log in" button',
  'wait until "Welcome, Ana" is visible',
  'expect no "Error" message',
  { action = "type", text = "!" },
]
"#;

const FAILING: &str = r#"[[test]]
name = "a login without a name greets nobody"
steps = [
  'click the "Log in" button',
  { step = 'expect "Welcome, Ana" visible', retries = 1 },
  'expect no "Error" message',
]

[[test]]
name = "an unclear answer fails"
steps = ['expect no "Error" message']
"#;

/// Runs `vlad test` on the test display; trajectories go to a fresh folder of the test's own
/// unless `extra` names one.
fn vlad_test(x: &Xvfb, args: &[&Path], extra: &[&str]) -> Result<Output> {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut cmd = x.command(VLAD);
    cmd.arg("test")
        .args(args)
        .args(extra)
        .env("HF_HUB_OFFLINE", "1");
    if !extra.contains(&"--trace") {
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cmd.arg("--trace").arg(x.path(&format!("traces-{n}")));
    }
    Ok(cmd.stdin(Stdio::null()).output()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The app's state once it has settled after a run (it keeps writing until killed; the last
/// write is what it saw).
fn final_state(state: &Path) -> Value {
    read_json(state).unwrap_or(Value::Null)
}

#[test]
fn ui_tests_record_replay_from_cache_and_report_in_junit() -> Result<()> {
    let _g = serial();
    let x = Xvfb::with_wm(W, H);
    let dir = x.dir.path().to_path_buf();
    let geo = probe(&x, &dir)?;
    let entry = box_reply(&geo, "entry", "the name field")?;
    let button = box_reply(&geo, "button", "the \"Log in\" button")?;
    let welcome = format!("yes {}", box_reply(&geo, "message_box", "Welcome, Ana")?);
    let state = dir.join("state.json");
    let file = script(&dir.join("login.toml"), &state, false, GREETS)?;
    let cache = dir.join("login.toml.cache.json");
    let junit = dir.join("junit.xml");
    let junit_s = junit.to_str().context("path")?;

    // 1. Recorded: four model calls (two groundings, two assertions) in step order.
    let r = replies(
        &dir.join("r1.jsonl"),
        &[entry.clone(), button.clone(), welcome.clone(), "no".into()],
    )?;
    let trace1 = dir.join("trace1");
    let out = vlad_test(
        &x,
        &[&file],
        &[
            "--backend",
            "replay",
            "--replies",
            r.to_str().context("path")?,
            "--junit",
            junit_s,
            "--trace",
            trace1.to_str().context("path")?,
        ],
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("PASS  greets the user by name"), "{stdout}");
    assert!(
        stdout.contains("0 answer(s) replayed, 4 asked the model"),
        "{stdout}"
    );
    let s = final_state(&state);
    assert_eq!(s["name"], "Ana!", "{s}");
    assert_eq!(s["message"], "Welcome, Ana", "{s}");
    assert_eq!(s["clicks"], 1, "{s}");
    validate(&junit).map_err(anyhow::Error::msg)?;
    let xml = std::fs::read_to_string(&junit)?;
    assert!(
        xml.contains("<testcase name=\"greets the user by name\" classname=\"login\""),
        "{xml}"
    );
    assert!(
        !xml.contains("<failure") && !xml.contains("<error"),
        "{xml}"
    );
    assert!(cache.is_file(), "the cache was not written");
    // A trajectory per test, with the grounded box drawn in its report.
    let tdir = trace1.join("login").join("greets-the-user-by-name");
    let t = trajectory::read(&tdir)?;
    assert_eq!(t.steps.len(), 5);
    // Screenshots show the app's window only.
    let window = (
        geo["window"]["width"].as_u64(),
        geo["window"]["height"].as_u64(),
    );
    assert_eq!(
        (
            Some(u64::from(t.steps[0].screen_width)),
            Some(u64::from(t.steps[0].screen_height))
        ),
        window
    );
    let html = vlad::report::render_report(&tdir)?;
    assert!(html.contains("id=\"step-1-box-1\"") && html.contains("id=\"step-2-point-1\""));

    // 2. No model at all: everything from the cache, the app gets the same input.
    std::fs::remove_file(&state)?;
    let out = vlad_test(&x, &[&file], &["--no-model", "--junit", junit_s])?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("4 answer(s) replayed, 0 asked the model"),
        "{stdout}"
    );
    let s = final_state(&state);
    assert_eq!(
        (s["name"].as_str(), s["clicks"].as_i64()),
        (Some("Ana!"), Some(1)),
        "{s}"
    );
    validate(&junit).map_err(anyhow::Error::msg)?;

    // 3. The same form in dark colours: a different screen. Without a model that is an error
    // that says so; nothing was typed.
    let dark = script(&dir.join("login.toml"), &state, true, GREETS)?;
    std::fs::remove_file(&state)?;
    let out = vlad_test(&x, &[&dark], &["--no-model", "--junit", junit_s])?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("ERROR greets the user by name"), "{stdout}");
    assert!(
        stdout.contains("cache miss: the screen changed")
            && stdout.contains("no model may be asked"),
        "{stdout}"
    );
    assert!(stdout.contains("1 missing without a model"), "{stdout}");
    assert_eq!(
        final_state(&state)["name"],
        "",
        "a step ran without an answer"
    );
    validate(&junit).map_err(anyhow::Error::msg)?;
    assert!(std::fs::read_to_string(&junit)?.contains("<error type=\"TestError\""));
    // With a model, the changed steps are asked again (and recorded)...
    let r = replies(
        &dir.join("r2.jsonl"),
        &[entry, button, welcome, "no".into()],
    )?;
    let out = vlad_test(
        &x,
        &[&dark],
        &[
            "--backend",
            "replay",
            "--replies",
            r.to_str().context("path")?,
        ],
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("0 answer(s) replayed, 4 asked the model (4 because the screen changed)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("cache miss: the screen changed"),
        "{stderr}"
    );
    // ...so the next run needs no model on either screen.
    for dark in [true, false] {
        let f = script(&dir.join("login.toml"), &state, dark, GREETS)?;
        let out = vlad_test(&x, &[&f], &["--no-model"])?;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    // 4. A failing assertion and an ambiguous answer: failing cases, valid JUnit.
    let failing = script(&dir.join("failing.toml"), &state, false, FAILING)?;
    let r = replies(
        &dir.join("r3.jsonl"),
        &[
            box_reply(&geo, "button", "Log in")?,
            "no".into(),
            "Maybe, I cannot tell.".into(),
        ],
    )?;
    let out = vlad_test(
        &x,
        &[&failing],
        &[
            "--backend",
            "replay",
            "--replies",
            r.to_str().context("path")?,
            "--junit",
            junit_s,
        ],
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("FAIL  a login without a name greets nobody"),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL  an unclear answer fails"), "{stdout}");
    assert!(stdout.contains("2 test(s): 0 passed, 2 failed"), "{stdout}");
    validate(&junit).map_err(anyhow::Error::msg)?;
    let xml = std::fs::read_to_string(&junit)?;
    assert!(
        xml.contains("tests=\"2\" failures=\"2\" errors=\"0\""),
        "{xml}"
    );
    assert!(
        xml.contains(
            "expected &quot;Welcome, Ana&quot; to be visible, but the model answered &quot;no&quot;"
        ),
        "{xml}"
    );
    assert!(
        xml.contains("ambiguous") && xml.contains("Maybe, I cannot tell."),
        "{xml}"
    );
    assert!(
        xml.contains("[skipped] expect no"),
        "the step after the failure: {xml}"
    );
    // The retry looked again (on the same screen the recorded answer stands).
    assert!(
        xml.contains("attempt 1 failed") && xml.contains("cache hit"),
        "{xml}"
    );

    // The validation is real: a report missing a required attribute is rejected.
    let broken = dir.join("broken.xml");
    let without = xml.replacen(
        "<testsuite name=\"login\" tests=\"2\" ",
        "<testsuite name=\"login\" ",
        1,
    );
    assert_ne!(without, xml);
    std::fs::write(&broken, without)?;
    assert!(
        validate(&broken).is_err(),
        "xmllint accepted a testsuite without tests="
    );
    Ok(())
}

#[test]
fn examples_are_valid_test_files() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ui-tests");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            vlad::script::Script::load(&path)?;
            seen += 1;
        }
    }
    assert!(seen > 0, "no examples in {}", dir.display());
    Ok(())
}

#[test]
fn invalid_files_stop_before_anything_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "[target]\ncommand = ['true']\n[[test]]\nname = \"t\"\nsteps = ['click OK']\n",
    )?;
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[target]\n[[test]]\nname = \"t\"\nsteps = ['make it work']\n",
    )?;
    let out = Command::new(VLAD)
        .arg("test")
        .arg(&good)
        .arg(&bad)
        .arg("--no-model")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("make it work") && stderr.contains("step 1"),
        "{stderr}"
    );
    assert!(
        text(&out.stdout).is_empty(),
        "a test ran: {}",
        text(&out.stdout)
    );
    Ok(())
}

#[test]
fn an_android_app_is_tested_on_its_device() -> Result<()> {
    let fake = fake_adb::FakeAdb::start(vec![fake_adb::FakeDevice::phone("phone-a")])?;
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("notes.toml");
    std::fs::write(
        &file,
        r#"[target]
package = "com.example.notes"
device = "phone-a"

[settings]
timeout = 3
settle = 0.1

[[test]]
name = "typed text shows"
steps = ['type "hi" into the text field', 'expect "hi" visible']
"#,
    )?;
    // The Notes app's text field is at (16,80)-(344,128) of the 360x640 screen.
    let r = replies(
        &tmp.path().join("r.jsonl"),
        &[
            "<|box_start|>(44,125),(955,200)<|box_end|>".into(),
            "yes <|box_start|>(50,140),(120,185)<|box_end|>".into(),
        ],
    )?;
    let run = |extra: &[&str]| -> Result<Output> {
        Ok(Command::new(VLAD)
            .arg("test")
            .arg(&file)
            .arg("--trace")
            .arg(tmp.path().join(format!("trace-{}", extra.len())))
            .args(extra)
            .env("ANDROID_ADB_SERVER_PORT", fake.port().to_string())
            .env_remove("ANDROID_ADB_SERVER_ADDRESS")
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .output()?)
    };
    let out = run(&[
        "--backend",
        "replay",
        "--replies",
        r.to_str().context("path")?,
    ])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let phone = fake.device("phone-a");
    assert_eq!(phone.text, "hi");
    assert!(
        phone.launched.iter().any(|p| p == "com.example.notes"),
        "{:?}",
        phone.launched
    );
    assert_eq!(phone.taps.last(), Some(&(180, 104)), "{:?}", phone.taps);
    assert!(
        phone
            .commands
            .iter()
            .any(|c| c.contains("am force-stop com.example.notes")),
        "{:?}",
        phone.commands
    );
    // From the cache, without a model: the app is restarted and gets the same input.
    let out = run(&["--no-model"])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("2 answer(s) replayed, 0 asked the model"));
    let phone = fake.device("phone-a");
    assert_eq!(
        phone
            .launched
            .iter()
            .filter(|p| *p == "com.example.notes")
            .count(),
        2
    );
    Ok(())
}
