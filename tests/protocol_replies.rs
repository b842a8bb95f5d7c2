//! The reply table: real-shaped model replies of every supported family and the exact JSON
//! `vlad parse` must produce for each (tests/fixtures/protocol/replies.json).

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Value, json};
use vlad::protocol::cli::{ParseOptions, parse_command};

#[derive(Deserialize)]
struct Case {
    name: String,
    family: String,
    image_size: String,
    screen_size: Option<String>,
    scale: Option<f64>,
    #[serde(default)]
    tools: Vec<String>,
    reply: String,
    expected: serde_json::Map<String, Value>,
}

fn cases() -> anyhow::Result<Vec<Case>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/protocol/replies.json"
    );
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// The expected object with the keys a case leaves out at their empty values.
fn expected(case: &Case) -> Value {
    let mut full =
        json!({"thought": null, "actions": [], "boxes": [], "answer": null, "errors": []});
    if let Some(object) = full.as_object_mut() {
        for (key, value) in &case.expected {
            object.insert(key.clone(), value.clone());
        }
    }
    full
}

fn run(case: &Case) -> anyhow::Result<Value> {
    let mut options = ParseOptions::new(case.family.parse()?, case.image_size.parse()?);
    options.screen_size = case.screen_size.as_deref().map(str::parse).transpose()?;
    options.scale = case.scale.unwrap_or(1.0);
    options.tools = case.tools.clone();
    Ok(parse_command(&options, &case.reply)?)
}

#[test]
fn every_reply_in_the_table_parses_to_its_expected_json() -> anyhow::Result<()> {
    let cases = cases()?;
    assert!(cases.len() >= 60, "the table must hold at least 60 replies");
    let mut names = HashSet::new();
    let mut failures = Vec::new();
    for case in &cases {
        assert!(
            names.insert(case.name.as_str()),
            "duplicate case name {}",
            case.name
        );
        let want = expected(case);
        let got = run(case)?;
        if got != want {
            failures.push(format!(
                "{}\n  reply:    {:?}\n  expected: {want}\n  got:      {got}",
                case.name, case.reply
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} replies differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn the_table_covers_every_family_and_kind_of_problem() -> anyhow::Result<()> {
    let cases = cases()?;
    for family in ["qwen2vl", "qwen25vl", "uitars"] {
        assert!(
            cases.iter().filter(|c| c.family == family).count() >= 10,
            "{family}"
        );
    }
    let messages: Vec<String> = cases
        .iter()
        .flat_map(|c| {
            c.expected
                .get("errors")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|e| e.get("message").and_then(Value::as_str).map(str::to_string))
        .collect();
    for needle in [
        "cut off",
        "is not a known function",
        "outside the coordinate range",
        "has no *ARGS*",
        "expected `",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(needle)),
            "no case for {needle}"
        );
    }
    Ok(())
}
