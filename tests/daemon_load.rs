//! `vlad serve` under load, against the real binary on loopback: 50 concurrent API clients for
//! about a minute (task lists, models, health, task records and event streams, task submits on
//! virtual devices, a few chat completions on the tiny checkpoint) get no error other than
//! queueing (429 with `Retry-After`), every accepted task ends, and the daemon's resident memory
//! is flat afterwards; then 1,000 malformed requests each get a JSON 4xx and the daemon keeps
//! serving.

#[path = "support/task_daemon.rs"]
mod task_daemon;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use task_daemon::{Daemon, form_replies, tiny_a};

const CLIENTS: usize = 50;
/// How long the clients keep at it: the minute (the whole test stays within 100 s).
const LOAD_TIME: Duration = Duration::from_secs(60);
/// Each client submits a task this often.
const SUBMIT_EVERY: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    queued_back: AtomicUsize,
    submitted: AtomicUsize,
    chats: AtomicUsize,
    streams: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    }

    /// 2xx is fine; 429/503 only with a retry hint; anything else is an error.
    fn check(&self, what: &str, status: u16, retry: Option<&str>, body: &str) -> bool {
        match status {
            200..=299 => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            429 | 503 if retry.is_some() => {
                self.queued_back.fetch_add(1, Ordering::Relaxed);
                false
            }
            _ => {
                self.error(format!("{what}: HTTP {status}: {body}"));
                false
            }
        }
    }
}

fn client(daemon: &Daemon, n: usize, stop: &AtomicBool, tally: &Tally, submit_every: Duration) {
    let agent = Daemon::agent(Duration::from_secs(60));
    let mut last_task: Option<String> = None;
    let mut next_submit = Instant::now() + submit_every.mul_f64(n as f64 / CLIENTS as f64);
    let mut i = n;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let result = if Instant::now() >= next_submit {
            next_submit += submit_every;
            let body = json!({"task": format!("client {n} task {i}"),
                              "device": format!("virtual:{}", n % 5),
                              "replies": form_replies("load", &format!("answer {n}-{i}"))});
            daemon
                .raw(&agent, "POST", "/v1/tasks", Some(&body.to_string()))
                .map(|(s, r, b)| {
                    if tally.check("POST /v1/tasks", s, r.as_deref(), &b) {
                        tally.submitted.fetch_add(1, Ordering::Relaxed);
                        let v: Value = serde_json::from_str(&b).unwrap_or_default();
                        last_task = v["id"].as_str().map(str::to_string);
                    }
                })
        } else if n < 4 && i.is_multiple_of(400) {
            let body = json!({"model": "tiny-a", "max_tokens": 3, "temperature": 0,
                              "messages": [{"role": "user", "content": format!("hello {i}")}]});
            daemon
                .raw(
                    &agent,
                    "POST",
                    "/v1/chat/completions",
                    Some(&body.to_string()),
                )
                .map(|(s, r, b)| {
                    if tally.check("POST /v1/chat/completions", s, r.as_deref(), &b) {
                        tally.chats.fetch_add(1, Ordering::Relaxed);
                    }
                })
        } else if i.is_multiple_of(97)
            && let Some(id) = &last_task
        {
            // A late client on a task's event stream, read to its end.
            match daemon.events(id, None) {
                Ok(s) => match s.collect_until("end", Duration::from_secs(30)) {
                    Ok(_) => {
                        tally.streams.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        } else {
            let path = match i % 10 {
                0..=3 => "/v1/tasks?limit=20".to_string(),
                4 | 5 => "/v1/models".to_string(),
                6 | 7 => "/health".to_string(),
                _ => match &last_task {
                    Some(id) if i.is_multiple_of(2) => format!("/v1/tasks/{id}"),
                    Some(id) => format!("/v1/tasks/{id}/trajectory"),
                    None => "/health".to_string(),
                },
            };
            daemon.raw(&agent, "GET", &path, None).map(|(s, r, b)| {
                tally.check(&format!("GET {path}"), s, r.as_deref(), &b);
            })
        };
        if let Err(e) = result {
            tally.error(format!("client {n}: {e:#}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn all_ended(daemon: &Daemon, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let (_, q) = daemon.request("GET", "/v1/tasks?state=queued&limit=1", None)?;
        let (_, r) = daemon.request("GET", "/v1/tasks?state=running&limit=1", None)?;
        if q["data"].as_array().is_some_and(Vec::is_empty)
            && r["data"].as_array().is_some_and(Vec::is_empty)
        {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "tasks still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fifty_clients_for_a_minute_get_only_queueing_and_memory_stays_flat() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = Arc::new(Daemon::start(
        &tiny_a(),
        &dir.path().join("data"),
        &dir.path().join("token"),
        &["--max-pending-chats", "2", "--max-queued-tasks", "40"],
    )?);
    // Warm up every path, submitting tasks fast enough to fill the in-memory record window, so
    // the baseline holds the daemon's steady working set.
    let warm = Tally::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for n in 0..CLIENTS {
            let (d, stop, warm) = (&daemon, &stop, &warm);
            s.spawn(move || client(d, n, stop, warm, Duration::from_millis(400)));
        }
        std::thread::sleep(Duration::from_secs(6));
        stop.store(true, Ordering::Relaxed);
    });
    all_ended(&daemon, Duration::from_secs(30))?;
    let before = daemon.rss_kib()?;
    let threads_before = daemon.threads()?;

    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        for n in 0..CLIENTS {
            let (d, stop, tally) = (&daemon, &stop, &tally);
            s.spawn(move || client(d, n, stop, tally, SUBMIT_EVERY));
        }
        std::thread::sleep(LOAD_TIME);
        stop.store(true, Ordering::Relaxed);
    });
    let load_s = start.elapsed().as_secs_f64();
    all_ended(&daemon, Duration::from_secs(30))?;
    let after = daemon.rss_kib()?;
    let threads_after = daemon.threads()?;
    eprintln!("threads {threads_before} -> {threads_after}");

    let errors = tally.errors.lock().unwrap().clone();
    let warm_errors = warm.errors.lock().unwrap().clone();
    eprintln!(
        "{load_s:.0} s: {} ok, {} told to retry, {} tasks, {} chats, {} event streams; RSS {before} KiB -> {after} KiB",
        tally.ok.load(Ordering::Relaxed),
        tally.queued_back.load(Ordering::Relaxed),
        tally.submitted.load(Ordering::Relaxed),
        tally.chats.load(Ordering::Relaxed),
        tally.streams.load(Ordering::Relaxed),
    );
    assert!(errors.is_empty(), "errors under load: {errors:#?}");
    assert!(
        warm_errors.is_empty(),
        "errors while warming up: {warm_errors:#?}"
    );
    assert!(
        tally.ok.load(Ordering::Relaxed) > 10_000 / 2,
        "too little got through"
    );
    assert!(tally.submitted.load(Ordering::Relaxed) >= CLIENTS * 10);
    assert!(tally.chats.load(Ordering::Relaxed) >= 1);
    assert!(tally.streams.load(Ordering::Relaxed) >= 1);
    // Every accepted task ran to its answer and is listed.
    let submitted =
        tally.submitted.load(Ordering::Relaxed) + warm.submitted.load(Ordering::Relaxed);
    let (_, list) = daemon.request("GET", "/v1/tasks?limit=1000000", None)?;
    let records = list["data"].as_array().context("data")?;
    assert_eq!(records.len(), submitted);
    for r in records {
        assert_eq!(r["state"], "done", "{r}");
        assert!(
            r["answer"]
                .as_str()
                .is_some_and(|a| a.starts_with("answer ")),
            "{r}"
        );
    }
    // Memory is flat: what the load added is bounded and small.
    assert!(
        (after as f64) < before as f64 * 1.2,
        "RSS grew from {before} KiB to {after} KiB"
    );
    let (status, _) = daemon.request("GET", "/health", None)?;
    assert_eq!(status, 200);
    Ok(())
}

/// A deterministic pseudo-random sequence (no dependency, same cases every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

#[test]
fn a_thousand_malformed_requests_each_get_a_json_4xx_and_the_daemon_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = dir.path().join("no-model");
    std::fs::create_dir_all(&empty)?;
    let daemon = Daemon::start(
        &empty,
        &dir.path().join("data"),
        &dir.path().join("token"),
        &["--max-body-mb", "1"],
    )?;
    let ok = daemon.request(
        "POST",
        "/v1/tasks",
        Some(&json!({"task": "t", "replies": form_replies("a", "b")}).to_string()),
    )?;
    assert_eq!(ok.0, 201, "{}", ok.1);
    daemon.wait_ended("task-1", Duration::from_secs(30))?;
    let valid_task =
        json!({"task": "Type", "device": "virtual", "max_steps": 3, "replies": ["x"]}).to_string();
    let valid_chat =
        json!({"model": "no-model", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let fixed: Vec<(&str, String, String)> = vec![
        ("POST", "/v1/tasks".into(), json!({"task": 5}).to_string()),
        ("POST", "/v1/tasks".into(), json!([]).to_string()),
        (
            "POST",
            "/v1/tasks".into(),
            json!({"task": "x", "replies": [1]}).to_string(),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            json!({"task": "x", "replies": [], "device": "\u{1}"}).to_string(),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            json!({"task": "x", "replies": [], "max_steps": 1e9}).to_string(),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            json!({"task": "x", "replies": [], "max_steps": 100000}).to_string(),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            json!({"task": "x", "replies": [], "profile": "../agents/virtual.toml"}).to_string(),
        ),
        (
            "POST",
            "/v1/tasks".into(),
            json!({"task": "x", "replies": [], "dry_run": "yes"}).to_string(),
        ),
        ("POST", "/v1/tasks".into(), "\u{0}\u{1}\u{2}".into()),
        ("POST", "/v1/tasks".into(), String::new()),
        (
            "POST",
            "/v1/chat/completions".into(),
            json!({"model": "no-model"}).to_string(),
        ),
        ("POST", "/v1/chat/completions".into(), "{".into()),
        (
            "GET",
            "/v1/tasks/task-1/trajectory/..%2F..%2Ftoken".into(),
            String::new(),
        ),
        (
            "GET",
            "/v1/tasks/task-1/trajectory/%2Fetc%2Fhostname".into(),
            String::new(),
        ),
        ("GET", "/v1/tasks?limit=many".into(), String::new()),
        ("GET", "/v1/tasks?state=%00".into(), String::new()),
        (
            "GET",
            "/v1/tasks/task-99999999999999999999999".into(),
            String::new(),
        ),
        ("GET", "/v1/tasks/../../etc/passwd".into(), String::new()),
        ("GET", "/v1/chat/completions".into(), String::new()),
        ("DELETE", "/v1/tasks".into(), String::new()),
        ("DELETE", "/v1/tasks/task-1".into(), String::new()),
        ("GET", "/v1/tasks/task-1/cancel".into(), String::new()),
        ("POST", "/v1/tasks/task-1/events".into(), String::new()),
        ("POST", "/v1/tasks/task-1/cancel".into(), String::new()),
    ];
    let mut rng = Lcg(0x5eed);
    let agent = Daemon::agent(Duration::from_secs(30));
    let mut count = 0;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while count < 1000 {
        let (method, path, body) = match rng.next(6) {
            0 | 1 => {
                // A valid body cut short: never valid JSON.
                let base = if rng.next(2) == 0 {
                    &valid_task
                } else {
                    &valid_chat
                };
                let cut = rng.next(base.len() - 1);
                let path = if base == &valid_task {
                    "/v1/tasks"
                } else {
                    "/v1/chat/completions"
                };
                ("POST", path.to_string(), base[..cut].to_string())
            }
            2 => (
                "GET",
                format!("/v1/no-such-route/{}", rng.next(1 << 20)),
                String::new(),
            ),
            3 => (
                "GET",
                format!("/v1/tasks/task-{}", 1000 + rng.next(1 << 20)),
                String::new(),
            ),
            _ => fixed[rng.next(fixed.len())].clone(),
        };
        let (status, _, text) = daemon.raw(&agent, method, &path, Some(&body))?;
        let value: Value = serde_json::from_str(&text).with_context(|| {
            format!("{method} {path} {body:?}: HTTP {status}, not JSON: {text:?}")
        })?;
        assert!(
            (400..500).contains(&status),
            "{method} {path} {body:?}: HTTP {status}: {value}"
        );
        assert!(
            value["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {path}: {value}"
        );
        *statuses.entry(status).or_default() += 1;
        count += 1;
    }
    // Too large, without a token, with a wrong token.
    let big = json!({"task": "x".repeat((1 << 20) + 10), "replies": []}).to_string();
    let (status, _, text) = daemon.raw(&agent, "POST", "/v1/tasks", Some(&big))?;
    assert_eq!(status, 413, "{text}");
    for auth in [None, Some("Bearer wrong"), Some("Basic abc")] {
        let mut r = agent.get(format!("{}/v1/tasks", daemon.url));
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        let mut response = r.call()?;
        assert_eq!(response.status().as_u16(), 401);
        let v: Value = serde_json::from_str(&response.body_mut().read_to_string()?)?;
        assert!(v["error"]["message"].is_string());
    }
    // Bytes that are not HTTP at all: the connection is refused, the daemon stays up.
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00"[..],
        b"HELLO\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        let mut s = std::net::TcpStream::connect(daemon.url.trim_start_matches("http://"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(garbage)?;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
    }
    eprintln!("statuses of the malformed requests: {statuses:?}");
    assert!(statuses.len() >= 4, "{statuses:?}");
    // Still serving: a task runs to its answer.
    let (status, record) = daemon.request(
        "POST",
        "/v1/tasks",
        Some(&valid_task.replace("[\"x\"]", &json!(form_replies("a", "fine")).to_string())),
    )?;
    assert_eq!(status, 201, "{record}");
    let id = record["id"].as_str().context("id")?;
    let record = daemon.wait_ended(id, Duration::from_secs(30))?;
    assert_eq!(record["answer"], "fine", "{record}");
    Ok(())
}
