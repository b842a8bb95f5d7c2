//! The agent loop on the virtual screen with recorded replies: actions land where intended
//! (widget state), results are written back inside the assistant turn, the history policy holds,
//! the trajectory is on disk, and every stop condition, dry runs, safety rules and secrets work.

#[path = "support/recording.rs"]
mod recording;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use recording::{Recording, flatten};
use vlad::action::Action;
use vlad::agent::{
    Agent, Decision, Event, Hooks, NoHooks, Profile, RunOptions, RunStatus, Secrets, StopSignal,
    trajectory,
};
use vlad::engine::Prompt;
use vlad::environment::virtual_screen::VirtualScreen;

fn virtual_profile() -> Result<Profile> {
    Ok(Profile::load("virtual")?)
}

fn screen(profile: &Profile) -> Result<VirtualScreen> {
    Ok(profile
        .screen
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no screen"))?
        .build())
}

fn options(dir: &Path) -> RunOptions {
    RunOptions {
        trace_dir: Some(dir.join("run")),
        ..Default::default()
    }
}

fn images(prompt: &Prompt) -> usize {
    prompt.messages.iter().map(|m| m.media().count()).sum()
}

const TEXT: &str = "Zoë Ünïcødé 北京 ✓";

fn form_replies() -> Vec<String> {
    vec![
        // Field centre (200, 60) of 400x300 is (500, 200); the invented result must be dropped.
        "I need to click the name field.\n*FUNCTION*: Click *ARGS*: {\"point\": (500,200)}\n*RESULT*: I made this up".into(),
        format!(" The field has focus. *FUNCTION*: Type *ARGS*: {{\"text\": \"{TEXT}\"}}"),
        " Now select all with a key combination. *FUNCTION*: Key *ARGS*: {\"keys\": \"ctrl+shift+a\"}".into(),
        // Submit's centre (200, 225) is (500, 750).
        " Submit the form. *FUNCTION*: Click *ARGS*: {\"point\": (500,750)}".into(),
        " The form is submitted. *FUNCTION*: Finish *ARGS*: {\"answer\": \"Submitted as Zoë.\"}".into(),
    ]
}

#[test]
fn a_multi_step_task_lands_every_action_and_records_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let profile = virtual_profile()?;
    let mut env = screen(&profile)?;
    let agent = Agent::new(profile)?;
    let replies = form_replies();
    let refs: Vec<&str> = replies.iter().map(String::as_str).collect();
    let (mut model, prompts) = Recording::new(&refs);
    let report = agent.run(
        "Fill in the name and submit",
        &mut model,
        &mut env,
        &options(tmp.path()),
        &mut NoHooks,
    )?;

    assert_eq!(
        report.status,
        RunStatus::Finished {
            answer: "Submitted as Zoë.".into()
        }
    );
    assert_eq!(report.steps, 5);
    // The screen's own state proves where each action landed.
    let field = env
        .widget("name_field")
        .ok_or_else(|| anyhow::anyhow!("no field"))?;
    assert_eq!(field.text, TEXT);
    assert_eq!(field.clicks, 1);
    assert_eq!(env.widget("submit").map(|w| w.clicks), Some(1));
    assert_eq!(env.widget("notes_field").map(|w| w.clicks), Some(0));
    assert_eq!(
        env.actions,
        vec![
            Action::Click { x: 200, y: 60 },
            Action::Type { text: TEXT.into() },
            Action::Key {
                keys: vec!["ctrl".into(), "shift".into(), "a".into()]
            },
            Action::Click { x: 200, y: 225 },
        ]
    );

    // Write-back: step 2 continues the same assistant turn after *RESULT*: <image> *RETURN*:.
    let prompts = prompts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert_eq!(prompts.len(), 5);
    assert!(!prompts[0].continue_final_message);
    assert_eq!(prompts[0].messages.len(), 2);
    let second = flatten(&prompts[1]);
    assert!(prompts[1].continue_final_message);
    assert_eq!(second.len(), 3);
    assert_eq!(second[2].0, "assistant");
    assert_eq!(
        second[2].1,
        "I need to click the name field.\n*FUNCTION*: Click *ARGS*: {\"point\": (500,200)}\n*RESULT*: <img>\n*RETURN*:"
    );
    assert!(!second[2].1.contains("made this up"));
    let last = flatten(&prompts[4]);
    assert!(
        last[2]
            .1
            .contains(&format!("{{\"text\": \"{TEXT}\"}}\n*RESULT*: "))
    );
    assert!(
        last[2].1.ends_with(
            "*FUNCTION*: Click *ARGS*: {\"point\": (500,750)}\n*RESULT*: <img>\n*RETURN*:"
        )
    );

    // History policy: the profile keeps 2 screenshots as images; older ones are placeholders.
    let counts: Vec<usize> = prompts.iter().map(images).collect();
    assert_eq!(counts, vec![1, 2, 2, 2, 2]);
    assert_eq!(
        last[1].1.matches("(screenshot of step 1 omitted)").count(),
        1
    );
    assert!(
        last[2]
            .1
            .contains("*RESULT*: (screenshot of step 2 omitted)")
    );
    assert!(
        last[2]
            .1
            .contains("*RESULT*: (screenshot of step 3 omitted)")
    );
    assert_eq!(last[2].1.matches("<img>").count(), 2);

    // The trajectory on disk.
    let t = trajectory::read(&report.trace_dir)?;
    assert!(!t.torn);
    assert_eq!(t.steps.len(), 5);
    assert_eq!(t.meta.task, "Fill in the name and submit");
    assert_eq!(
        t.steps[0].actions[0].action,
        Action::Click { x: 200, y: 60 }
    );
    assert_eq!(t.steps[0].actions[0].model["x"], 500.0);
    assert_eq!(t.steps[0].actions[0].decision, Decision::Perform);
    assert!(
        t.steps[0]
            .reply
            .as_deref()
            .is_some_and(|r| r.ends_with("(500,200)}\n") && !r.contains("made this up"))
    );
    assert_eq!(t.steps[0].stop.as_deref(), Some("stop string *RESULT*"));
    assert_eq!(t.steps[4].answer.as_deref(), Some("Submitted as Zoë."));
    assert_eq!(
        t.steps.iter().map(|s| s.prompt.images).collect::<Vec<_>>(),
        vec![1, 2, 2, 2, 2]
    );
    for s in &t.steps {
        assert!(t.dir.join(&s.screenshot).exists(), "{}", s.screenshot);
    }
    assert!(
        t.result
            .as_ref()
            .is_some_and(|r| r.steps == 5 && matches!(r.status, RunStatus::Finished { .. }))
    );
    // Each screenshot differs from the one before (every action changed the screen).
    let shots: Vec<_> = t
        .steps
        .iter()
        .map(|s| t.screenshot(&s.screenshot))
        .collect::<Result<_, _>>()?;
    assert_ne!(shots[0], shots[1]);
    assert_ne!(shots[1], shots[2]);
    Ok(())
}

/// How a run ended, the screen after it, every prompt and the trajectory on disk.
type Run = (
    RunStatus,
    VirtualScreen,
    Vec<Prompt>,
    trajectory::Trajectory,
);

fn run_with(
    profile: Profile,
    replies: &[&str],
    options: &RunOptions,
    hooks: &mut dyn Hooks,
) -> Result<Run> {
    let mut env = screen(&profile)?;
    let agent = Agent::new(profile)?;
    let (mut model, prompts) = Recording::new(replies);
    let report = agent.run("Do the task", &mut model, &mut env, options, hooks)?;
    let prompts = prompts
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let t = trajectory::read(&report.trace_dir)?;
    assert_eq!(t.result.as_ref().map(|r| &r.status), Some(&report.status));
    Ok((report.status, env, prompts, t))
}

/// [`run_with`] on the virtual profile with default options and no hooks.
fn run_replies(replies: &[&str]) -> Result<Run> {
    let tmp = tempfile::tempdir()?;
    run_with(
        virtual_profile()?,
        replies,
        &options(tmp.path()),
        &mut NoHooks,
    )
}

const CLICK_A: &str = "*FUNCTION*: Click *ARGS*: {\"point\": (100,900)}";
const CLICK_B: &str = "*FUNCTION*: Click *ARGS*: {\"point\": (900,900)}";

#[test]
fn a_reply_without_a_call_is_the_answer() -> Result<()> {
    let (status, env, _, _) = run_replies(&["All done, nothing to do."])?;
    assert_eq!(
        status,
        RunStatus::Finished {
            answer: "All done, nothing to do.".into()
        }
    );
    assert_eq!(status.exit_code(), 0);
    assert!(env.actions.is_empty());
    Ok(())
}

#[test]
fn max_steps_stops_the_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut o = options(tmp.path());
    o.max_steps = Some(3);
    let (status, env, _, t) = run_with(
        virtual_profile()?,
        &[CLICK_A, CLICK_B, CLICK_A, CLICK_B, CLICK_A],
        &o,
        &mut NoHooks,
    )?;
    assert_eq!(status, RunStatus::MaxSteps { steps: 3 });
    assert_eq!(status.exit_code(), 4);
    assert_eq!(env.actions.len(), 3);
    assert_eq!(t.steps.len(), 3);
    Ok(())
}

#[test]
fn the_wall_clock_limit_stops_the_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let profile = virtual_profile()?;
    let mut env = screen(&profile)?;
    let agent = Agent::new(profile)?;
    let (mut model, _) = Recording::new(&[CLICK_A, CLICK_B, CLICK_A, CLICK_B, CLICK_A, CLICK_B]);
    model.delay = Duration::from_millis(300);
    let mut o = options(tmp.path());
    o.max_seconds = Some(0.5);
    let report = agent.run("t", &mut model, &mut env, &o, &mut NoHooks)?;
    assert_eq!(report.status, RunStatus::TimeLimit { seconds: 0.5 });
    assert!((1..=3).contains(&report.steps), "{} steps", report.steps);
    Ok(())
}

#[test]
fn the_same_action_on_an_unchanged_screen_is_a_loop() -> Result<()> {
    // Clicking the background changes nothing on screen.
    let (status, env, _, t) = run_replies(&[CLICK_A, CLICK_A, CLICK_A, CLICK_A])?;
    assert_eq!(
        status,
        RunStatus::Looping {
            action: "click".into(),
            times: 3
        }
    );
    assert_eq!(env.actions.len(), 2, "the third repeat is not performed");
    assert!(matches!(
        t.steps[2].actions[0].decision,
        Decision::Skipped { .. }
    ));
    // Clicking a field changes the screen each time (focus, shade): no loop.
    let field = "*FUNCTION*: Click *ARGS*: {\"point\": (500,200)}";
    let (status, env, _, _) = run_replies(&[field, field, field, field])?;
    assert!(
        matches!(status, RunStatus::RepliesExhausted { .. }),
        "{status:?}"
    );
    assert_eq!(env.actions.len(), 4);
    Ok(())
}

#[test]
fn consecutive_errors_are_reported_back_then_stop_the_run() -> Result<()> {
    let bad = "*FUNCTION*: Fly *ARGS*: {\"to\": \"moon\"}";
    let (status, env, prompts, t) = run_replies(&[
        bad,
        "*FUNCTION*: Click *ARGS*: {\"point\": (5000,1)}",
        bad,
        bad,
    ])?;
    assert!(
        matches!(status, RunStatus::TooManyErrors { errors: 3, .. }),
        "{status:?}"
    );
    assert!(env.actions.is_empty());
    // The parse error went back to the model as the *RESULT*, in the same assistant turn.
    let second = flatten(&prompts[1]);
    assert!(second[2].1.starts_with(&format!(
        "{bad}\n*RESULT*: Your reply could not be carried out:"
    )));
    assert!(second[2].1.contains("`Fly` is not a known function"));
    assert!(second[2].1.ends_with("<img>\n*RETURN*:"));
    let third = flatten(&prompts[2]);
    assert!(
        third[2].1.contains("outside the coordinate range"),
        "{}",
        third[2].1
    );
    assert!(t.steps.iter().all(|s| !s.errors.is_empty()));
    // An action that fails on screen counts too, and a success resets the count.
    let typed = "*FUNCTION*: Type *ARGS*: {\"text\": \"x\"}";
    let (status, _, prompts, _) = run_replies(&[typed, CLICK_A, typed, bad, typed])?;
    assert!(
        matches!(status, RunStatus::TooManyErrors { errors: 3, .. }),
        "{status:?}"
    );
    assert!(
        flatten(&prompts[1])[2]
            .1
            .contains("Type failed: no field has focus")
    );
    Ok(())
}

#[test]
fn call_user_needs_the_user_or_asks_and_continues() -> Result<()> {
    let ask = "*FUNCTION*: CallUser *ARGS*: {\"question\": \"Which name?\"}";
    let (status, _, _, _) = run_replies(&[ask])?;
    assert_eq!(
        status,
        RunStatus::NeedsUser {
            question: "Which name?".into()
        }
    );
    assert_eq!(status.exit_code(), 3);

    struct Answering;
    impl Hooks for Answering {
        fn ask_user(&mut self, question: &str) -> Option<String> {
            assert_eq!(question, "Which name?");
            Some("Ada".into())
        }
    }
    let tmp = tempfile::tempdir()?;
    let finish = "*FUNCTION*: Finish *ARGS*: {\"answer\": \"ok\"}";
    let (status, _, prompts, _) = run_with(
        virtual_profile()?,
        &[ask, finish],
        &options(tmp.path()),
        &mut Answering,
    )?;
    assert_eq!(
        status,
        RunStatus::Finished {
            answer: "ok".into()
        }
    );
    assert!(
        flatten(&prompts[1])[2]
            .1
            .contains("*RESULT*: The user answered: Ada <img>")
    );
    Ok(())
}

#[test]
fn running_out_of_replies_has_its_own_status() -> Result<()> {
    let (status, _, _, t) = run_replies(&[CLICK_A])?;
    assert!(
        matches!(&status, RunStatus::RepliesExhausted { message } if message.contains("no reply left for step 2")),
        "{status:?}"
    );
    assert_eq!(status.exit_code(), 4);
    assert_eq!(t.steps.len(), 2);
    assert!(t.steps[1].reply.is_none());
    Ok(())
}

/// Requests a stop as soon as the first action is performed.
struct StopAfterFirstAction(StopSignal);

impl Hooks for StopAfterFirstAction {
    fn event(&mut self, event: &Event<'_>) {
        if matches!(event, Event::Action { .. }) {
            self.0.request_stop();
        }
    }
}

#[test]
fn a_stop_request_stops_between_actions() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut o = options(tmp.path());
    o.stop = StopSignal::new();
    let mut hooks = StopAfterFirstAction(o.stop.clone());
    let two = format!("{CLICK_A}\n{CLICK_B}");
    let (status, env, _, t) = run_with(virtual_profile()?, &[&two, CLICK_A], &o, &mut hooks)?;
    assert_eq!(status, RunStatus::Interrupted);
    assert_eq!(status.exit_code(), 5);
    assert_eq!(env.actions, vec![Action::Click { x: 40, y: 270 }]);
    assert_eq!(t.steps.len(), 1);
    assert!(matches!(
        t.steps[0].actions[1].decision,
        Decision::Skipped { .. }
    ));
    assert!(
        t.steps[0].screenshot_after.is_some(),
        "the screen after acting is kept"
    );
    Ok(())
}

#[test]
fn an_abort_file_stops_the_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let abort = tmp.path().join("abort");
    let mut o = options(tmp.path());
    o.stop = StopSignal::new().with_abort_file(&abort);
    struct Touch(std::path::PathBuf, Arc<AtomicBool>);
    impl Hooks for Touch {
        fn event(&mut self, event: &Event<'_>) {
            if matches!(event, Event::Step { .. }) && !self.1.swap(true, Ordering::SeqCst) {
                let _ = std::fs::write(&self.0, "stop");
            }
        }
    }
    let mut hooks = Touch(abort.clone(), Arc::new(AtomicBool::new(false)));
    let (status, env, _, _) = run_with(
        virtual_profile()?,
        &[CLICK_A, CLICK_B, CLICK_A],
        &o,
        &mut hooks,
    )?;
    assert!(
        matches!(&status, RunStatus::Aborted { reason } if reason.contains("abort")),
        "{status:?}"
    );
    assert_eq!(env.actions.len(), 1);
    Ok(())
}

#[test]
fn a_dry_run_performs_nothing_and_records_everything() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut o = options(tmp.path());
    o.dry_run = true;
    let replies = form_replies();
    let refs: Vec<&str> = replies.iter().map(String::as_str).collect();
    let (status, env, prompts, t) = run_with(virtual_profile()?, &refs, &o, &mut NoHooks)?;
    assert!(matches!(status, RunStatus::Finished { .. }));
    assert!(env.actions.is_empty());
    assert!(
        env.widgets
            .iter()
            .all(|w| w.clicks == 0 && w.text.is_empty())
    );
    assert!(t.meta.dry_run);
    let performed: Vec<_> = t
        .steps
        .iter()
        .flat_map(|s| &s.actions)
        .filter(|a| a.decision == Decision::DryRun)
        .collect();
    assert_eq!(performed.len(), 4);
    assert_eq!(performed[0].action, Action::Click { x: 200, y: 60 });
    assert!(
        flatten(&prompts[1])[2]
            .1
            .contains("*RESULT*: Click was not performed (dry run). <img>")
    );
    Ok(())
}

#[test]
fn safety_rules_deny_and_confirm() -> Result<()> {
    let source = include_str!("../agents/virtual.toml").replace(
        "[safety]\n",
        "[safety]\ndeny_actions = [\"double_click\"]\nconfirm_actions = [\"scroll\"]\n",
    );
    let profile = Profile::from_toml(&source, None)?;
    let double = "*FUNCTION*: DoubleClick *ARGS*: {\"point\": (500,200)}";
    let combo = "*FUNCTION*: Key *ARGS*: {\"keys\": [\"ctrl\", \"alt\", \"del\"]}";
    let scroll = "*FUNCTION*: Scroll *ARGS*: {\"point\": (500,500), \"direction\": \"down\"}";
    let tmp = tempfile::tempdir()?;
    let (_, env, prompts, t) = run_with(
        profile.clone(),
        &[double, combo, scroll],
        &options(tmp.path()),
        &mut NoHooks,
    )?;
    assert!(env.actions.is_empty());
    assert!(matches!(
        t.steps[0].actions[0].decision,
        Decision::Denied { .. }
    ));
    assert!(matches!(
        t.steps[1].actions[0].decision,
        Decision::Declined { .. }
    ));
    assert!(
        flatten(&prompts[1])[2]
            .1
            .contains("DoubleClick was not performed: the profile denies double_click")
    );
    // A function the profile does not list is refused too (virtual has no RightClick).
    let right = "*FUNCTION*: RightClick *ARGS*: {\"point\": (500,200)}";
    let (_, env2, prompts2, _) = run_replies(&[right])?;
    assert!(env2.actions.is_empty());
    assert!(
        flatten(&prompts2[1])[2].1.contains(
            "RightClick was not performed: RightClick is not one of this agent's functions"
        )
    );

    struct Yes(usize);
    impl Hooks for Yes {
        fn confirm(&mut self, _action: &Action, _reason: &str) -> bool {
            self.0 += 1;
            true
        }
    }
    let tmp = tempfile::tempdir()?;
    let mut yes = Yes(0);
    let (_, env, _, _) = run_with(profile, &[combo, scroll], &options(tmp.path()), &mut yes)?;
    assert_eq!(yes.0, 2);
    assert_eq!(env.actions.len(), 2);
    Ok(())
}

#[test]
fn secrets_are_typed_but_never_shown_or_recorded() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let secret = "hunter2-Ωµ";
    let mut o = options(tmp.path());
    o.secrets.insert("PW", secret);
    let replies = [
        "*FUNCTION*: Click *ARGS*: {\"point\": (500,200)}",
        "*FUNCTION*: Type *ARGS*: {\"text\": \"{{secret:PW}}\"}",
        "*FUNCTION*: Type *ARGS*: {\"text\": \"{{secret:NOPE}}\"}",
        "*FUNCTION*: Finish *ARGS*: {\"answer\": \"Logged in.\"}",
    ];
    let profile = virtual_profile()?;
    let mut env = screen(&profile)?;
    let agent = Agent::new(profile)?;
    let (mut model, prompts) = Recording::new(&replies);
    let report = agent.run(
        "Log in with password {{secret:PW}}",
        &mut model,
        &mut env,
        &o,
        &mut NoHooks,
    )?;
    assert!(matches!(report.status, RunStatus::Finished { .. }));
    assert_eq!(
        env.widget("name_field").map(|w| w.text.as_str()),
        Some(secret)
    );
    for p in prompts
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        for (_, text) in flatten(p) {
            assert!(!text.contains(secret));
        }
    }
    let t = trajectory::read(&report.trace_dir)?;
    assert_eq!(t.meta.task, "Log in with password {{secret:PW}}");
    assert_eq!(
        t.steps[1].actions[0].action,
        Action::Type {
            text: "{{secret:PW}}".into()
        }
    );
    assert!(
        t.steps[2]
            .errors
            .iter()
            .any(|e| e.contains("no secret named NOPE"))
    );
    for entry in walk(&report.trace_dir)? {
        let bytes = std::fs::read(&entry)?;
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(secret),
            "{} holds the secret",
            entry.display()
        );
    }
    // A task naming a secret nobody gave does not start.
    let missing = agent.run(
        "{{secret:ABSENT_FOR_TEST}}",
        &mut model,
        &mut env,
        &options(&tmp.path().join("b")),
        &mut NoHooks,
    );
    assert!(missing.is_err_and(|e| e.to_string().contains("VLAD_SECRET_ABSENT_FOR_TEST")));
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

#[test]
fn secrets_file_and_environment() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("secrets");
    std::fs::write(&file, "# comment\nPW=a=b c\n")?;
    let from_file = Secrets::from_file(&file)?;
    assert_eq!(from_file.reveal("{{secret:PW}}").as_deref(), Ok("a=b c"));
    std::fs::write(&file, "no equals sign\n")?;
    assert!(Secrets::from_file(&file).is_err_and(|e| e.to_string().contains("line 1")));
    Ok(())
}
