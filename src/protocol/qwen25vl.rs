//! Qwen2.5-VL tool calls: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, with the
//! `computer_use` and `mobile_use` functions of the Qwen2.5-VL cookbook (an `action` argument
//! names what to do) as well as direct calls of built-ins and tools. Coordinates are pixels of
//! the resized image the model saw. A `<tool_response>` the model wrote itself ends the turn.

use serde_json::{Map, Value};

use super::args::{self, Args};
use super::functions::{self, Function, Resolved};
use super::{Call, ProtocolError, Reply, ReplyError};
use crate::action::Action;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Parses one reply (already cut at end-of-turn tokens).
pub(super) fn parse(text: &str, tools: &[String]) -> Reply<f64> {
    let mut reply = Reply::empty(text.len());
    if let Some(at) = text.find("<tool_response>") {
        reply.turn_end = at;
    }
    let body = text.get(..reply.turn_end).unwrap_or(text);
    let mut first_call = None;
    let mut pos = 0;
    while let Some(found) = body.get(pos..).and_then(|rest| rest.find(OPEN)) {
        let start = pos + found;
        first_call.get_or_insert(start);
        let inner_start = start + OPEN.len();
        // An unclosed call (a cut-off reply) runs to the end.
        let (inner_end, end) = match body.get(inner_start..).and_then(|rest| rest.find(CLOSE)) {
            Some(len) => (inner_start + len, inner_start + len + CLOSE.len()),
            None => (body.len(), body.len()),
        };
        let inner = body.get(inner_start..inner_end).unwrap_or("");
        let span = start..end;
        match read_call(inner, tools) {
            Ok((function, action)) => reply.calls.push(Call {
                action,
                function,
                text: super::snippet(text, &span),
                span,
            }),
            Err(error) => reply.errors.push(ReplyError::new(error, text, span)),
        }
        pos = end;
    }
    match first_call {
        Some(at) => reply.thought = super::non_empty(body.get(..at).unwrap_or("").trim()),
        None => reply.answer = super::non_empty(body.trim()),
    }
    reply
}

/// One call's JSON: returns the function name as written and the action.
fn read_call(inner: &str, tools: &[String]) -> Result<(String, Action<f64>), ProtocolError> {
    let (value, _) = args::parse_value(inner).map_err(|source| ProtocolError::Args {
        function: "<tool_call>".to_string(),
        source,
    })?;
    let Value::Object(mut call) = value else {
        return Err(ProtocolError::ToolCallShape);
    };
    let Some(Value::String(name)) = call.remove("name") else {
        return Err(ProtocolError::ToolCallShape);
    };
    let arguments = ["arguments", "args", "parameters"]
        .iter()
        .find_map(|k| call.remove(*k))
        .unwrap_or(Value::Null);
    let args = Args::from_value(arguments);
    if tools.contains(&name) {
        return super::call_action(&name, &args, tools).map(|a| (name, a));
    }
    match functions::normalize(&name).as_str() {
        "computeruse" | "mobileuse" => computer_use(&name, args),
        _ => super::call_action(&name, &args, tools).map(|a| (name, a)),
    }
}

/// `computer_use`/`mobile_use`: `action` names the function; its arguments use the cookbook's
/// names and units (`coordinate`, `coordinate2`, `time` in seconds, signed `pixels`).
fn computer_use(name: &str, args: Args) -> Result<(String, Action<f64>), ProtocolError> {
    let missing_action = || ProtocolError::MissingAction {
        name: name.to_string(),
    };
    let Args::Named(mut map) = args else {
        return Err(missing_action());
    };
    let Some(Value::String(action)) = map.remove("action") else {
        return Err(missing_action());
    };
    // `system_button` names the function in its `button` argument.
    let function_name = if functions::normalize(&action) == "systembutton" {
        match map.get("button") {
            Some(Value::String(button)) => button.clone(),
            _ => action.clone(),
        }
    } else {
        action.clone()
    };
    let call_error = |source| ProtocolError::from_call(&function_name, source);
    let function = match functions::resolve(&function_name, &[]).map_err(call_error)? {
        Resolved::Builtin(f) => f,
        Resolved::Tool(_) => {
            return Err(call_error(functions::CallError::Unknown {
                name: function_name.clone(),
            }));
        }
    };
    convert_units(function, &mut map);
    let action = functions::bind(function, &Args::Named(map)).map_err(call_error)?;
    Ok((function_name, action))
}

/// The cookbook's units: a long press's `time` is seconds, a scroll's `pixels` is signed
/// (positive scrolls up).
fn convert_units(function: Function, map: &mut Map<String, Value>) {
    match function {
        Function::LongPress => {
            if let Some(seconds) = map.get("time").and_then(Value::as_f64)
                && !map.contains_key("ms")
                && let Some(ms) = serde_json::Number::from_f64(seconds * 1000.0)
            {
                map.remove("time");
                map.insert("ms".to_string(), Value::Number(ms));
            }
        }
        Function::Scroll => {
            if let Some(pixels) = map.get("pixels").and_then(Value::as_f64) {
                if !map.contains_key("direction") {
                    let direction = if pixels >= 0.0 { "up" } else { "down" };
                    map.insert("direction".to_string(), Value::from(direction));
                }
                if !map.contains_key("amount")
                    && let Some(amount) = serde_json::Number::from_f64(pixels.abs())
                {
                    map.insert("amount".to_string(), Value::Number(amount));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::ScrollDirection;
    use crate::protocol::{ModelFamily, Protocol};

    fn actions(text: &str) -> Vec<Action<f64>> {
        let reply = Protocol::new(ModelFamily::Qwen25Vl).parse(text);
        assert_eq!(reply.errors, vec![], "{text}");
        reply.actions().cloned().collect()
    }

    #[test]
    fn cookbook_calls() {
        assert_eq!(
            actions(
                "<tool_call>\n{\"name\": \"computer_use\", \"arguments\": {\"action\": \"left_click\", \"coordinate\": [640, 360]}}\n</tool_call>"
            ),
            vec![Action::Click { x: 640.0, y: 360.0 }]
        );
        assert_eq!(
            actions(
                "<tool_call>{\"name\": \"mobile_use\", \"arguments\": {\"action\": \"long_press\", \"coordinate\": [5, 6], \"time\": 2}}</tool_call>"
            ),
            vec![Action::LongPress {
                x: 5.0,
                y: 6.0,
                ms: 2000
            }]
        );
        assert_eq!(
            actions(
                "<tool_call>{\"name\": \"mobile_use\", \"arguments\": {\"action\": \"system_button\", \"button\": \"Back\"}}</tool_call>"
            ),
            vec![Action::Back]
        );
        assert_eq!(
            actions(
                "<tool_call>{\"name\": \"computer_use\", \"arguments\": {\"action\": \"scroll\", \"coordinate\": [1, 2], \"pixels\": -5}}</tool_call>"
            ),
            vec![Action::Scroll {
                x: 1.0,
                y: 2.0,
                direction: ScrollDirection::Down,
                amount: 5
            }]
        );
    }
}
