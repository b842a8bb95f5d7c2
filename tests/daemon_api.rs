//! `vlad serve` end to end: the real binary on a loopback port with the tiny-a checkpoint, driven
//! by real clients — vlad's own OpenAI-compatible backend, the official `openai` Python client
//! (installed into `.venv-openai` when missing), and plain HTTP for auth and malformed requests.
//! Generated text is checked against the engine run in-process and the reference
//! implementation's greedy text in `tests/fixtures/engine/cases.json`. Idle, trickling and slow
//! clients are cut off by the daemon's time limits, and a client that goes away (or a generation
//! past its limit) frees the engine at once.

#[path = "support/task_daemon.rs"]
mod task_daemon;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use task_daemon::{Daemon, root, tiny_a};
use vlad::engine::{GenerationOptions, LoadOptions, Prompt, Qwen2Vl};
use vlad::model::{Model, OpenAiConfig, OpenAiModel};

const CASE: &str = "image_333x217_tiny-a";
const MAX_TOKENS: usize = 12;

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/engine")
}

fn case() -> Result<Value> {
    let text = std::fs::read_to_string(fixtures().join("cases.json"))?;
    let cases: Vec<Value> = serde_json::from_str(&text)?;
    cases
        .into_iter()
        .find(|c| c["name"] == CASE)
        .context("case missing from cases.json")
}

/// The greedy text of the case's prompt from the engine in this process.
fn in_process_text() -> Result<String> {
    let c = case()?;
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures())?;
    let mut model = Qwen2Vl::load_dir(&fixtures().join("tiny-a"), &LoadOptions::default())?;
    let options = GenerationOptions {
        max_new_tokens: MAX_TOKENS,
        greedy: Some(true),
        ..Default::default()
    };
    let text = model.generate(&prompt, &options, |_| {})?.text;
    // The independent truth: the reference implementation's greedy text for the same prompt.
    assert_eq!(text, c["greedy_text"].as_str().context("greedy_text")?);
    Ok(text)
}

fn image_data_url() -> Result<String> {
    let bytes = std::fs::read(fixtures().join("media/img_333x217.png"))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// `vlad serve --model MODEL EXTRA…` with its data dir and token file in a temporary folder
/// (removed when dropped).
fn serve(model: &Path, extra: &[&str]) -> Result<(tempfile::TempDir, Daemon)> {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::start(
        model,
        &dir.path().join("data"),
        &dir.path().join("state/token"),
        extra,
    )?;
    Ok((dir, daemon))
}

#[test]
fn vlads_own_openai_backend_gets_the_engines_greedy_text_for_an_image() -> Result<()> {
    let expected = in_process_text()?;
    let (_dir, daemon) = serve(&tiny_a(), &[])?;
    let c = case()?;
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures())?;
    let mut config = OpenAiConfig::new(format!("{}/v1", daemon.url), "tiny-a");
    config.api_key = daemon.token.clone();
    config.max_retries = 0;
    let mut client = OpenAiModel::new(config)?;
    let options = GenerationOptions {
        max_new_tokens: MAX_TOKENS,
        greedy: Some(true),
        ..Default::default()
    };
    let completion = client.generate(&prompt, &options)?;
    assert_eq!(completion.text, expected);
    assert_eq!(completion.tokens, Some(MAX_TOKENS));
    assert_eq!(completion.stop, vlad::model::StopReason::Length);
    Ok(())
}

/// The venv with the official `openai` package, installed on first use.
fn openai_python() -> Result<PathBuf> {
    let venv = root().join(".venv-openai");
    let python = venv.join("bin/python");
    let has = |p: &Path| {
        Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has(&python) {
        return Ok(python);
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "openai"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok || !has(&python) {
        bail!(
            "cannot install the `openai` Python package into {}; run `python3 -m venv .venv-openai && .venv-openai/bin/pip install openai` (needs python3-venv and PyPI access)",
            venv.display()
        );
    }
    Ok(python)
}

const PYTHON_CLIENT: &str = r#"
import json, sys
from openai import OpenAI
base_url, key, image = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
messages = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": image}},
    {"type": "text", "text": "Describe this image."},
]}]
r = client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=12,
                                   temperature=0, seed=7)
out = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
       "usage": r.usage.model_dump(), "models": [m.id for m in client.models.list()]}
pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out.update(stream_pieces=pieces, stream_finish=finish, stream_usage=usage)
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
    out["unknown_model"] = None
except Exception as e:
    out["unknown_model"] = type(e).__name__
print(json.dumps(out))
"#;

#[test]
fn official_openai_python_client_streams_and_not_with_an_image() -> Result<()> {
    let python = openai_python()?;
    let expected = in_process_text()?;
    let (_dir, daemon) = serve(&tiny_a(), &[])?;
    let output = Command::new(python)
        .args(["-c", PYTHON_CLIENT])
        .arg(format!("{}/v1", daemon.url))
        .arg(daemon.token.as_deref().context("token")?)
        .arg(image_data_url()?)
        .output()?;
    if !output.status.success() {
        bail!(
            "the Python client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let out: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(out["text"], json!(expected));
    assert_eq!(out["finish"], "length");
    assert_eq!(out["usage"]["completion_tokens"], MAX_TOKENS);
    let prompt_tokens = case()?["input_ids"]
        .as_array()
        .map(Vec::len)
        .context("input_ids")?;
    assert_eq!(out["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(out["models"], json!(["tiny-a"]));
    let pieces: Vec<String> = serde_json::from_value(out["stream_pieces"].clone())?;
    assert!(pieces.len() > 1, "the answer came in one piece: {pieces:?}");
    assert_eq!(pieces.concat(), expected);
    assert_eq!(out["stream_finish"], "length");
    assert_eq!(out["stream_usage"], out["usage"]);
    assert_eq!(out["unknown_model"], "NotFoundError");
    Ok(())
}

#[test]
fn requests_without_the_token_get_401_and_the_token_file_is_private() -> Result<()> {
    let (_dir, daemon) = serve(&tiny_a(), &[])?;
    let token = daemon.token.clone().context("token")?;
    assert_eq!(token.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&daemon.token_file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "token file mode {mode:o}");
    }
    let chat = json!({"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
    for (path, body) in [
        ("/v1/models", None),
        ("/v1/chat/completions", Some(chat.as_str())),
    ] {
        let method = if body.is_some() { "POST" } else { "GET" };
        let (status, value) = daemon.request_as(method, path, body, None)?;
        assert_eq!(status, 401, "{path} without a token: {value}");
        assert!(
            value["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Bearer"))
        );
        let (status, _) = daemon.request_as(method, path, body, Some("wrong"))?;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, value) = daemon.request_as(method, path, body, Some(&token))?;
        assert_eq!(status, 200, "{path} with the token: {value}");
    }
    // A restart reads the same token back.
    let dir_token = std::fs::read_to_string(&daemon.token_file)?;
    assert_eq!(dir_token.trim(), token);
    Ok(())
}

#[test]
fn malformed_requests_get_json_4xx_and_the_daemon_keeps_serving() -> Result<()> {
    let (_dir, mut daemon) = serve(&tiny_a(), &["--no-auth", "--max-body-mb", "1"])?;
    let msg = |content: Value| json!({"model": "tiny-a", "messages": [{"role": "user", "content": content}]});
    let img = |url: &str| {
        msg(
            json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]),
        )
    };
    let png_b64 = base64::engine::general_purpose::STANDARD.encode(b"not a png at all");
    let big = "x".repeat((1 << 20) + 1000);
    let mut cases: Vec<(&str, String, u16)> = vec![
        ("not json", "{\"model\": ".into(), 400),
        ("empty body", String::new(), 400),
        ("a list", "[]".into(), 400),
        ("messages not a list", json!({"model": "tiny-a", "messages": "hi"}).to_string(), 400),
        ("no model", json!({"messages": []}).to_string(), 400),
        ("unknown field", json!({"model": "tiny-a", "messages": [], "bogus": 1}).to_string(), 400),
        ("max_tokens a string", json!({"model": "tiny-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}).to_string(), 400),
        ("max_tokens 0", json!({"model": "tiny-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(), 400),
        ("empty messages", json!({"model": "tiny-a", "messages": []}).to_string(), 400),
        ("bad role", json!({"model": "tiny-a", "messages": [{"role": "robot", "content": "x"}]}).to_string(), 400),
        ("unknown part type", msg(json!([{"type": "audio", "audio": "x"}])).to_string(), 400),
        ("n = 2", json!({"model": "tiny-a", "messages": [{"role": "user", "content": "x"}], "n": 2}).to_string(), 400),
        ("temperature 9", json!({"model": "tiny-a", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).to_string(), 400),
        ("bad base64", img("data:image/png;base64,@@@@").to_string(), 400),
        ("not an image", img(&format!("data:image/png;base64,{png_b64}")).to_string(), 400),
        ("remote url", img("https://example.com/a.png").to_string(), 400),
        ("local path refused", img(&fixtures().join("media/img_60x45.png").display().to_string()).to_string(), 400),
        ("unknown model", json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404),
        ("too large", json!({"model": "tiny-a", "messages": [{"role": "user", "content": big}]}).to_string(), 413),
    ];
    // Repeat the batch so the daemon sees a few hundred bad requests.
    let base = cases.clone();
    for _ in 0..9 {
        cases.extend(base.iter().filter(|c| c.2 != 413).cloned());
    }
    for (name, body, want) in &cases {
        let (status, value) = daemon.request("POST", "/v1/chat/completions", Some(body))?;
        assert_eq!(status, *want, "{name}: {value}");
        let message = value["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{name}: no error message in {value}");
    }
    let (status, value) = daemon.request("GET", "/v1/nowhere", None)?;
    assert_eq!(status, 404, "{value}");
    let (status, value) = daemon.request("GET", "/v1/chat/completions", None)?;
    assert_eq!(status, 405, "{value}");
    assert!(value["error"]["message"].is_string());
    // Still serving: a real completion with an image.
    let mut ok = img(&image_data_url()?);
    ok["max_tokens"] = json!(3);
    ok["temperature"] = json!(0);
    let (status, value) = daemon.request("POST", "/v1/chat/completions", Some(&ok.to_string()))?;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["usage"]["completion_tokens"], 3);
    assert_eq!(value["choices"][0]["finish_reason"], "length");
    // And it stops cleanly on SIGTERM.
    let exit = daemon.stop("TERM", Duration::from_secs(10))?;
    assert!(exit.success(), "exit status {exit:?}");
    Ok(())
}

#[test]
fn local_image_paths_work_only_when_allowed_and_give_the_same_text() -> Result<()> {
    let expected = in_process_text()?;
    let (_dir, daemon) = serve(&tiny_a(), &["--no-auth", "--allow-local-files"])?;
    let path = fixtures().join("media/img_333x217.png");
    let body = json!({"model": "tiny-a", "max_tokens": MAX_TOKENS, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("file://{}", path.display())}},
        {"type": "text", "text": "Describe this image."},
    ]}]});
    let (status, value) =
        daemon.request("POST", "/v1/chat/completions", Some(&body.to_string()))?;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["choices"][0]["message"]["content"], json!(expected));
    Ok(())
}

#[test]
fn a_model_that_fails_to_load_gives_503() -> Result<()> {
    let model = tempfile::tempdir()?;
    let (_dir, daemon) = serve(model.path(), &["--no-auth", "--served-model-name", "m"])?;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}).to_string();
    let (status, value) = daemon.request("POST", "/v1/chat/completions", Some(&body))?;
    assert_eq!(status, 503, "{value}");
    assert!(
        value["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("config.json")),
        "{value}"
    );
    Ok(())
}

#[test]
fn idle_and_slow_clients_are_cut_off_and_the_daemon_keeps_serving() -> Result<()> {
    use std::io::{Read, Write};
    let (_dir, daemon) = serve(
        &tiny_a(),
        &[
            "--no-auth",
            "--header-timeout-s",
            "1",
            "--request-timeout-s",
            "2",
        ],
    )?;
    let addr = daemon.url.trim_start_matches("http://").to_string();
    // Connected, silent: dropped after the header timeout.
    let mut idle = std::net::TcpStream::connect(&addr)?;
    idle.set_read_timeout(Some(Duration::from_secs(20)))?;
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "an idle connection was closed after {waited:?}"
    );
    // Headers trickled in one byte at a time: dropped too.
    let mut trickle = std::net::TcpStream::connect(&addr)?;
    trickle.set_read_timeout(Some(Duration::from_secs(20)))?;
    let start = Instant::now();
    for b in b"GET /health HTTP/1.1\r\nHost: x\r\n" {
        if trickle.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let mut buf = Vec::new();
    let _ = trickle.read_to_end(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "a trickling client held its connection for {:?}",
        start.elapsed()
    );
    // A body announced and never sent: 408 with a JSON error after the request timeout.
    let mut slow = std::net::TcpStream::connect(&addr)?;
    slow.set_read_timeout(Some(Duration::from_secs(20)))?;
    let start = Instant::now();
    slow.write_all(
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"task\": ",
    )?;
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--request-timeout-s"), "{answer}");
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    // Still serving.
    let (status, _) = daemon.request("GET", "/health", None)?;
    assert_eq!(status, 200);
    Ok(())
}

/// A chat request for `max_tokens` tokens on tiny-a (about 100 tokens/s in a debug build, so
/// 20,000 would take minutes).
fn long_chat(max_tokens: usize, stream: bool) -> String {
    json!({"model": "tiny-a", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
           "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
}

/// Seconds a 3-token completion takes: long when the engine is still busy with another.
fn quick_completion_s(daemon: &Daemon) -> Result<f64> {
    let start = Instant::now();
    let (status, value) =
        daemon.request("POST", "/v1/chat/completions", Some(&long_chat(3, false)))?;
    assert_eq!(status, 200, "{value}");
    Ok(start.elapsed().as_secs_f64())
}

#[test]
fn a_client_that_goes_away_or_runs_past_the_generation_limit_stops_the_model() -> Result<()> {
    use std::io::{Read, Write};
    let (_dir, daemon) = serve(&tiny_a(), &["--no-auth", "--generation-timeout-s", "3"])?;
    let addr = daemon.url.trim_start_matches("http://").to_string();
    // A streaming client reads the first chunks and hangs up.
    let body = long_chat(20_000, true);
    let mut s = std::net::TcpStream::connect(&addr)?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut first = [0u8; 1024];
    let n = s.read(&mut first)?;
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let waited = quick_completion_s(&daemon)?;
    assert!(
        waited < 2.5,
        "the engine stayed busy {waited:.1} s after the stream's client left"
    );
    // A non-streaming client that gives up after half a second.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(500)))
        .build()
        .into();
    let gone = agent
        .post(format!("{}/v1/chat/completions", daemon.url))
        .header("Content-Type", "application/json")
        .send(long_chat(20_000, false));
    assert!(gone.is_err(), "the long completion finished within 0.5 s");
    let waited = quick_completion_s(&daemon)?;
    assert!(
        waited < 2.5,
        "the engine stayed busy {waited:.1} s after the client left"
    );
    // Past --generation-timeout-s: 504 for a plain request, an error event for a stream.
    let start = Instant::now();
    let (status, value) = daemon.request(
        "POST",
        "/v1/chat/completions",
        Some(&long_chat(20_000, false)),
    )?;
    assert_eq!(status, 504, "{value}");
    assert!(
        value["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--generation-timeout-s"))
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let start = Instant::now();
    let text = agent
        .post(format!("{}/v1/chat/completions", daemon.url))
        .header("Content-Type", "application/json")
        .send(long_chat(20_000, true))?
        .body_mut()
        .read_to_string()?;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(
        text.contains("--generation-timeout-s"),
        "{}",
        &text[text.len().saturating_sub(500)..]
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let waited = quick_completion_s(&daemon)?;
    assert!(
        waited < 2.5,
        "the engine stayed busy {waited:.1} s after the time limit"
    );
    Ok(())
}
