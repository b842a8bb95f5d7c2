//! The whole loop on the embedded engine with a tiny random checkpoint: whatever it emits is
//! parsed, reported back and recorded, and the run ends by a stop condition, never a crash.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use vlad::agent::{Agent, NoHooks, Profile, RunOptions, RunStatus, trajectory};
use vlad::engine::LoadOptions;
use vlad::model::{EmbeddedModel, Model};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/engine/tiny-a");

fn strict_profile() -> String {
    include_str!("../agents/virtual.toml")
        .replace(
            "max_new_tokens = 256",
            "max_new_tokens = 24\nanswer_without_call = false",
        )
        .replace("max_steps = 15", "max_steps = 4")
}

#[test]
fn garbage_replies_are_reported_back_and_the_run_stops_by_a_limit() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let profile = Profile::from_toml(&strict_profile(), None)?;
    let mut env = profile
        .screen
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no screen"))?
        .build();
    let agent = Agent::new(profile)?;
    let mut model = EmbeddedModel::load(TINY, &LoadOptions::default())?;
    assert!(model.name().contains("tiny-a"));
    let options = RunOptions {
        trace_dir: Some(tmp.path().join("run")),
        ..Default::default()
    };
    let report = agent.run(
        "Click the submit button",
        &mut model,
        &mut env,
        &options,
        &mut NoHooks,
    )?;
    assert!(
        matches!(
            report.status,
            RunStatus::TooManyErrors { .. }
                | RunStatus::MaxSteps { .. }
                | RunStatus::Looping { .. }
        ),
        "{:?}",
        report.status
    );
    let t = trajectory::read(&report.trace_dir)?;
    assert_eq!(t.steps.len(), report.steps);
    assert!(
        t.steps.len() >= 2,
        "the errors went back to the model at least once"
    );
    for s in &t.steps {
        assert!(s.reply.is_some(), "step {}: the reply is recorded", s.step);
        assert!(s.timings.generate_s > 0.0);
        assert!(s.model_timings.get("prefill_s").is_some());
    }
    // Step 2 continued the assistant turn that holds step 1's reply and its *RESULT*.
    assert!(!t.steps[0].prompt.continued);
    assert!(t.steps[1].prompt.continued);
    assert_eq!(t.steps[1].prompt.images, 2);
    let failing = t.steps.iter().filter(|s| !s.errors.is_empty()).count();
    assert!(failing >= 1, "garbage produced no error: {:?}", t.steps);
    assert!(t.result.is_some());
    Ok(())
}

#[test]
fn vlad_run_with_the_embedded_backend_gives_up_cleanly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let profile = tmp.path().join("strict.toml");
    std::fs::write(&profile, strict_profile())?;
    let trace = tmp.path().join("trace");
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["run", "Click submit", "--agent"])
        .arg(&profile)
        .args([
            "--backend",
            "embedded",
            "--dtype",
            "f32",
            "--model",
            TINY,
            "--max-steps",
            "2",
            "--trace",
        ])
        .arg(&trace)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("gave up"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(Path::new(&trace).join(trajectory::RESULT_FILE).exists());
    Ok(())
}
