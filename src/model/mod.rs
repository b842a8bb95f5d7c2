//! Where replies come from: the [`Model`] trait and its backends — [`embedded`] (the candle
//! engine in this process), [`openai`] (any OpenAI-compatible chat-completions server with image
//! input) and [`replay`] (recorded replies, for tests, demos and reproducing bugs).
//!
//! The agent only sees [`Model::generate`]: a [`Prompt`] in, a [`Completion`] out.

pub mod embedded;
pub mod openai;
pub mod replay;

use std::path::PathBuf;

use serde::Serialize;

pub use crate::engine::{GenerationOptions, Prompt};
pub use embedded::EmbeddedModel;
pub use openai::{OpenAiConfig, OpenAiModel};
pub use replay::ReplayModel;

/// The default model of the embedded backend.
pub const DEFAULT_MODEL: &str = crate::engine::DEFAULT_MODEL;

/// Why a completion ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model ended its turn.
    EndOfTurn,
    /// One of the stop strings (which); the text ends before it.
    StopString(String),
    /// The token budget ran out.
    Length,
    /// Generation was cancelled (`GenerationOptions::cancel`).
    Cancelled,
    /// The backend did not say.
    Unknown,
}

/// One reply of a model.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The generated text, without a matched stop string.
    pub text: String,
    pub stop: StopReason,
    /// Tokens generated, when the backend reports them.
    pub tokens: Option<usize>,
    /// Seconds the backend took, as it measured them (vision, prefill, decode), when known.
    pub timings: serde_json::Value,
}

/// Why no completion came back.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The replay file has no reply left for this step (`step` counts from 1).
    #[error("{} has no reply left for step {step} (it holds {available}); record more replies or lower --max-steps", path.display())]
    Exhausted {
        path: PathBuf,
        step: usize,
        available: usize,
    },
    #[error("cannot read replies from {}: {message}", path.display())]
    Replay { path: PathBuf, message: String },
    #[error("{url}: the server answered HTTP {status} after {attempts} attempt(s): {body}")]
    Http {
        url: String,
        status: u16,
        attempts: u32,
        body: String,
    },
    #[error(
        "{url}: no answer after {attempts} attempt(s): {message}; check that the server runs and --base-url is right"
    )]
    Unreachable {
        url: String,
        attempts: u32,
        message: String,
    },
    #[error("{url}: the answer is not a chat completion ({message}); the start of it: {body}")]
    Malformed {
        url: String,
        message: String,
        body: String,
    },
    #[error("cannot encode the prompt for the server: {0}")]
    Encode(String),
    #[error("invalid model option: {0}")]
    Option(String),
}

impl ModelError {
    /// True when the replies simply ran out (a normal end of a replayed run).
    pub fn is_exhausted(&self) -> bool {
        matches!(self, Self::Exhausted { .. })
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// A source of replies. Synchronous; a service wraps it in its own task.
pub trait Model: Send {
    /// Completes `prompt` (continuing its final assistant message when
    /// `prompt.continue_final_message` is set). Generation stops at `options.stop_strings`.
    fn generate(&mut self, prompt: &Prompt, options: &GenerationOptions) -> Result<Completion>;

    /// A short name for logs and trajectories (`embedded:Qwen/Qwen2-VL-2B-Instruct`).
    fn name(&self) -> String;

    /// The size of the image the model sees for a `screenshot` (width, height) after its own
    /// resizing, when the backend knows it; model families with pixel coordinates need it.
    fn model_image_size(&self, _screenshot: (u32, u32)) -> Option<(u32, u32)> {
        None
    }
}

/// `text` cut before the earliest of `stops` (what a server does with `stop`), and which one.
pub(crate) fn cut_at_stop(text: &str, stops: &[String]) -> (String, Option<String>) {
    let hit = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|p| (p, s)))
        .min_by_key(|(p, _)| *p);
    match hit {
        Some((pos, stop)) => (text[..pos].to_string(), Some(stop.clone())),
        None => (text.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_at_the_earliest() {
        let stops = vec!["*RESULT*".to_string(), "B".to_string()];
        assert_eq!(
            cut_at_stop("aB *RESULT*", &stops),
            ("a".to_string(), Some("B".to_string()))
        );
        assert_eq!(cut_at_stop("abc", &stops), ("abc".to_string(), None));
    }
}
