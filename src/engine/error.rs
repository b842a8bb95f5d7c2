//! Errors of the embedded engine. Each variant names the input at fault and what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the Qwen2-VL engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model folder {path} has no {file}: {hint}")]
    MissingFile {
        path: PathBuf,
        file: String,
        hint: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error(
        "{path}: model_type {found:?} is not supported (vlad's embedded engine runs Qwen2-VL, model_type \"qwen2_vl\"); \
         serve other models with vLLM/SGLang and use the openai backend"
    )]
    UnsupportedModel { path: PathBuf, found: String },
    /// Loading the weights failed; the message names the tensor and its file.
    #[error("cannot load the weights in {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("could not fetch {repo} from the Hugging Face hub: {message}. {hint}")]
    Hub {
        repo: String,
        message: String,
        hint: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("image: {0}")]
    Image(#[from] crate::engine::image::ImageError),
    #[error("prompt: {0}")]
    Prompt(String),
    #[error("invalid option: {0}")]
    Option(String),
    #[error("unsupported device or dtype: {0}")]
    Device(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
