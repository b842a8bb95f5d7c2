//! UI-TARS replies: `Thought: …` (or `Reflection:`/`Action_Summary:` before it), then
//! `Action: click(start_box='(x,y)')`, possibly several calls on separate lines. Points come
//! as `'(x,y)'`, `'<|box_start|>(x,y)<|box_end|>'` or `'<point>x y</point>'`; UI-TARS 1.5 gives
//! pixels of the resized image. A reply without `Action:` is the final answer.

use std::sync::LazyLock;

use regex::Regex;

use super::args;
use super::{Call, ProtocolError, Reply, ReplyError};

static ACTION: LazyLock<Regex> = LazyLock::new(|| super::pattern(r"(?mi)^[ \t]*Action[ \t]*:"));
static THOUGHT: LazyLock<Regex> =
    LazyLock::new(|| super::pattern(r"(?i)^\s*(?:Thought|Reflection|Action_Summary)\s*:"));

/// Parses one reply (already cut at end-of-turn tokens).
pub(super) fn parse(text: &str, tools: &[String]) -> Reply<f64> {
    let mut reply = Reply::empty(text.len());
    let Some(action) = ACTION.find(text) else {
        reply.answer = super::non_empty(strip_label(text));
        return reply;
    };
    reply.thought = super::non_empty(strip_label(text.get(..action.start()).unwrap_or("")));
    let mut pos = action.end();
    loop {
        pos += leading_ws(text.get(pos..).unwrap_or(""));
        let Some(rest) = text.get(pos..).filter(|r| !r.is_empty()) else {
            break;
        };
        // Some replies label every call: `Action: a(...)\nAction: b(...)`.
        if let Some(label) = ACTION.find(rest).filter(|m| m.start() == 0) {
            pos += label.end();
            continue;
        }
        let name_len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest.get(..name_len).unwrap_or("");
        let after_name = rest.get(name_len..).unwrap_or("");
        let paren = after_name.len() - after_name.trim_start().len();
        if name.is_empty() || !after_name.trim_start().starts_with('(') {
            let span = pos..super::line_end(text, pos);
            reply
                .errors
                .push(ReplyError::new(ProtocolError::ActionSyntax, text, span));
            break;
        }
        let args_start = pos + name_len + paren + 1;
        match args::parse_call_args(text.get(args_start..).unwrap_or("")) {
            Ok((args, used)) => {
                let span = pos..args_start + used;
                match super::call_action(name, &args, tools) {
                    Ok(action) => reply.calls.push(Call {
                        action,
                        function: name.to_string(),
                        text: super::snippet(text, &span),
                        span,
                    }),
                    Err(error) => reply.errors.push(ReplyError::new(error, text, span)),
                }
                pos = args_start + used;
            }
            Err(source) => {
                let error_at = args_start + source.offset();
                let span = pos..super::line_end(text, error_at).max(error_at);
                let error = ProtocolError::Args {
                    function: name.to_string(),
                    source,
                };
                reply.errors.push(ReplyError::new(error, text, span));
                break;
            }
        }
    }
    reply
}

fn leading_ws(text: &str) -> usize {
    text.len() - text.trim_start().len()
}

/// The text without a leading `Thought:` label, trimmed.
fn strip_label(text: &str) -> &str {
    match THOUGHT.find(text) {
        Some(m) => text.get(m.end()..).unwrap_or("").trim(),
        None => text.trim(),
    }
}

#[cfg(test)]
mod tests {
    use crate::action::Action;
    use crate::protocol::{ModelFamily, Protocol};

    #[test]
    fn thought_and_actions() {
        let reply = Protocol::new(ModelFamily::UiTars).parse(
            "Thought: I need to save.\nAction: hotkey(key='ctrl s')\n\ntype(content='It\\'s done\\n')",
        );
        assert_eq!(reply.errors, vec![]);
        assert_eq!(reply.thought.as_deref(), Some("I need to save."));
        assert_eq!(
            reply.actions().cloned().collect::<Vec<_>>(),
            vec![
                Action::Key {
                    keys: vec!["ctrl".into(), "s".into()]
                },
                Action::Type {
                    text: "It's done\n".into()
                }
            ]
        );
    }
}
