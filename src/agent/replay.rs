//! Re-running a recorded trajectory without a model: every action that was performed is
//! performed again, in order. With verification, the screen before each step (and after the
//! last) is compared to the recorded screenshot and the replay stops at the first drift.

use std::time::Duration;

use serde::Serialize;

use super::trajectory::{Decision, Trajectory};
use super::{AgentError, Secrets, StopSignal};
use crate::action::Action;
use crate::environment::{Environment, Outcome};

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Compare screenshots and stop on drift.
    pub verify: bool,
    /// Fraction of pixels that may differ before it counts as drift (0 = identical).
    pub tolerance: f64,
    /// Values for `{{secret:NAME}}` in recorded Type actions.
    pub secrets: Secrets,
    pub stop: StopSignal,
    /// Milliseconds to wait after each step's actions.
    pub settle_ms: u64,
}

/// How a replay ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReplayStatus {
    /// Every recorded action was performed (and every screen matched, when verifying).
    Completed,
    /// The screen before `step` (or after the last step) differs from the recording.
    Drift {
        step: usize,
        screenshot: String,
        /// Fraction of pixels that differ (1 for a different size).
        differing: f64,
    },
    /// An action ended differently than recorded (verifying only).
    OutcomeChanged {
        step: usize,
        action: String,
        recorded: Option<Outcome>,
        now: Outcome,
    },
    Interrupted {
        step: usize,
    },
}

/// The end of a replay.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub status: ReplayStatus,
    pub steps: usize,
    pub actions: usize,
}

/// Replays `trajectory` on `env`; `progress` hears each performed action.
pub fn replay(
    trajectory: &Trajectory,
    env: &mut dyn Environment,
    options: &ReplayOptions,
    progress: &mut dyn FnMut(usize, &Action, &Outcome),
) -> Result<ReplayReport, AgentError> {
    let mut actions = 0;
    let mut steps = 0;
    let report = |status, steps, actions| ReplayReport {
        status,
        steps,
        actions,
    };
    for record in &trajectory.steps {
        if options.stop.check().is_some() {
            return Ok(report(
                ReplayStatus::Interrupted { step: record.step },
                steps,
                actions,
            ));
        }
        if options.verify
            && let Some(drift) =
                check_screen(trajectory, env, &record.screenshot, options.tolerance)?
        {
            return Ok(report(
                ReplayStatus::Drift {
                    step: record.step,
                    screenshot: record.screenshot.clone(),
                    differing: drift,
                },
                steps,
                actions,
            ));
        }
        for rec in &record.actions {
            if rec.decision != Decision::Perform {
                continue;
            }
            let action = match &rec.action {
                Action::Type { text } if Secrets::mentions(text) => Action::Type {
                    text: options
                        .secrets
                        .reveal(text)
                        .map_err(|m| AgentError::Secret(format!("step {}: {m}", record.step)))?,
                },
                other => other.clone(),
            };
            let outcome = env.perform(&action)?;
            actions += 1;
            progress(record.step, &rec.action, &outcome);
            if options.verify && rec.outcome.as_ref() != Some(&outcome) {
                return Ok(report(
                    ReplayStatus::OutcomeChanged {
                        step: record.step,
                        action: rec.action.tag().to_string(),
                        recorded: rec.outcome.clone(),
                        now: outcome,
                    },
                    steps,
                    actions,
                ));
            }
        }
        if options.settle_ms > 0 {
            std::thread::sleep(Duration::from_millis(options.settle_ms));
        }
        steps += 1;
    }
    if options.verify
        && let Some(last) = trajectory.steps.last()
        && let Some(after) = &last.screenshot_after
        && let Some(drift) = check_screen(trajectory, env, after, options.tolerance)?
    {
        return Ok(report(
            ReplayStatus::Drift {
                step: last.step + 1,
                screenshot: after.clone(),
                differing: drift,
            },
            steps,
            actions,
        ));
    }
    Ok(report(ReplayStatus::Completed, steps, actions))
}

/// `Some(fraction of differing pixels)` when the screen now differs from `recorded` by more
/// than `tolerance`.
fn check_screen(
    trajectory: &Trajectory,
    env: &mut dyn Environment,
    recorded: &str,
    tolerance: f64,
) -> Result<Option<f64>, AgentError> {
    let expected = trajectory.screenshot(recorded)?;
    let now = env.observe()?.screenshot;
    if expected.dimensions() != now.dimensions() {
        return Ok(Some(1.0));
    }
    let total = u64::from(now.width()) * u64::from(now.height());
    let differing = expected
        .pixels()
        .zip(now.pixels())
        .filter(|(a, b)| a != b)
        .count() as f64;
    let fraction = if total == 0 {
        0.0
    } else {
        differing / total as f64
    };
    Ok((fraction > tolerance).then_some(fraction))
}
