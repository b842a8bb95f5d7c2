//! `vlad do`: perform typed actions by hand — the JSON `vlad parse` prints (its `actions`), one
//! action object, or an array of them — on a monitor, a window or an Android device.

use std::io::{Read, Write};

use clap::{Args, CommandFactory, error::ErrorKind};
use serde_json::Value;

use vlad::action::Action;
use vlad::environment::Outcome;

use super::screenshot::TargetArgs;

#[derive(Debug, Args)]
pub struct DoArgs {
    /// The action(s) as JSON, e.g. '{"action":"click","x":10,"y":20}'; `-` reads standard input.
    /// Points are pixels of a screenshot of the same screen.
    #[arg(value_name = "ACTION_JSON")]
    action: String,
    #[command(flatten)]
    target: TargetArgs,
}

/// The actions in `text`: an action object, an array of them, or an object with `actions`.
pub fn parse_actions(text: &str) -> Result<Vec<Action>, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("ACTION_JSON is not JSON: {e}"))?;
    let list = match value {
        Value::Array(items) => items,
        Value::Object(ref map) if map.contains_key("action") => vec![value],
        Value::Object(mut map) => match map.remove("actions") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(
                    "ACTION_JSON needs an \"action\" field, an array of actions, or an \"actions\" array"
                        .into(),
                );
            }
        },
        _ => return Err("ACTION_JSON must be an object or an array".into()),
    };
    list.into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value::<Action>(v).map_err(|e| format!("action {}: {e}", i + 1))
        })
        .collect()
}

/// Performs the actions in order, printing one JSON object with every outcome; stops at the first
/// one that is not done (exit 1).
pub fn run(args: DoArgs) -> anyhow::Result<()> {
    let usage = |message: String| -> ! {
        crate::Cli::command()
            .error(ErrorKind::ValueValidation, message)
            .exit()
    };
    let text = if args.action == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .unwrap_or_else(|e| usage(format!("cannot read standard input: {e}")));
        s
    } else {
        args.action.clone()
    };
    let actions = parse_actions(&text).unwrap_or_else(|e| usage(e));
    if actions.is_empty() {
        usage("ACTION_JSON holds no action".into());
    }
    let mut env = args.target.open()?;
    let identity = env.describe().identity;
    let mut results = Vec::new();
    let mut failure = None;
    for action in &actions {
        let outcome = env.perform(action)?;
        results.push(serde_json::json!({"action": action, "result": outcome}));
        match outcome {
            Outcome::Done => {}
            Outcome::Refused { reason } | Outcome::Failed { reason } => {
                failure = Some(format!("{}: {reason}", action.tag()));
                break;
            }
        }
    }
    let report = serde_json::json!({"identity": identity, "results": results});
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{report}")?;
    stdout.flush()?;
    match failure {
        Some(f) => anyhow::bail!(f),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_an_action_an_array_and_parse_output() {
        let one = parse_actions(r#"{"action":"click","x":1,"y":2}"#);
        assert_eq!(one, Ok(vec![Action::Click { x: 1, y: 2 }]));
        let many = parse_actions(r#"[{"action":"click","x":1,"y":2},{"action":"enter"}]"#);
        assert_eq!(many.map(|v| v.len()), Ok(2));
        let parsed = parse_actions(r#"{"thought":"t","actions":[{"action":"type","text":"hé"}]}"#);
        assert_eq!(parsed, Ok(vec![Action::Type { text: "hé".into() }]));
        assert!(parse_actions("{").is_err());
        assert!(parse_actions(r#"{"action":"fly"}"#).is_err());
        assert!(parse_actions(r#"{"thought":"t"}"#).is_err());
    }
}
