//! `vlad run` and `vlad replay` as a user runs them: exit statuses, the answer on stdout,
//! progress on stderr, secrets kept out of both, a `kill -9` mid-run leaving a readable
//! trajectory, and replays that verify each screen.

#[path = "support/cli.rs"]
mod cli;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cli::{VLAD, replies_file, run_args, text, vlad, vlad_with_env, vlad_with_input};
use vlad::agent::{RunStatus, trajectory};

/// `vlad run` of 100 clicks on a copy of the virtual profile whose steps each wait `settle_ms`
/// first, recording into `DIR/trace`.
fn slow_run(dir: &Path, settle_ms: u64) -> Result<Command> {
    let profile = include_str!("../agents/virtual.toml")
        .replace("max_steps = 15", "max_steps = 200")
        .replace("[safety]", &format!("settle_ms = {settle_ms}\n\n[safety]"));
    let profile_path = dir.join("slow.toml");
    std::fs::write(&profile_path, profile)?;
    let a = "*FUNCTION*: Click *ARGS*: {\"point\": (500,200)}";
    let b = "*FUNCTION*: Click *ARGS*: {\"point\": (500,433)}";
    let many: Vec<&str> = (0..100).map(|i| if i % 2 == 0 { a } else { b }).collect();
    let replies = replies_file(dir, &many)?;
    let mut cmd = Command::new(VLAD);
    cmd.args(run_args(
        "t",
        profile_path.to_str().unwrap_or_default(),
        &replies,
        &dir.join("trace"),
        &[],
    ));
    Ok(cmd)
}

/// Waits until the run recording into `trace` has written `steps` steps (killing it after 60 s).
fn wait_for_steps(child: &mut Child, trace: &Path, steps: usize) -> Result<()> {
    let steps_file = trace.join(trajectory::STEPS_FILE);
    let start = Instant::now();
    loop {
        let lines = std::fs::read_to_string(&steps_file)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= steps {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("the run wrote {lines} steps in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const FORM: [&str; 5] = [
    "I click the name field. *FUNCTION*: Click *ARGS*: {\"point\": (500,200)}",
    "*FUNCTION*: Type *ARGS*: {\"text\": \"Ünïcødé 名前\"}",
    "*FUNCTION*: Key *ARGS*: {\"keys\": \"ctrl+s\"}",
    "*FUNCTION*: Click *ARGS*: {\"point\": (500,750)}",
    "*FUNCTION*: Finish *ARGS*: {\"answer\": \"Saved the form.\"}",
];

#[test]
fn run_prints_the_answer_and_replay_verifies_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let replies = replies_file(tmp.path(), &FORM)?;
    let trace = tmp.path().join("trace");
    let out = vlad(&run_args(
        "Fill in the form",
        "virtual",
        &replies,
        &trace,
        &[],
    ))?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "Saved the form.\n");
    assert!(stderr.contains("step 1:"), "{stderr}");
    assert!(
        stderr.contains("{\"action\":\"click\",\"x\":200,\"y\":60} -> done"),
        "{stderr}"
    );
    let t = trajectory::read(&trace)?;
    assert_eq!(t.steps.len(), 5);
    assert!(matches!(
        t.result.map(|r| r.status),
        Some(RunStatus::Finished { .. })
    ));

    // Replaying on a fresh virtual screen reproduces every recorded screen.
    let out = vlad(&[
        "replay",
        trace.to_str().unwrap_or_default(),
        "--verify",
        "--json",
    ])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["status"]["status"], "completed");
    assert_eq!(report["actions"], 4);

    // A recorded screen that no longer matches is drift: exit 4, the step named.
    let blank = image::RgbImage::from_pixel(400, 300, image::Rgb([1, 2, 3]));
    blank.save(trace.join("screenshots/0002.png"))?;
    let out = vlad(&["replay", trace.to_str().unwrap_or_default(), "--verify"])?;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("drift before step 3"),
        "{}",
        text(&out.stderr)
    );
    // Without --verify the actions are simply performed again.
    let out = vlad(&["replay", trace.to_str().unwrap_or_default()])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    Ok(())
}

#[test]
fn exit_statuses_tell_how_the_run_ended() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cases: [(&[&str], i32, &str); 3] = [
        (
            &["*FUNCTION*: CallUser *ARGS*: {\"question\": \"Which account?\"}"],
            3,
            "Which account?\n",
        ),
        (&["*FUNCTION*: Click *ARGS*: {\"point\": (100,900)}"], 4, ""),
        (
            &["*FUNCTION*: Finish *ARGS*: {\"answer\": \"42\"}"],
            0,
            "42\n",
        ),
    ];
    for (i, (replies, code, stdout)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir)?;
        let file = replies_file(&dir, replies)?;
        let out = vlad(&run_args("t", "virtual", &file, &dir.join("trace"), &[]))?;
        assert_eq!(
            out.status.code(),
            Some(*code),
            "case {i}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), *stdout, "case {i}");
    }
    // Usage errors name what to do.
    let out = vlad(&["run", "t", "--agent", "virtual", "--backend", "replay"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--replies FILE"));
    let out = vlad(&[
        "run",
        "t",
        "--agent",
        "no-such-profile.toml",
        "--backend",
        "replay",
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a built-in profile"));
    Ok(())
}

#[test]
fn secrets_stay_out_of_logs_output_and_trajectories() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let secret = "s3cr3t-pässwörd";
    let replies = replies_file(
        tmp.path(),
        &[
            "*FUNCTION*: Click *ARGS*: {\"point\": (500,433)}",
            "*FUNCTION*: Type *ARGS*: {\"text\": \"{{secret:PW}}\\n\"}",
            "*FUNCTION*: Finish *ARGS*: {\"answer\": \"Typed the password.\"}",
        ],
    )?;
    let trace = tmp.path().join("trace");
    let out = vlad_with_env(
        &run_args(
            "Type {{secret:PW}} into notes",
            "virtual",
            &replies,
            &trace,
            &["--json"],
        ),
        &[("VLAD_SECRET_PW", secret), ("VLAD_LOG", "trace")],
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("{{secret:PW}}"), "{stderr}");
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
    let mut files = vec![trace.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p)? {
                files.push(e?.path());
            }
        } else {
            assert!(
                !text(&std::fs::read(&p)?).contains(secret),
                "{}",
                p.display()
            );
        }
    }
    // Without the secret the run does not start; with it a replay types it again.
    let out = vlad(&[
        "run",
        "Type {{secret:PW}}",
        "--agent",
        "virtual",
        "--backend",
        "replay",
        "--replies",
        replies.to_str().unwrap_or_default(),
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("VLAD_SECRET_PW"));
    let out = vlad_with_env(
        &["replay", trace.to_str().unwrap_or_default(), "--verify"],
        &[("VLAD_SECRET_PW", secret)],
    )?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(secret));
    Ok(())
}

#[test]
fn a_dry_run_says_what_would_have_happened() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let replies = replies_file(tmp.path(), &FORM)?;
    let trace = tmp.path().join("trace");
    let out = vlad(&run_args("t", "virtual", &replies, &trace, &["--dry-run"]))?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("-> dry_run"));
    let t = trajectory::read(&trace)?;
    // Nothing happened: every screenshot is the first one.
    let first = t.screenshot(&t.steps[0].screenshot)?;
    for s in &t.steps {
        assert_eq!(t.screenshot(&s.screenshot)?, first);
    }
    Ok(())
}

#[test]
fn kill_9_mid_run_leaves_a_readable_trajectory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trace = tmp.path().join("trace");
    // A slow profile: each step waits 150 ms before its screenshot.
    let mut child = slow_run(tmp.path(), 150)?
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_for_steps(&mut child, &trace, 3)?;
    child.kill()?; // SIGKILL
    let status = child.wait()?;
    assert!(!status.success());
    let t = trajectory::read(&trace)?;
    assert!(t.result.is_none(), "a killed run has no result");
    assert!(t.steps.len() >= 3);
    for (i, s) in t.steps.iter().enumerate() {
        assert_eq!(s.step, i + 1);
        assert!(t.dir.join(&s.screenshot).exists());
        if let Some(after) = &s.screenshot_after {
            t.screenshot(after)?;
        }
    }
    // The partial run replays and verifies.
    let out = vlad(&["replay", trace.to_str().unwrap_or_default(), "--verify"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    Ok(())
}

#[test]
fn ctrl_c_stops_between_actions_with_its_own_status() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trace = tmp.path().join("trace");
    let mut child = slow_run(tmp.path(), 100)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_steps(&mut child, &trace, 2)?;
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(sent.success());
    let out = child.wait_with_output()?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("stopping after the current action"),
        "{stderr}"
    );
    let t = trajectory::read(&trace)?;
    assert_eq!(t.result.map(|r| r.status), Some(RunStatus::Interrupted));
    assert!(t.steps.len() < 100);
    Ok(())
}

#[test]
fn interactive_runs_ask_the_terminal() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let replies = replies_file(
        tmp.path(),
        &[
            "*FUNCTION*: CallUser *ARGS*: {\"question\": \"Which name?\"}",
            "*FUNCTION*: Key *ARGS*: {\"keys\": \"ctrl+alt+delete\"}",
            "*FUNCTION*: Key *ARGS*: {\"keys\": \"ctrl+alt+delete\"}",
            "*FUNCTION*: Finish *ARGS*: {\"answer\": \"ok\"}",
        ],
    )?;
    let trace = tmp.path().join("trace");
    let out = vlad_with_input(
        &run_args("t", "virtual", &replies, &trace, &["--interactive"]),
        "Ada Lovelace\nn\ny\n",
    )?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("vlad asks: Which name?"), "{stderr}");
    assert!(stderr.contains("Perform it? [y/N]"), "{stderr}");
    let t = trajectory::read(&trace)?;
    assert_eq!(
        t.steps[0].result.as_deref(),
        Some("The user answered: Ada Lovelace")
    );
    use vlad::agent::Decision;
    assert!(matches!(
        t.steps[1].actions[0].decision,
        Decision::Declined { .. }
    ));
    assert_eq!(t.steps[2].actions[0].decision, Decision::Perform);
    Ok(())
}
