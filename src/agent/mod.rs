//! The agent loop: observe → prompt → generate (stopping at `*RESULT*`) → parse → map
//! coordinates → safety gate → perform → record → write `*RESULT*: <screenshot>` and `*RETURN*:`
//! back into the same assistant turn, until a stop condition holds.
//!
//! Entry point: [`Agent::run`]. A run never panics on what the model says: malformed replies are
//! reported back to the model and recorded. It ends with a [`RunStatus`]; only setup failures
//! (a bad profile, an unwritable trace folder, a missing secret) are an [`AgentError`].

pub mod history;
pub mod profile;
pub mod replay;
pub mod safety;
pub mod texts;
pub mod trajectory;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use minijinja::context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::action::Action;
use crate::engine::GenerationOptions;
use crate::environment::{Environment, EnvironmentError, EnvironmentKind, Observation, Outcome};
use crate::model::{Model, ModelError, StopReason};
use crate::protocol::render::{PromptContext, Prompts, RenderError};
use crate::protocol::{
    ActionSpace, CoordMap, Function, ModelFamily, Protocol, ProtocolError, ReplyError, Size,
};
use crate::tools::{Plugins, ToolResult};

pub use history::Conversation;
pub use profile::{Limits, Profile, Safety};
pub use safety::Secrets;
pub use texts::Texts;
pub use trajectory::{ActionRecord, Decision, RunMeta, RunResult, StepRecord, Trajectory};

/// Why a run could not start or could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent profile {}: {message}", path.display())]
    Profile { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Prompt(String),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("{0}")]
    Secret(String),
    #[error("trajectory: {0}")]
    Trace(String),
    #[error(transparent)]
    Environment(#[from] EnvironmentError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Unsupported(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RunStatus {
    /// The task is done; the model's answer.
    Finished {
        answer: String,
    },
    /// The model asked the user and nobody could answer.
    NeedsUser {
        question: String,
    },
    MaxSteps {
        steps: usize,
    },
    TimeLimit {
        seconds: f64,
    },
    /// The same action on an unchanged screen, `times` in a row.
    Looping {
        action: String,
        times: usize,
    },
    /// `errors` steps in a row with a parse or execution error; the last one.
    TooManyErrors {
        errors: usize,
        last: String,
    },
    /// The replay backend ran out of replies.
    RepliesExhausted {
        message: String,
    },
    /// Ctrl-C or a stop request.
    Interrupted,
    /// The abort file appeared.
    Aborted {
        reason: String,
    },
    /// The model or the environment failed.
    Error {
        message: String,
    },
}

/// The kind of ending, for exit statuses and summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    Finished,
    NeedsUser,
    GaveUp,
    Stopped,
    Error,
}

impl RunStatus {
    pub fn ending(&self) -> Ending {
        match self {
            Self::Finished { .. } => Ending::Finished,
            Self::NeedsUser { .. } => Ending::NeedsUser,
            Self::MaxSteps { .. }
            | Self::TimeLimit { .. }
            | Self::Looping { .. }
            | Self::TooManyErrors { .. }
            | Self::RepliesExhausted { .. } => Ending::GaveUp,
            Self::Interrupted | Self::Aborted { .. } => Ending::Stopped,
            Self::Error { .. } => Ending::Error,
        }
    }

    /// The process exit status of `vlad run`: 0 finished, 1 error, 3 needs the user, 4 gave up,
    /// 5 stopped (Ctrl-C, abort file).
    pub fn exit_code(&self) -> u8 {
        match self.ending() {
            Ending::Finished => 0,
            Ending::Error => 1,
            Ending::NeedsUser => 3,
            Ending::GaveUp => 4,
            Ending::Stopped => 5,
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            Self::Finished { answer } => format!("finished: {answer}"),
            Self::NeedsUser { question } => format!("needs the user: {question}"),
            Self::MaxSteps { steps } => format!("gave up: reached the step limit ({steps})"),
            Self::TimeLimit { seconds } => format!("gave up: reached the time limit ({seconds} s)"),
            Self::Looping { action, times } => {
                format!("gave up: {action} asked for {times} times on an unchanged screen")
            }
            Self::TooManyErrors { errors, last } => {
                format!("gave up: {errors} steps in a row failed; last: {last}")
            }
            Self::RepliesExhausted { message } => format!("gave up: {message}"),
            Self::Interrupted => "stopped: interrupted".into(),
            Self::Aborted { reason } => format!("stopped: {reason}"),
            Self::Error { message } => format!("error: {message}"),
        }
    }
}

/// A request to stop between actions: a flag (Ctrl-C, the daemon) and an optional abort file.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    abort_file: Option<PathBuf>,
}

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also stop once `path` exists.
    pub fn with_abort_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.abort_file = Some(path.into());
        self
    }

    /// The flag to set from a signal handler or another thread.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    pub fn request_stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// The status to stop with, if a stop was requested.
    pub fn check(&self) -> Option<RunStatus> {
        if self.flag.load(Ordering::SeqCst) {
            return Some(RunStatus::Interrupted);
        }
        match &self.abort_file {
            Some(path) if path.exists() => Some(RunStatus::Aborted {
                reason: format!("abort file {} exists", path.display()),
            }),
            _ => None,
        }
    }
}

/// What happens during a run, as it happens (progress display, event streams).
#[derive(Debug)]
pub enum Event<'a> {
    Started {
        dir: &'a Path,
        meta: &'a RunMeta,
    },
    /// The model replied (secrets redacted).
    Reply {
        step: usize,
        text: &'a str,
        seconds: f64,
    },
    Action {
        step: usize,
        record: &'a ActionRecord,
    },
    /// A step is recorded.
    Step {
        record: &'a StepRecord,
    },
    Finished {
        status: &'a RunStatus,
    },
}

/// The caller's side of a run: progress, confirmations, questions to the user.
pub trait Hooks {
    fn event(&mut self, _event: &Event<'_>) {}
    /// May `action` (marked sensitive for `reason`) be performed? No by default.
    fn confirm(&mut self, _action: &Action, _reason: &str) -> bool {
        false
    }
    /// The user's answer to the model's question; `None` ends the run as needing the user.
    fn ask_user(&mut self, _question: &str) -> Option<String> {
        None
    }
}

/// Hooks that do nothing, confirm nothing and answer nothing.
#[derive(Debug, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}

/// Options of one run; the profile's limits apply where these say `None`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub dry_run: bool,
    pub max_steps: Option<usize>,
    pub max_seconds: Option<f64>,
    /// The run folder; a fresh one under the user's state directory when `None`.
    pub trace_dir: Option<PathBuf>,
    /// Secret values (from a file); names the task uses and these lack come from
    /// `VLAD_SECRET_<NAME>`.
    pub secrets: Secrets,
    pub stop: StopSignal,
    pub seed: u64,
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub status: RunStatus,
    pub steps: usize,
    pub trace_dir: PathBuf,
    pub elapsed_s: f64,
}

/// An agent: a profile with its prompts and parser, ready to run tasks.
#[derive(Debug)]
pub struct Agent {
    profile: Profile,
    space: ActionSpace,
    protocol: Protocol,
    prompts: Prompts,
    texts: Texts,
    /// Tool plugins the model may call besides the built-in functions.
    plugins: Plugins,
}

/// What the environment (or a tool plugin) is asked to do for one action.
enum Execution {
    Outcome(Outcome),
    Broken(EnvironmentError),
    Tool(ToolResult),
}

impl Agent {
    pub fn new(profile: Profile) -> Result<Self, AgentError> {
        let space = profile.action_space().map_err(|e| AgentError::Profile {
            path: PathBuf::from(&profile.name),
            message: e.to_string(),
        })?;
        let (prompts, texts) = match &profile.prompt_dir {
            Some(dir) => (Prompts::from_dir(dir)?, Texts::from_dir(dir)?),
            None => (Prompts::builtin()?, Texts::builtin()?),
        };
        Ok(Self {
            protocol: Protocol::new(profile.family),
            profile,
            space,
            prompts,
            texts,
            plugins: Plugins::none(),
        })
    }

    /// This agent with tool plugins: each becomes a function in the system prompt and the
    /// parser accepts calls of it.
    pub fn with_plugins(mut self, plugins: Plugins) -> Self {
        self.protocol = Protocol::new(self.profile.family).with_tools(plugins.names());
        self.plugins = plugins;
        self
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub fn plugins(&self) -> &Plugins {
        &self.plugins
    }

    /// The system prompt of this agent.
    pub fn system_prompt(&self) -> Result<String, AgentError> {
        let ctx = PromptContext {
            space: Some(self.space.clone()),
            tools: self.plugins.specs(),
            ..Default::default()
        };
        Ok(self.prompts.system_prompt(self.profile.prompt, &ctx)?)
    }

    /// Generation settings of a step: greedy, the profile's token budget, the protocol's stop
    /// strings.
    pub fn generation_options(&self, seed: u64) -> GenerationOptions {
        GenerationOptions {
            max_new_tokens: self.profile.limits.max_new_tokens,
            greedy: Some(true),
            seed,
            stop_strings: self
                .protocol
                .stop_strings()
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
            ..Default::default()
        }
    }

    /// Runs `task` until a stop condition holds. Everything is recorded under the run folder.
    pub fn run(
        &self,
        task: &str,
        model: &mut dyn Model,
        env: &mut dyn Environment,
        options: &RunOptions,
        hooks: &mut dyn Hooks,
    ) -> Result<RunReport, AgentError> {
        let start = Instant::now();
        let secrets = Secrets::for_text(task, &options.secrets)?;
        let dir = options
            .trace_dir
            .clone()
            .unwrap_or_else(trajectory::default_dir);
        let first = env.observe()?;
        let meta = RunMeta {
            vlad_version: env!("CARGO_PKG_VERSION").to_string(),
            task: secrets.redact(task),
            profile: self.profile.name.clone(),
            model: model.name(),
            environment: env.describe(),
            dry_run: options.dry_run,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        let mut writer =
            trajectory::TrajectoryWriter::create(&dir, &meta, &self.profile.to_toml()?)?;
        hooks.event(&Event::Started {
            dir: &dir,
            meta: &meta,
        });
        let system = self.system_prompt()?;
        let task_text = self.texts.render("task", context! { task => meta.task })?;
        let mut run = RunState {
            agent: self,
            options,
            secrets,
            limits: Limits {
                max_steps: options.max_steps.unwrap_or(self.profile.limits.max_steps),
                max_seconds: options
                    .max_seconds
                    .unwrap_or(self.profile.limits.max_seconds),
                ..self.profile.limits.clone()
            },
            start,
            conversation: Conversation::new(system, task_text, first.screenshot.clone()),
            screenshot_path: writer.save_screenshot(0, &first.screenshot)?,
            screenshots: 1,
            current: first,
            step: 0,
            errors_in_row: 0,
            last_action: None,
            repeats: 0,
        };
        let generation = self.generation_options(options.seed);
        let status = loop {
            if let Some(status) = run.stop_before_step() {
                break status;
            }
            let (record, status) = run.step(model, env, &generation, &mut writer, hooks)?;
            writer.append(&record)?;
            hooks.event(&Event::Step { record: &record });
            if let Some(status) = status {
                break status;
            }
        };
        let elapsed_s = start.elapsed().as_secs_f64();
        writer.finish(&RunResult {
            status: status.clone(),
            steps: run.step,
            elapsed_s,
            final_screenshot: Some(run.screenshot_path.clone()),
        })?;
        hooks.event(&Event::Finished { status: &status });
        Ok(RunReport {
            status,
            steps: run.step,
            trace_dir: dir,
            elapsed_s,
        })
    }
}

/// The state of one run between steps.
struct RunState<'a> {
    agent: &'a Agent,
    options: &'a RunOptions,
    secrets: Secrets,
    limits: Limits,
    start: Instant,
    conversation: Conversation,
    current: Observation,
    screenshot_path: String,
    screenshots: usize,
    step: usize,
    errors_in_row: usize,
    /// The last action asked for (its JSON) and the screen it was asked for on.
    last_action: Option<(String, u64)>,
    repeats: usize,
}

impl RunState<'_> {
    fn stop_now(&self) -> Option<RunStatus> {
        if let Some(status) = self.options.stop.check() {
            return Some(status);
        }
        if self.start.elapsed().as_secs_f64() >= self.limits.max_seconds {
            return Some(RunStatus::TimeLimit {
                seconds: self.limits.max_seconds,
            });
        }
        None
    }

    fn stop_before_step(&self) -> Option<RunStatus> {
        if let Some(status) = self.stop_now() {
            return Some(status);
        }
        if self.step >= self.limits.max_steps {
            return Some(RunStatus::MaxSteps { steps: self.step });
        }
        None
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Result<String, AgentError> {
        self.agent.texts.render(name, ctx)
    }

    /// One step; the record to append and, when the run ends here, its status.
    fn step(
        &mut self,
        model: &mut dyn Model,
        env: &mut dyn Environment,
        generation: &GenerationOptions,
        writer: &mut trajectory::TrajectoryWriter,
        hooks: &mut dyn Hooks,
    ) -> Result<(StepRecord, Option<RunStatus>), AgentError> {
        self.step += 1;
        let step_start = Instant::now();
        let (prompt, summary) = self
            .conversation
            .prompt(self.limits.history_images, &self.agent.texts)?;
        let mut record = StepRecord {
            step: self.step,
            screenshot: self.screenshot_path.clone(),
            screenshot_after: None,
            screen_width: self.current.width(),
            screen_height: self.current.height(),
            prompt: summary,
            reply: None,
            stop: None,
            thought: None,
            actions: Vec::new(),
            answer: None,
            errors: Vec::new(),
            result: None,
            timings: Default::default(),
            model_timings: Value::Null,
        };
        let generate_start = Instant::now();
        let completion = model.generate(&prompt, generation);
        record.timings.generate_s = generate_start.elapsed().as_secs_f64();
        let completion = match completion {
            Ok(c) => c,
            Err(e) => {
                let message = self.secrets.redact(&e.to_string());
                record.errors.push(message.clone());
                record.timings.total_s = step_start.elapsed().as_secs_f64();
                let status = if e.is_exhausted() {
                    RunStatus::RepliesExhausted { message }
                } else {
                    RunStatus::Error { message }
                };
                return Ok((record, Some(status)));
            }
        };
        record.reply = Some(self.secrets.redact(&completion.text));
        record.stop = Some(match &completion.stop {
            StopReason::StopString(s) => format!("stop string {s}"),
            other => format!("{other:?}").to_lowercase(),
        });
        record.model_timings = completion.timings.clone();
        hooks.event(&Event::Reply {
            step: self.step,
            text: record.reply.as_deref().unwrap_or(""),
            seconds: record.timings.generate_s,
        });

        let parsed = self.agent.protocol.parse(&completion.text);
        let kept = completion
            .text
            .get(..parsed.turn_end)
            .unwrap_or(&completion.text)
            .to_string();
        record.thought = parsed.thought.as_deref().map(|t| self.secrets.redact(t));
        let markers = parsed.markers;
        let screen = Size::new(self.current.width(), self.current.height());
        let space = self.agent.profile.family.coord_space(model_image_size(
            self.agent.profile.family,
            screen,
            model,
        ));
        let map = CoordMap::new(space, screen, 1.0, (0, 0)).map_err(|e| {
            AgentError::Unsupported(format!(
                "cannot map coordinates onto a {screen} screen: {e}"
            ))
        })?;
        let model_actions: Vec<(std::ops::Range<usize>, Value)> = parsed
            .calls
            .iter()
            .map(|c| {
                (
                    c.span.clone(),
                    serde_json::to_value(&c.action).unwrap_or(Value::Null),
                )
            })
            .collect();
        let mapped = parsed.map(&map);
        let blocking: Vec<ReplyError> = mapped
            .errors
            .iter()
            .filter(|e| {
                !matches!(
                    e.error,
                    ProtocolError::Box { .. } | ProtocolError::BoxCoord { .. }
                )
            })
            .cloned()
            .collect();
        self.conversation.push_reply(&kept);

        let mut status = None;
        let mut failed = false;
        let mut notes: Vec<String> = Vec::new();
        let mut performed = false;
        if !blocking.is_empty() {
            notes.push(self.agent.prompts.parse_errors(&blocking, markers)?);
            record
                .errors
                .extend(blocking.iter().map(|e| self.secrets.redact(&e.to_string())));
            failed = true;
        } else if mapped.calls.is_empty() {
            match mapped.answer.as_deref().map(str::trim) {
                Some(answer) if self.limits.answer_without_call && !answer.is_empty() => {
                    let answer = self.secrets.redact(answer);
                    record.answer = Some(answer.clone());
                    status = Some(RunStatus::Finished { answer });
                }
                _ => {
                    let finish = self.agent.space.name_of(Function::Finish).to_string();
                    let text = self.render("no_call", context! { finish })?;
                    record.errors.push(text.clone());
                    notes.push(text);
                    failed = true;
                }
            }
        } else {
            for call in &mapped.calls {
                let model_value = model_actions
                    .iter()
                    .find(|(span, _)| *span == call.span)
                    .map_or(Value::Null, |(_, v)| v.clone());
                let mut rec = ActionRecord {
                    function: call.function.clone(),
                    text: self.secrets.redact(&call.text),
                    model: model_value,
                    action: redact_action(&self.secrets, &call.action),
                    decision: Decision::Agent,
                    outcome: None,
                    perform_s: 0.0,
                };
                if let Some(stop) = self.stop_now() {
                    rec.decision = Decision::Skipped {
                        reason: stop.describe(),
                    };
                    record.actions.push(rec);
                    status = Some(stop);
                    break;
                }
                match &call.action {
                    Action::Finish { answer } => {
                        let answer = self.secrets.redact(answer.trim());
                        record.answer = Some(answer.clone());
                        status = Some(RunStatus::Finished { answer });
                    }
                    Action::CallUser { question } => match hooks.ask_user(question) {
                        Some(answer) => {
                            notes.push(self.render("user_answer", context! { answer })?);
                        }
                        None => {
                            status = Some(RunStatus::NeedsUser {
                                question: self.secrets.redact(question),
                            })
                        }
                    },
                    action => {
                        if let Some(looping) = self.repeated(action) {
                            rec.decision = Decision::Skipped {
                                reason: looping.describe(),
                            };
                            status = Some(looping);
                        } else {
                            rec.decision = self.decide(action, hooks);
                            match &rec.decision {
                                Decision::Perform => {
                                    let t0 = Instant::now();
                                    let execution = self.perform(env, action);
                                    rec.perform_s = t0.elapsed().as_secs_f64();
                                    record.timings.perform_s += rec.perform_s;
                                    performed = true;
                                    match execution {
                                        Execution::Outcome(outcome) => {
                                            let outcome = redact_outcome(&self.secrets, outcome);
                                            let note = match &outcome {
                                                Outcome::Done => None,
                                                Outcome::Failed { reason } => Some(self.render(
                                                    "failed",
                                                    context! { function => call.function, reason },
                                                )?),
                                                Outcome::Refused { reason } => Some(self.render(
                                                    "refused",
                                                    context! { function => call.function, reason },
                                                )?),
                                            };
                                            if let Some(note) = note {
                                                record.errors.push(note.clone());
                                                notes.push(note);
                                                failed = true;
                                            }
                                            rec.outcome = Some(outcome);
                                        }
                                        Execution::Broken(e) => {
                                            let message = self.secrets.redact(&e.to_string());
                                            record.errors.push(message.clone());
                                            status = Some(RunStatus::Error { message });
                                        }
                                        Execution::Tool(result) => {
                                            let (note, outcome) =
                                                self.tool_note(&call.function, result)?;
                                            if matches!(outcome, Outcome::Failed { .. }) {
                                                record.errors.push(note.clone());
                                                failed = true;
                                            }
                                            notes.push(note);
                                            rec.outcome = Some(outcome);
                                        }
                                    }
                                }
                                Decision::DryRun => notes.push(
                                    self.render("dry_run", context! { function => call.function })?,
                                ),
                                Decision::Denied { reason } | Decision::Declined { reason } => {
                                    let note = self.render(
                                        "refused",
                                        context! { function => call.function, reason },
                                    )?;
                                    record.errors.push(note.clone());
                                    notes.push(note);
                                    failed = true;
                                }
                                Decision::Skipped { .. } | Decision::Agent => {}
                            }
                        }
                    }
                }
                hooks.event(&Event::Action {
                    step: self.step,
                    record: &rec,
                });
                record.actions.push(rec);
                if status.is_some() {
                    break;
                }
            }
        }

        // The new screen: written back to the model, or kept for the record when the run ends
        // after acting.
        let continues = status.is_none();
        if continues || (performed && !matches!(status, Some(RunStatus::Error { .. }))) {
            if self.limits.settle_ms > 0 && performed {
                std::thread::sleep(Duration::from_millis(self.limits.settle_ms));
            }
            let t0 = Instant::now();
            match env.observe() {
                Ok(observation) => {
                    record.timings.observe_s = t0.elapsed().as_secs_f64();
                    self.screenshot_path =
                        writer.save_screenshot(self.screenshots, &observation.screenshot)?;
                    self.screenshots += 1;
                    record.screenshot_after = Some(self.screenshot_path.clone());
                    if continues {
                        let text = self.secrets.redact(&notes.join(" "));
                        self.conversation.push_result(
                            &text,
                            observation.screenshot.clone(),
                            markers,
                        );
                        record.result = Some(text);
                    }
                    self.current = observation;
                }
                Err(e) => {
                    let message = self.secrets.redact(&e.to_string());
                    record.errors.push(message.clone());
                    status.get_or_insert(RunStatus::Error { message });
                }
            }
        }
        self.errors_in_row = if failed { self.errors_in_row + 1 } else { 0 };
        if status.is_none() && self.errors_in_row >= self.limits.max_errors.max(1) {
            status = Some(RunStatus::TooManyErrors {
                errors: self.errors_in_row,
                last: record.errors.last().cloned().unwrap_or_default(),
            });
        }
        record.timings.total_s = step_start.elapsed().as_secs_f64();
        Ok((record, status))
    }

    /// What a tool call writes back (its result, or the `failed` text with the reason, secrets
    /// redacted) and its outcome for the record.
    fn tool_note(
        &self,
        function: &str,
        result: ToolResult,
    ) -> Result<(String, Outcome), AgentError> {
        Ok(match result {
            ToolResult::Ok { text } => (self.secrets.redact(&text), Outcome::Done),
            ToolResult::Failed { reason } => {
                let reason = self.secrets.redact(&reason);
                let note = self.render("failed", context! { function, reason })?;
                (note, Outcome::Failed { reason })
            }
        })
    }

    /// Loop detection: `Some` when `action` is asked for on an unchanged screen for the
    /// `max_repeats`-th time in a row.
    fn repeated(&mut self, action: &Action) -> Option<RunStatus> {
        let key = (
            serde_json::to_string(action).unwrap_or_default(),
            screen_hash(&self.current),
        );
        if self.last_action.as_ref() == Some(&key) {
            self.repeats += 1;
        } else {
            self.last_action = Some(key);
            self.repeats = 1;
        }
        let limit = self.limits.max_repeats;
        (limit > 0 && self.repeats >= limit).then(|| RunStatus::Looping {
            action: action.tag().to_string(),
            times: self.repeats,
        })
    }

    fn decide(&self, action: &Action, hooks: &mut dyn Hooks) -> Decision {
        if let Some(function) = Function::of(action)
            && !self.agent.space.contains(function)
        {
            return Decision::Denied {
                reason: format!(
                    "{} is not one of this agent's functions",
                    function.canonical()
                ),
            };
        }
        let verdict = match safety::check(&self.agent.profile.safety, action) {
            safety::Verdict::Allow => self
                .agent
                .plugins
                .confirmation(action)
                .map_or(safety::Verdict::Allow, safety::Verdict::Confirm),
            other => other,
        };
        let decision = match verdict {
            safety::Verdict::Allow => Decision::Perform,
            safety::Verdict::Deny(reason) => Decision::Denied { reason },
            safety::Verdict::Confirm(reason) => {
                if self.options.dry_run || hooks.confirm(action, &reason) {
                    Decision::Perform
                } else {
                    Decision::Declined {
                        reason: format!("{reason}, and the user did not confirm it"),
                    }
                }
            }
        };
        match decision {
            Decision::Perform if self.options.dry_run => Decision::DryRun,
            other => other,
        }
    }

    fn perform(&self, env: &mut dyn Environment, action: &Action) -> Execution {
        if let Action::Tool { name, args } = action {
            return Execution::Tool(self.agent.plugins.call(name, args));
        }
        let real = match action {
            Action::Type { text } if Secrets::mentions(text) => match self.secrets.reveal(text) {
                Ok(text) => Action::Type { text },
                Err(reason) => return Execution::Outcome(Outcome::Refused { reason }),
            },
            other => other.clone(),
        };
        match env.perform(&real) {
            Ok(outcome) => Execution::Outcome(outcome),
            Err(e) => Execution::Broken(e),
        }
    }
}

/// The size of the image a model of `family` sees for a `screen` screenshot: the backend's own
/// resizing when it knows it, else Qwen2-VL's default smart_resize budget. Only families with
/// pixel coordinates use it.
fn model_image_size(family: ModelFamily, screen: Size, model: &dyn Model) -> Size {
    if family == ModelFamily::Qwen2Vl {
        return screen;
    }
    if let Some((w, h)) = model.model_image_size((screen.width, screen.height)) {
        return Size::new(w, h);
    }
    match crate::engine::image::smart_resize(
        screen.height,
        screen.width,
        28,
        56 * 56,
        28 * 28 * 16384,
    ) {
        Ok((h, w)) => Size::new(w, h),
        Err(_) => screen,
    }
}

fn screen_hash(observation: &Observation) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    observation.screenshot.dimensions().hash(&mut h);
    observation.screenshot.as_raw().hash(&mut h);
    h.finish()
}

fn redact_action(secrets: &Secrets, action: &Action) -> Action {
    match action {
        Action::Type { text } => Action::Type {
            text: secrets.redact(text),
        },
        other => other.clone(),
    }
}

fn redact_outcome(secrets: &Secrets, outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Done => Outcome::Done,
        Outcome::Failed { reason } => Outcome::Failed {
            reason: secrets.redact(&reason),
        },
        Outcome::Refused { reason } => Outcome::Refused {
            reason: secrets.redact(&reason),
        },
    }
}

/// Opens the environment a profile names. `device`: an Android serial or a desktop monitor.
pub fn open_environment(
    profile: &Profile,
    device: Option<&str>,
) -> Result<Box<dyn Environment>, AgentError> {
    match profile.environment {
        EnvironmentKind::Virtual => {
            let spec = profile.screen.as_ref().ok_or_else(|| AgentError::Profile {
                path: PathBuf::from(&profile.name),
                message: "a virtual environment needs a [screen] table".into(),
            })?;
            Ok(Box::new(spec.build()))
        }
        EnvironmentKind::Desktop => {
            use crate::environment::desktop::{DesktopEnvironment, DesktopTarget};
            // `--device` names a monitor, or a window as `window:TITLE`.
            let target = match device {
                None => DesktopTarget::Primary,
                Some(d) => match d.strip_prefix("window:") {
                    Some(title) => DesktopTarget::Window(title.to_string()),
                    None => DesktopTarget::Monitor(d.to_string()),
                },
            };
            let env = DesktopEnvironment::open(target).map_err(|e| {
                AgentError::Environment(EnvironmentError::Unavailable(e.to_string()))
            })?;
            Ok(Box::new(env))
        }
        EnvironmentKind::Android => {
            let env = crate::environment::android::AndroidDevice::connect(device).map_err(|e| {
                AgentError::Environment(EnvironmentError::Unavailable(e.to_string()))
            })?;
            Ok(Box::new(env))
        }
    }
}
