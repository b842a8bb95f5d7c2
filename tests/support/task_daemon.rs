//! A real `vlad serve` for the task API tests: started on a loopback port with its own data
//! dir, plain HTTP requests, an event-stream reader that follows the browser's EventSource rules
//! (`event:`/`data:`/`id:` fields, multi-line data, comments, blank-line dispatch,
//! `Last-Event-ID`), and process helpers (SIGTERM, SIGKILL, resident memory).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny random checkpoint of the engine tests.
pub fn tiny_a() -> PathBuf {
    root().join("tests/fixtures/engine/tiny-a")
}

/// A running `vlad serve`, killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub url: String,
    pub token: Option<String>,
    pub data_dir: PathBuf,
    pub token_file: PathBuf,
}

impl Daemon {
    /// `vlad serve --listen 127.0.0.1:0 --model MODEL --data-dir DATA --token-file … EXTRA…`;
    /// waits for its "listening on" line.
    pub fn start(model: &Path, data_dir: &Path, token_file: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_with_env(model, data_dir, token_file, extra, &[])
    }

    pub fn start_with_env(
        model: &Path,
        data_dir: &Path,
        token_file: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlad"));
        cmd.args([
            "serve",
            "--dtype",
            "f32",
            "--listen",
            "127.0.0.1:0",
            "--model",
        ])
        .arg(model)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let no_auth = extra.contains(&"--no-auth");
        if !no_auth {
            cmd.arg("--token-file").arg(token_file);
        }
        let mut child = cmd.spawn().context("cannot start vlad serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                eprintln!("[daemon] {line}");
                if let Some(url) = line.strip_prefix("vlad serve: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                bail!("vlad serve did not report its address within 120 s");
            }
        };
        let token = if no_auth {
            None
        } else {
            Some(std::fs::read_to_string(token_file)?.trim().to_string())
        };
        Ok(Self {
            child: Some(child),
            url,
            token,
            data_dir: data_dir.to_path_buf(),
            token_file: token_file.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn agent(timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into()
    }

    /// One request with the daemon's token; the status, the `Retry-After` header and the body
    /// as text.
    pub fn raw(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Option<String>, String)> {
        self.raw_as(agent, method, path, body, self.token.as_deref())
    }

    /// [`Daemon::raw`] with `token` in place of the daemon's (`None`: no `Authorization`).
    pub fn raw_as(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> Result<(u16, Option<String>, String)> {
        let url = format!("{}{path}", self.url);
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut response = match method {
            "GET" => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()?
            }
            "POST" => {
                let mut r = agent.post(&url).header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(body.unwrap_or(""))?
            }
            "DELETE" => {
                let mut r = agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()?
            }
            _ => bail!("unsupported method {method}"),
        };
        let status = response.status().as_u16();
        let retry = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response.body_mut().read_to_string()?;
        Ok((status, retry, text))
    }

    /// One request; the status and the body parsed as JSON.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
        self.request_as(method, path, body, self.token.as_deref())
    }

    /// [`Daemon::request`] with `token` in place of the daemon's (`None`: no `Authorization`).
    pub fn request_as(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> Result<(u16, Value)> {
        let agent = Self::agent(Duration::from_secs(60));
        let (status, _, text) = self.raw_as(&agent, method, path, body, token)?;
        let value = serde_json::from_str(&text).with_context(|| {
            format!("{method} {path}: HTTP {status} body is not JSON: {text:?}")
        })?;
        Ok((status, value))
    }

    /// `GET /v1/tasks/{id}` until `done(record)` holds.
    pub fn wait_for(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            let (status, record) = self.request("GET", &format!("/v1/tasks/{id}"), None)?;
            if status != 200 {
                bail!("GET /v1/tasks/{id}: HTTP {status}: {record}");
            }
            if done(&record) {
                return Ok(record);
            }
            if start.elapsed() > limit {
                bail!("task {id} did not get there within {limit:?}: {record}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the task has ended (any final state).
    pub fn wait_ended(&self, id: &str, limit: Duration) -> Result<Value> {
        self.wait_for(id, limit, |r| {
            !matches!(r["state"].as_str(), Some("queued" | "running"))
        })
    }

    /// Opens `/v1/tasks/{id}/events` (optionally with `Last-Event-ID`); events arrive on the
    /// returned channel as they are parsed, the channel closing when the stream does.
    pub fn events(&self, id: &str, last_event_id: Option<u64>) -> Result<EventStream> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let mut request = agent
            .get(format!("{}/v1/tasks/{id}/events", self.url))
            .header("Accept", "text/event-stream");
        if let Some(t) = &self.token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(n) = last_event_id {
            request = request.header("Last-Event-ID", n.to_string());
        }
        let response = request.call()?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if status != 200 {
            let text = response.into_body().read_to_string()?;
            bail!("GET /v1/tasks/{id}/events: HTTP {status}: {text}");
        }
        if !content_type.starts_with("text/event-stream") {
            bail!("the event stream's content type is {content_type:?}");
        }
        let reader = response.into_body().into_reader();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || parse_event_stream(reader, |e| tx.send(e).is_ok()));
        Ok(EventStream { rx })
    }

    /// Stops the daemon with `signal` and waits for it to exit within `limit`.
    pub fn stop(&mut self, signal: &str, limit: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("the daemon is not running")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} failed");
        }
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = child.try_wait()? {
                self.child = None;
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("vlad serve did not stop within {limit:?} of SIG{signal}")
    }

    /// The daemon's resident memory in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> Result<u64> {
        self.proc_status("VmRSS:")
    }

    /// The daemon's thread count (`Threads` of /proc/PID/status).
    pub fn threads(&self) -> Result<u64> {
        self.proc_status("Threads:")
    }

    fn proc_status(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field} line"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One Server-Sent Event as a browser's EventSource dispatches it.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `message` when the stream gave no `event:` field.
    pub event: String,
    pub data: String,
    /// The last event id seen so far (EventSource's `lastEventId`).
    pub last_event_id: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// Events as they are parsed from a live stream.
pub struct EventStream {
    rx: mpsc::Receiver<SseEvent>,
}

impl EventStream {
    /// The next event, or `None` when the stream ended or nothing came within `limit`.
    pub fn next(&self, limit: Duration) -> Option<SseEvent> {
        self.rx.recv_timeout(limit).ok()
    }

    /// Every event up to and including the first named `until` (bounded by `limit`).
    pub fn collect_until(&self, until: &str, limit: Duration) -> Result<Vec<SseEvent>> {
        let start = Instant::now();
        let mut out = Vec::new();
        loop {
            let left = limit.saturating_sub(start.elapsed());
            match self.rx.recv_timeout(left) {
                Ok(e) => {
                    let stop = e.event == until;
                    out.push(e);
                    if stop {
                        return Ok(out);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no {until:?} event within {limit:?}; got {out:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the stream ended before an {until:?} event; got {out:?}")
                }
            }
        }
    }

    /// True when the stream has ended (nothing more within `limit` and the sender is gone).
    pub fn ended(&self, limit: Duration) -> bool {
        matches!(
            self.rx.recv_timeout(limit),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    }
}

/// The EventSource parsing rules (HTML standard, "event stream interpretation"): lines end in
/// CRLF, LF or CR; a line starting with `:` is a comment; `field: value` with one leading space
/// dropped; `data` lines join with `\n`; `id` sets the last event id; a blank line dispatches
/// (nothing when the data buffer is empty).
pub fn parse_event_stream(mut reader: impl Read, mut emit: impl FnMut(SseEvent) -> bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut event = String::new();
    let mut data = String::new();
    let mut last_id = String::new();
    let mut pending_cr = false;
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if pending_cr {
                pending_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            if b != b'\n' && b != b'\r' {
                buf.push(b);
                continue;
            }
            pending_cr = b == b'\r';
            let line = String::from_utf8_lossy(&buf).into_owned();
            buf.clear();
            if line.is_empty() {
                if !data.is_empty() {
                    let e = SseEvent {
                        event: if event.is_empty() {
                            "message".into()
                        } else {
                            event.clone()
                        },
                        data: data.strip_suffix('\n').unwrap_or(&data).to_string(),
                        last_event_id: last_id.clone(),
                    };
                    if !emit(e) {
                        return;
                    }
                }
                event.clear();
                data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "event" => event = value.to_string(),
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "id" if !value.contains('\0') => last_id = value.to_string(),
                _ => {}
            }
        }
    }
}

/// A copy of the built-in virtual profile whose actions take `settle_ms` each (the agent waits
/// that long after acting) and whose loop detection is off, so replayed `Wait` steps keep a
/// task running for a while.
pub fn slow_virtual_profile(dir: &Path, settle_ms: u64) -> Result<PathBuf> {
    let source = std::fs::read_to_string(root().join("agents/virtual.toml"))?;
    let source = source
        .replace("name = \"virtual\"", "name = \"slow-virtual\"")
        .replace("max_repeats = 3", "max_repeats = 0")
        .replace("[limits]", &format!("[limits]\nsettle_ms = {settle_ms}"));
    let path = dir.join("slow-virtual.toml");
    std::fs::write(&path, source)?;
    Ok(path)
}

/// Replies for the virtual screen: `waits` × a Wait, then a Finish with `answer`.
pub fn wait_replies(waits: usize, answer: &str) -> Vec<String> {
    let mut replies: Vec<String> = (0..waits)
        .map(|i| format!("Waiting ({i}). *FUNCTION*: Wait *ARGS*: {{\"seconds\": 1}}"))
        .collect();
    replies.push(format!(
        " *FUNCTION*: Finish *ARGS*: {{\"answer\": \"{answer}\"}}"
    ));
    replies
}

/// Replies that click the name field, type `text` and finish with `answer`.
pub fn form_replies(text: &str, answer: &str) -> Vec<String> {
    vec![
        "I need to click the name field.\n*FUNCTION*: Click *ARGS*: {\"point\": (500,200)}".into(),
        format!(" The field has focus. *FUNCTION*: Type *ARGS*: {{\"text\": \"{text}\"}}"),
        format!(" Typed. *FUNCTION*: Finish *ARGS*: {{\"answer\": \"{answer}\"}}"),
    ]
}
