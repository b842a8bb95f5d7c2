//! `vlad test FILE…`: runs UI test files, prints a summary, writes JUnit XML (`--junit`) and a
//! trajectory per test. Exit status: 0 every test passed, 1 a test failed or could not run,
//! 2 a file is invalid.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use vlad::script::{self, CaseStatus, ModelSlot, Progress, Script, StepStatus, TestOptions, junit};

use super::run::{ModelArgs, open_model};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Test files (TOML; see examples/ui-tests/).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Write a JUnit XML report here.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Where trajectories go: `DIR/<suite>/<test>/` [default: a new folder under the user's
    /// state directory].
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// Keep the answer caches here instead of next to each test file.
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Never ask a model: replay cached answers only; a step whose screen has no cached
    /// answer is an error.
    #[arg(long)]
    no_model: bool,
    #[command(flatten)]
    model: ModelArgs,
}

fn default_trace_root() -> PathBuf {
    let base = dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .unwrap_or_else(std::env::temp_dir);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    base.join("vlad")
        .join("tests")
        .join(format!("test-{now}-{}", std::process::id()))
}

fn progress(event: &Progress<'_>) {
    match event {
        Progress::TestStarted { suite, test } => eprintln!("vlad test: {suite} › {test}"),
        Progress::Step { index, result } => {
            let mark = match result.status {
                StepStatus::Passed => "ok",
                StepStatus::Failed => "FAILED",
                StepStatus::Error => "ERROR",
                StepStatus::Skipped => "skipped",
            };
            let mut line = format!("  {index}. {} [{mark}] {:.2} s", result.text, result.time_s);
            if let Some(s) = &result.source {
                line.push_str(&format!(" ({s})"));
            }
            if let Some(m) = result
                .message
                .as_ref()
                .filter(|_| result.status != StepStatus::Passed)
            {
                line.push_str(&format!(": {m}"));
            }
            eprintln!("{line}");
        }
        Progress::TestFinished { .. } => {}
    }
}

fn run_tests(args: TestArgs) -> anyhow::Result<u8> {
    // Every file is checked before anything runs.
    let mut scripts = Vec::with_capacity(args.files.len());
    let mut invalid = false;
    for path in &args.files {
        match Script::load(path) {
            Ok(s) => scripts.push(s),
            Err(e) => {
                eprintln!("error: {e}");
                invalid = true;
            }
        }
    }
    if invalid {
        return Ok(2);
    }
    let model_args = &args.model;
    let mut models = if args.no_model {
        ModelSlot::none()
    } else {
        ModelSlot::lazy(move || open_model(model_args, None).map_err(|e| format!("{e:#}")))
    };
    let options = TestOptions {
        trace_root: args.trace.clone().unwrap_or_else(default_trace_root),
        cache_dir: args.cache.clone(),
    };
    let mut suites = Vec::with_capacity(scripts.len());
    for script in &scripts {
        let mut show = progress;
        suites.push(script::run_script(
            script,
            &mut models,
            &options,
            &mut show,
        )?);
    }
    if let Some(path) = &args.junit {
        std::fs::write(path, junit::render(&suites))
            .with_context(|| format!("cannot write the JUnit report to {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    write!(out, "{}", script::summary(&suites))?;
    writeln!(out, "trajectories: {}", options.trace_root.display())?;
    let all_passed = suites
        .iter()
        .flat_map(|s| &s.cases)
        .all(|c| c.status == CaseStatus::Passed);
    Ok(if all_passed { 0 } else { 1 })
}

/// Runs the command; the exit status says whether every test passed.
pub fn main(args: TestArgs) -> ExitCode {
    match run_tests(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
