//! `vlad tasks`: submit, list, show, watch and cancel tasks of a running `vlad serve` over its
//! HTTP API (`/v1/tasks`). `watch` reads the task's Server-Sent Events as they come and
//! reconnects with `Last-Event-ID` when the connection drops.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use vlad::daemon;

/// Times a dropped event stream is reopened before `watch` gives up.
const RECONNECTS: usize = 5;

#[derive(Debug, clap::Args)]
pub struct TasksArgs {
    /// The daemon's address.
    #[arg(long, env = "VLAD_URL", default_value_t = default_url(), global = true)]
    url: String,
    /// The bearer token (default: read from --token-file).
    #[arg(long, env = "VLAD_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Where the daemon keeps its token (default <config dir>/vlad/token); none is sent when
    /// the file does not exist (a daemon run with --no-auth).
    #[arg(long, env = "VLAD_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: TasksCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TasksCommand {
    /// Queue a task; prints its record (or, with --watch, its events and exits as `vlad run`).
    Submit {
        task: String,
        /// A built-in profile (virtual, desktop, android) or a profile file on the daemon's machine.
        #[arg(long)]
        profile: Option<String>,
        /// virtual, virtual:NAME, desktop, desktop:MONITOR, window:TITLE or an ADB serial.
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        max_steps: Option<usize>,
        #[arg(long)]
        max_seconds: Option<f64>,
        #[arg(long)]
        dry_run: bool,
        /// Recorded replies (`{"reply": …}` per line), read here and sent with the task, instead
        /// of the daemon's model.
        #[arg(long)]
        replies: Option<PathBuf>,
        /// Follow the task's events until it ends.
        #[arg(long)]
        watch: bool,
        /// With --watch: print each event as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// List tasks, newest first.
    List {
        /// Only tasks in this state (queued, running, done, cancelled, failed, interrupted).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print one task's record as JSON.
    Show { id: String },
    /// Print a task's events as they come (past ones first) until it ends; the exit status is
    /// that of `vlad run` (0 finished, 1 failed, 3 needs the user, 4 gave up, 5 stopped).
    Watch {
        id: String,
        /// Print each event as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued task, or stop a running one after its current action.
    Cancel { id: String },
}

fn default_url() -> String {
    format!("http://{}", daemon::DEFAULT_LISTEN)
}

/// The daemon's address and credentials.
struct Client {
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(args: &TasksArgs) -> anyhow::Result<Self> {
        let token = match &args.token {
            Some(t) => Some(t.clone()),
            None => {
                let path = match &args.token_file {
                    Some(p) => p.clone(),
                    None => daemon::auth::default_token_path()?,
                };
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(text.trim().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => bail!("cannot read the token file {}: {e}", path.display()),
                }
            }
        };
        Ok(Self {
            base: args.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn agent(timeout: Option<Duration>) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into()
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// One JSON request; an HTTP error becomes an error naming the daemon's message.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let agent = Self::agent(Some(Duration::from_secs(60)));
        let result = match method {
            "GET" => {
                let mut r = agent.get(&url);
                if let Some(a) = self.auth() {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = agent.post(&url).header("Content-Type", "application/json");
                if let Some(a) = self.auth() {
                    r = r.header("Authorization", a);
                }
                r.send(body.map(Value::to_string).unwrap_or_default())
            }
        };
        let mut response = result.with_context(|| {
            format!("cannot reach the daemon at {url}; is `vlad serve` running (--url)?")
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("{method} {url}: cannot read the answer"))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{method} {url}: HTTP {status}, not JSON: {text}"))?;
        if status >= 400 {
            let message = value["error"]["message"].as_str().unwrap_or(&text);
            let hint = if status == 401 {
                " (pass --token or --token-file)"
            } else {
                ""
            };
            bail!("{method} {path}: HTTP {status}: {message}{hint}");
        }
        Ok(value)
    }

    /// Follows `/v1/tasks/{id}/events`, calling `on_event(id, event, data)` per event, until
    /// the `end` event; returns its data (the final record).
    fn watch(
        &self,
        id: &str,
        mut on_event: impl FnMut(u64, &str, &Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/v1/tasks/{id}/events", self.base);
        let mut last_id: u64 = 0;
        let mut tries = 0;
        loop {
            let agent = Self::agent(None);
            let mut request = agent.get(&url).header("Accept", "text/event-stream");
            if let Some(a) = self.auth() {
                request = request.header("Authorization", a);
            }
            if last_id > 0 {
                request = request.header("Last-Event-ID", last_id.to_string());
            }
            let response = request.call().with_context(|| {
                format!("cannot reach the daemon at {url}; is `vlad serve` running (--url)?")
            })?;
            let status = response.status().as_u16();
            if status >= 400 {
                let text = response.into_body().read_to_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or(text);
                bail!("GET /v1/tasks/{id}/events: HTTP {status}: {message}");
            }
            let reader = BufReader::new(response.into_body().into_reader());
            let mut event = String::new();
            let mut data = String::new();
            let mut event_id: Option<u64> = None;
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if line.is_empty() {
                    // A blank line dispatches the event (a browser's EventSource rules).
                    if !data.is_empty() {
                        let value: Value = serde_json::from_str(&data)
                            .with_context(|| format!("event data is not JSON: {data}"))?;
                        let name = if event.is_empty() { "message" } else { &event };
                        if let Some(n) = event_id {
                            last_id = n;
                        }
                        on_event(last_id, name, &value)?;
                        if name == "end" {
                            return Ok(value);
                        }
                    }
                    event.clear();
                    data.clear();
                    event_id = None;
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((&line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = value.to_string(),
                    "data" => {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(value);
                    }
                    "id" => event_id = value.parse().ok(),
                    _ => {}
                }
            }
            tries += 1;
            if tries > RECONNECTS {
                bail!("the event stream of {id} kept dropping; see `vlad tasks show {id}`");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The exit status `vlad run` would give for a final record.
fn exit_status(record: &Value) -> u8 {
    match record["state"].as_str() {
        Some("done") => match record["result"]["status"].as_str() {
            Some("finished") => 0,
            Some("needs_user") => 3,
            Some("interrupted" | "aborted") => 5,
            Some("error") => 1,
            _ => 4,
        },
        Some("cancelled" | "interrupted") => 5,
        _ => 1,
    }
}

/// One line for people per event.
fn describe(event: &str, data: &Value) -> Option<String> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Some(match event {
        "state" => format!("state: {}", s(&data["state"])),
        "started" => format!(
            "started on {} with {}",
            s(&data["environment"]["identity"]),
            s(&data["model"])
        ),
        "step" => {
            let actions: Vec<String> = data["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| s(&a["text"]))
                .collect();
            let mut line = format!(
                "step {}: {}",
                data["step"],
                if actions.is_empty() {
                    "(no action)".to_string()
                } else {
                    actions.join("; ")
                }
            );
            if let Some(t) = data["thought"].as_str().filter(|t| !t.trim().is_empty()) {
                line.push_str(&format!("\n  thought: {}", t.trim()));
            }
            for e in data["errors"].as_array().into_iter().flatten() {
                line.push_str(&format!("\n  error: {}", s(e)));
            }
            line.push_str(&format!(
                "\n  {:.2} s",
                data["timings"]["total_s"].as_f64().unwrap_or(0.0)
            ));
            if let Some(url) = data["screenshot_after_url"].as_str() {
                line.push_str(&format!("; screenshot {url}"));
            }
            line
        }
        "finished" => s(&data["summary"]),
        "cancel_requested" => "cancel requested; stopping after the current action".into(),
        "end" => format!("{}: {}", s(&data["id"]), s(&data["state"])),
        _ => return None,
    })
}

fn watch(client: &Client, id: &str, json_lines: bool) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let record = client.watch(id, |n, event, data| {
        if json_lines {
            writeln!(out, "{}", json!({"id": n, "event": event, "data": data}))?;
        } else if let Some(line) = describe(event, data) {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        Ok(())
    })?;
    if !json_lines && let Some(answer) = record["answer"].as_str() {
        writeln!(out, "answer: {answer}")?;
    }
    Ok(ExitCode::from(exit_status(&record)))
}

pub fn main(args: TasksArgs) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: TasksArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args)?;
    match args.command {
        TasksCommand::Submit {
            task,
            profile,
            device,
            max_steps,
            max_seconds,
            dry_run,
            replies,
            watch: follow,
            json,
        } => {
            let mut body = json!({"task": task, "dry_run": dry_run});
            for (key, value) in [
                ("profile", profile.map(Value::from)),
                ("device", device.map(Value::from)),
                ("max_steps", max_steps.map(Value::from)),
                ("max_seconds", max_seconds.map(Value::from)),
            ] {
                if let Some(v) = value {
                    body[key] = v;
                }
            }
            if let Some(path) = replies {
                // Checked first for its clear messages about malformed lines.
                vlad::model::ReplayModel::open(&path)?;
                let text = std::fs::read_to_string(&path)?;
                let lines: Vec<Value> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str::<Value>(l).map(|v| v["reply"].clone()))
                    .collect::<Result<_, _>>()?;
                body["replies"] = Value::from(lines);
            }
            let record = client.call("POST", "/v1/tasks", Some(&body))?;
            let id = record["id"]
                .as_str()
                .context("the daemon's answer has no id")?;
            if follow {
                eprintln!("{id}: {}", record["state"].as_str().unwrap_or_default());
                return watch(&client, id, json);
            }
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
        TasksCommand::List { state, limit, json } => {
            let mut path = format!("/v1/tasks?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            let list = client.call("GET", &path, None)?;
            let records = list["data"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&Value::from(records))?);
            } else {
                for r in records {
                    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                    println!(
                        "{}\t{}\t{}\t{} steps\t{}",
                        s(&r["id"]),
                        s(&r["state"]),
                        s(&r["device"]),
                        r["steps"],
                        s(&r["task"]).replace('\n', " ")
                    );
                }
            }
        }
        TasksCommand::Show { id } => {
            let record = client.call("GET", &format!("/v1/tasks/{id}"), None)?;
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
        TasksCommand::Watch { id, json } => return watch(&client, &id, json),
        TasksCommand::Cancel { id } => {
            let record = client.call("POST", &format!("/v1/tasks/{id}/cancel"), None)?;
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
