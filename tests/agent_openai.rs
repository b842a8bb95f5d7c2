//! The OpenAI-compatible backend against a real HTTP server on loopback: a stand-in that checks
//! each request body against the chat-completions schema (messages, image_url data URLs,
//! max_tokens, stop) and answers from a script — 5xx then success, hangs (timeouts), malformed
//! JSON.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use vlad::agent::{Agent, NoHooks, Profile, RunOptions, RunStatus};
use vlad::engine::{GenerationOptions, Message, Part, Prompt};
use vlad::model::{Model, ModelError, OpenAiConfig, OpenAiModel};

/// What the stand-in answers, request by request.
#[derive(Clone)]
enum Answer {
    /// A chat completion whose message content is this text.
    Reply(&'static str),
    Status(u16, &'static str),
    /// A 200 with this raw body.
    Raw(&'static str),
    /// Say nothing for this long, then hang up.
    Hang(Duration),
}

struct Request {
    path: String,
    authorization: Option<String>,
    body: Value,
}

fn completion(text: &str) -> String {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "served-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })
    .to_string()
}

fn read_request(stream: &mut TcpStream) -> Result<Request> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    if parts.next() != Some("POST") {
        bail!("expected a POST, got {line:?}");
    }
    let path = parts.next().unwrap_or_default().to_string();
    let mut length = None;
    let mut authorization = None;
    let mut content_type = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').context("bad header")?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = Some(value.trim().parse::<usize>()?),
            "authorization" => authorization = Some(value.trim().to_string()),
            "content-type" => content_type = Some(value.trim().to_string()),
            _ => {}
        }
    }
    if content_type.as_deref() != Some("application/json") {
        bail!("content-type is {content_type:?}");
    }
    let mut body = vec![0; length.context("no content-length")?];
    reader.read_exact(&mut body)?;
    Ok(Request {
        path,
        authorization,
        body: serde_json::from_slice(&body)?,
    })
}

fn respond(stream: &mut TcpStream, answer: &Answer) -> Result<()> {
    let (status, body) = match answer {
        Answer::Reply(text) => (200, completion(text)),
        Answer::Status(code, body) => (*code, body.to_string()),
        Answer::Raw(body) => (200, body.to_string()),
        Answer::Hang(d) => {
            std::thread::sleep(*d);
            return Ok(());
        }
    };
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(stream.flush()?)
}

/// Starts the stand-in; returns its API root and the requests it receives.
fn serve(script: Vec<Answer>) -> Result<(String, Receiver<Result<Request>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    let (tx, rx): (Sender<Result<Request>>, _) = channel();
    let script = Arc::new(Mutex::new(script.into_iter()));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let tx = tx.clone();
            let answer = script.lock().ok().and_then(|mut s| s.next());
            std::thread::spawn(move || {
                let request = read_request(&mut stream);
                let ok = request.is_ok();
                let _ = tx.send(request);
                if let (true, Some(answer)) = (ok, answer) {
                    let _ = respond(&mut stream, &answer);
                }
            });
        }
    });
    Ok((url, rx))
}

/// Checks a body against the chat-completions schema as vlad uses it; returns the images.
fn validate(body: &Value, max_tokens: u64) -> Result<Vec<image::RgbImage>> {
    assert_eq!(body["model"], "served-x");
    assert_eq!(body["max_tokens"], max_tokens);
    assert_eq!(body["stop"], json!(["*RESULT*", "✿RESULT✿"]));
    assert_eq!(body["temperature"], 0.0);
    let messages = body["messages"].as_array().context("messages is a list")?;
    assert!(!messages.is_empty());
    let mut images = Vec::new();
    for m in messages {
        let role = m["role"].as_str().context("role is a string")?;
        assert!(["system", "user", "assistant"].contains(&role), "{role}");
        match &m["content"] {
            Value::String(_) => {}
            Value::Array(parts) => {
                for p in parts {
                    match p["type"].as_str() {
                        Some("text") => assert!(p["text"].is_string()),
                        Some("image_url") => {
                            let url = p["image_url"]["url"].as_str().context("url")?;
                            let data = url
                                .strip_prefix("data:image/png;base64,")
                                .context("a PNG data URL")?;
                            let png = base64::engine::general_purpose::STANDARD.decode(data)?;
                            images.push(image::load_from_memory(&png)?.to_rgb8());
                        }
                        other => bail!("unknown part type {other:?}"),
                    }
                }
            }
            other => bail!("content is {other}"),
        }
    }
    Ok(images)
}

fn config(url: &str) -> OpenAiConfig {
    let mut c = OpenAiConfig::new(url, "served-x");
    c.api_key = Some("test-key".into());
    c.backoff = Duration::from_millis(10);
    c.timeout = Duration::from_secs(2);
    c.max_retries = 2;
    c
}

fn small_prompt() -> Prompt {
    Prompt::new(vec![Message::parts(
        "user",
        vec![
            Part::Text("What is this?".into()),
            Part::Image(Arc::new(image::RgbImage::from_pixel(
                30,
                20,
                image::Rgb([9, 8, 7]),
            ))),
        ],
    )])
}

fn options() -> GenerationOptions {
    GenerationOptions {
        max_new_tokens: 64,
        greedy: Some(true),
        stop_strings: vec!["*RESULT*".into(), "✿RESULT✿".into()],
        ..Default::default()
    }
}

#[test]
fn the_loop_runs_against_the_server_and_retries_a_5xx() -> Result<()> {
    let (url, requests) = serve(vec![
        Answer::Status(503, "{\"error\": \"loading\"}"),
        Answer::Reply("I click the name field. *FUNCTION*: Click *ARGS*: {\"point\": (500,200)}"),
        // A server that ignores `stop` must not get its invented result through.
        Answer::Reply("*FUNCTION*: Type *ARGS*: {\"text\": \"héllo\"}\n*RESULT*: fake"),
        Answer::Reply("*FUNCTION*: Finish *ARGS*: {\"answer\": \"done\"}"),
    ])?;
    let profile = Profile::load("virtual")?;
    let max_tokens = profile.limits.max_new_tokens as u64;
    let mut env = profile.screen.as_ref().context("screen")?.build();
    let agent = Agent::new(profile)?;
    let mut model = OpenAiModel::new(config(&url))?;
    let tmp = tempfile::tempdir()?;
    let run_options = RunOptions {
        trace_dir: Some(tmp.path().join("run")),
        ..Default::default()
    };
    let report = agent.run(
        "Type hello",
        &mut model,
        &mut env,
        &run_options,
        &mut NoHooks,
    )?;
    assert_eq!(
        report.status,
        RunStatus::Finished {
            answer: "done".into()
        }
    );
    assert_eq!(
        env.widget("name_field").map(|w| w.text.as_str()),
        Some("héllo")
    );

    let received: Vec<Request> = requests.try_iter().collect::<Result<_>>()?;
    assert_eq!(received.len(), 4, "one retry after the 503");
    assert_eq!(
        received[0].body, received[1].body,
        "the retry sends the same request"
    );
    for (i, r) in received.iter().enumerate() {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.authorization.as_deref(), Some("Bearer test-key"));
        let images = validate(&r.body, max_tokens)?;
        assert!(
            images.iter().all(|img| img.dimensions() == (400, 300)),
            "request {i}"
        );
    }
    // The first request opens the assistant turn; the next ones continue it with the result.
    assert!(received[0].body.get("continue_final_message").is_none());
    let third = &received[3].body;
    assert_eq!(third["continue_final_message"], true);
    assert_eq!(third["add_generation_prompt"], false);
    let messages = third["messages"].as_array().context("messages")?;
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[2]["role"], "assistant");
    let parts = messages[2]["content"].as_array().context("parts")?;
    let texts: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    assert!(
        texts.contains("*FUNCTION*: Type *ARGS*: {\"text\": \"héllo\"}\n*RESULT*: "),
        "{texts}"
    );
    assert!(!texts.contains("fake"));
    assert!(texts.ends_with("\n*RETURN*:"));
    assert_eq!(parts.iter().filter(|p| p["type"] == "image_url").count(), 2);
    Ok(())
}

#[test]
fn timeouts_are_retried_and_then_reported() -> Result<()> {
    let (url, requests) = serve(vec![
        Answer::Hang(Duration::from_secs(6)),
        Answer::Reply("fine"),
    ])?;
    let mut model = OpenAiModel::new(config(&url))?;
    let c = model.generate(&small_prompt(), &options())?;
    assert_eq!(c.text, "fine");
    assert_eq!(c.tokens, Some(5));
    let received: Vec<Request> = requests.try_iter().collect::<Result<_>>()?;
    assert_eq!(received.len(), 2);
    let images = validate(&received[0].body, 64)?;
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].get_pixel(0, 0).0, [9, 8, 7]);

    let (url, _requests) = serve(vec![Answer::Hang(Duration::from_secs(3)); 3])?;
    let mut cfg = config(&url);
    cfg.timeout = Duration::from_millis(300);
    let mut model = OpenAiModel::new(cfg)?;
    let err = model.generate(&small_prompt(), &options());
    match err {
        Err(ModelError::Unreachable {
            attempts, url: u, ..
        }) => {
            assert_eq!(attempts, 3);
            assert!(u.ends_with("/v1/chat/completions"));
        }
        other => bail!("expected a timeout error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn bad_answers_are_clear_errors() -> Result<()> {
    // Malformed JSON is not retried: the server is not going to get better.
    let (url, requests) = serve(vec![
        Answer::Raw("{\"choices\": [oops"),
        Answer::Reply("unused"),
    ])?;
    let err = OpenAiModel::new(config(&url))?.generate(&small_prompt(), &options());
    assert!(
        matches!(&err, Err(ModelError::Malformed { body, .. }) if body.contains("oops")),
        "{err:?}"
    );
    assert!(err.is_err_and(|e| e.to_string().contains("not a chat completion")));
    assert_eq!(requests.try_iter().count(), 1);

    let (url, _) = serve(vec![Answer::Raw("{\"choices\": []}")])?;
    let err = OpenAiModel::new(config(&url))?.generate(&small_prompt(), &options());
    assert!(err.is_err_and(|e| e.to_string().contains("no choices[0]")));

    // A 4xx names the status and the server's words, without retries.
    let (url, requests) = serve(vec![
        Answer::Status(400, "{\"error\": \"bad image\"}"),
        Answer::Reply("x"),
    ])?;
    let err = OpenAiModel::new(config(&url))?.generate(&small_prompt(), &options());
    assert!(
        matches!(&err, Err(ModelError::Http { status: 400, attempts: 1, body, .. }) if body.contains("bad image")),
        "{err:?}"
    );
    assert_eq!(requests.try_iter().count(), 1);

    // 5xx on every attempt gives up after the retries.
    let (url, requests) = serve(vec![Answer::Status(502, "gateway"); 3])?;
    let err = OpenAiModel::new(config(&url))?.generate(&small_prompt(), &options());
    assert!(
        matches!(
            &err,
            Err(ModelError::Http {
                status: 502,
                attempts: 3,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(requests.try_iter().count(), 3);

    // A server that is not there.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut cfg = config(&format!("http://127.0.0.1:{port}/v1"));
    cfg.max_retries = 1;
    let err = OpenAiModel::new(cfg)?.generate(&small_prompt(), &options());
    assert!(err.is_err_and(|e| e.to_string().contains("--base-url")));
    assert!(OpenAiModel::new(OpenAiConfig::new("localhost:8000", "m")).is_err());
    Ok(())
}

#[test]
fn vlad_run_takes_the_server_from_flags_and_environment() -> Result<()> {
    let (url, requests) = serve(vec![
        Answer::Reply("*FUNCTION*: Click *ARGS*: {\"point\": (500,750)}"),
        Answer::Reply("*FUNCTION*: Finish *ARGS*: {\"answer\": \"Clicked.\"}"),
    ])?;
    let tmp = tempfile::tempdir()?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args([
            "run",
            "Click submit",
            "--agent",
            "virtual",
            "--backend",
            "openai",
            "--base-url",
            &url,
            "--trace",
        ])
        .arg(tmp.path().join("trace"))
        .env("VLAD_OPENAI_MODEL", "served-x")
        .env_remove("VLAD_OPENAI_API_KEY")
        .env("OPENAI_API_KEY", "test-key")
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Clicked.\n");
    let received: Vec<Request> = requests.try_iter().collect::<Result<_>>()?;
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].authorization.as_deref(),
        Some("Bearer test-key")
    );
    validate(&received[1].body, 256)?;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args([
            "run",
            "t",
            "--agent",
            "virtual",
            "--backend",
            "openai",
            "--base-url",
            &url,
        ])
        .env_remove("VLAD_OPENAI_MODEL")
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--served-model"));
    Ok(())
}
