//! Model text ⇄ typed actions: the function-call formats of the supported model families,
//! grounding boxes, coordinate spaces, and how results are written back to the model.
//!
//! The entry type is [`Protocol`]: [`Protocol::parse`] turns one reply into a [`Reply`] whose
//! points are still in the model's space, [`Reply::map`] converts them into environment pixels
//! with a [`CoordMap`], and [`render`] produces system prompts and the `*RESULT*`/`*RETURN*`
//! write-back. Parsing never fails as a whole and never panics: everything that could not be
//! understood is a [`ReplyError`] (what, where, the offending text) the agent can show the model.

pub mod args;
pub mod cli;
pub mod coords;
pub mod functions;
pub mod grounding;
mod qwen25vl;
pub mod qwen2vl;
pub mod render;
mod uitars;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use args::ArgsError;
pub use coords::{CoordError, CoordMap, CoordSpace, Size};
pub use functions::{ActionSpace, CallError, Function};
pub use grounding::{BoxError, GroundedBox};

use crate::action::Action;

/// The reply format a model was trained on. Chosen by configuration, never guessed from text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// The Qwen2-VL paper: `*FUNCTION*: Tap *ARGS*: {"point": (348,291)}`, 0–1000 coordinates.
    #[default]
    Qwen2Vl,
    /// Qwen2.5-VL: `<tool_call>{"name": …, "arguments": …}</tool_call>`, resized-image pixels.
    Qwen25Vl,
    /// UI-TARS 1.5: `Thought: …\nAction: click(start_box='(x,y)')`, resized-image pixels.
    UiTars,
}

impl ModelFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qwen2Vl => "qwen2vl",
            Self::Qwen25Vl => "qwen25vl",
            Self::UiTars => "uitars",
        }
    }

    /// The space this family's coordinates live in, given the size of the image the model saw
    /// (after smart_resize). UI-TARS 1.0 used 0–1000: build its [`CoordSpace`] directly.
    pub fn coord_space(self, model_image: Size) -> CoordSpace {
        match self {
            Self::Qwen2Vl => CoordSpace::Relative1000,
            Self::Qwen25Vl | Self::UiTars => CoordSpace::ImagePixels(model_image),
        }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown model family name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model family `{0}`; use qwen2vl, qwen25vl or uitars")]
pub struct UnknownFamily(pub String);

impl FromStr for ModelFamily {
    type Err = UnknownFamily;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match functions::normalize(s).as_str() {
            "qwen2vl" => Ok(Self::Qwen2Vl),
            "qwen25vl" => Ok(Self::Qwen25Vl),
            "uitars" | "uitars15" => Ok(Self::UiTars),
            _ => Err(UnknownFamily(s.to_string())),
        }
    }
}

/// How the model spelled the paper's markers; results are written back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarkerStyle {
    /// `*FUNCTION*`, `*ARGS*`, `*RESULT*`, `*RETURN*` (the paper).
    #[default]
    Asterisk,
    /// `✿FUNCTION✿`, `✿ARGS✿`, `✿RESULT✿`, `✿RETURN✿` (Qwen-Agent).
    Flower,
}

impl MarkerStyle {
    /// The marker for `word` (`FUNCTION`, `ARGS`, `RESULT`, `RETURN`) in this style.
    pub fn marker(self, word: &str) -> String {
        match self {
            Self::Asterisk => format!("*{word}*"),
            Self::Flower => format!("✿{word}✿"),
        }
    }
}

/// The parser of one agent: its model family and the tool names of its profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protocol {
    family: ModelFamily,
    tools: Vec<String>,
}

impl Protocol {
    pub fn new(family: ModelFamily) -> Self {
        Self {
            family,
            tools: Vec::new(),
        }
    }

    /// Tool names the model may call besides the built-in functions.
    pub fn with_tools<I, S>(mut self, tools: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tools = tools.into_iter().map(Into::into).collect();
        self
    }

    pub fn family(&self) -> ModelFamily {
        self.family
    }

    pub fn tools(&self) -> &[String] {
        &self.tools
    }

    /// Strings at which generation should stop: the model must not invent its own results.
    pub fn stop_strings(&self) -> &'static [&'static str] {
        match self.family {
            ModelFamily::Qwen2Vl => &["*RESULT*", "✿RESULT✿"],
            ModelFamily::Qwen25Vl => &["<tool_response>"],
            ModelFamily::UiTars => &[],
        }
    }

    /// Parses one reply. Points stay in the model's space; see [`Reply::map`].
    pub fn parse(&self, reply: &str) -> Reply<f64> {
        let text = cut_at_end_tokens(reply);
        let mut parsed = match self.family {
            ModelFamily::Qwen2Vl => qwen2vl::parse(text, &self.tools),
            ModelFamily::Qwen25Vl => qwen25vl::parse(text, &self.tools),
            ModelFamily::UiTars => uitars::parse(text, &self.tools),
        };
        if text.trim().is_empty() {
            parsed.errors.push(ReplyError::new(
                ProtocolError::EmptyReply,
                text,
                0..text.len(),
            ));
        }
        // Boxes in the free text; a box inside a call is part of that call.
        let body = text.get(..parsed.turn_end).unwrap_or(text);
        let taken: Vec<Range<usize>> = parsed
            .calls
            .iter()
            .map(|c| c.span.clone())
            .chain(parsed.errors.iter().map(|e| e.span.clone()))
            .collect();
        let overlaps = |span: &Range<usize>| {
            taken
                .iter()
                .any(|t| span.start < t.end && t.start < span.end)
        };
        let scan = grounding::find_boxes(body);
        for (b, span) in scan.boxes {
            if !overlaps(&span) {
                let text = snippet(text, &span);
                parsed.boxes.push(Located {
                    item: b,
                    span,
                    text,
                });
            }
        }
        for (e, span) in scan.errors {
            if !overlaps(&span) {
                let error = ProtocolError::Box { source: e };
                parsed.errors.push(ReplyError::new(error, text, span));
            }
        }
        parsed.errors.sort_by_key(|e| e.span.start);
        parsed
    }
}

/// A value with the reply text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub item: T,
    /// Byte range in the reply.
    pub span: Range<usize>,
    /// The text there, shortened to [`MAX_ERROR_TEXT`] characters.
    pub text: String,
}

/// One parsed function call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call<C = i32> {
    pub action: Action<C>,
    /// The function name as the model wrote it.
    pub function: String,
    /// Byte range of the whole call in the reply.
    pub span: Range<usize>,
    /// The call as written, shortened to [`MAX_ERROR_TEXT`] characters.
    pub text: String,
}

/// Everything understood from one reply, and everything that was not.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<C = i32> {
    /// The reasoning before the first call.
    pub thought: Option<String>,
    /// The calls, in order. An agent performs them one after another.
    pub calls: Vec<Call<C>>,
    /// Grounding boxes in the free text (not those used as call arguments).
    pub boxes: Vec<Located<GroundedBox<C>>>,
    /// The final answer: set when the reply holds no call at all.
    pub answer: Option<String>,
    /// What could not be understood, in reply order.
    pub errors: Vec<ReplyError>,
    /// The marker spelling the model used, for writing results back.
    pub markers: MarkerStyle,
    /// Bytes of the reply that belong to this turn: a `*RESULT*` the model wrote itself (it
    /// should have stopped there) and everything after it are not part of the turn.
    pub turn_end: usize,
}

impl<C> Reply<C> {
    fn empty(len: usize) -> Self {
        Self {
            thought: None,
            calls: Vec::new(),
            boxes: Vec::new(),
            answer: None,
            errors: Vec::new(),
            markers: MarkerStyle::default(),
            turn_end: len,
        }
    }

    /// The actions of the calls, in order.
    pub fn actions(&self) -> impl Iterator<Item = &Action<C>> {
        self.calls.iter().map(|c| &c.action)
    }

    /// True when the reply ends the task: a final answer, or a `finish` call.
    pub fn is_final(&self) -> bool {
        (self.calls.is_empty() && self.errors.is_empty() && self.answer.is_some())
            || self.actions().any(|a| matches!(a, Action::Finish { .. }))
    }
}

impl Reply<f64> {
    /// Converts every point into environment pixels. A call or box with a point outside the
    /// model's range is dropped and becomes an error instead.
    pub fn map(self, map: &CoordMap) -> Reply<i32> {
        let mut errors = self.errors;
        let mut calls = Vec::with_capacity(self.calls.len());
        for call in self.calls {
            match call.action.map_points(|x, y| map.map_point(x, y)) {
                Ok(action) => calls.push(Call {
                    action,
                    function: call.function,
                    span: call.span,
                    text: call.text,
                }),
                Err(source) => errors.push(ReplyError {
                    error: ProtocolError::Coord {
                        function: call.function,
                        source,
                    },
                    span: call.span,
                    text: call.text,
                }),
            }
        }
        let mut boxes = Vec::with_capacity(self.boxes.len());
        for Located {
            item: b,
            span,
            text,
        } in self.boxes
        {
            let mapped = map
                .map_point(b.x1, b.y1)
                .and_then(|p1| map.map_point(b.x2, b.y2).map(|p2| (p1, p2)));
            match mapped {
                Ok(((x1, y1), (x2, y2))) => boxes.push(Located {
                    item: GroundedBox {
                        label: b.label,
                        x1,
                        y1,
                        x2,
                        y2,
                    },
                    span,
                    text,
                }),
                Err(source) => errors.push(ReplyError {
                    error: ProtocolError::BoxCoord { source },
                    span,
                    text,
                }),
            }
        }
        errors.sort_by_key(|e| e.span.start);
        Reply {
            thought: self.thought,
            calls,
            boxes,
            answer: self.answer,
            errors,
            markers: self.markers,
            turn_end: self.turn_end,
        }
    }
}

impl<C: Serialize> Reply<C> {
    /// The JSON form of `vlad parse`: `thought`, `actions`, `boxes`, `answer`, `errors`.
    pub fn to_json(&self) -> Value {
        let actions: Vec<Value> = self
            .actions()
            .map(|a| serde_json::to_value(a).unwrap_or(Value::Null))
            .collect();
        let boxes: Vec<Value> = self
            .boxes
            .iter()
            .map(|b| serde_json::to_value(&b.item).unwrap_or(Value::Null))
            .collect();
        let errors: Vec<Value> = self
            .errors
            .iter()
            .map(|e| json!({"message": e.message(), "text": e.text}))
            .collect();
        json!({
            "thought": self.thought,
            "actions": actions,
            "boxes": boxes,
            "answer": self.answer,
            "errors": errors,
        })
    }
}

/// What went wrong with a part of a reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the reply is empty")]
    EmptyReply,
    #[error("*FUNCTION* is not followed by a function name")]
    MissingName,
    #[error("{function} has no *ARGS*; write `*FUNCTION*: {function} *ARGS*: {{...}}`")]
    MissingArgs { function: String },
    #[error("*ARGS* without a *FUNCTION* before it")]
    StrayArgs,
    #[error("the arguments of {function} could not be read: {source}")]
    Args { function: String, source: ArgsError },
    /// An unknown or unsupported function name.
    #[error(transparent)]
    Function(CallError),
    #[error("{function}: {source}")]
    Call { function: String, source: CallError },
    #[error("{function}: {source}")]
    Coord {
        function: String,
        source: CoordError,
    },
    #[error("{source}")]
    Box { source: BoxError },
    #[error("box: {source}")]
    BoxCoord { source: CoordError },
    #[error("a tool call must be a JSON object with \"name\" and \"arguments\"")]
    ToolCallShape,
    #[error("{name} needs an \"action\" argument naming what to do")]
    MissingAction { name: String },
    #[error("expected an action like click(start_box='(x,y)')")]
    ActionSyntax,
}

impl ProtocolError {
    /// Wraps a [`CallError`] of `function`: name errors stand alone, argument errors name the
    /// function.
    pub(crate) fn from_call(function: &str, source: CallError) -> Self {
        match source {
            CallError::Unknown { .. } | CallError::Unsupported { .. } => Self::Function(source),
            source => Self::Call {
                function: function.to_string(),
                source,
            },
        }
    }
}

/// Longest offending text kept in an error, in characters.
pub const MAX_ERROR_TEXT: usize = 200;

/// One problem in a reply: what ([`ProtocolError`]), where (byte range and character
/// position), and the offending text, shortened to [`MAX_ERROR_TEXT`] characters.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyError {
    pub error: ProtocolError,
    /// Byte range in the reply.
    pub span: Range<usize>,
    /// The offending text.
    pub text: String,
}

impl ReplyError {
    /// An error about `span` of `reply`; the text is taken from there.
    pub(crate) fn new(error: ProtocolError, reply: &str, span: Range<usize>) -> Self {
        let text = snippet(reply, &span);
        Self { error, span, text }
    }

    /// The error as one sentence (what and where).
    pub fn message(&self) -> String {
        self.error.to_string()
    }

    /// The character position in `reply` (the text that was parsed) where the problem starts.
    pub fn char_offset(&self, reply: &str) -> usize {
        reply
            .get(..self.span.start)
            .map_or(0, |before| before.chars().count())
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            write!(f, "{}", self.error)
        } else {
            write!(f, "{} (in `{}`)", self.error, self.text)
        }
    }
}

impl std::error::Error for ReplyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The trimmed text of `span`, shortened to [`MAX_ERROR_TEXT`] characters.
pub(crate) fn snippet(reply: &str, span: &Range<usize>) -> String {
    let text = reply.get(span.clone()).unwrap_or("").trim();
    truncate_chars(text, MAX_ERROR_TEXT)
}

/// `text` cut to at most `max` characters, with `…` when something was cut.
pub(crate) fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", text.get(..at).unwrap_or("")),
        None => text.to_string(),
    }
}

/// The reply up to the first end-of-turn token, if the decoder left one in.
fn cut_at_end_tokens(text: &str) -> &str {
    let end = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| text.find(t))
        .min()
        .unwrap_or(text.len());
    text.get(..end).unwrap_or(text)
}

/// Byte offset of the end of the line holding `from` (or the end of the text).
pub(crate) fn line_end(text: &str, from: usize) -> usize {
    text.get(from..)
        .and_then(|rest| rest.find('\n'))
        .map_or(text.len(), |at| from + at)
}

/// Compiles one of this module's constant patterns; every one of them runs in the tests.
pub(crate) fn pattern(re: &str) -> Regex {
    Regex::new(re).unwrap_or_else(|e| unreachable!("constant pattern {re}: {e}"))
}

/// The action for a call of `name` with `args`: a tool of the profile or a built-in function.
pub(crate) fn call_action(
    name: &str,
    args: &args::Args,
    tools: &[String],
) -> Result<Action<f64>, ProtocolError> {
    let call_error = |source| ProtocolError::from_call(name, source);
    match functions::resolve(name, tools).map_err(call_error)? {
        functions::Resolved::Tool(tool) => Ok(Action::Tool {
            name: tool,
            args: args.clone().into_json(),
        }),
        functions::Resolved::Builtin(f) => functions::bind(f, args).map_err(call_error),
    }
}

/// `Some(text)` unless it is empty.
pub(crate) fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_read_their_names() {
        assert_eq!("Qwen2-VL".parse(), Ok(ModelFamily::Qwen2Vl));
        assert_eq!("qwen2.5vl".parse(), Ok(ModelFamily::Qwen25Vl));
        assert_eq!("UI-TARS".parse(), Ok(ModelFamily::UiTars));
        assert!("gpt".parse::<ModelFamily>().is_err());
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate_chars("你好世界", 2), "你好…");
        assert_eq!(truncate_chars("abc", 3), "abc");
        assert_eq!(cut_at_end_tokens("done<|im_end|>\n"), "done");
    }

    #[test]
    fn error_positions_count_characters() {
        let reply = "你好 *FUNCTION*: Nope *ARGS*: {}";
        let parsed = Protocol::default().parse(reply);
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].char_offset(reply), 3);
        assert!(
            parsed.errors[0]
                .to_string()
                .contains("`Nope` is not a known function")
        );
    }
}
