//! What vlad writes to the model: system prompts rendered from the templates in `prompts/`
//! (with the action space and tool list of an agent profile), the text that reports parse
//! errors, and the `*RESULT*: … *RETURN*:` write-back inside the same assistant turn.
//!
//! The templates are compiled into the binary; [`Prompts::from_dir`] reads edited copies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::functions::{ActionSpace, Function, ParamKind};
use super::qwen2vl;
use super::{MarkerStyle, ReplyError};
use crate::action::Action;

/// The template files, by name, as compiled in.
const BUILTIN: [(&str, &str); 5] = [
    ("desktop.j2", include_str!("../../prompts/desktop.j2")),
    ("android.j2", include_str!("../../prompts/android.j2")),
    ("grounding.j2", include_str!("../../prompts/grounding.j2")),
    (
        "parse_errors.j2",
        include_str!("../../prompts/parse_errors.j2"),
    ),
    (
        "functions.json",
        include_str!("../../prompts/functions.json"),
    ),
];

/// Why a prompt could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read prompt file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("prompt template {name} is invalid or failed to render: {source}")]
    Template {
        name: String,
        source: minijinja::Error,
    },
    #[error("prompts/functions.json is invalid: {source}")]
    Docs { source: serde_json::Error },
    #[error("prompts/functions.json has no description for {what}; add one")]
    MissingDoc { what: String },
}

/// Which system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptKind {
    Desktop,
    Android,
    Grounding,
}

impl PromptKind {
    fn template(self) -> &'static str {
        match self {
            Self::Desktop => "desktop.j2",
            Self::Android => "android.j2",
            Self::Grounding => "grounding.j2",
        }
    }

    /// The action space of this kind of agent when the profile names none.
    pub fn default_space(self) -> ActionSpace {
        match self {
            Self::Android => ActionSpace::android(),
            Self::Desktop | Self::Grounding => ActionSpace::desktop(),
        }
    }
}

/// A tool plugin as the model sees it: name, description and a JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub parameters: Value,
}

/// What a system prompt is rendered with.
#[derive(Debug, Clone, Default)]
pub struct PromptContext {
    /// The profile's functions; the kind's default when `None`.
    pub space: Option<ActionSpace>,
    pub tools: Vec<ToolSpec>,
    pub markers: MarkerStyle,
    /// For grounding: what to find.
    pub query: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Docs {
    params: BTreeMap<String, String>,
    functions: BTreeMap<String, String>,
}

/// The loaded prompt templates.
#[derive(Debug)]
pub struct Prompts {
    env: Environment<'static>,
    docs: Docs,
}

impl Prompts {
    /// The templates compiled into vlad.
    pub fn builtin() -> Result<Self, RenderError> {
        Self::from_sources(BUILTIN.iter().map(|(n, s)| (*n, (*s).to_string())))
    }

    /// The templates in `dir` (`desktop.j2`, `android.j2`, `grounding.j2`, `parse_errors.j2`,
    /// `functions.json`); a file that is not there is taken from the built-in set.
    pub fn from_dir(dir: &Path) -> Result<Self, RenderError> {
        let mut sources = Vec::new();
        for (name, builtin) in BUILTIN {
            let path = dir.join(name);
            let source = match std::fs::read_to_string(&path) {
                Ok(source) => source,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => builtin.to_string(),
                Err(source) => return Err(RenderError::Read { path, source }),
            };
            sources.push((name, source));
        }
        Self::from_sources(sources)
    }

    fn from_sources(
        sources: impl IntoIterator<Item = (&'static str, String)>,
    ) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        let mut docs = None;
        for (name, source) in sources {
            if name.ends_with(".json") {
                docs = Some(
                    serde_json::from_str(&source).map_err(|source| RenderError::Docs { source })?,
                );
                continue;
            }
            env.add_template_owned(name, source)
                .map_err(|source| RenderError::Template {
                    name: name.to_string(),
                    source,
                })?;
        }
        let docs = docs.ok_or_else(|| RenderError::MissingDoc {
            what: "anything (the file is missing)".to_string(),
        })?;
        Ok(Self { env, docs })
    }

    /// The system prompt of `kind` for a profile's functions and tools.
    pub fn system_prompt(
        &self,
        kind: PromptKind,
        ctx: &PromptContext,
    ) -> Result<String, RenderError> {
        let space = ctx.space.clone().unwrap_or_else(|| kind.default_space());
        let mut functions = Vec::new();
        for (function, name) in space.functions() {
            functions.push(context! {
                name => name,
                description => self.function_doc(function, name)?,
                parameters => self.schema(function)?,
            });
        }
        for tool in &ctx.tools {
            functions.push(context! {
                name => tool.name,
                description => tool.description,
                parameters => tool.parameters.to_string(),
            });
        }
        let example = space
            .functions()
            .next()
            .map(|(f, _)| qwen2vl::render_call(&sample(f), &space, ctx.markers))
            .unwrap_or_default();
        let finish = space
            .contains(Function::Finish)
            .then(|| space.name_of(Function::Finish));
        let call_user = space
            .contains(Function::CallUser)
            .then(|| space.name_of(Function::CallUser));
        self.render(
            kind.template(),
            context! {
                functions,
                example,
                finish,
                call_user,
                markers => markers(ctx.markers),
                query => ctx.query,
            },
        )
    }

    /// The `*RESULT*` text telling the model what in its reply could not be understood.
    pub fn parse_errors(
        &self,
        errors: &[ReplyError],
        style: MarkerStyle,
    ) -> Result<String, RenderError> {
        let errors: Vec<_> = errors
            .iter()
            .map(|e| context! { message => e.message(), text => e.text })
            .collect();
        self.render(
            "parse_errors.j2",
            context! { errors, markers => markers(style) },
        )
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Result<String, RenderError> {
        let template_error = |source| RenderError::Template {
            name: name.to_string(),
            source,
        };
        let template = self.env.get_template(name).map_err(template_error)?;
        let text = template.render(ctx).map_err(template_error)?;
        Ok(text.trim_end().to_string())
    }

    /// The description under the name shown (`Tap`), else under the canonical name (`Click`).
    fn function_doc(&self, function: Function, shown: &str) -> Result<&str, RenderError> {
        self.docs
            .functions
            .get(shown)
            .or_else(|| self.docs.functions.get(function.canonical()))
            .map(String::as_str)
            .ok_or_else(|| RenderError::MissingDoc {
                what: format!("function {}", function.canonical()),
            })
    }

    /// The JSON schema of a built-in's arguments, keys in the order Qwen-Agent writes them.
    fn schema(&self, function: Function) -> Result<String, RenderError> {
        let mut properties = Vec::new();
        let mut required = Vec::new();
        for param in function.params() {
            let description =
                self.docs
                    .params
                    .get(param.name)
                    .ok_or_else(|| RenderError::MissingDoc {
                        what: format!("parameter {}", param.name),
                    })?;
            let kind = match param.kind {
                ParamKind::Point => r#""type": "array", "items": {"type": "number"}"#.to_string(),
                ParamKind::Text => r#""type": "string""#.to_string(),
                ParamKind::Keys => r#""type": "string""#.to_string(),
                ParamKind::Direction => {
                    r#""type": "string", "enum": ["up", "down", "left", "right"]"#.to_string()
                }
                ParamKind::Count | ParamKind::Millis => r#""type": "integer""#.to_string(),
                ParamKind::Seconds => r#""type": "number""#.to_string(),
            };
            let description = Value::String(description.clone());
            properties.push(format!(
                r#""{}": {{{kind}, "description": {description}}}"#,
                param.name
            ));
            if param.required {
                required.push(format!("\"{}\"", param.name));
            }
        }
        Ok(format!(
            r#"{{"type": "object", "properties": {{{}}}, "required": [{}]}}"#,
            properties.join(", "),
            required.join(", ")
        ))
    }
}

/// The markers in one style, as templates see them (`markers.function`, `markers.return`, …).
#[derive(Serialize)]
struct Markers {
    function: String,
    args: String,
    result: String,
    #[serde(rename = "return")]
    ret: String,
}

fn markers(style: MarkerStyle) -> minijinja::Value {
    minijinja::Value::from_serialize(Markers {
        function: style.marker("FUNCTION"),
        args: style.marker("ARGS"),
        result: style.marker("RESULT"),
        ret: style.marker("RETURN"),
    })
}

/// An example call of `function` for the prompt.
fn sample(function: Function) -> Action<f64> {
    match function {
        Function::Click => Action::Click { x: 348.0, y: 291.0 },
        Function::DoubleClick => Action::DoubleClick { x: 348.0, y: 291.0 },
        Function::RightClick => Action::RightClick { x: 348.0, y: 291.0 },
        Function::LongPress => Action::LongPress {
            x: 348.0,
            y: 291.0,
            ms: 1000,
        },
        Function::Drag => Action::Drag {
            x: 200.0,
            y: 500.0,
            to_x: 800.0,
            to_y: 500.0,
            ms: None,
        },
        Function::Swipe => Action::Swipe {
            x: 500.0,
            y: 800.0,
            to_x: 500.0,
            to_y: 200.0,
            ms: None,
        },
        Function::Scroll => Action::Scroll {
            x: 500.0,
            y: 500.0,
            direction: crate::action::ScrollDirection::Down,
            amount: 3,
        },
        Function::Type => Action::Type {
            text: "hello".to_string(),
        },
        Function::Key => Action::Key {
            keys: vec!["ctrl".to_string(), "s".to_string()],
        },
        Function::Wait => Action::Wait { seconds: 2.0 },
        Function::Home => Action::Home,
        Function::Back => Action::Back,
        Function::Enter => Action::Enter,
        Function::AppSwitch => Action::AppSwitch,
        Function::OpenApp => Action::OpenApp {
            name: "Settings".to_string(),
        },
        Function::Finish => Action::Finish {
            answer: "Done.".to_string(),
        },
        Function::CallUser => Action::CallUser {
            question: "Which account?".to_string(),
        },
    }
}

/// One part of a result: text, or the new screenshot (the caller places the image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultPart {
    Text(String),
    Image,
}

/// What to append to the assistant turn: text, or the place of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Text(String),
    Image,
}

/// The write-back of one step, to append to the assistant text `assistant` (the reply as kept,
/// see [`Reply::turn_end`](super::Reply::turn_end)): `*RESULT*: <parts>` on a new line, then
/// `\n*RETURN*:`, after which the model continues in the same turn. Parts are separated by a
/// space; the marker spelling follows `style`.
pub fn result_segments(assistant: &str, style: MarkerStyle, parts: &[ResultPart]) -> Vec<Segment> {
    let newline = if assistant.is_empty() || assistant.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let mut segments = Vec::new();
    let mut text = format!("{newline}{}: ", style.marker("RESULT"));
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        match part {
            ResultPart::Text(t) => text.push_str(t),
            ResultPart::Image => {
                segments.push(Segment::Text(std::mem::take(&mut text)));
                segments.push(Segment::Image);
            }
        }
    }
    text.push('\n');
    text.push_str(&style.marker("RETURN"));
    text.push(':');
    segments.push(Segment::Text(text));
    segments.retain(|s| !matches!(s, Segment::Text(t) if t.is_empty()));
    segments
}

/// [`result_segments`] for a text-only result, as one string.
pub fn result_text(assistant: &str, style: MarkerStyle, text: &str) -> String {
    result_segments(assistant, style, &[ResultPart::Text(text.to_string())])
        .into_iter()
        .map(|s| match s {
            Segment::Text(t) => t,
            Segment::Image => String::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_back_follows_the_paper() {
        let turn = "I need to go home.\n*FUNCTION*: Home *ARGS*: {}\n";
        assert_eq!(
            result_segments(turn, MarkerStyle::Asterisk, &[ResultPart::Image]),
            vec![
                Segment::Text("*RESULT*: ".into()),
                Segment::Image,
                Segment::Text("\n*RETURN*:".into())
            ]
        );
        assert_eq!(
            result_text("*FUNCTION*: Home *ARGS*: {}", MarkerStyle::Flower, "ok"),
            "\n✿RESULT✿: ok\n✿RETURN✿:"
        );
        assert_eq!(
            result_segments(
                "",
                MarkerStyle::Asterisk,
                &[ResultPart::Text("Typed.".into()), ResultPart::Image]
            ),
            vec![
                Segment::Text("*RESULT*: Typed. ".into()),
                Segment::Image,
                Segment::Text("\n*RETURN*:".into())
            ]
        );
    }
}
