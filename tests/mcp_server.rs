//! vlad's MCP server as MCP clients see it: the official Rust SDK's client (rmcp) spawns
//! `vlad mcp` over stdio, or connects to `/mcp` on a running `vlad serve` over streamable HTTP,
//! and drives a private Xvfb + openbox desktop where a real Tk app records what it receives.

#[path = "support/tk_probe.rs"]
mod tk_probe;
#[path = "support/xvfb.rs"]
mod xvfb;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use rmcp::model::{
    CallToolRequestParams, ClientRequest, ProgressNotificationParam, Request, ServerResult,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Map, Value, json};
use tk_probe::{start_probe, wait_state};
use xvfb::{Xvfb, read_json};

const TOOLS: [&str; 9] = [
    "click",
    "devices",
    "drag",
    "ground",
    "key",
    "run_task",
    "screenshot",
    "scroll",
    "type_text",
];
/// Every call is bounded: a hung server fails the test instead of hanging it.
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// A client that records the progress notifications it receives.
#[derive(Clone, Default)]
struct Client {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Client {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(params);
    }
}

type Session = RunningService<RoleClient, Client>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start tokio: {e}"))
}

/// Spawns `vlad mcp ARGS` (stderr dropped, no adb server reachable) and connects to it.
async fn spawn_stdio(mut command: std::process::Command, args: &[&str]) -> Result<Session> {
    command
        .arg("mcp")
        .args(args)
        // No adb server here: point the Android side at a closed loopback port so it fails fast.
        .env("ANDROID_ADB_SERVER_PORT", "1")
        .env("VLAD_LOG", "warn");
    let (transport, _stderr) = TokioChildProcess::builder(tokio::process::Command::from(command))
        .stderr(Stdio::null())
        .spawn()
        .context("cannot spawn vlad mcp")?;
    let session = tokio::time::timeout(CALL_LIMIT, Client::default().serve(transport))
        .await
        .context("vlad mcp did not finish the handshake in time")??;
    Ok(session)
}

/// Calls a tool and returns the result as JSON on the wire (`content`, `isError`, …).
async fn call(session: &Session, tool: &str, args: Value) -> Result<Value> {
    let Value::Object(arguments) = args else {
        bail!("tool arguments must be an object");
    };
    let request = CallToolRequestParams::new(tool.to_string()).with_arguments(arguments);
    let result = tokio::time::timeout(CALL_LIMIT, session.call_tool(request))
        .await
        .with_context(|| format!("{tool} did not answer in time"))??;
    Ok(serde_json::to_value(result)?)
}

fn is_error(result: &Value) -> bool {
    result["isError"] == true
}

/// The text of every text block of a result.
fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// The structured content of a result, else its first text block read as JSON.
fn structured(result: &Value) -> Value {
    if !result["structuredContent"].is_null() {
        return result["structuredContent"].clone();
    }
    serde_json::from_str(&text(result)).unwrap_or(Value::Null)
}

fn ok(result: Value) -> Value {
    assert!(!is_error(&result), "the tool failed: {}", text(&result));
    result
}

async fn list_tools(session: &Session) -> Result<Map<String, Value>> {
    let tools = tokio::time::timeout(CALL_LIMIT, session.list_all_tools())
        .await
        .context("tools/list did not answer in time")??;
    let mut by_name = Map::new();
    for tool in tools {
        by_name.insert(tool.name.to_string(), serde_json::to_value(&tool)?);
    }
    Ok(by_name)
}

/// The tool list: all names, and input schemas that describe what each tool needs.
fn check_tools(tools: &Map<String, Value>) {
    let mut names: Vec<&str> = tools.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, TOOLS);
    let schema = |name: &str| tools[name]["inputSchema"].clone();
    let required = |name: &str| {
        let mut r: Vec<String> = schema(name)["required"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        r.sort();
        r
    };
    for name in TOOLS {
        assert_eq!(schema(name)["type"], "object", "{name}");
        assert!(
            tools[name]["description"]
                .as_str()
                .is_some_and(|d| d.len() > 20),
            "{name} has no description"
        );
    }
    assert_eq!(required("click"), ["x", "y"]);
    for p in ["x", "y", "button", "double", "device"] {
        assert!(
            schema("click")["properties"][p].is_object(),
            "click lacks {p}"
        );
    }
    assert_eq!(required("type_text"), ["text"]);
    assert_eq!(required("key"), ["keys"]);
    assert_eq!(required("scroll"), ["direction", "x", "y"]);
    assert_eq!(required("drag"), ["to_x", "to_y", "x", "y"]);
    assert_eq!(required("ground"), ["description"]);
    assert_eq!(required("run_task"), ["task"]);
    assert!(required("screenshot").is_empty());
    assert!(required("devices").is_empty());
    assert_eq!(
        schema("scroll")["properties"]["direction"]["enum"],
        json!(["up", "down", "left", "right"])
    );
    assert_eq!(
        schema("click")["properties"]["button"]["enum"],
        json!(["left", "right"])
    );
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(i64::MIN)
}

/// The centre of a widget the probe reports, in root-window pixels.
fn centre(state: &Value, widget: &str) -> (i64, i64) {
    let w = &state[widget];
    (
        int(&w["x"]) + int(&w["width"]) / 2,
        int(&w["y"]) + int(&w["height"]) / 2,
    )
}

/// Decodes the image block of a screenshot result.
fn screenshot_image(result: &Value) -> Result<image::RgbImage> {
    let blocks = result["content"].as_array().context("no content")?;
    let image = blocks
        .iter()
        .find(|b| b["type"] == "image")
        .context("no image block")?;
    assert_eq!(image["mimeType"], "image/png");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(image["data"].as_str().context("no image data")?)?;
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    Ok(image::load_from_memory(&bytes)?.into_rgb8())
}

const ROOT: [u8; 3] = [0x33, 0x66, 0x99];
const SWATCH: [u8; 3] = [0x12, 0xab, 0x34];

/// Screenshot, click, type, key, ground and bad arguments over stdio, against a real Tk app.
#[test]
fn stdio_tools_see_and_drive_a_real_app() -> Result<()> {
    let mut x = Xvfb::with_wm(1280, 720);
    x.run("xsetroot", &["-solid", "#336699"]);
    let state = start_probe(&mut x);
    // The model's only recorded reply: a box at 0–1000 of the image.
    let replies = x.path("replies.jsonl");
    let reply = "<|object_ref_start|>the button<|object_ref_end|><|box_start|>(250,500),(500,750)<|box_end|>";
    std::fs::write(&replies, format!("{}\n", json!({ "reply": reply })))?;
    let rt = runtime();
    rt.block_on(async {
        let replies = replies.to_string_lossy().to_string();
        let session = spawn_stdio(
            x.command(env!("CARGO_BIN_EXE_vlad")),
            &["--backend", "replay", "--replies", &replies],
        )
        .await?;
        check_tools(&list_tools(&session).await?);

        // The screenshot is the display: its size, the root colour, the app's green swatch.
        let shot = ok(call(&session, "screenshot", json!({})).await?);
        let img = screenshot_image(&shot)?;
        assert_eq!(img.dimensions(), (1280, 720));
        let info: Value =
            serde_json::from_str(text(&shot).lines().last().context("no size text")?)?;
        assert_eq!(
            (info["width"].clone(), info["height"].clone()),
            (json!(1280), json!(720))
        );
        assert_eq!(img.get_pixel(3, 716).0, ROOT);
        let s = read_json(&state).context("no probe state")?;
        let (sx, sy) = centre(&s, "swatch");
        assert_eq!(img.get_pixel(sx as u32, sy as u32).0, SWATCH);

        // A click on the button: the app counts the press.
        let (bx, by) = centre(&s, "button");
        let clicked = ok(call(&session, "click", json!({"x": bx, "y": by})).await?);
        assert!(text(&clicked).contains("clicked"), "{clicked}");
        wait_state(&state, "the press", |s| s["presses"] == 1);

        // Typing into the entry, then a key: the app's text follows.
        let (ex, ey) = centre(&s, "entry");
        ok(call(
            &session,
            "click",
            json!({"x": ex, "y": ey, "device": "desktop"}),
        )
        .await?);
        ok(call(&session, "type_text", json!({"text": "hello mcp"})).await?);
        wait_state(&state, "the typed text", |s| s["text"] == "hello mcp");
        ok(call(&session, "key", json!({"keys": "BackSpace"})).await?);
        wait_state(&state, "the backspace", |s| s["text"] == "hello mc");

        // ground: the recorded box, mapped from 0–1000 onto 1280x720 pixels.
        let found = ok(call(&session, "ground", json!({"description": "the button"})).await?);
        let g = structured(&found);
        assert_eq!(g["bbox"], json!([320, 360, 640, 540]), "{found}");
        assert_eq!(g["point"], json!([480, 450]), "{found}");
        assert_eq!(g["label"], "the button");
        assert_eq!(
            (g["width"].clone(), g["height"].clone()),
            (json!(1280), json!(720))
        );

        // Bad arguments are tool errors that say what is wrong; the server keeps serving.
        let bad = call(&session, "click", json!({"x": "left", "y": 3})).await?;
        assert!(
            is_error(&bad) && text(&bad).contains("invalid arguments"),
            "{bad}"
        );
        let typo = call(&session, "click", json!({"x": 1, "y": 3, "buton": "left"})).await?;
        assert!(is_error(&typo) && text(&typo).contains("buton"), "{typo}");
        let off = call(&session, "click", json!({"x": 5000, "y": 3})).await?;
        assert!(
            is_error(&off) && text(&off).contains("click failed"),
            "{off}"
        );
        let phone = call(&session, "screenshot", json!({"device": "emulator-5554"})).await?;
        assert!(is_error(&phone), "{phone}");
        let empty = call(&session, "ground", json!({"description": " "})).await?;
        assert!(
            is_error(&empty) && text(&empty).contains("description"),
            "{empty}"
        );
        // The one recorded reply is used up: the model's failure is a tool error too.
        let spent = call(&session, "ground", json!({"description": "the button"})).await?;
        assert!(
            is_error(&spent) && text(&spent).contains("no reply left"),
            "{spent}"
        );
        let devices = ok(call(&session, "devices", json!({})).await?);
        let list = structured(&devices);
        assert!(
            list["devices"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["device"] == "desktop")),
            "{list}"
        );
        assert!(list["errors"]["android"].is_string(), "{list}");
        assert_eq!(read_json(&state).context("no state")?["presses"], 1);
        session.cancel().await?;
        Ok(())
    })
}

/// Without a model or a display, the tools say so instead of failing the connection.
#[test]
fn missing_model_and_display_are_tool_errors() -> Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vlad"));
        command.env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY");
        let session = spawn_stdio(command, &["--no-model"]).await?;
        let ground = call(&session, "ground", json!({"description": "the OK button"})).await?;
        assert!(
            is_error(&ground) && text(&ground).contains("--no-model"),
            "{ground}"
        );
        let shot = call(&session, "screenshot", json!({})).await?;
        assert!(is_error(&shot) && text(&shot).contains("DISPLAY"), "{shot}");
        let run = call(
            &session,
            "run_task",
            json!({"task": "hi", "agent": "virtual"}),
        )
        .await?;
        assert!(
            is_error(&run) && text(&run).contains("vision model"),
            "{run}"
        );
        let unknown = call(&session, "run_task", json!({"task": "hi", "agent": "nope"})).await?;
        assert!(
            is_error(&unknown) && text(&unknown).contains("nope"),
            "{unknown}"
        );
        let mismatch = call(
            &session,
            "run_task",
            json!({"task": "hi", "agent": "android", "device": "desktop"}),
        )
        .await?;
        assert!(
            is_error(&mismatch) && text(&mismatch).contains("android"),
            "{mismatch}"
        );
        session.cancel().await?;
        Ok(())
    })
}

/// run_task runs the agent (on the in-memory virtual screen, replayed replies), reports each
/// step as MCP progress and returns the answer.
#[test]
fn run_task_reports_progress_and_the_answer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let replies = dir.path().join("replies.jsonl");
    let lines = [
        "I click the name field. *FUNCTION*: Click *ARGS*: {\"point\": (500,200)}",
        " Done. *FUNCTION*: Finish *ARGS*: {\"answer\": \"the form is open\"}",
    ];
    let text_lines: Vec<String> = lines
        .iter()
        .map(|r| json!({ "reply": r }).to_string())
        .collect();
    std::fs::write(&replies, text_lines.join("\n"))?;
    let rt = runtime();
    rt.block_on(async {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vlad"));
        // Run folders go under the state dir: keep them in the test's folder.
        command
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .env("HOME", dir.path());
        let replies = replies.to_string_lossy().to_string();
        let session = spawn_stdio(command, &["--backend", "replay", "--replies", &replies]).await?;
        let mut args = Map::new();
        args.insert("task".into(), json!("Open the form"));
        args.insert("agent".into(), json!("virtual"));
        let request = ClientRequest::CallToolRequest(Request::new(
            CallToolRequestParams::new("run_task").with_arguments(args),
        ));
        let handle = session
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await?;
        let token = handle.progress_token.clone();
        let response = tokio::time::timeout(CALL_LIMIT, handle.await_response())
            .await
            .context("run_task did not answer in time")??;
        let ServerResult::CallToolResult(result) = response else {
            bail!("run_task answered with something else: {response:?}");
        };
        let result = ok(serde_json::to_value(result)?);
        let report = structured(&result);
        assert_eq!(report["status"]["status"], "finished", "{report}");
        assert_eq!(report["status"]["answer"], "the form is open");
        assert_eq!(report["steps"], 2);
        let trace = PathBuf::from(report["trace"].as_str().context("no trace")?);
        assert!(trace.starts_with(dir.path()), "{trace:?}");
        assert!(trace.join("trajectory.jsonl").is_file());
        // Progress: the start and both steps, for this request's token. (The client handles
        // notifications concurrently, so they may be seen out of order.)
        let start = Instant::now();
        let mut progress = loop {
            let seen = session
                .service()
                .progress
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default();
            if seen.len() >= 3 || start.elapsed() > Duration::from_secs(5) {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        progress.sort_by(|a, b| a.progress.total_cmp(&b.progress));
        let steps: Vec<f64> = progress.iter().map(|p| p.progress).collect();
        assert_eq!(steps, [0.0, 1.0, 2.0], "{progress:?}");
        assert!(progress.iter().all(|p| p.progress_token == token));
        assert!(
            progress.iter().all(|p| p.total == Some(15.0)),
            "{progress:?}"
        );
        let messages: Vec<&str> = progress
            .iter()
            .map(|p| p.message.as_deref().unwrap_or(""))
            .collect();
        assert!(
            messages[0].starts_with("started on virtual"),
            "{messages:?}"
        );
        assert_eq!(messages[1..], ["step 1: click", "step 2: finish"]);
        session.cancel().await?;
        Ok(())
    })
}

/// Cancelling a run_task request stops the run after the current action; the run is recorded
/// as interrupted and the server keeps serving.
#[test]
fn cancelling_run_task_stops_the_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let replies = dir.path().join("replies.jsonl");
    // Waits of alternating length (not a loop), far more than the test waits for.
    let lines: Vec<String> = (0..14)
        .map(|i| {
            let reply = format!(
                "I wait. *FUNCTION*: Wait *ARGS*: {{\"seconds\": {}}}",
                1 + i % 2
            );
            json!({ "reply": reply }).to_string()
        })
        .collect();
    std::fs::write(&replies, lines.join("\n"))?;
    // The virtual profile, with a second's pause after each action: the run lasts ~14 s.
    let virtual_profile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/virtual.toml"))?;
    assert!(virtual_profile.contains("[limits]\n"));
    let profile = dir.path().join("slow.toml");
    std::fs::write(
        &profile,
        virtual_profile.replacen("[limits]\n", "[limits]\nsettle_ms = 1000\n", 1),
    )?;
    let rt = runtime();
    rt.block_on(async {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vlad"));
        command
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .env("HOME", dir.path());
        let replies = replies.to_string_lossy().to_string();
        let session = spawn_stdio(command, &["--backend", "replay", "--replies", &replies]).await?;
        let mut args = Map::new();
        args.insert("task".into(), json!("Wait for it"));
        args.insert("agent".into(), json!(profile));
        let request = ClientRequest::CallToolRequest(Request::new(
            CallToolRequestParams::new("run_task").with_arguments(args),
        ));
        let handle = session
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await?;
        // Cancel once the first step is reported.
        let start = Instant::now();
        while !session
            .service()
            .progress
            .lock()
            .map(|p| p.iter().any(|p| p.progress >= 1.0))
            .unwrap_or(false)
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no step reported"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        handle.cancel(Some("the test is done".into())).await?;
        // The run's folder records how it ended: interrupted, long before its 14 replies.
        let runs = dir.path().join("state/vlad/runs");
        let result = loop {
            let found = std::fs::read_dir(&runs)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .and_then(|e| std::fs::read_to_string(e.path().join("result.json")).ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            if let Some(r) = found {
                break r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the run did not stop after the cancellation"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(result["status"]["status"], "interrupted", "{result}");
        assert!(result["steps"].as_u64().is_some_and(|s| s < 5), "{result}");
        // The device is free and the server answers.
        ok(call(&session, "devices", json!({})).await?);
        session.cancel().await?;
        Ok(())
    })
}

/// `/mcp` on `vlad serve`: the streamable HTTP client with the bearer token lists the tools,
/// takes a screenshot and reaches the daemon's model; without the token it gets 401.
#[test]
fn streamable_http_on_the_daemon_needs_the_token() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let x = Xvfb::with_wm(800, 600);
    x.run("xsetroot", &["-solid", "#336699"]);
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engine/tiny-a");
    assert!(
        model.join("config.json").is_file(),
        "{} is missing: scripts/test.sh builds it (tests/fixtures/generate_engine_fixtures.py)",
        model.display()
    );
    let mut command = x.command(env!("CARGO_BIN_EXE_vlad"));
    command
        .args([
            "serve",
            "--dtype",
            "f32",
            "--listen",
            "127.0.0.1:0",
            "--model",
        ])
        .arg(&model)
        .arg("--token-file")
        .arg(&token_file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("ANDROID_ADB_SERVER_PORT", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut daemon = Daemon(command.spawn().context("cannot start vlad serve")?);
    let url = daemon.wait_for_address()?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();

    // Without the token, or with a wrong one: 401, before any MCP handling.
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "curl", "version": "1"}}
    })
    .to_string();
    for auth in [None, Some("Bearer wrong")] {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut request = agent
            .post(format!("{url}/mcp"))
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream");
        if let Some(a) = auth {
            request = request.header("Authorization", a);
        }
        let status = request.send(initialize.as_str())?.status().as_u16();
        assert_eq!(status, 401, "auth {auth:?}");
    }

    let rt = runtime();
    let task_api = TaskApi {
        url: url.clone(),
        token: token.clone(),
    };
    rt.block_on(async {
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(format!("{url}/mcp")).auth_header(token),
        );
        let session = tokio::time::timeout(CALL_LIMIT, Client::default().serve(transport))
            .await
            .context("the /mcp handshake did not finish in time")??;
        check_tools(&list_tools(&session).await?);
        let devices = structured(&ok(call(&session, "devices", json!({})).await?));
        assert!(
            devices["devices"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["device"] == "desktop")),
            "{devices}"
        );
        let shot = ok(call(&session, "screenshot", json!({})).await?);
        let img = screenshot_image(&shot)?;
        assert_eq!(img.dimensions(), (800, 600));
        assert_eq!(img.get_pixel(400, 300).0, ROOT);
        // ground reaches the daemon's (random, tiny) model: whatever it says, the answer is
        // about its reply, never that there is no model.
        let found = call(&session, "ground", json!({"description": "the OK button"})).await?;
        if is_error(&found) {
            assert!(text(&found).contains("the model's"), "{found}");
        } else {
            assert!(structured(&found)["bbox"].is_array(), "{found}");
        }
        let bad = call(
            &session,
            "scroll",
            json!({"x": 1, "y": 1, "direction": "sideways"}),
        )
        .await?;
        assert!(is_error(&bad) && text(&bad).contains("sideways"), "{bad}");
        ok(call(&session, "devices", json!({})).await?);

        // One run per device: while a daemon task drives the desktop, MCP calls on it are
        // refused (naming the task), on any monitor; afterwards they work again.
        let id = tokio::task::spawn_blocking(move || task_api.run_waiting_task()).await??;
        for device in ["desktop", "desktop:window:nothing"] {
            let refused = call(
                &session,
                "click",
                json!({"x": 10, "y": 10, "device": device}),
            )
            .await?;
            assert!(
                is_error(&refused) && text(&refused).contains(&id),
                "{device}: {refused}"
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let clicked = call(&session, "click", json!({"x": 10, "y": 10})).await?;
            if !is_error(&clicked) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline && text(&clicked).contains(&id),
                "{clicked}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        session.cancel().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    drop(daemon);
    Ok(())
}

/// The daemon's task API, over plain HTTP.
struct TaskApi {
    url: String,
    token: String,
}

impl TaskApi {
    /// Submits a task on the desktop that waits a few seconds, and returns its id once it runs.
    fn run_waiting_task(&self) -> Result<String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut replies: Vec<String> = (0..3)
            .map(|_| r#"*FUNCTION*: Wait *ARGS*: {"seconds": 1}"#.to_string())
            .collect();
        replies.push(r#"*FUNCTION*: Finish *ARGS*: {"answer": "waited"}"#.to_string());
        let body = json!({"task": "Wait a little", "device": "desktop", "replies": replies});
        let mut response = agent
            .post(format!("{}/v1/tasks", self.url))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_str())?;
        let record: Value = serde_json::from_slice(&response.body_mut().read_to_vec()?)?;
        anyhow::ensure!(response.status() == 201, "submit: {record}");
        let id = record["id"].as_str().context("id")?.to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut response = agent
                .get(format!("{}/v1/tasks/{id}", self.url))
                .header("Authorization", format!("Bearer {}", self.token))
                .call()?;
            let record: Value = serde_json::from_slice(&response.body_mut().read_to_vec()?)?;
            match record["state"].as_str() {
                Some("running") => return Ok(id),
                Some("queued") if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => anyhow::bail!("the task did not start: {record}"),
            }
        }
    }
}

/// A running `vlad serve`, killed on drop.
struct Daemon(std::process::Child);

impl Daemon {
    /// Waits for the "listening on" line and returns the base URL.
    fn wait_for_address(&mut self) -> Result<String> {
        use std::io::{BufRead, BufReader};
        let stderr = self.0.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(url) = line.strip_prefix("vlad serve: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(120))
            .context("vlad serve did not report its address within 120 s")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
