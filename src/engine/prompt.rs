//! What a caller asks the engine: ChatML messages whose content is text or a list of text, image
//! and video parts, in any order, across any number of turns.

use std::sync::Arc;

use image::RgbImage;

/// One part of a message's content.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    /// A decoded RGB image at its original size.
    Image(Arc<RgbImage>),
    /// A video as its frames, in order.
    Video(Arc<Vec<RgbImage>>),
}

/// A message's content: a plain string (rendered as is) or a list of parts.
#[derive(Debug, Clone)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One chat turn.
#[derive(Debug, Clone)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

impl Message {
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Content::Text(text.into()),
        }
    }

    pub fn parts(role: impl Into<String>, parts: Vec<Part>) -> Self {
        Self {
            role: role.into(),
            content: Content::Parts(parts),
        }
    }

    /// The media of this message in order of appearance.
    pub fn media(&self) -> impl Iterator<Item = &Part> {
        let parts: &[Part] = match &self.content {
            Content::Text(_) => &[],
            Content::Parts(p) => p,
        };
        parts
            .iter()
            .filter(|p| matches!(p, Part::Image(_) | Part::Video(_)))
    }
}

/// A whole conversation to complete.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub messages: Vec<Message>,
    /// Continue the last message (an unfinished assistant turn) instead of opening a new
    /// assistant turn. This is how the agent writes `*RESULT*` back inside the same turn.
    pub continue_final_message: bool,
}

impl Prompt {
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            continue_final_message: false,
        }
    }
}

/// Errors in a messages file (`vlad generate --messages`, API requests).
#[derive(Debug, thiserror::Error)]
pub enum MessagesError {
    #[error("message #{index}: {message}")]
    Invalid { index: usize, message: String },
    #[error("message #{index}: {path}: {source}")]
    Media {
        index: usize,
        path: std::path::PathBuf,
        #[source]
        source: super::image::ImageError,
    },
}

impl Prompt {
    /// Builds a prompt from the JSON chat form: a list of `{"role", "content"}` where content is a
    /// string or a list of `{"type":"text","text"}`, `{"type":"image","image":PATH}`,
    /// `{"type":"video","video":[PATH, …]}`. Relative paths resolve against `base`.
    pub fn from_json_messages(
        value: &serde_json::Value,
        base: &std::path::Path,
    ) -> Result<Self, MessagesError> {
        let list = value.as_array().ok_or(MessagesError::Invalid {
            index: 0,
            message: "expected a JSON list of messages".into(),
        })?;
        let mut messages = Vec::with_capacity(list.len());
        for (index, m) in list.iter().enumerate() {
            let invalid = |message: String| MessagesError::Invalid { index, message };
            let role = m
                .get("role")
                .and_then(|r| r.as_str())
                .ok_or_else(|| invalid("needs a \"role\" string".into()))?;
            let content = match m.get("content") {
                Some(serde_json::Value::String(s)) => Content::Text(s.clone()),
                Some(serde_json::Value::Array(parts)) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for part in parts {
                        out.push(parse_part(part, base, index)?);
                    }
                    Content::Parts(out)
                }
                _ => {
                    return Err(invalid(
                        "needs \"content\": a string or a list of parts".into(),
                    ));
                }
            };
            messages.push(Message {
                role: role.to_string(),
                content,
            });
        }
        Ok(Prompt::new(messages))
    }
}

fn parse_part(
    part: &serde_json::Value,
    base: &std::path::Path,
    index: usize,
) -> Result<Part, MessagesError> {
    let invalid = |message: String| MessagesError::Invalid { index, message };
    let load = |p: &serde_json::Value| -> Result<RgbImage, MessagesError> {
        let rel = p
            .as_str()
            .ok_or_else(|| invalid("image and video frame paths must be strings".into()))?;
        let path = base.join(rel);
        super::image::load_rgb(&path).map_err(|source| MessagesError::Media {
            index,
            path,
            source,
        })
    };
    match part.get("type").and_then(|t| t.as_str()) {
        Some("text") => part
            .get("text")
            .and_then(|t| t.as_str())
            .map(|t| Part::Text(t.to_string()))
            .ok_or_else(|| invalid("a text part needs a \"text\" string".into())),
        Some("image") => {
            let p = part
                .get("image")
                .ok_or_else(|| invalid("an image part needs an \"image\" path".into()))?;
            Ok(Part::Image(Arc::new(load(p)?)))
        }
        Some("video") => {
            let frames = part
                .get("video")
                .and_then(|v| v.as_array())
                .ok_or_else(|| {
                    invalid("a video part needs a \"video\" list of frame paths".into())
                })?;
            if frames.is_empty() {
                return Err(invalid("a video needs at least one frame".into()));
            }
            let frames = frames.iter().map(load).collect::<Result<Vec<_>, _>>()?;
            Ok(Part::Video(Arc::new(frames)))
        }
        other => Err(invalid(format!(
            "unknown part type {other:?}; use \"text\", \"image\" or \"video\""
        ))),
    }
}
