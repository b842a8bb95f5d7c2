//! `vlad run "TASK"`: one task, start to end. Progress on stderr, the answer on stdout, and an
//! exit status that tells finished (0) / error (1) / needs the user (3) / gave up (4) /
//! stopped (5).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};

use vlad::action::Action;
use vlad::agent::{self, Agent, Event, Hooks, Profile, RunOptions, Secrets, StopSignal};
use vlad::engine::LoadOptions;
use vlad::environment::Outcome;
use vlad::model::{self, EmbeddedModel, Model, OpenAiConfig, OpenAiModel, ReplayModel};

use super::{DeviceArg, DtypeArg};

/// Where replies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The embedded Qwen2-VL engine (--model).
    Embedded,
    /// An OpenAI-compatible server (--base-url, --served-model).
    Openai,
    /// Recorded replies (--replies).
    Replay,
}

/// Where a command's model replies come from: the embedded engine (default), an
/// OpenAI-compatible server, or recorded replies. Shared by the commands that ask a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    #[arg(long, value_enum, default_value = "embedded")]
    pub backend: Backend,
    /// Embedded backend: a model folder or hub id [default: the profile's, else Qwen/Qwen2-VL-2B-Instruct].
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub model: Option<String>,
    /// Embedded backend: where to compute.
    #[arg(long, value_enum, default_value = "cpu")]
    pub compute: DeviceArg,
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    /// Embedded backend: store the language model's linear layers quantized (q8_0: 3.5× fewer
    /// bytes per token than f32, q4k: 6×), for faster decoding on a CPU.
    #[arg(long, value_name = "q8_0|q4k")]
    pub quantize: Option<vlad::engine::Quantization>,
    /// OpenAI backend: the API root, e.g. http://localhost:8000/v1.
    #[arg(long, env = "VLAD_OPENAI_BASE_URL")]
    pub base_url: Option<String>,
    /// OpenAI backend: the served model name.
    #[arg(long, env = "VLAD_OPENAI_MODEL")]
    pub served_model: Option<String>,
    /// OpenAI backend: the API key [env: VLAD_OPENAI_API_KEY, else OPENAI_API_KEY].
    #[arg(long, hide_env_values = true, env = "VLAD_OPENAI_API_KEY")]
    pub api_key: Option<String>,
    /// OpenAI backend: seconds per request.
    #[arg(long, default_value_t = 120.0, env = "VLAD_OPENAI_TIMEOUT")]
    pub timeout: f64,
    /// OpenAI backend: further attempts after a timeout or a 5xx answer.
    #[arg(long, default_value_t = 3, env = "VLAD_OPENAI_RETRIES")]
    pub retries: u32,
    /// Replay backend: a JSON Lines file of {"reply": "..."}, one per model call (a step of `vlad run`).
    #[arg(long, value_name = "FILE")]
    pub replies: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The task, in plain language. `{{secret:NAME}}` is typed as the secret's value and never
    /// shown or recorded.
    task: String,
    /// An agent profile: desktop, android, virtual, or a TOML file.
    #[arg(long, default_value = "desktop")]
    agent: String,
    /// The device: an Android serial, or a desktop monitor.
    #[arg(long, value_name = "SERIAL")]
    device: Option<String>,
    /// Tool plugins: a folder of manifests (e.g. tools) or one manifest file; repeatable, and
    /// added to the profile's `tools`.
    #[arg(long = "tools", value_name = "DIR")]
    tools: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// At most this many model calls [default: the profile's].
    #[arg(long)]
    max_steps: Option<usize>,
    /// At most this many seconds [default: the profile's].
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Do everything but act; the trajectory shows what would have happened.
    #[arg(long)]
    dry_run: bool,
    /// The run folder [default: under the user's state directory].
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// Ask on the terminal when the agent calls the user or needs a confirmation.
    #[arg(long)]
    interactive: bool,
    /// A file of NAME=value lines for {{secret:NAME}} (else VLAD_SECRET_NAME).
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Stop between actions once this file exists.
    #[arg(long, value_name = "PATH")]
    abort_file: Option<PathBuf>,
    /// Print the result as one JSON object on stdout instead of the answer.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Progress on stderr; questions on the terminal when interactive.
struct TerminalHooks {
    interactive: bool,
}

impl TerminalHooks {
    fn ask(&self, question: &str) -> Option<String> {
        if !self.interactive {
            return None;
        }
        eprint!("{question} ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        match std::io::stdin().lock().read_line(&mut line) {
            Ok(n) if n > 0 => Some(line.trim_end_matches(['\r', '\n']).to_string()),
            _ => None,
        }
    }
}

fn short(text: &str, max: usize) -> String {
    // One line, without control characters a garbled reply may hold.
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

impl Hooks for TerminalHooks {
    fn event(&mut self, event: &Event<'_>) {
        match event {
            Event::Started { dir, meta } => {
                eprintln!(
                    "vlad: {} on {} with {}; trace in {}",
                    meta.profile,
                    meta.environment.identity,
                    meta.model,
                    dir.display()
                );
            }
            Event::Reply {
                step,
                text,
                seconds,
            } => eprintln!("step {step}: reply in {seconds:.2} s: {}", short(text, 120)),
            Event::Action { step, record } => {
                let what = serde_json::to_string(&record.action).unwrap_or_default();
                let outcome = match (&record.decision, &record.outcome) {
                    (_, Some(Outcome::Done)) => "done".to_string(),
                    (_, Some(Outcome::Failed { reason })) => format!("failed: {reason}"),
                    (_, Some(Outcome::Refused { reason })) => format!("refused: {reason}"),
                    (d, None) => serde_json::to_value(d)
                        .ok()
                        .and_then(|v| v.get("decision").and_then(|d| d.as_str()).map(String::from))
                        .unwrap_or_default(),
                };
                eprintln!(
                    "step {step}: {what} -> {outcome} ({:.2} s)",
                    record.perform_s
                );
            }
            Event::Step { record } => {
                for e in &record.errors {
                    eprintln!("step {}: error: {}", record.step, short(e, 200));
                }
            }
            Event::Finished { status } => eprintln!("vlad: {}", status.describe()),
        }
    }

    fn confirm(&mut self, action: &Action, reason: &str) -> bool {
        let what = serde_json::to_string(action).unwrap_or_default();
        self.ask(&format!("vlad: {what}: {reason}. Perform it? [y/N]"))
            .is_some_and(|a| matches!(a.trim().to_lowercase().as_str(), "y" | "yes"))
    }

    fn ask_user(&mut self, question: &str) -> Option<String> {
        self.ask(&format!("vlad asks: {question}\n>"))
    }
}

/// Opens the model `args` choose; `default_model` is the embedded model when `--model` names
/// none (an agent profile's), else [`model::DEFAULT_MODEL`].
pub fn open_model(args: &ModelArgs, default_model: Option<&str>) -> anyhow::Result<Box<dyn Model>> {
    Ok(match args.backend {
        Backend::Embedded => {
            let spec = args
                .model
                .clone()
                .or_else(|| default_model.map(String::from))
                .unwrap_or_else(|| model::DEFAULT_MODEL.to_string());
            eprintln!("vlad: loading {spec} …");
            let device = args.compute.open()?;
            let options = LoadOptions {
                dtype: args.dtype.resolve(&device),
                device,
                quantize: args.quantize,
                ..Default::default()
            };
            Box::new(EmbeddedModel::load(&spec, &options)?)
        }
        Backend::Openai => {
            let base_url = args.base_url.clone().context(
                "--backend openai needs --base-url URL (or VLAD_OPENAI_BASE_URL), e.g. http://localhost:8000/v1",
            )?;
            let served = args
                .served_model
                .clone()
                .context("--backend openai needs --served-model NAME (or VLAD_OPENAI_MODEL)")?;
            let mut config = OpenAiConfig::new(base_url, served);
            config.api_key = args
                .api_key
                .clone()
                .or_else(|| std::env::var("OPENAI_API_KEY").ok())
                .filter(|k| !k.is_empty());
            if !(args.timeout.is_finite() && args.timeout > 0.0) {
                anyhow::bail!("--timeout must be a positive number of seconds");
            }
            config.timeout = Duration::from_secs_f64(args.timeout);
            config.max_retries = args.retries;
            Box::new(OpenAiModel::new(config)?)
        }
        Backend::Replay => {
            let path = args.replies.as_ref().context(
                "--backend replay needs --replies FILE (JSON Lines of {\"reply\": ...})",
            )?;
            Box::new(ReplayModel::open(path)?)
        }
    })
}

fn run_task(args: RunArgs) -> anyhow::Result<u8> {
    let profile = Profile::load(&args.agent)?;
    let tool_paths: Vec<PathBuf> = profile.tools.iter().chain(&args.tools).cloned().collect();
    let agent = Agent::new(profile)?.with_plugins(super::tools::load(&tool_paths)?);
    let secrets = match &args.secrets {
        Some(path) => Secrets::from_file(path)?,
        None => Secrets::new(),
    };
    // Fail on missing secrets before loading a model.
    Secrets::for_text(&args.task, &secrets)?;
    let mut env = agent::open_environment(agent.profile(), args.device.as_deref())?;
    let mut model = open_model(&args.model, agent.profile().model.as_deref())?;
    let mut stop = StopSignal::new();
    if let Some(path) = &args.abort_file {
        stop = stop.with_abort_file(path);
    }
    let flag = stop.flag();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("vlad: stopping after the current action (Ctrl-C again to quit at once)");
    });
    if let Err(e) = installed {
        tracing::warn!("cannot catch Ctrl-C: {e}");
    }
    let options = RunOptions {
        dry_run: args.dry_run,
        max_steps: args.max_steps,
        max_seconds: args.max_seconds,
        trace_dir: args.trace.clone(),
        secrets,
        stop,
        seed: args.seed,
    };
    let mut hooks = TerminalHooks {
        interactive: args.interactive,
    };
    let report = agent.run(
        &args.task,
        model.as_mut(),
        env.as_mut(),
        &options,
        &mut hooks,
    )?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "status": report.status,
            "steps": report.steps,
            "elapsed_s": report.elapsed_s,
            "trace": report.trace_dir,
        });
        writeln!(out, "{value}")?;
    } else {
        match &report.status {
            agent::RunStatus::Finished { answer } => writeln!(out, "{answer}")?,
            agent::RunStatus::NeedsUser { question } => writeln!(out, "{question}")?,
            _ => {}
        }
    }
    Ok(report.status.exit_code())
}

/// Runs the command; the exit status says how the run ended.
pub fn main(args: RunArgs) -> ExitCode {
    match run_task(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
