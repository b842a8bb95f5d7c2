//! The Qwen2-VL paper's agent format: free-text thought, then one or more
//! `*FUNCTION*: Name *ARGS*: {...}` calls (or `✿FUNCTION✿`/`✿ARGS✿`); a reply without a call is
//! the final answer; `*RESULT*` ends the turn (the model should have stopped there).
//!
//! The reader walks the reply once: it finds a marker, reads the name, reads one argument value
//! with the lenient [`args`] reader (so a `*FUNCTION*` inside a typed string is
//! text, not a marker), and goes on after that value. Also accepted: `**FUNCTION**`, a full-width
//! colon, the name and `*ARGS*` on separate lines, no `*ARGS*` marker before `(x,y)` or `{...}`.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::args::{self, Args};
use super::functions::{self, ActionSpace, Function};
use super::{Call, MarkerStyle, ProtocolError, Reply, ReplyError};
use crate::action::Action;

static MARKER: LazyLock<Regex> = LazyLock::new(|| {
    super::pattern(
        r"(?:\*{1,2}|✿)[ \t]*(FUNCTION|ARGS|RESULT|RETURN)[ \t]*(?:\*{1,2}|✿)[ \t]*[:：]?",
    )
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Function,
    Args,
    Result,
    Return,
}

#[derive(Debug, Clone, Copy)]
struct Marker {
    kind: Kind,
    start: usize,
    end: usize,
}

fn next_marker(text: &str, from: usize) -> Option<Marker> {
    if from > text.len() || !text.is_char_boundary(from) {
        return None;
    }
    let caps = MARKER.captures_at(text, from)?;
    let whole = caps.get(0)?;
    let kind = match caps.get(1)?.as_str() {
        "FUNCTION" => Kind::Function,
        "ARGS" => Kind::Args,
        "RESULT" => Kind::Result,
        _ => Kind::Return,
    };
    Some(Marker {
        kind,
        start: whole.start(),
        end: whole.end(),
    })
}

/// Parses one reply (already cut at end-of-turn tokens).
pub(super) fn parse(text: &str, tools: &[String]) -> Reply<f64> {
    let mut reply = Reply::empty(text.len());
    let mut style = None;
    let mut thought_start = 0;
    let mut first_call = None;
    // A reply with any `*FUNCTION*` or `*ARGS*` is an attempt at a call, never an answer.
    let mut attempted_call = false;
    let mut pos = 0;
    while let Some(marker) = next_marker(text, pos) {
        style.get_or_insert(
            if text.get(marker.start..).is_some_and(|t| t.starts_with('✿')) {
                MarkerStyle::Flower
            } else {
                MarkerStyle::Asterisk
            },
        );
        pos = match marker.kind {
            Kind::Result => {
                reply.turn_end = marker.start;
                break;
            }
            Kind::Return => {
                if first_call.is_none() {
                    thought_start = marker.end;
                }
                marker.end
            }
            Kind::Args => {
                attempted_call = true;
                let span = marker.start..super::line_end(text, marker.start);
                reply
                    .errors
                    .push(ReplyError::new(ProtocolError::StrayArgs, text, span));
                marker.end
            }
            Kind::Function => {
                first_call.get_or_insert(marker.start);
                read_call(text, marker, tools, &mut reply)
            }
        };
    }
    reply.markers = style.unwrap_or_default();
    let body = text.get(..reply.turn_end).unwrap_or(text);
    match first_call {
        Some(at) => {
            let thought = text.get(thought_start..at).unwrap_or("").trim();
            reply.thought = super::non_empty(thought);
        }
        None if attempted_call => {}
        None => {
            let answer = body.get(thought_start..).unwrap_or("").trim();
            reply.answer = super::non_empty(answer);
        }
    }
    reply
}

/// Reads the call whose `*FUNCTION*` marker is `function`; returns where to go on scanning.
fn read_call(text: &str, function: Marker, tools: &[String], reply: &mut Reply<f64>) -> usize {
    let after = function.end;
    let name_start = after + leading_ws(text.get(after..).unwrap_or(""));
    let next = next_marker(text, after);
    if name_start >= text.len() || next.is_some_and(|m| m.start <= name_start) {
        let span = function.start..super::line_end(text, function.start).max(function.end);
        reply
            .errors
            .push(ReplyError::new(ProtocolError::MissingName, text, span));
        // Skip an `*ARGS*` that belongs to the nameless call.
        return match next {
            Some(m) if m.kind == Kind::Args && m.start <= name_start => m.end,
            _ => after,
        };
    }

    // `*FUNCTION*: Name *ARGS*: value` (the name may sit alone on its line before `*ARGS*`),
    // or `*FUNCTION*: Name value` / `*FUNCTION*: Name` without the marker.
    let args_marker = next.filter(|m| {
        m.kind == Kind::Args
            && !text
                .get(name_start..m.start)
                .is_none_or(|name| name.trim().contains('\n'))
    });
    let (name, args_at, mut end) = match args_marker {
        Some(m) => {
            let name = clean_name(text.get(name_start..m.start).unwrap_or(""));
            (name, Some(m.end), m.end)
        }
        None => {
            let line_end = super::line_end(text, name_start);
            let line_end = next.map_or(line_end, |m| m.start.min(line_end));
            let line = text.get(name_start..line_end).unwrap_or("");
            let name_len = line
                .find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | '`')))
                .unwrap_or(line.len());
            let name_part = line.get(..name_len).unwrap_or("");
            let rest = line.get(name_len..).unwrap_or("");
            let opens_value = rest
                .trim_start()
                .starts_with(['{', '(', '[', '"', '\'', '<', '“']);
            let name_end = name_start + name_part.trim_end().len();
            let args_at = opens_value.then_some(name_start + name_len);
            (clean_name(name_part), args_at, name_end)
        }
    };
    if name.is_empty() {
        let span = function.start..end;
        reply
            .errors
            .push(ReplyError::new(ProtocolError::MissingName, text, span));
        return end;
    }

    let written = match args_at {
        None => None,
        Some(at) => {
            let value_start = at + leading_ws(text.get(at..).unwrap_or(""));
            let empty = value_start >= text.len()
                || next_marker(text, at).is_some_and(|m| m.start == value_start);
            if empty {
                // `*ARGS*:` with nothing after it.
                None
            } else {
                match args::parse_value(text.get(value_start..).unwrap_or("")) {
                    Ok((value, used)) => {
                        end = value_start + used;
                        Some(Args::from_value(value))
                    }
                    Err(source) => {
                        let error_at = value_start + source.offset();
                        let span = function.start..super::line_end(text, error_at).max(error_at);
                        let error = ProtocolError::Args {
                            function: name,
                            source,
                        };
                        reply.errors.push(ReplyError::new(error, text, span));
                        return at;
                    }
                }
            }
        }
    };

    let span = function.start..end;
    let missing_args = written.is_none();
    let args = written.unwrap_or(Args::None);
    match super::call_action(&name, &args, tools) {
        Ok(action) => reply.calls.push(Call {
            action,
            text: super::snippet(text, &span),
            function: name,
            span,
        }),
        Err(ProtocolError::Call {
            source: functions::CallError::Missing { .. },
            ..
        }) if missing_args => {
            let error = ProtocolError::MissingArgs { function: name };
            reply.errors.push(ReplyError::new(error, text, span));
        }
        Err(error) => reply.errors.push(ReplyError::new(error, text, span)),
    }
    end
}

fn leading_ws(text: &str) -> usize {
    text.len() - text.trim_start().len()
}

/// The name without decoration: `` `Tap` ``, `"Tap"`, `**Tap**`, `Tap:`.
fn clean_name(raw: &str) -> String {
    raw.trim()
        .trim_matches(|c: char| {
            matches!(c, '`' | '"' | '\'' | '*' | ':' | '.') || c.is_whitespace()
        })
        .to_string()
}

/// Writes `action` as the model would: `*FUNCTION*: Tap *ARGS*: {"point": (348,291)}`,
/// naming the function as `space` shows it. Points are model-space values.
pub fn render_call(action: &Action<f64>, space: &ActionSpace, style: MarkerStyle) -> String {
    let (name, args) = match action {
        Action::Tool { name, args } => (name.as_str(), args.to_string()),
        other => {
            let name = Function::of(other).map_or("", |f| space.name_of(f));
            (name, render_args(other))
        }
    };
    format!(
        "{}: {name} {}: {args}",
        style.marker("FUNCTION"),
        style.marker("ARGS")
    )
}

fn render_args(action: &Action<f64>) -> String {
    let point = |x: &f64, y: &f64| format!("({x},{y})");
    let text = |s: &str| Value::String(s.to_string()).to_string();
    let mut fields: Vec<(&str, String)> = Vec::new();
    match action {
        Action::Click { x, y } | Action::DoubleClick { x, y } | Action::RightClick { x, y } => {
            fields.push(("point", point(x, y)));
        }
        Action::LongPress { x, y, ms } => {
            fields.push(("point", point(x, y)));
            fields.push(("ms", ms.to_string()));
        }
        Action::Drag {
            x,
            y,
            to_x,
            to_y,
            ms,
        }
        | Action::Swipe {
            x,
            y,
            to_x,
            to_y,
            ms,
        } => {
            fields.push(("start", point(x, y)));
            fields.push(("end", point(to_x, to_y)));
            if let Some(ms) = ms {
                fields.push(("ms", ms.to_string()));
            }
        }
        Action::Scroll {
            x,
            y,
            direction,
            amount,
        } => {
            fields.push(("point", point(x, y)));
            fields.push(("direction", text(direction.as_str())));
            fields.push(("amount", amount.to_string()));
        }
        Action::Type { text: t } => fields.push(("text", text(t))),
        Action::Key { keys } => {
            let keys: Vec<Value> = keys.iter().map(|k| Value::String(k.clone())).collect();
            fields.push(("keys", Value::Array(keys).to_string()));
        }
        Action::Wait { seconds } => fields.push(("seconds", seconds.to_string())),
        Action::Home | Action::Back | Action::Enter | Action::AppSwitch => {}
        Action::OpenApp { name } => fields.push(("name", text(name))),
        Action::Finish { answer } => fields.push(("answer", text(answer))),
        Action::CallUser { question } => fields.push(("question", text(question))),
        Action::Tool { args, .. } => return args.to_string(),
    }
    let body: Vec<String> = fields
        .into_iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ModelFamily, Protocol};

    fn parse(text: &str) -> Reply<f64> {
        Protocol::new(ModelFamily::Qwen2Vl).parse(text)
    }

    #[test]
    fn the_paper_example() {
        let reply = parse(
            "Several e-mails are displaying on the phone screen. To open Map, I need go back to the home screen.\n*FUNCTION*: Home *ARGS*: {}\n",
        );
        assert_eq!(reply.errors, vec![]);
        assert_eq!(reply.actions().collect::<Vec<_>>(), vec![&Action::Home]);
        assert!(reply.thought.is_some_and(|t| t.ends_with("home screen.")));
    }

    #[test]
    fn a_function_marker_inside_typed_text_is_text() {
        let reply = parse("*FUNCTION*: Type *ARGS*: {\"text\": \"*FUNCTION*: Home *RESULT*\"}");
        assert_eq!(reply.errors, vec![]);
        assert_eq!(
            reply.actions().collect::<Vec<_>>(),
            vec![&Action::Type {
                text: "*FUNCTION*: Home *RESULT*".into()
            }]
        );
    }

    #[test]
    fn a_self_written_result_ends_the_turn() {
        let text =
            "*FUNCTION*: Back *ARGS*: {}\n*RESULT*: ok\n*RETURN*: *FUNCTION*: Home *ARGS*: {}";
        let reply = parse(text);
        assert_eq!(reply.actions().count(), 1);
        assert_eq!(
            text.get(..reply.turn_end),
            Some("*FUNCTION*: Back *ARGS*: {}\n")
        );
    }

    #[test]
    fn renders_what_it_reads() {
        let action = Action::Click { x: 348.0, y: 291.0 };
        let android = ActionSpace::android();
        let text = render_call(&action, &android, MarkerStyle::Asterisk);
        assert_eq!(text, "*FUNCTION*: Tap *ARGS*: {\"point\": (348,291)}");
        let flower = render_call(&action, &ActionSpace::desktop(), MarkerStyle::Flower);
        assert_eq!(flower, "✿FUNCTION✿: Click ✿ARGS✿: {\"point\": (348,291)}");
        assert_eq!(parse(&flower).markers, MarkerStyle::Flower);
    }
}
