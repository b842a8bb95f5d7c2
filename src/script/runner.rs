//! Running a test file: each test launches the target, runs its steps (with timeouts, retries
//! and the answer cache), records a trajectory, and stops the target.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use image::RgbImage;
use serde_json::json;

use super::cache::{Answer, Cache, Fingerprint, Lookup};
use super::file::{Script, Step, StepKind, TestCase};
use super::target::{self, Launched};
use super::{
    CacheStats, CaseResult, CaseStatus, ModelSlot, Progress, StepResult, StepStatus, SuiteResult,
    TestOptions, UiTestError, assertion, cache_path,
};
use crate::action::Action;
use crate::agent::trajectory::{PromptSummary, StepTimings, TrajectoryWriter};
use crate::agent::{ActionRecord, Decision, RunMeta, RunResult, RunStatus};
use crate::environment::{Environment, Outcome};
use crate::grounding::{self, GroundingError};
use crate::protocol::Size;

/// How soon to look again for a screen the cache knows, when no model may be asked.
const RESAMPLE: Duration = Duration::from_millis(60);

/// Why a step did not pass.
#[derive(Debug)]
enum StepError {
    /// An expectation was not met.
    Failed(String),
    /// The step could not run.
    Error(String),
    /// No cached answer for this screen, and no model may be asked.
    Unanswered(String),
}

/// What one step did, for its trajectory line.
#[derive(Default)]
struct StepLog {
    before: Option<RgbImage>,
    after: Option<RgbImage>,
    reply: Option<String>,
    actions: Vec<ActionRecord>,
    sources: Vec<String>,
    asked_model: bool,
    generate_s: f64,
    perform_s: f64,
    observe_s: f64,
}

/// A located thing.
struct Located {
    bbox: [i32; 4],
    point: (i32, i32),
    label: Option<String>,
}

struct Ctx<'a, 'm> {
    script: &'a Script,
    cache: &'a mut Cache,
    models: &'a mut ModelSlot<'m>,
    stats: CacheStats,
}

fn seconds_since_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `secs` since the epoch as ISO 8601 UTC (`2026-01-31T12:00:00`).
fn iso8601(secs: f64) -> String {
    let secs = secs.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A file-name-safe form of a name.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(60).collect();
    if out.is_empty() { "test".into() } else { out }
}

/// Runs every test of `script`.
pub fn run_script(
    script: &Script,
    models: &mut ModelSlot<'_>,
    options: &TestOptions,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<SuiteResult, UiTestError> {
    let cache_file = cache_path(&script.path, options.cache_dir.as_deref());
    let mut cache = Cache::load(&cache_file)?;
    let started = seconds_since_epoch();
    let clock = Instant::now();
    let mut ctx = Ctx {
        script,
        cache: &mut cache,
        models,
        stats: CacheStats::default(),
    };
    let suite_dir = options.trace_root.join(slug(&script.name));
    let mut cases = Vec::with_capacity(script.tests.len());
    for case in &script.tests {
        progress(&Progress::TestStarted {
            suite: &script.name,
            test: &case.name,
        });
        let result = ctx.run_case(case, &suite_dir.join(slug(&case.name)), progress);
        // Keep what was learnt even if a later test crashes the process.
        ctx.cache.save()?;
        progress(&Progress::TestFinished { case: &result });
        cases.push(result);
    }
    let stats = ctx.stats;
    cache.save()?;
    Ok(SuiteResult {
        name: script.name.clone(),
        file: script.path.clone(),
        timestamp: iso8601(started),
        time_s: clock.elapsed().as_secs_f64(),
        cases,
        cache: stats,
        cache_file,
    })
}

impl Ctx<'_, '_> {
    fn run_case(
        &mut self,
        case: &TestCase,
        dir: &Path,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> CaseResult {
        let clock = Instant::now();
        let script: &Script = self.script;
        let settings = &script.settings;
        let error_case = |message: String, trace: Option<PathBuf>, steps| CaseResult {
            name: case.name.clone(),
            status: CaseStatus::Error {
                detail: message.clone(),
                message,
            },
            steps,
            time_s: clock.elapsed().as_secs_f64(),
            trace,
        };
        let skipped = |why: &str| -> Vec<StepResult> {
            case.steps
                .iter()
                .map(|s| StepResult {
                    text: s.text.clone(),
                    status: StepStatus::Skipped,
                    message: Some(why.to_string()),
                    source: None,
                    attempts: 0,
                    time_s: 0.0,
                })
                .collect()
        };
        let mut launched =
            match target::launch(&script.target, Duration::from_secs_f64(settings.settle)) {
                Ok(l) => l,
                Err(e) => {
                    return error_case(
                        format!("cannot start the target: {e}"),
                        None,
                        skipped("the target did not start"),
                    );
                }
            };
        let meta = RunMeta {
            vlad_version: env!("CARGO_PKG_VERSION").to_string(),
            task: format!("{} › {}", self.script.name, case.name),
            profile: format!("vlad test {}", self.script.path.display()),
            model: self.models.describe(),
            environment: launched.env.describe(),
            dry_run: false,
            started_at: seconds_since_epoch(),
        };
        let mut writer = match TrajectoryWriter::create(dir, &meta, &launched.profile_toml) {
            Ok(w) => w,
            Err(e) => {
                launched.stop();
                return error_case(
                    format!("cannot record the trajectory: {e}"),
                    None,
                    skipped("no trajectory"),
                );
            }
        };
        let mut steps = Vec::with_capacity(case.steps.len());
        let mut status = CaseStatus::Passed;
        let mut record_error = None;
        for (i, step) in case.steps.iter().enumerate() {
            if status != CaseStatus::Passed {
                steps.push(StepResult {
                    text: step.text.clone(),
                    status: StepStatus::Skipped,
                    message: Some("an earlier step did not pass".into()),
                    source: None,
                    attempts: 0,
                    time_s: 0.0,
                });
                continue;
            }
            let (result, log) = self.run_step(&mut launched, step);
            if let Err(e) = record(&mut writer, i + 1, step, &result, log) {
                record_error = Some(e);
            }
            progress(&Progress::Step {
                index: i + 1,
                result: &result,
            });
            let detail = || {
                format!(
                    "step {} ({}): {}",
                    i + 1,
                    step.text,
                    result.message.clone().unwrap_or_default()
                )
            };
            status = match result.status {
                StepStatus::Failed => CaseStatus::Failed {
                    message: format!(
                        "step {}: {}",
                        i + 1,
                        result.message.clone().unwrap_or_default()
                    ),
                    detail: detail(),
                },
                StepStatus::Error => CaseStatus::Error {
                    message: format!(
                        "step {}: {}",
                        i + 1,
                        result.message.clone().unwrap_or_default()
                    ),
                    detail: detail(),
                },
                _ => CaseStatus::Passed,
            };
            steps.push(result);
        }
        launched.stop();
        if let (Some(e), CaseStatus::Passed) = (&record_error, &status) {
            status = CaseStatus::Error {
                message: format!("cannot record the trajectory: {e}"),
                detail: e.clone(),
            };
        }
        let run_status = match &status {
            CaseStatus::Passed => RunStatus::Finished {
                answer: format!("passed ({} steps)", case.steps.len()),
            },
            CaseStatus::Failed { message, .. } => RunStatus::Error {
                message: format!("failed: {message}"),
            },
            CaseStatus::Error { message, .. } => RunStatus::Error {
                message: message.clone(),
            },
        };
        let time_s = clock.elapsed().as_secs_f64();
        let _ = writer.finish(&RunResult {
            status: run_status,
            steps: steps
                .iter()
                .filter(|s| s.status != StepStatus::Skipped)
                .count(),
            elapsed_s: time_s,
            final_screenshot: None,
        });
        CaseResult {
            name: case.name.clone(),
            status,
            steps,
            time_s,
            trace: Some(writer.dir().to_path_buf()),
        }
    }

    fn run_step(&mut self, launched: &mut Launched, step: &Step) -> (StepResult, StepLog) {
        let script: &Script = self.script;
        let settings = &script.settings;
        let clock = Instant::now();
        let timeout = step.timeout.unwrap_or(settings.timeout);
        let retries = step.retries.unwrap_or(settings.retries);
        let poll = Duration::from_secs_f64(settings.poll_interval);
        let deadline = clock + Duration::from_secs_f64(timeout);
        let mut log = StepLog::default();
        // Attempts: the first and each retry after a failure (looking again for a cached
        // screen does not count).
        let mut attempts = 1;
        let outcome = loop {
            let r = self.attempt(launched.env.as_mut(), step, &mut log, deadline);
            let time_left = Instant::now() + poll < deadline;
            match r {
                Ok(()) => break Ok(()),
                Err(StepError::Failed(m)) if attempts <= retries && time_left => {
                    log.sources.push(format!("attempt {attempts} failed: {m}"));
                    attempts += 1;
                }
                Err(StepError::Unanswered(_)) if time_left => {
                    // Look again soon: a recorded screen may come back for a moment only
                    // (a blinking caret), and a fixed poll could keep missing it.
                    std::thread::sleep(poll.min(RESAMPLE));
                    continue;
                }
                Err(e) => break Err(e),
            }
            std::thread::sleep(poll);
        };
        let (status, message) = match outcome {
            Ok(()) => (StepStatus::Passed, None),
            Err(StepError::Failed(m)) => (StepStatus::Failed, Some(m)),
            Err(StepError::Error(m)) => (StepStatus::Error, Some(m)),
            Err(StepError::Unanswered(note)) => {
                self.stats.unanswered += 1;
                (
                    StepStatus::Error,
                    Some(format!(
                        "no cached answer for this screen ({note}) and no model may be asked; \
                         run once with a model (without --no-model) to record it"
                    )),
                )
            }
        };
        let source = (!log.sources.is_empty()).then(|| log.sources.join("; "));
        let result = StepResult {
            text: step.text.clone(),
            status,
            message,
            source,
            attempts,
            time_s: clock.elapsed().as_secs_f64(),
        };
        (result, log)
    }

    fn observe(
        &mut self,
        env: &mut dyn Environment,
        log: &mut StepLog,
    ) -> Result<RgbImage, StepError> {
        let t = Instant::now();
        let obs = env
            .observe()
            .map_err(|e| StepError::Error(format!("cannot take a screenshot: {e}")))?;
        log.observe_s += t.elapsed().as_secs_f64();
        log.before = Some(obs.screenshot.clone());
        Ok(obs.screenshot)
    }

    fn perform(
        &mut self,
        env: &mut dyn Environment,
        action: Action,
        step: &Step,
        model: serde_json::Value,
        log: &mut StepLog,
    ) -> Result<(), StepError> {
        let t = Instant::now();
        let outcome = env.perform(&action).map_err(|e| {
            StepError::Error(format!("the {} could not be performed: {e}", action.tag()))
        })?;
        let perform_s = t.elapsed().as_secs_f64();
        log.perform_s += perform_s;
        log.actions.push(ActionRecord {
            function: action.tag().to_string(),
            text: step.text.clone(),
            model,
            action: action.clone(),
            decision: Decision::Perform,
            outcome: Some(outcome.clone()),
            perform_s,
        });
        std::thread::sleep(Duration::from_secs_f64(self.script.settings.settle));
        match outcome {
            Outcome::Done => Ok(()),
            Outcome::Failed { reason } => Err(StepError::Failed(format!(
                "the {} failed: {reason}",
                action.tag()
            ))),
            Outcome::Refused { reason } => Err(StepError::Error(format!(
                "the {} was refused: {reason}",
                action.tag()
            ))),
        }
    }

    /// The cached answer for `step` on `img`, or the model's (then cached).
    fn answer(
        &mut self,
        step: &Step,
        img: &RgbImage,
        log: &mut StepLog,
        ask: &mut dyn FnMut(&mut dyn crate::model::Model) -> Result<Answer, StepError>,
    ) -> Result<Answer, StepError> {
        let tolerance = self.script.settings.cache_tolerance;
        let fp = Fingerprint::of(img);
        let note = match self.cache.lookup(&step.text, &fp, tolerance) {
            Lookup::Hit { answer, distance } => {
                self.stats.hits += 1;
                log.sources.push(if distance == 0 {
                    "cache hit".into()
                } else {
                    format!("cache hit ({distance} of 1024 hash bits differ)")
                });
                log.reply = Some(answer.reply().to_string());
                return Ok(answer);
            }
            Lookup::NotRecorded => None,
            Lookup::ScreenChanged { nearest } => Some(if nearest >= 1024 {
                "cache miss: the screen changed (recorded at another size)".to_string()
            } else {
                format!(
                    "cache miss: the screen changed ({nearest} of 1024 hash bits differ, tolerance {tolerance})"
                )
            }),
        };
        if !self.models.allowed() {
            return Err(match note {
                // The screen may still come back (a caret blinks, a tooltip fades): look again.
                Some(note) => StepError::Unanswered(note),
                None => {
                    self.stats.unanswered += 1;
                    StepError::Error(
                        "this step was never recorded and no model may be asked; run once with \
                         a model (without --no-model) to record it"
                            .into(),
                    )
                }
            });
        }
        let model = self.models.get().map_err(StepError::Error)?;
        let t = Instant::now();
        let answer = ask(model);
        log.generate_s += t.elapsed().as_secs_f64();
        log.asked_model = true;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                log.sources.push(match &note {
                    Some(n) => format!("{n}; asked the model"),
                    None => "asked the model".into(),
                });
                return Err(e);
            }
        };
        log.reply = Some(answer.reply().to_string());
        self.stats.asked += 1;
        if note.is_some() {
            self.stats.changed += 1;
        }
        log.sources.push(match note {
            Some(n) => format!("{n}; asked the model"),
            None => "asked the model".into(),
        });
        self.cache.insert(&step.text, &fp, answer.clone());
        Ok(answer)
    }

    fn locate(
        &mut self,
        step: &Step,
        description: &str,
        img: &RgbImage,
        log: &mut StepLog,
    ) -> Result<Located, StepError> {
        let rgba = image::DynamicImage::ImageRgb8(img.clone()).to_rgba8();
        let answer = self.answer(step, img, log, &mut |model| match grounding::ground(
            model,
            &rgba,
            description,
        ) {
            Ok(g) => Ok(Answer::Ground {
                label: g.label,
                bbox: g.bbox,
                point: g.point,
                reply: g.reply,
            }),
            Err(
                e @ (GroundingError::NoBox { .. }
                | GroundingError::BadBox { .. }
                | GroundingError::OutsideImage { .. }),
            ) => Err(StepError::Failed(format!(
                "could not locate {description}: {e}"
            ))),
            Err(e) => Err(StepError::Error(e.to_string())),
        })?;
        match answer {
            Answer::Ground {
                label, bbox, point, ..
            } => Ok(Located { bbox, point, label }),
            Answer::Assert { .. } => Err(StepError::Error(format!(
                "the cache {} holds an assertion for a step that locates something; delete the file to re-record",
                self.cache.path().display()
            ))),
        }
    }

    fn check(
        &mut self,
        step: &Step,
        description: &str,
        img: &RgbImage,
        log: &mut StepLog,
    ) -> Result<(bool, String), StepError> {
        let size = Size::new(img.width(), img.height());
        let answer = self.answer(step, img, log, &mut |model| {
            let reply = assertion::ask(model, img, description)
                .map_err(|e| StepError::Error(e.to_string()))?;
            match assertion::parse(&reply, size) {
                Ok(v) => Ok(Answer::Assert {
                    visible: v.visible,
                    bbox: v.bbox,
                    reply,
                }),
                Err(why) => Err(StepError::Failed(format!(
                    "the model's answer is ambiguous ({why}): {reply:?}"
                ))),
            }
        })?;
        match answer {
            Answer::Assert { visible, reply, .. } => Ok((visible, reply)),
            Answer::Ground { .. } => Err(StepError::Error(format!(
                "the cache {} holds a grounding for an assertion; delete the file to re-record",
                self.cache.path().display()
            ))),
        }
    }

    fn attempt(
        &mut self,
        env: &mut dyn Environment,
        step: &Step,
        log: &mut StepLog,
        deadline: Instant,
    ) -> Result<(), StepError> {
        let grounded = |l: &Located, description: &str| json!({"description": description, "box": l.bbox, "point": [l.point.0, l.point.1], "label": l.label});
        match &step.kind {
            StepKind::Act { verb, target } => {
                let img = self.observe(env, log)?;
                let l = self.locate(step, target, &img, log)?;
                let model = grounded(&l, target);
                self.perform(env, verb.at(l.point), step, model, log)?;
            }
            StepKind::Type { text, target } => {
                let img = self.observe(env, log)?;
                if let Some(target) = target {
                    let l = self.locate(step, target, &img, log)?;
                    let model = grounded(&l, target);
                    self.perform(
                        env,
                        Action::Click {
                            x: l.point.0,
                            y: l.point.1,
                        },
                        step,
                        model,
                        log,
                    )?;
                }
                let action = Action::Type { text: text.clone() };
                self.perform(env, action, step, serde_json::Value::Null, log)?;
            }
            StepKind::Press { keys } => {
                self.observe(env, log)?;
                let action = Action::Key { keys: keys.clone() };
                self.perform(env, action, step, serde_json::Value::Null, log)?;
            }
            StepKind::Scroll {
                direction,
                amount,
                target,
            } => {
                let img = self.observe(env, log)?;
                let (point, model) = match target {
                    Some(t) => {
                        let l = self.locate(step, t, &img, log)?;
                        let model = grounded(&l, t);
                        (l.point, model)
                    }
                    None => (
                        (img.width() as i32 / 2, img.height() as i32 / 2),
                        serde_json::Value::Null,
                    ),
                };
                let action = Action::Scroll {
                    x: point.0,
                    y: point.1,
                    direction: *direction,
                    amount: *amount,
                };
                self.perform(env, action, step, model, log)?;
            }
            StepKind::Wait { seconds } => {
                self.observe(env, log)?;
                let action = Action::Wait { seconds: *seconds };
                self.perform(env, action, step, serde_json::Value::Null, log)?;
            }
            StepKind::Action(action) => {
                self.observe(env, log)?;
                self.perform(env, action.clone(), step, serde_json::Value::Null, log)?;
            }
            StepKind::Expect { target, visible } => {
                let img = self.observe(env, log)?;
                let (seen, reply) = self.check(step, target, &img, log)?;
                if seen != *visible {
                    return Err(StepError::Failed(format!(
                        "expected {target} {}, but the model answered {reply:?}",
                        if *visible {
                            "to be visible"
                        } else {
                            "not to be visible"
                        }
                    )));
                }
            }
            StepKind::WaitUntil { target, visible } => {
                let poll = Duration::from_secs_f64(self.script.settings.poll_interval);
                let start = Instant::now();
                loop {
                    let img = self.observe(env, log)?;
                    match self.check(step, target, &img, log) {
                        Ok((seen, _)) if seen == *visible => return Ok(()),
                        Ok((_, reply)) if Instant::now() + poll >= deadline => {
                            return Err(StepError::Failed(format!(
                                "{target} was {} after {:.1} s; the model's last answer: {reply:?}",
                                if *visible {
                                    "still not visible"
                                } else {
                                    "still visible"
                                },
                                start.elapsed().as_secs_f64()
                            )));
                        }
                        Ok(_) => {}
                        Err(StepError::Unanswered(n)) if Instant::now() + poll >= deadline => {
                            return Err(StepError::Unanswered(n));
                        }
                        Err(StepError::Unanswered(_)) => {
                            std::thread::sleep(poll.min(RESAMPLE));
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    std::thread::sleep(poll);
                }
            }
        }
        if !log.actions.is_empty() {
            let t = Instant::now();
            if let Ok(obs) = env.observe() {
                log.after = Some(obs.screenshot);
            }
            log.observe_s += t.elapsed().as_secs_f64();
        }
        Ok(())
    }
}

/// Writes one step's trajectory line and its screenshots.
fn record(
    writer: &mut TrajectoryWriter,
    n: usize,
    step: &Step,
    result: &StepResult,
    log: StepLog,
) -> Result<(), String> {
    let save = |index: usize, img: &RgbImage| {
        writer
            .save_screenshot(index, img)
            .map_err(|e| e.to_string())
    };
    let (screenshot, width, height) = match &log.before {
        Some(img) => (save((n - 1) * 2, img)?, img.width(), img.height()),
        None => (String::new(), 0, 0),
    };
    let screenshot_after = match &log.after {
        Some(img) => Some(save((n - 1) * 2 + 1, img)?),
        None => None,
    };
    let mut result_text = match result.status {
        StepStatus::Passed => "passed".to_string(),
        StepStatus::Failed => "failed".to_string(),
        StepStatus::Error => "error".to_string(),
        StepStatus::Skipped => "skipped".to_string(),
    };
    if result.attempts > 1 {
        result_text.push_str(&format!(" after {} attempts", result.attempts));
    }
    if let Some(s) = &result.source {
        result_text.push_str(&format!(" ({s})"));
    }
    let record = crate::agent::StepRecord {
        step: n,
        screenshot,
        screenshot_after,
        screen_width: width,
        screen_height: height,
        prompt: if log.asked_model {
            PromptSummary {
                messages: 1,
                images: 1,
                placeholders: 0,
                text_chars: step.text.len(),
                continued: false,
            }
        } else {
            PromptSummary::default()
        },
        reply: log.reply,
        stop: None,
        thought: Some(step.text.clone()),
        actions: log.actions,
        answer: None,
        errors: result
            .message
            .iter()
            .filter(|_| result.status != StepStatus::Passed)
            .cloned()
            .collect(),
        result: Some(result_text),
        timings: StepTimings {
            generate_s: log.generate_s,
            perform_s: log.perform_s,
            observe_s: log.observe_s,
            total_s: result.time_s,
        },
        model_timings: serde_json::Value::Null,
    };
    writer.append(&record).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_8601_utc() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso8601(951_782_400.0), "2000-02-29T00:00:00");
        assert_eq!(iso8601(1_767_225_599.0), "2025-12-31T23:59:59");
    }

    #[test]
    fn slugs_are_safe_file_names() {
        assert_eq!(slug("Logs in, then greets Ana!"), "logs-in-then-greets-ana");
        assert_eq!(slug("../.."), "test");
        assert_eq!(slug("Ünïcødé"), "ünïcødé");
    }
}
