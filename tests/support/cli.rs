//! The `vlad` binary as a user runs it: recorded replies and `vlad run` arguments for
//! `--backend replay`, a command run to completion, and its output as text.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result};

pub const VLAD: &str = env!("CARGO_BIN_EXE_vlad");

/// Writes `replies` as `DIR/replies.jsonl`, one `{"reply": …}` a line.
pub fn replies_file(dir: &Path, replies: &[&str]) -> Result<PathBuf> {
    let path = dir.join("replies.jsonl");
    let text: String = replies
        .iter()
        .map(|r| format!("{}\n", serde_json::json!({ "reply": r })))
        .collect();
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `vlad run TASK --agent AGENT --backend replay --replies REPLIES --trace TRACE EXTRA…`.
pub fn run_args<'a>(
    task: &'a str,
    agent: &'a str,
    replies: &'a Path,
    trace: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        task,
        "--agent",
        agent,
        "--backend",
        "replay",
        "--replies",
        replies.to_str().unwrap_or_default(),
        "--trace",
        trace.to_str().unwrap_or_default(),
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs `vlad ARGS…` to completion with stdin closed.
pub fn vlad(args: &[&str]) -> Result<Output> {
    vlad_with_env(args, &[] as &[(&str, &str)])
}

/// [`vlad`] with extra environment variables.
pub fn vlad_with_env(args: &[&str], envs: &[(&str, impl AsRef<OsStr>)]) -> Result<Output> {
    let mut cmd = Command::new(VLAD);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

/// Runs `vlad ARGS…` to completion with `input` on its stdin (then closed).
pub fn vlad_with_input(args: &[&str], input: &str) -> Result<Output> {
    let mut child = Command::new(VLAD)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
