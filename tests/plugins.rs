//! Tool plugins end to end: a replayed `vlad run` on the virtual screen whose recorded replies
//! call subprocess tools and the tools of a real MCP server (the official Rust SDK's, built as
//! `examples/mcp_tool_server`); a timeout, crashes, bad output, a schema mismatch, an unknown
//! tool, a server that dies and a dangerous tool each become a result the model reads, and the
//! run still reaches its final answer. Also what the model is shown (system prompt, write-back),
//! `vlad tools list|call`, MCP over streamable HTTP, and the shipped example plugins.

#[path = "support/cli.rs"]
mod cli;
#[path = "support/recording.rs"]
mod recording;
#[path = "support/xvfb.rs"]
mod xvfb;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cli::{VLAD, replies_file, run_args, text, vlad, vlad_with_env, vlad_with_input};
use recording::{Recording, all_text};
use serde_json::{Value, json};
use vlad::agent::{Agent, NoHooks, Profile, RunOptions, RunStatus, trajectory};
use vlad::environment::Outcome;
use vlad::tools::Plugins;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/plugins")
}

/// The example MCP server, built by `cargo build --examples` next to the vlad binary.
fn mcp_server() -> Result<PathBuf> {
    let bin = Path::new(VLAD)
        .parent()
        .context("the vlad binary has no folder")?;
    let path = bin.join("examples").join("mcp_tool_server");
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --examples` (scripts/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// A manifest importing the example server's tools as `demo_*`, calls limited to 2 s.
fn mcp_manifest(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("demo.toml");
    let server = mcp_server()?;
    std::fs::write(
        &path,
        format!(
            "name = \"demo\"\ndescription = \"The demo MCP server.\"\ntimeout_s = 2\n[mcp]\ncommand = [{}]\nprefix = \"demo_\"\n",
            Value::String(server.to_string_lossy().into_owned())
        ),
    )?;
    Ok(path)
}

/// Is process `pid` gone (or a zombie nobody reaped yet)?
fn gone(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    stat.is_empty() || stat.contains(") Z")
}

#[test]
fn a_replayed_run_calls_plugins_and_every_failure_is_a_result() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    mcp_manifest(tmp.path())?;
    let replies = replies_file(
        tmp.path(),
        &[
            "I upper-case the text first. *FUNCTION*: upper *ARGS*: {\"text\": \"héllo wörld\"}",
            " *FUNCTION*: demo_add *ARGS*: {\"a\": 2, \"b\": 40}",
            " *FUNCTION*: slow *ARGS*: {}",
            " *FUNCTION*: crash *ARGS*: {\"how\": \"signal\"}",
            " *FUNCTION*: crash *ARGS*: {\"how\": \"exit\"}",
            " *FUNCTION*: garbage *ARGS*: {}",
            " *FUNCTION*: weather *ARGS*: {\"city\": \"Oslo\"}",
            " *FUNCTION*: upper *ARGS*: {\"txt\": \"x\"}",
            " *FUNCTION*: demo_crash *ARGS*: {}",
            " *FUNCTION*: demo_echo *ARGS*: {\"text\": \"back again\"}",
            " *FUNCTION*: demo_slow *ARGS*: {\"seconds\": 30}",
            " *FUNCTION*: demo_fail *ARGS*: {}",
            " *FUNCTION*: danger *ARGS*: {}",
            " All tools tried. *FUNCTION*: Finish *ARGS*: {\"answer\": \"All tools tried.\"}",
        ],
    )?;
    let trace = tmp.path().join("trace");
    let pid_file = tmp.path().join("slow.pid");
    let profile = fixtures().join("agent.toml");
    let start = Instant::now();
    let out = vlad_with_env(
        &run_args(
            "Try every tool",
            profile.to_str().context("path")?,
            &replies,
            &trace,
            &["--tools", tmp.path().to_str().context("path")?],
        ),
        &[("VLAD_TEST_PID_FILE", &pid_file)],
    )?;
    let elapsed = start.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "All tools tried.\n");
    // Timeouts stop the tools: the slow plugin and the slow MCP call would take 60 s.
    assert!(elapsed < Duration::from_secs(40), "took {elapsed:?}");
    let pid = std::fs::read_to_string(&pid_file)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone(&pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        gone(&pid),
        "the slow plugin's child {pid} outlived the timeout"
    );

    let t = trajectory::read(&trace)?;
    assert!(matches!(
        t.result.as_ref().map(|r| &r.status),
        Some(RunStatus::Finished { answer }) if answer == "All tools tried."
    ));
    assert_eq!(t.steps.len(), 14);
    let result = |step: usize| t.steps[step - 1].result.clone().unwrap_or_default();

    // The call and its result are recorded.
    let first = &t.steps[0].actions[0];
    assert_eq!(
        serde_json::to_value(&first.action)?,
        json!({"action": "tool", "name": "upper", "args": {"text": "héllo wörld"}})
    );
    assert_eq!(first.outcome, Some(Outcome::Done));
    assert_eq!(result(1), "HÉLLO WÖRLD");
    assert_eq!(result(2), "42");
    assert!(t.steps[0].errors.is_empty() && t.steps[1].errors.is_empty());

    let failures: [(usize, &[&str]); 10] = [
        (3, &["slow failed", "did not answer within 1 s"]),
        (4, &["crash failed", "killed by signal 11", "SIGSEGV"]),
        (5, &["crash failed", "exited with status 3", "disk full"]),
        (
            6,
            &["garbage failed", "not the JSON result", "this is not json"],
        ),
        (7, &["`weather` is not a known function"]),
        (8, &["upper failed", "missing required argument `text`"]),
        (
            9,
            &["demo_crash failed", "went away", "crashing on request"],
        ),
        (11, &["demo_slow failed", "did not answer within 2 s"]),
        (12, &["demo_fail failed", "the demo tool failed on purpose"]),
        (
            13,
            &[
                "danger was not performed",
                "marked dangerous",
                "did not confirm",
            ],
        ),
    ];
    for (step, expected) in failures {
        let written = result(step);
        for e in expected {
            assert!(written.contains(e), "step {step}: {written:?} lacks {e:?}");
            assert!(
                t.steps[step - 1].errors.iter().any(|x| x.contains(e)),
                "step {step} errors: {:?}",
                t.steps[step - 1].errors
            );
        }
    }
    // The MCP server was started again after its crash.
    assert_eq!(result(10), "back again");
    assert!(t.steps[9].errors.is_empty(), "{:?}", t.steps[9].errors);
    // A failed tool call is recorded as failed; the dangerous one was never called.
    assert!(matches!(
        t.steps[3].actions[0].outcome,
        Some(Outcome::Failed { .. })
    ));
    assert_eq!(t.steps[12].actions[0].outcome, None);
    Ok(())
}

#[test]
fn the_model_sees_the_tools_and_their_results() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let profile = Profile::load(fixtures().join("agent.toml").to_str().context("path")?)?;
    let mut env = profile.screen.as_ref().context("no screen")?.build();
    let loaded = Plugins::load(&profile.tools);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let agent = Agent::new(profile)?.with_plugins(loaded.plugins);

    let system = agent.system_prompt()?;
    assert!(system.contains("### upper"), "{system}");
    assert!(system.contains("upper: Return the text in upper case."));
    assert!(system.contains("\"required\":[\"text\"]"), "{system}");
    assert!(
        system.contains("[Click,Type,Key,Wait,Finish,CallUser,crash,danger,garbage,slow,upper]"),
        "{system}"
    );

    let (mut model, prompts) = Recording::new(&[
        "*FUNCTION*: upper *ARGS*: {\"text\": \"abc\"}",
        " *FUNCTION*: garbage *ARGS*: {}",
        " *FUNCTION*: nope *ARGS*: {}",
        " *FUNCTION*: Finish *ARGS*: {\"answer\": \"ok\"}",
    ]);
    let report = agent.run(
        "Use the tools",
        &mut model,
        &mut env,
        &RunOptions {
            trace_dir: Some(tmp.path().join("run")),
            ..Default::default()
        },
        &mut NoHooks,
    )?;
    assert_eq!(
        report.status,
        RunStatus::Finished {
            answer: "ok".into()
        }
    );
    let prompts = prompts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert_eq!(prompts.len(), 4);
    // Each result goes back inside the same assistant turn, before the new screenshot.
    let second = all_text(&prompts[1]);
    assert!(
        second.contains(
            "*FUNCTION*: upper *ARGS*: {\"text\": \"abc\"}\n*RESULT*: ABC <img>\n*RETURN*:"
        ),
        "{second}"
    );
    let third = all_text(&prompts[2]);
    assert!(
        third.contains(
            "*RESULT*: garbage failed: the tool's answer is not the JSON result expected"
        ),
        "{third}"
    );
    let fourth = all_text(&prompts[3]);
    assert!(
        fourth.contains("`nope` is not a known function"),
        "{fourth}"
    );
    Ok(())
}

#[test]
fn tools_list_shows_tools_and_manifest_errors() -> Result<()> {
    let out = vlad(&[
        "tools",
        "list",
        fixtures().join("tools").to_str().context("path")?,
        "--json",
    ])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing: Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<&str> = listing["tools"]
        .as_array()
        .context("tools")?
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["crash", "danger", "garbage", "slow", "upper"]);
    assert_eq!(listing["tools"][1]["dangerous"], true);
    assert_eq!(listing["tools"][3]["timeout_s"], 1.0);

    // A broken manifest is named with its field, the good ones still load, and `vlad run`
    // refuses to start with it.
    let tmp = tempfile::tempdir()?;
    std::fs::write(
        tmp.path().join("bad.toml"),
        "name = \"bad\"\ncommand = [\"sh\"]\ntimeout_s = -1\n",
    )?;
    std::fs::write(
        tmp.path().join("good.toml"),
        "name = \"good\"\ncommand = [\"sh\", \"-c\", \"echo '{\\\"ok\\\": true, \\\"result\\\": 1}'\"]\n",
    )?;
    let dir = tmp.path().to_str().context("path")?;
    let out = vlad(&["tools", "list", dir])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with("good (command"),
        "{}",
        text(&out.stdout)
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.toml: `timeout_s`: must be a number of seconds above 0"),
        "{stderr}"
    );
    let out = vlad(&["tools", "call", "good", "--tools", dir])?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a broken manifest must stop the call"
    );
    std::fs::remove_file(tmp.path().join("bad.toml"))?;
    let out = vlad(&["tools", "call", "good", "--tools", dir])?;
    assert_eq!(text(&out.stdout), "1\n", "{}", text(&out.stderr));
    Ok(())
}

/// The example server on streamable HTTP; killed on drop.
struct HttpServer(Child);

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn mcp_tools_are_imported_over_streamable_http() -> Result<()> {
    let mut child = Command::new(mcp_server()?)
        .args(["--http", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let _server = HttpServer(child);
    let mut url = String::new();
    BufReader::new(stdout).read_line(&mut url)?;
    let tmp = tempfile::tempdir()?;
    let manifest = tmp.path().join("remote.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"remote\"\ntimeout_s = 5\n[mcp]\nurl = \"{}\"\ntools = [\"add\", \"echo\"]\n",
            url.trim()
        ),
    )?;
    let path = manifest.to_str().context("path")?;
    let out = vlad(&["tools", "list", path, "--json"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing: Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<&str> = listing["tools"]
        .as_array()
        .context("tools")?
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["add", "echo"]);
    let out = vlad(&[
        "tools",
        "call",
        "add",
        "{\"a\": 1.5, \"b\": 2}",
        "--tools",
        path,
    ])?;
    assert_eq!(text(&out.stdout), "3.5\n", "{}", text(&out.stderr));
    Ok(())
}

#[test]
fn the_shell_example_runs_in_its_sandbox() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let sandbox = tmp.path().join("sandbox");
    let tools = repo().join("tools");
    let tools = tools.to_str().context("path")?;
    let out = vlad_with_env(
        &[
            "tools",
            "call",
            "shell",
            "{\"command\": \"echo héllo > note.txt; cat note.txt; pwd; echo oops >&2; exit 4\"}",
            "--tools",
            tools,
        ],
        &[("VLAD_SHELL_SANDBOX", &sandbox)],
    )?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout)?;
    let real = sandbox.canonicalize()?;
    assert_eq!(result["exit_status"], 4);
    assert_eq!(
        result["stdout"],
        format!("héllo\n{}\n", real.display()).as_str()
    );
    assert_eq!(result["stderr"], "oops\n");
    assert_eq!(std::fs::read_to_string(real.join("note.txt"))?, "héllo\n");

    // Its own timeout stops a command before vlad's does.
    let out = vlad_with_env(
        &[
            "tools",
            "call",
            "shell",
            "{\"command\": \"echo started; sleep 30\", \"timeout_s\": 1}",
            "--tools",
            tools,
        ],
        &[("VLAD_SHELL_SANDBOX", &sandbox)],
    )?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("did not finish within 1 s") && stderr.contains("started"),
        "{stderr}"
    );

    // Dangerous: a run that cannot ask the user does not call it.
    let profile = tools_profile(tmp.path(), tools)?;
    let replies = replies_file(
        tmp.path(),
        &[
            "*FUNCTION*: shell *ARGS*: {\"command\": \"touch made-by-agent\"}",
            " *FUNCTION*: Finish *ARGS*: {\"answer\": \"done\"}",
        ],
    )?;
    let trace = tmp.path().join("trace");
    let out = vlad_with_env(
        &run_args(
            "Make a file",
            profile.to_str().context("path")?,
            &replies,
            &trace,
            &[],
        ),
        &[("VLAD_SHELL_SANDBOX", &sandbox)],
    )?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!real.join("made-by-agent").exists());
    let t = trajectory::read(&trace)?;
    let written = t.steps[0].result.clone().unwrap_or_default();
    assert!(written.contains("shell was not performed"), "{written}");
    Ok(())
}

/// The built-in virtual profile with the shipped tools.
fn tools_profile(dir: &Path, tools: &str) -> Result<PathBuf> {
    let mut profile = Profile::load("virtual")?;
    profile.tools = vec![PathBuf::from(tools)];
    let path = dir.join("agent.toml");
    std::fs::write(&path, profile.to_toml()?)?;
    Ok(path)
}

#[test]
fn the_clipboard_example_round_trips_text_on_x11() -> Result<()> {
    let x = xvfb::Xvfb::start(320, 240);
    let tools = repo().join("tools");
    let tools = tools.to_str().context("path")?;
    let call = |args: &str| -> Result<Output> {
        Ok(x.command(VLAD)
            .args(["tools", "call", "clipboard", args, "--tools", tools])
            .stdin(Stdio::null())
            .output()?)
    };
    let written = "Zoë 北京 ✓";
    let out = call(&json!({"action": "write", "text": written}).to_string())?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // An independent reader: xclip itself.
    let seen = x.output("xclip", &["-selection", "clipboard", "-o"]);
    assert_eq!(text(&seen.stdout), written);
    let out = call("{\"action\": \"read\"}")?;
    assert_eq!(
        text(&out.stdout),
        format!("{written}\n"),
        "{}",
        text(&out.stderr)
    );
    let out = call("{\"action\": \"paste\"}")?;
    assert!(
        text(&out.stderr).contains("argument `action` must be one of \"read\", \"write\""),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_dangerous_tool_runs_when_the_user_says_yes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let replies = replies_file(
        tmp.path(),
        &[
            "*FUNCTION*: danger *ARGS*: {}",
            " *FUNCTION*: Finish *ARGS*: {\"answer\": \"done\"}",
        ],
    )?;
    let trace = tmp.path().join("trace");
    let profile = fixtures().join("agent.toml");
    let out = vlad_with_input(
        &run_args(
            "Do the dangerous thing",
            profile.to_str().context("path")?,
            &replies,
            &trace,
            &["--interactive"],
        ),
        "y\n",
    )?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("the tool danger is marked dangerous. Perform it? [y/N]"),
        "{stderr}"
    );
    let t = trajectory::read(&trace)?;
    assert_eq!(t.steps[0].result.as_deref(), Some("did it"));
    assert_eq!(t.steps[0].actions[0].outcome, Some(Outcome::Done));
    Ok(())
}

#[test]
fn the_shipped_plugins_load_and_open_url_keeps_to_its_schemes() -> Result<()> {
    let tools = repo().join("tools");
    let tools = tools.to_str().context("path")?;
    let out = vlad(&["tools", "list", tools, "--json"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing: Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<(&str, bool)> = listing["tools"]
        .as_array()
        .context("tools")?
        .iter()
        .filter_map(|t| Some((t["name"].as_str()?, t["dangerous"].as_bool()?)))
        .collect();
    assert_eq!(
        names,
        [("clipboard", false), ("open_url", false), ("shell", true)]
    );
    // Refused before anything is opened.
    let out = vlad(&[
        "tools",
        "call",
        "open_url",
        "{\"url\": \"javascript:alert(1)\"}",
        "--tools",
        tools,
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("only http, https, mailto, file URLs are opened"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
