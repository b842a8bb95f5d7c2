//! The task API of `vlad serve` end to end, over plain HTTP against the real binary: a replayed
//! task on the virtual screen runs to its answer while its Server-Sent Events are read as a
//! browser reads them (late clients and `Last-Event-ID` included), its trajectory files are
//! served (and path traversal refused); tasks queue per device and run concurrently across
//! devices; a running task is cancelled within one step; records and trajectories survive a
//! restart (SIGTERM and SIGKILL), unfinished tasks marked interrupted; a task on the daemon's
//! own model shares it with chat completions; and `vlad tasks` drives all of it.

#[path = "support/fake_adb.rs"]
mod fake_adb;
#[path = "support/task_daemon.rs"]
mod task_daemon;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use task_daemon::{Daemon, form_replies, slow_virtual_profile, tiny_a, wait_replies};

const LIMIT: Duration = Duration::from_secs(60);

/// A daemon with a model folder that does not load (tasks with recorded replies need none).
fn replay_daemon(dir: &tempfile::TempDir, extra: &[&str]) -> Result<Daemon> {
    let empty = dir.path().join("no-model");
    std::fs::create_dir_all(&empty)?;
    Daemon::start(
        &empty,
        &dir.path().join("data"),
        &dir.path().join("token"),
        extra,
    )
}

fn submit(daemon: &Daemon, body: &Value) -> Result<Value> {
    let (status, record) = daemon.request("POST", "/v1/tasks", Some(&body.to_string()))?;
    anyhow::ensure!(
        status == 201,
        "POST /v1/tasks {body}: HTTP {status}: {record}"
    );
    Ok(record)
}

/// Seconds from `a`'s creation to `b`'s end.
fn t_span(a: &Value, b: &Value) -> f64 {
    b["ended_at"].as_f64().unwrap_or(0.0) - a["created_at"].as_f64().unwrap_or(0.0)
}

fn id(record: &Value) -> String {
    record["id"].as_str().unwrap_or_default().to_string()
}

fn get_bytes(daemon: &Daemon, path: &str) -> Result<(u16, String, Vec<u8>)> {
    let agent = Daemon::agent(LIMIT);
    let mut request = agent.get(format!("{}{path}", daemon.url));
    if let Some(t) = &daemon.token {
        request = request.header("Authorization", format!("Bearer {t}"));
    }
    let mut response = request.call()?;
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = response.body_mut().read_to_vec()?;
    Ok((status, kind, bytes))
}

#[test]
fn a_replayed_task_runs_to_its_answer_and_streams_its_events() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = replay_daemon(&dir, &[])?;
    let record = submit(
        &daemon,
        &json!({"task": "Type Zoë in the name field", "device": "virtual",
                "replies": form_replies("Zoë", "Done, Zoë.")}),
    )?;
    let id = id(&record);
    assert_eq!(record["backend"], "replay");
    assert!(
        matches!(record["state"].as_str(), Some("queued" | "running")),
        "{record}"
    );
    // A live client from the start.
    let stream = daemon.events(&id, None)?;
    let events = stream.collect_until("end", LIMIT)?;
    assert!(
        stream.ended(Duration::from_secs(5)),
        "the stream stays open after its end event"
    );
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names[..3], ["state", "state", "started"], "{names:?}");
    assert_eq!(events[0].json()["state"], "queued");
    assert_eq!(events[1].json()["state"], "running");
    assert_eq!(
        names.iter().filter(|n| **n == "step").count(),
        3,
        "{names:?}"
    );
    assert_eq!(names[names.len() - 2..], ["finished", "end"], "{names:?}");
    // Event ids count up from 1, so a reconnecting client can say where it was.
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e.last_event_id.parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=events.len() as u64).collect::<Vec<_>>());

    let steps: Vec<Value> = events
        .iter()
        .filter(|e| e.event == "step")
        .map(|e| e.json())
        .collect();
    assert_eq!(steps[0]["thought"], "I need to click the name field.");
    assert_eq!(
        steps[0]["actions"][0]["action"],
        json!({"action": "click", "x": 200, "y": 60})
    );
    assert!(
        steps[0]["timings"]["total_s"].as_f64().is_some(),
        "{}",
        steps[0]
    );
    assert_eq!(steps[2]["answer"], "Done, Zoë.");
    let finished = events[events.len() - 2].json();
    assert_eq!(finished["answer"], "Done, Zoë.");
    let end = events.last().unwrap().json();
    assert_eq!(end["state"], "done", "{end}");
    assert_eq!(
        end["result"],
        json!({"status": "finished", "answer": "Done, Zoë."})
    );
    assert_eq!(end["steps"], 3);

    // Every screenshot URL of the stream serves the PNG the agent saw.
    let url = steps[1]["screenshot_after_url"]
        .as_str()
        .context("screenshot_after_url")?;
    let (status, kind, png) = get_bytes(&daemon, url)?;
    assert_eq!((status, kind.as_str()), (200, "image/png"));
    let image = image::load_from_memory(&png)?;
    assert_eq!((image.width(), image.height()), (400, 300));
    let on_disk = std::fs::read(
        dir.path()
            .join("data/tasks")
            .join(&id)
            .join("trajectory/screenshots/0002.png"),
    )?;
    assert_eq!(png, on_disk);

    // A late client gets the past events first; a reconnecting one only what it missed.
    let late = daemon.events(&id, None)?.collect_until("end", LIMIT)?;
    let late_names: Vec<&str> = late.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(late_names, names);
    let resumed = daemon.events(&id, Some(4))?.collect_until("end", LIMIT)?;
    assert_eq!(resumed.len(), events.len() - 4);
    assert_eq!(resumed[0].last_event_id, "5");
    assert_eq!(resumed[0].data, events[4].data);

    // The trajectory: listed, each file served; anything outside it refused.
    let (status, index) = daemon.request("GET", &format!("/v1/tasks/{id}/trajectory"), None)?;
    assert_eq!(status, 200, "{index}");
    let files: HashSet<&str> = index["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    for f in [
        "run.json",
        "trajectory.jsonl",
        "result.json",
        "screenshots/0000.png",
    ] {
        assert!(files.contains(f), "{f} missing from {index}");
    }
    let (status, kind, jsonl) = get_bytes(
        &daemon,
        &format!("/v1/tasks/{id}/trajectory/trajectory.jsonl"),
    )?;
    assert_eq!((status, kind.as_str()), (200, "application/x-ndjson"));
    assert_eq!(String::from_utf8(jsonl)?.lines().count(), 3);
    let t =
        vlad::agent::trajectory::read(&dir.path().join("data/tasks").join(&id).join("trajectory"))?;
    assert_eq!(t.meta.task, "Type Zoë in the name field");
    for bad in [
        "..%2Ftask.json",
        "%2E%2E/task.json",
        "screenshots/..%2F..%2Ftask.json",
        "%2Fetc%2Fpasswd",
        "..%5Ctask.json",
        "screenshots%2F%2E%2E%2F%2E%2E%2Fevents.jsonl",
    ] {
        let (status, value) =
            daemon.request("GET", &format!("/v1/tasks/{id}/trajectory/{bad}"), None)?;
        assert!(
            (400..500).contains(&status) && value["error"]["message"].is_string(),
            "{bad}: HTTP {status}: {value}"
        );
        assert_ne!(status, 200);
    }
    // A raw `..` in the request line (clients normally collapse it) is refused too.
    let mut raw = std::net::TcpStream::connect(daemon.url.trim_start_matches("http://"))?;
    use std::io::{Read, Write};
    write!(
        raw,
        "GET /v1/tasks/{id}/trajectory/../task.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        daemon.token.as_deref().unwrap_or_default()
    )?;
    let mut answer = String::new();
    raw.read_to_string(&mut answer)?;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let (status, _) =
        daemon.request("GET", &format!("/v1/tasks/{id}/trajectory/nope.png"), None)?;
    assert_eq!(status, 404);

    // The same page `vlad report` writes for this trajectory.
    let (status, kind, page) = get_bytes(&daemon, &format!("/v1/tasks/{id}/report"))?;
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/html"), "{kind}");
    let expected =
        vlad::report::render_report(&dir.path().join("data/tasks").join(&id).join("trajectory"))?;
    assert_eq!(String::from_utf8(page)?, expected);
    assert!(expected.contains("id=\"step-1\"") && expected.contains("id=\"step-3\""));

    for (method, path) in [
        ("GET", "/v1/tasks/task-99/report"),
        ("GET", "/v1/tasks/task-99"),
        ("GET", "/v1/tasks/task-99/events"),
        ("GET", "/v1/tasks/task-99/trajectory"),
        ("POST", "/v1/tasks/task-99/cancel"),
    ] {
        let (status, value) = daemon.request(method, path, Some(""))?;
        assert_eq!(status, 404, "{path}: {value}");
    }
    let (status, value) = daemon.request("POST", &format!("/v1/tasks/{id}/cancel"), Some(""))?;
    assert_eq!(status, 409, "cancelling a finished task: {value}");
    Ok(())
}

#[test]
fn tasks_on_one_device_queue_and_different_devices_run_together() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Event streams outlive the request time limit.
    let daemon = replay_daemon(&dir, &["--allow-local-files", "--request-timeout-s", "1"])?;
    let profile = slow_virtual_profile(dir.path(), 150)?;
    let profile = profile.display().to_string();
    let slow = |device: &str, answer: &str| {
        json!({"task": "wait", "profile": profile, "device": device,
               "replies": wait_replies(6, answer)})
    };
    let a = submit(&daemon, &slow("virtual:one", "a"))?;
    let b = submit(&daemon, &slow("virtual:one", "b"))?;
    let c = submit(&daemon, &slow("virtual:two", "c"))?;
    assert_eq!(b["state"], "queued", "{b}");
    let b_events = daemon.events(&id(&b), None)?;
    let (status, queued) = daemon.request("GET", "/v1/tasks?state=queued", None)?;
    assert_eq!(status, 200);
    let queued_ids: Vec<&str> = queued["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(queued_ids, [id(&b).as_str()], "{queued}");
    let mut ended = Vec::new();
    for task in [&a, &b, &c] {
        ended.push(daemon.wait_ended(&id(task), LIMIT)?);
    }
    let [a, b, c] = &ended[..] else {
        unreachable!()
    };
    // The stream opened while b was queued followed it to its end, past the request time limit.
    let streamed = b_events.collect_until("end", LIMIT)?;
    assert_eq!(streamed.last().unwrap().json()["answer"], "b");
    assert!(
        t_span(a, b) > 1.0,
        "the stream lasted less than the request time limit"
    );
    for (r, answer) in [(a, "a"), (b, "b"), (c, "c")] {
        assert_eq!(r["state"], "done", "{r}");
        assert_eq!(r["answer"], answer, "{r}");
    }
    let t = |r: &Value, k: &str| r[k].as_f64().unwrap();
    // One device: the second task started only after the first ended.
    assert!(t(b, "started_at") >= t(a, "ended_at"), "{a}\n{b}");
    // Two devices: their tasks overlapped.
    assert!(t(c, "started_at") < t(a, "ended_at"), "{a}\n{c}");
    assert!(t(a, "started_at") < t(c, "ended_at"), "{a}\n{c}");
    // The list is newest first.
    let (_, list) = daemon.request("GET", "/v1/tasks", None)?;
    let listed: Vec<&str> = list["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(listed, ["task-3", "task-2", "task-1"]);
    let (_, one) = daemon.request("GET", "/v1/tasks?limit=1", None)?;
    assert_eq!(one["data"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[test]
fn cancelling_a_running_task_stops_it_within_a_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = replay_daemon(&dir, &["--allow-local-files"])?;
    let profile = slow_virtual_profile(dir.path(), 300)?.display().to_string();
    let running = submit(
        &daemon,
        &json!({"task": "wait a long time", "profile": profile, "device": "virtual",
                "replies": wait_replies(200, "never")}),
    )?;
    let queued = submit(
        &daemon,
        &json!({"task": "never starts", "profile": profile, "device": "virtual",
                "replies": wait_replies(1, "x")}),
    )?;
    let rid = id(&running);
    let stream = daemon.events(&rid, None)?;
    // Let it take two steps.
    let mut steps_seen = 0;
    while steps_seen < 2 {
        let e = stream.next(LIMIT).context("no events while running")?;
        if e.event == "step" {
            steps_seen += 1;
        }
    }
    // A queued task is cancelled at once and never runs.
    let (status, value) = daemon.request(
        "POST",
        &format!("/v1/tasks/{}/cancel", id(&queued)),
        Some(""),
    )?;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["state"], "cancelled");
    let (status, value) = daemon.request("POST", &format!("/v1/tasks/{rid}/cancel"), Some(""))?;
    assert_eq!(status, 202, "{value}");
    let cancelled_at = std::time::Instant::now();
    let rest = stream.collect_until("end", Duration::from_secs(10))?;
    let stop_time = cancelled_at.elapsed();
    // Within one step: at most the step in flight finishes after the request.
    let more_steps = rest.iter().filter(|e| e.event == "step").count();
    assert!(
        more_steps <= 1,
        "{more_steps} steps after the cancel: {rest:?}"
    );
    assert!(
        stop_time < Duration::from_secs(3),
        "took {stop_time:?} to stop"
    );
    assert!(rest.iter().any(|e| e.event == "cancel_requested"));
    let record = rest.last().unwrap().json();
    assert_eq!(record["state"], "cancelled", "{record}");
    assert_eq!(record["result"]["status"], "interrupted", "{record}");
    let steps = record["steps"].as_u64().unwrap() as usize;
    assert!((2..=3).contains(&steps), "{record}");
    // The trajectory is complete on disk: every step and the result.
    let t = vlad::agent::trajectory::read(std::path::Path::new(
        record["trace_dir"].as_str().context("trace_dir")?,
    ))?;
    assert_eq!(t.steps.len(), steps);
    let result = t.result.context("no result.json")?;
    assert_eq!(result.status, vlad::agent::RunStatus::Interrupted);
    let (_, q) = daemon.request("GET", &format!("/v1/tasks/{}", id(&queued)), None)?;
    assert_eq!(q["state"], "cancelled");
    assert_eq!(q["started_at"], Value::Null, "{q}");
    let (status, _) = daemon.request("POST", &format!("/v1/tasks/{rid}/cancel"), Some(""))?;
    assert_eq!(status, 409);
    Ok(())
}

#[test]
fn tasks_and_trajectories_survive_a_restart_and_unfinished_ones_are_marked_interrupted()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let profile = slow_virtual_profile(dir.path(), 200)?.display().to_string();
    let slow = json!({"task": "keep waiting", "profile": profile, "device": "virtual",
                      "replies": wait_replies(500, "never")});
    let mut first = replay_daemon(&dir, &["--allow-local-files"])?;
    let done = submit(
        &first,
        &json!({"task": "Type hi", "replies": form_replies("hi", "typed")}),
    )?;
    first.wait_ended(&id(&done), LIMIT)?;
    let running = submit(&first, &slow)?;
    let queued = submit(&first, &slow)?;
    first.wait_for(&id(&running), LIMIT, |r| r["state"] == "running")?;
    let stream = first.events(&id(&running), None)?;
    stream.collect_until("step", LIMIT)?;
    // SIGTERM: the running task stops after its current action and records it; the daemon exits.
    let exit = first.stop("TERM", Duration::from_secs(20))?;
    assert!(exit.success(), "{exit:?}");
    let end = stream.collect_until("end", Duration::from_secs(5))?;
    assert_eq!(end.last().unwrap().json()["state"], "interrupted");
    drop(first);

    let mut second = replay_daemon(&dir, &["--allow-local-files"])?;
    let (status, list) = second.request("GET", "/v1/tasks", None)?;
    assert_eq!(status, 200);
    let states: Vec<(String, String)> = list["data"]
        .as_array()
        .context("data")?
        .iter()
        .map(|r| (id(r), r["state"].as_str().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(
        states,
        [
            ("task-3".to_string(), "interrupted".to_string()),
            ("task-2".to_string(), "interrupted".to_string()),
            ("task-1".to_string(), "done".to_string()),
        ]
    );
    let (_, r1) = second.request("GET", "/v1/tasks/task-1", None)?;
    assert_eq!(r1["answer"], "typed");
    let (_, r2) = second.request("GET", &format!("/v1/tasks/{}", id(&running)), None)?;
    assert_eq!(r2["result"]["status"], "interrupted", "{r2}");
    assert!(r2["steps"].as_u64() >= Some(1), "{r2}");
    let (_, r3) = second.request("GET", &format!("/v1/tasks/{}", id(&queued)), None)?;
    assert_eq!(r3["started_at"], Value::Null, "{r3}");
    // The trajectories and event logs are served again.
    let (status, kind, png) =
        get_bytes(&second, "/v1/tasks/task-1/trajectory/screenshots/0001.png")?;
    assert_eq!((status, kind.as_str()), (200, "image/png"));
    assert!(png.starts_with(b"\x89PNG"));
    let (_, index) = second.request("GET", "/v1/tasks/task-2/trajectory", None)?;
    assert!(
        index["data"].as_array().is_some_and(|f| f.len() >= 4),
        "{index}"
    );
    let replayed = second.events("task-1", None)?.collect_until("end", LIMIT)?;
    assert_eq!(replayed.iter().filter(|e| e.event == "step").count(), 3);

    // SIGKILL mid-task: nothing is flushed by the daemon, yet the next start marks it
    // interrupted and keeps the steps recorded so far.
    let killed = submit(&second, &slow)?;
    assert_eq!(id(&killed), "task-4");
    second
        .events("task-4", None)?
        .collect_until("step", LIMIT)?;
    second.stop("KILL", Duration::from_secs(10))?;
    drop(second);
    let third = replay_daemon(&dir, &["--allow-local-files"])?;
    let (_, r4) = third.request("GET", "/v1/tasks/task-4", None)?;
    assert_eq!(r4["state"], "interrupted", "{r4}");
    assert!(
        r4["error"].as_str().is_some_and(|e| e.contains("running")),
        "{r4}"
    );
    let t = vlad::agent::trajectory::read(&dir.path().join("data/tasks/task-4/trajectory"))?;
    assert!(!t.steps.is_empty());
    let late = third.events("task-4", None)?;
    let events = late.collect_until("step", LIMIT)?;
    assert_eq!(events[0].json()["state"], "queued");
    // New tasks continue the numbering.
    let next = submit(
        &third,
        &json!({"task": "x", "replies": form_replies("a", "b")}),
    )?;
    assert_eq!(id(&next), "task-5");
    Ok(())
}

#[test]
fn a_task_on_the_daemons_model_shares_it_with_chat_completions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::start(
        &tiny_a(),
        &dir.path().join("data"),
        &dir.path().join("token"),
        &[],
    )?;
    let tasks: Vec<Value> = ["virtual:a", "virtual:b"]
        .iter()
        .map(|d| {
            submit(
                &daemon,
                &json!({"task": "Fill in the form", "device": d, "max_steps": 2}),
            )
        })
        .collect::<Result<_>>()?;
    let chat = json!({"model": "tiny-a", "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": "hello"}]});
    let (status, value) =
        daemon.request("POST", "/v1/chat/completions", Some(&chat.to_string()))?;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["usage"]["completion_tokens"], 4);
    for task in &tasks {
        let r = daemon.wait_ended(&id(task), LIMIT)?;
        assert_eq!(r["backend"], "embedded");
        // A random checkpoint writes no valid call: the run gives up, but it ran on the model.
        assert_eq!(r["state"], "done", "{r}");
        assert!(r["steps"].as_u64() >= Some(1), "{r}");
        let t = vlad::agent::trajectory::read(std::path::Path::new(
            r["trace_dir"].as_str().context("trace_dir")?,
        ))?;
        assert_eq!(t.meta.model, "embedded:tiny-a");
        assert!(t.steps[0].reply.is_some());
    }
    Ok(())
}

#[test]
fn cancelling_a_task_stops_the_daemons_model_mid_generation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::start(
        &tiny_a(),
        &dir.path().join("data"),
        &dir.path().join("token"),
        &["--allow-local-files"],
    )?;
    // A profile whose steps may generate 20,000 tokens: minutes on tiny-a unless cancelled.
    let source = std::fs::read_to_string(task_daemon::root().join("agents/virtual.toml"))?
        .replace("max_new_tokens = 256", "max_new_tokens = 20000");
    let profile = dir.path().join("long.toml");
    std::fs::write(&profile, source)?;
    let record = submit(
        &daemon,
        &json!({"task": "Fill in the form", "profile": profile.display().to_string()}),
    )?;
    let tid = id(&record);
    daemon.wait_for(&tid, LIMIT, |r| r["state"] == "running")?;
    std::thread::sleep(Duration::from_millis(1500));
    let (status, value) = daemon.request("POST", &format!("/v1/tasks/{tid}/cancel"), Some(""))?;
    assert_eq!(status, 202, "{value}");
    let start = std::time::Instant::now();
    let record = daemon.wait_ended(&tid, Duration::from_secs(30))?;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the task took {:?} to stop",
        start.elapsed()
    );
    assert_eq!(record["state"], "cancelled", "{record}");
    let t = vlad::agent::trajectory::read(std::path::Path::new(
        record["trace_dir"].as_str().context("trace_dir")?,
    ))?;
    assert_eq!(t.steps.len(), 1);
    assert_eq!(
        t.steps[0].stop.as_deref(),
        Some("cancelled"),
        "{:?}",
        t.steps[0]
    );
    // The engine is free again for chat completions.
    let chat = json!({"model": "tiny-a", "max_tokens": 3, "temperature": 0,
                      "messages": [{"role": "user", "content": "hello"}]});
    let start = std::time::Instant::now();
    let (status, _) = daemon.request("POST", "/v1/chat/completions", Some(&chat.to_string()))?;
    assert_eq!(status, 200);
    assert!(start.elapsed() < Duration::from_secs(3));
    Ok(())
}

#[test]
fn a_task_on_an_adb_device_runs_beside_a_virtual_one() -> Result<()> {
    let phone = fake_adb::FakeDevice::phone("phone-1");
    let (w, h) = (phone.width as f64, phone.height as f64);
    let (x, y) = phone
        .icon_center("com.example.notes")
        .context("notes icon")?;
    let fake = fake_adb::FakeAdb::start(vec![phone])?;
    let dir = tempfile::tempdir()?;
    let empty = dir.path().join("no-model");
    std::fs::create_dir_all(&empty)?;
    let port = fake.port().to_string();
    let daemon = Daemon::start_with_env(
        &empty,
        &dir.path().join("data"),
        &dir.path().join("token"),
        &["--allow-local-files"],
        &[("ANDROID_ADB_SERVER_PORT", &port)],
    )?;
    let (mx, my) = (
        (x as f64 / w * 1000.0).round(),
        (y as f64 / h * 1000.0).round(),
    );
    let on_phone = submit(
        &daemon,
        &json!({"task": "Open Notes", "device": "phone-1", "replies": [
            format!("I open Notes. *FUNCTION*: Tap *ARGS*: {{\"point\": ({mx},{my})}}"),
            "*FUNCTION*: Finish *ARGS*: {\"answer\": \"opened\"}",
        ]}),
    )?;
    assert_eq!(on_phone["profile"], "android");
    let profile = slow_virtual_profile(dir.path(), 300)?.display().to_string();
    let on_screen = submit(
        &daemon,
        &json!({"task": "wait", "profile": profile, "device": "virtual",
                "replies": wait_replies(4, "waited")}),
    )?;
    let missing = submit(
        &daemon,
        &json!({"task": "x", "device": "no-such-phone", "replies": ["x"]}),
    )?;
    let phone = daemon.wait_ended(&id(&on_phone), LIMIT)?;
    let screen = daemon.wait_ended(&id(&on_screen), LIMIT)?;
    assert_eq!(phone["state"], "done", "{phone}");
    assert_eq!(phone["answer"], "opened");
    assert_eq!(screen["answer"], "waited", "{screen}");
    let t = |r: &Value, k: &str| r[k].as_f64().unwrap();
    assert!(t(&phone, "started_at") < t(&screen, "ended_at"));
    assert!(t(&screen, "started_at") < t(&phone, "ended_at"));
    let device = fake.device("phone-1");
    assert_eq!(device.taps, vec![(x, y)]);
    // A device that is not there: the task fails with a message naming it.
    let missing = daemon.wait_ended(&id(&missing), LIMIT)?;
    assert_eq!(missing["state"], "failed", "{missing}");
    assert!(
        missing["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such-phone")),
        "{missing}"
    );
    Ok(())
}

#[test]
fn bad_task_submissions_get_json_400s() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = replay_daemon(&dir, &[])?;
    let profile = slow_virtual_profile(dir.path(), 10)?.display().to_string();
    for (bad, want) in [
        (json!({"task": ""}), 400),
        (json!({"task": "x", "replies": [], "bogus": true}), 400),
        (
            json!({"task": "x", "replies": [], "profile": "no-such-profile"}),
            400,
        ),
        (json!({"task": "x", "replies": [], "profile": profile}), 400),
        (
            json!({"task": "x", "replies": [], "replay_file": "/tmp/r.jsonl"}),
            400,
        ),
        (
            json!({"task": "x", "replies": [], "device": "desktop", "profile": "virtual"}),
            400,
        ),
        (json!({"task": "x", "replies": [], "device": ""}), 400),
        (
            json!({"task": "x", "replies": [], "device": "two words"}),
            400,
        ),
        (json!({"task": "x", "replies": [], "max_steps": 0}), 400),
        (json!({"task": "x", "replies": [], "max_seconds": -1}), 400),
        (json!({"task": "x", "replies": "a"}), 400),
        // No replies: the daemon's model, which did not load here.
        (json!({"task": "x"}), 503),
    ] {
        let (status, value) = daemon.request("POST", "/v1/tasks", Some(&bad.to_string()))?;
        assert_eq!(status, want, "{bad}: {value}");
        assert!(value["error"]["message"].is_string(), "{value}");
    }
    for bad in ["/v1/tasks?state=sleeping", "/v1/tasks?limit=-1"] {
        let (status, value) = daemon.request("GET", bad, None)?;
        assert_eq!(status, 400, "{bad}: {value}");
    }
    Ok(())
}

#[test]
fn vlad_tasks_submits_watches_lists_and_cancels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let daemon = replay_daemon(&dir, &["--allow-local-files"])?;
    let replies = dir.path().join("replies.jsonl");
    let lines: Vec<String> = form_replies("hi", "all typed")
        .into_iter()
        .map(|r| json!({"reply": r}).to_string())
        .collect();
    std::fs::write(&replies, lines.join("\n"))?;
    let vlad = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vlad"))
            .arg("tasks")
            .args(args)
            .env("VLAD_URL", &daemon.url)
            .env("VLAD_TOKEN_FILE", &daemon.token_file)
            .env_remove("VLAD_TOKEN")
            .output()
    };
    let out = vlad(&[
        "submit",
        "Type hi",
        "--replies",
        replies.to_str().unwrap(),
        "--watch",
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("step 1: *FUNCTION*: Click"), "{stdout}");
    assert!(
        stdout.contains("thought: I need to click the name field."),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("answer: all typed"), "{stdout}");

    let out = vlad(&["watch", "task-1", "--json"])?;
    assert_eq!(out.status.code(), Some(0));
    let events: Vec<Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(events.last().unwrap()["event"], "end");
    assert_eq!(events.last().unwrap()["data"]["answer"], "all typed");

    let out = vlad(&["list"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("task-1\tdone\tvirtual\t3 steps\tType hi"),
        "{stdout}"
    );
    let out = vlad(&["show", "task-1"])?;
    let record: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(record["answer"], "all typed");

    // Cancel a running task from the command line; watching it exits 5 (stopped).
    let profile = slow_virtual_profile(dir.path(), 200)?;
    let many: Vec<String> = wait_replies(100, "x")
        .into_iter()
        .map(|r| json!({"reply": r}).to_string())
        .collect();
    std::fs::write(&replies, many.join("\n"))?;
    let out = vlad(&[
        "submit",
        "wait",
        "--profile",
        profile.to_str().unwrap(),
        "--replies",
        replies.to_str().unwrap(),
    ])?;
    let record: Value = serde_json::from_slice(&out.stdout)?;
    let id3 = id(&record);
    daemon.wait_for(&id3, LIMIT, |r| r["state"] == "running")?;
    let out = vlad(&["cancel", &id3])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vlad(&["watch", &id3])?;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Without the token: a clear error, exit 1.
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["tasks", "list", "--url", &daemon.url, "--token-file"])
        .arg(dir.path().join("missing-token"))
        .env_remove("VLAD_TOKEN")
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"));
    Ok(())
}
