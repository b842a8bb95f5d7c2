//! `vlad parse` as a user runs it: the built binary, its JSON on stdout and its exit codes.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

fn vlad_parse(args: &[&str], stdin: &str) -> anyhow::Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .arg("parse")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        // A usage error exits before reading its input.
        match input.write_all(stdin.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other?,
        }
    }
    Ok(child.wait_with_output()?)
}

fn stdout_json(output: &Output) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[test]
fn the_issue_example_maps_onto_the_screen() -> anyhow::Result<()> {
    let output = vlad_parse(
        &["--image-size", "1000x2000", "--screen-size", "1080x2400"],
        "I need to open Map.\n*FUNCTION*: Tap *ARGS*: {\"point\": (348,291)}",
    )?;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout_json(&output)?,
        json!({
            "thought": "I need to open Map.",
            "actions": [{"action": "click", "x": 376, "y": 698}],
            "boxes": [],
            "answer": null,
            "errors": []
        })
    );
    Ok(())
}

#[test]
fn a_file_argument_and_another_family() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("reply.txt");
    std::fs::write(&path, "Thought: Save it.\nAction: hotkey(key='ctrl s')")?;
    let path = path.to_string_lossy().into_owned();
    let output = vlad_parse(
        &["--family", "uitars", "--image-size", "1280x720", &path],
        "",
    )?;
    assert_eq!(output.status.code(), Some(0));
    let json = stdout_json(&output)?;
    assert_eq!(json["thought"], "Save it.");
    assert_eq!(
        json["actions"],
        json!([{"action": "key", "keys": ["ctrl", "s"]}])
    );
    Ok(())
}

#[test]
fn errors_in_the_reply_are_output_not_failure() -> anyhow::Result<()> {
    let output = vlad_parse(
        &["--image-size", "1000x1000", "-"],
        "*FUNCTION*: Tap *ARGS*: {\"point\": (1200,5)}",
    )?;
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout_json(&output)?["errors"],
        json!([{
            "message": "Tap: x = 1200 is outside the coordinate range 0 to 1000",
            "text": "*FUNCTION*: Tap *ARGS*: {\"point\": (1200,5)}"
        }])
    );
    Ok(())
}

#[test]
fn tools_can_be_named() -> anyhow::Result<()> {
    let reply = "*FUNCTION*: web_search *ARGS*: {\"query\": \"vlad\"}";
    let output = vlad_parse(&["--image-size", "10x10", "--tool", "web_search"], reply)?;
    assert_eq!(
        stdout_json(&output)?["actions"],
        json!([{"action": "tool", "name": "web_search", "args": {"query": "vlad"}}])
    );
    let without = vlad_parse(&["--image-size", "10x10"], reply)?;
    assert_eq!(without.status.code(), Some(0));
    assert_eq!(
        stdout_json(&without)?["errors"][0]["message"],
        "`web_search` is not a known function"
    );
    Ok(())
}

#[test]
fn usage_errors_exit_with_2_and_print_nothing_on_stdout() -> anyhow::Result<()> {
    let cases: [&[&str]; 6] = [
        &[],
        &["--image-size", "1000by2000"],
        &["--image-size", "0x10"],
        &["--image-size", "10x10", "--family", "gpt"],
        &["--image-size", "10x10", "--scale", "0"],
        &["--image-size", "10x10", "/no/such/reply.txt"],
    ];
    for args in cases {
        let output = vlad_parse(args, "*FUNCTION*: Home *ARGS*: {}")?;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.stdout.is_empty(), "{args:?}");
        assert!(!output.stderr.is_empty(), "{args:?}");
    }
    Ok(())
}
