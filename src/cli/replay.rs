//! `vlad replay DIR`: performs a recorded run's actions again, without a model; `--verify`
//! compares each screen with the recording and stops on drift. Exit status: 0 replayed,
//! 1 error, 4 drift, 5 interrupted.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use vlad::agent::replay::{ReplayOptions, ReplayStatus, replay};
use vlad::agent::{self, Profile, Secrets, StopSignal, trajectory};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A run folder written by `vlad run` (--trace).
    dir: PathBuf,
    /// Compare each step's screen with the recorded screenshot; stop on the first drift.
    #[arg(long)]
    verify: bool,
    /// Fraction of pixels that may differ before a screen counts as drifted.
    #[arg(long, default_value_t = 0.0)]
    tolerance: f64,
    /// The agent profile whose environment to use [default: the one recorded in DIR].
    #[arg(long)]
    agent: Option<String>,
    /// The device: an Android serial, or a desktop monitor.
    #[arg(long, value_name = "SERIAL")]
    device: Option<String>,
    /// A file of NAME=value lines for the recorded {{secret:NAME}} (else VLAD_SECRET_NAME).
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn replay_run(args: ReplayArgs) -> anyhow::Result<u8> {
    let recorded = trajectory::read(&args.dir)?;
    let profile = match &args.agent {
        Some(spec) => Profile::load(spec)?,
        None => {
            let source = recorded.profile_toml.as_deref().with_context(|| {
                format!(
                    "{} has no {}; name the profile with --agent",
                    args.dir.display(),
                    trajectory::PROFILE_FILE
                )
            })?;
            Profile::from_toml(source, None)?
        }
    };
    let mut secrets = match &args.secrets {
        Some(path) => Secrets::from_file(path)?,
        None => Secrets::new(),
    };
    for step in &recorded.steps {
        for action in &step.actions {
            if let vlad::action::Action::Type { text } = &action.action {
                secrets = Secrets::for_text(text, &secrets)?;
            }
        }
    }
    let mut env = agent::open_environment(&profile, args.device.as_deref())?;
    if !(0.0..=1.0).contains(&args.tolerance) {
        anyhow::bail!("--tolerance must lie between 0 and 1");
    }
    let options = ReplayOptions {
        verify: args.verify,
        tolerance: args.tolerance,
        secrets,
        stop: StopSignal::new(),
        settle_ms: profile.limits.settle_ms,
    };
    eprintln!(
        "vlad: replaying {} ({} steps) on {}",
        args.dir.display(),
        recorded.steps.len(),
        env.describe().identity
    );
    let report = replay(
        &recorded,
        env.as_mut(),
        &options,
        &mut |step, action, outcome| {
            eprintln!(
                "step {step}: {} -> {}",
                serde_json::to_string(action).unwrap_or_default(),
                serde_json::to_string(outcome).unwrap_or_default()
            );
        },
    )?;
    let code = match &report.status {
        ReplayStatus::Completed => {
            eprintln!("vlad: replayed {} actions", report.actions);
            0
        }
        ReplayStatus::Drift {
            step,
            screenshot,
            differing,
        } => {
            eprintln!(
                "vlad: drift before step {step}: the screen differs from {screenshot} in {:.2}% of pixels",
                differing * 100.0
            );
            4
        }
        ReplayStatus::OutcomeChanged {
            step,
            action,
            recorded,
            now,
        } => {
            eprintln!("vlad: step {step}: {action} was {recorded:?}, now {now:?}");
            4
        }
        ReplayStatus::Interrupted { step } => {
            eprintln!("vlad: interrupted at step {step}");
            5
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(code)
}

/// Runs the command; the exit status says how the replay ended.
pub fn main(args: ReplayArgs) -> ExitCode {
    match replay_run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
