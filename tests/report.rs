//! `vlad report` on a trajectory of a replayed `vlad run` on the virtual screen, opened in
//! headless Chromium: the rendered DOM has every step and its box and point elements at the
//! recorded coordinates, the page's script pages to the step the URL names, and Chromium's own
//! screenshot of the page has the marker colours exactly where the model's box and the click
//! point lie on the embedded screenshot. Chromium missing is a failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use image::RgbImage;
use vlad::agent::trajectory;
use vlad::report::annotate::{BOX_COLOR, POINT_COLOR};

const VLAD: &str = env!("CARGO_BIN_EXE_vlad");

/// The form of the `virtual` profile (400x300): name field (40,40,320x40), notes field,
/// green Submit button (140,200,120x50).
const REPLIES: [&str; 4] = [
    "I see <|object_ref_start|>the name field<|object_ref_end|><|box_start|>(100,133),(900,267)<|box_end|>. *FUNCTION*: Click *ARGS*: {\"point\": (500,200)}",
    "*FUNCTION*: Type *ARGS*: {\"text\": \"Ana <b>&</b>\"}",
    "The <|object_ref_start|>Submit button<|object_ref_end|><|box_start|>(350,667),(650,833)<|box_end|> *FUNCTION*: Click *ARGS*: {\"point\": (500,750)}",
    "*FUNCTION*: Finish *ARGS*: {\"answer\": \"Submitted.\"}",
];

fn chromium() -> PathBuf {
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium is not installed: the report test opens the page in headless Chromium. \
             Run scripts/install-deps.sh (it installs the Debian package `chromium`)."
        )
    })
}

/// Runs a command, killing it after `limit`.
fn output_within(mut cmd: Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{cmd:?} did not finish within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn headless(profile: &Path) -> Command {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--force-color-profile=srgb",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

fn dump_dom(profile: &Path, url: &str) -> Result<String> {
    let mut cmd = headless(profile);
    cmd.args(["--virtual-time-budget=2000", "--dump-dom", url]);
    let out = output_within(cmd, Duration::from_secs(90))?;
    anyhow::ensure!(
        out.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn screenshot(profile: &Path, url: &str, out: &Path) -> Result<RgbImage> {
    let mut cmd = headless(profile);
    cmd.arg("--window-size=1000,800")
        .arg(format!("--screenshot={}", out.display()))
        .arg(url);
    let run = output_within(cmd, Duration::from_secs(90))?;
    anyhow::ensure!(
        run.status.success() && out.is_file(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    Ok(image::open(out)?.to_rgb8())
}

/// The first pixel (row by row) of exactly `color`.
fn find(img: &RgbImage, color: [u8; 3]) -> Option<(u32, u32)> {
    img.enumerate_pixels()
        .find(|(_, _, p)| p.0 == color)
        .map(|(x, y, _)| (x, y))
}

fn close(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 8)
}

/// An element's opening tag with `id`, from the DOM.
fn tag<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

fn attr(tag: &str, name: &str) -> Option<i64> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    let end = at + tag[at..].find('"')?;
    tag[at..end].parse().ok()
}

#[test]
fn the_report_draws_every_step_with_its_box_and_point() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let replies = tmp.path().join("replies.jsonl");
    let lines: Vec<String> = REPLIES
        .iter()
        .map(|r| serde_json::json!({ "reply": r }).to_string())
        .collect();
    std::fs::write(&replies, lines.join("\n"))?;
    let trace = tmp.path().join("trace");
    let out = Command::new(VLAD)
        .args([
            "run",
            "Fill in the form",
            "--agent",
            "virtual",
            "--backend",
            "replay",
        ])
        .arg("--replies")
        .arg(&replies)
        .arg("--trace")
        .arg(&trace)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = trajectory::read(&trace)?;
    assert_eq!(t.steps.len(), 4);

    let page = tmp.path().join("report.html");
    let out = Command::new(VLAD)
        .arg("report")
        .arg(&trace)
        .arg("-o")
        .arg(&page)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&page)?;
    // What the daemon serves is the same page.
    assert_eq!(vlad::report::render_report(&trace)?, html);
    // Self-contained: nothing is fetched.
    for external in [
        "src=\"http",
        "href=\"http",
        "src=\"file",
        "url(http",
        "@import",
    ] {
        assert!(!html.contains(external), "the page refers to {external}");
    }
    assert!(html.contains("data:image/png;base64,"));
    // Typed text is escaped, not markup.
    assert!(html.contains("Ana &lt;b&gt;&amp;&lt;"));
    assert!(!html.contains("Ana <b>"));

    let profile = tmp.path().join("chromium-profile");
    let url = format!("file://{}", page.display());
    let dom = dump_dom(&profile, &url)?;
    for step in &t.steps {
        let section = tag(&dom, &format!("step-{}", step.step))
            .with_context(|| format!("step {} is missing from the DOM", step.step))?;
        assert!(section.starts_with("<section"), "{section}");
    }
    // The first step is the current one; the others are hidden by the page's script.
    assert!(
        tag(&dom, "step-1").is_some_and(|t| t.contains("class=\"step current\"")),
        "{:?}",
        tag(&dom, "step-1")
    );
    // Points: where the actions were performed (the trajectory's screen pixels).
    for (n, step) in [(1, &t.steps[0]), (3, &t.steps[2])] {
        let (x, y) = match step.actions[0].action {
            vlad::action::Action::Click { x, y } => (x, y),
            ref other => bail!("step {n}: expected a click, got {other:?}"),
        };
        let point = tag(&dom, &format!("step-{n}-point-1")).context("point element")?;
        assert!(point.contains("class=\"point\""), "{point}");
        assert_eq!(
            (attr(point, "cx"), attr(point, "cy")),
            (Some(x.into()), Some(y.into()))
        );
    }
    // Boxes: the reply's 0-1000 boxes on the 400x300 screen.
    let b1 = tag(&dom, "step-1-box-1").context("step 1 box")?;
    assert!(b1.contains("class=\"box\""), "{b1}");
    assert_eq!(
        ["x", "y", "width", "height"].map(|a| attr(b1, a)),
        [Some(40), Some(40), Some(320), Some(40)]
    );
    let b3 = tag(&dom, "step-3-box-1").context("step 3 box")?;
    assert_eq!(
        ["x", "y", "width", "height"].map(|a| attr(b3, a)),
        [Some(140), Some(200), Some(120), Some(50)]
    );
    assert!(tag(&dom, "step-2-box-1").is_none(), "step 2 has no box");
    assert!(tag(&dom, "step-2-point-1").is_none(), "typing has no point");

    // Chromium's pixels, step 1: the green Submit button's top-left corner (140,200 on the
    // virtual screen) anchors the embedded screenshot on the page.
    let shot = screenshot(&profile, &url, &tmp.path().join("step1.png"))?;
    let (gx, gy) = find(&shot, [60, 180, 75]).context("the screenshot is not on the page")?;
    let (ox, oy) = (gx - 140, gy - 200);
    let px = |x: u32, y: u32| shot.get_pixel(ox + x, oy + y).0;
    assert!(close(px(200, 60), POINT_COLOR), "point: {:?}", px(200, 60));
    for (x, y) in [(40, 60), (360, 60), (100, 40), (100, 80)] {
        assert!(
            close(px(x, y), BOX_COLOR),
            "box edge ({x}, {y}): {:?}",
            px(x, y)
        );
    }
    // Inside the box, away from the markers, the screenshot shows through.
    assert!(
        close(px(100, 60), [255, 255, 255]),
        "inside: {:?}",
        px(100, 60)
    );

    // Step 3, named in the URL: the page's script shows it. The focused name field's blue
    // border (its corner at 40,40) anchors the screenshot there.
    let url3 = format!("{url}#step-3");
    let dom3 = dump_dom(&profile, &url3)?;
    assert!(
        tag(&dom3, "step-3").is_some_and(|t| t.contains("class=\"step current\"")),
        "{:?}",
        tag(&dom3, "step-3")
    );
    let shot = screenshot(&profile, &url3, &tmp.path().join("step3.png"))?;
    let (bx, by) = find(&shot, [0, 0, 255]).context("step 3's screenshot is not shown")?;
    let (ox, oy) = (bx - 40, by - 40);
    let px = |x: u32, y: u32| shot.get_pixel(ox + x, oy + y).0;
    assert!(
        close(px(200, 225), POINT_COLOR),
        "point: {:?}",
        px(200, 225)
    );
    for (x, y) in [(140, 225), (260, 225), (170, 200), (170, 250)] {
        assert!(
            close(px(x, y), BOX_COLOR),
            "box edge ({x}, {y}): {:?}",
            px(x, y)
        );
    }
    Ok(())
}

#[test]
fn a_folder_without_a_trajectory_is_an_error_naming_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = Command::new(VLAD)
        .arg("report")
        .arg(tmp.path())
        .arg("-o")
        .arg(tmp.path().join("r.html"))
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not a trajectory folder")
            && stderr.contains(&tmp.path().display().to_string()),
        "{stderr}"
    );
    assert!(!tmp.path().join("r.html").exists());
    Ok(())
}
