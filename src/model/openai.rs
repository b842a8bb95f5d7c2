//! The OpenAI-compatible backend: chat completions over HTTP (vLLM, SGLang, or any server with
//! image input), images sent inline as base64 PNG data URLs.
//!
//! Transient failures (timeouts, refused connections, HTTP 5xx and 429) are retried with
//! exponential backoff; anything else is an error that names the server and what it said. An
//! unfinished assistant turn is continued with vLLM's `continue_final_message` extension.

use std::io::Cursor;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use super::{Completion, GenerationOptions, Model, ModelError, Prompt, Result, StopReason};
use crate::engine::{Content, Part};

/// Where and how to reach the server.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// The API root (`http://host:8000/v1`) or the full `…/chat/completions` URL.
    pub base_url: String,
    /// The served model name.
    pub model: String,
    pub api_key: Option<String>,
    /// Limit for one request, connection to last byte.
    pub timeout: Duration,
    /// Further attempts after a transient failure.
    pub max_retries: u32,
    /// The first wait between attempts; doubled each time, at most 30 s.
    pub backoff: Duration,
}

impl OpenAiConfig {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(120),
            max_retries: 3,
            backoff: Duration::from_millis(500),
        }
    }

    /// The chat-completions URL.
    pub fn endpoint(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        }
    }
}

/// A client of one server.
pub struct OpenAiModel {
    config: OpenAiConfig,
    agent: ureq::Agent,
}

/// Longest answer body read, in bytes.
const MAX_BODY: u64 = 64 << 20;
/// How much of a bad answer goes into an error message, in characters.
const SHOWN_BODY: usize = 300;

impl OpenAiModel {
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        if config.model.trim().is_empty() {
            return Err(ModelError::Option(
                "the served model name is empty; pass --served-model NAME".into(),
            ));
        }
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            return Err(ModelError::Option(format!(
                "--base-url {:?} must start with http:// or https://",
                config.base_url
            )));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self { config, agent })
    }

    /// The JSON body sent for `prompt`.
    pub fn request_body(&self, prompt: &Prompt, options: &GenerationOptions) -> Result<Value> {
        let mut messages = Vec::with_capacity(prompt.messages.len());
        for m in &prompt.messages {
            let content = match &m.content {
                Content::Text(t) => Value::String(t.clone()),
                Content::Parts(parts) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for part in parts {
                        out.push(match part {
                            Part::Text(t) => json!({"type": "text", "text": t}),
                            Part::Image(img) => json!({
                                "type": "image_url",
                                "image_url": {"url": data_url(img)?},
                            }),
                            Part::Video(_) => {
                                return Err(ModelError::Encode(
                                    "videos are not sent to OpenAI-compatible servers".into(),
                                ));
                            }
                        });
                    }
                    Value::Array(out)
                }
            };
            messages.push(json!({"role": m.role, "content": content}));
        }
        let mut body = json!({
            "model": self.config.model,
            "messages": messages,
            "max_tokens": options.max_new_tokens,
            "seed": options.seed,
        });
        if !options.stop_strings.is_empty() {
            body["stop"] = json!(options.stop_strings);
        }
        if options.greedy != Some(false) {
            body["temperature"] = json!(0.0);
        } else if let Some(t) = options.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = options.top_p {
            body["top_p"] = json!(p);
        }
        if prompt.continue_final_message {
            body["continue_final_message"] = json!(true);
            body["add_generation_prompt"] = json!(false);
        }
        Ok(body)
    }

    /// One attempt: `Ok(Ok(answer))`, `Ok(Err(retryable failure))` or a final error.
    fn attempt(&self, url: &str, body: &str, attempts: u32) -> Result<Result<String, Failure>> {
        let mut request = self
            .agent
            .post(url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.config.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = match request.send(body) {
            Ok(r) => r,
            Err(e) => return Ok(Err(Failure::Transport(e.to_string()))),
        };
        let status = response.status().as_u16();
        let text = match response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
        {
            Ok(t) => t,
            Err(e) => return Ok(Err(Failure::Transport(e.to_string()))),
        };
        if status == 429 || status >= 500 {
            return Ok(Err(Failure::Status(status, shorten(&text))));
        }
        if !(200..300).contains(&status) {
            return Err(ModelError::Http {
                url: url.to_string(),
                status,
                attempts,
                body: shorten(&text),
            });
        }
        Ok(Ok(text))
    }

    fn parse_answer(
        &self,
        url: &str,
        text: &str,
        options: &GenerationOptions,
    ) -> Result<Completion> {
        let malformed = |message: &str| ModelError::Malformed {
            url: url.to_string(),
            message: message.to_string(),
            body: shorten(text),
        };
        let value: Value = serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
        let choice = value
            .get("choices")
            .and_then(|c| c.get(0))
            .ok_or_else(|| malformed("no choices[0]"))?;
        let content = match choice.get("message").and_then(|m| m.get("content")) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) => String::new(),
            _ => return Err(malformed("choices[0].message.content is not a string")),
        };
        // Servers that ignore `stop` still must not hand the model's invented results over.
        let (text, local_stop) = super::cut_at_stop(&content, &options.stop_strings);
        let stop = match (
            local_stop,
            choice.get("finish_reason").and_then(Value::as_str),
        ) {
            (Some(s), _) => StopReason::StopString(s),
            (None, Some("length")) => StopReason::Length,
            (None, Some("stop")) => match choice.get("stop_reason").and_then(Value::as_str) {
                Some(s) if options.stop_strings.iter().any(|x| x == s) => {
                    StopReason::StopString(s.to_string())
                }
                _ => StopReason::EndOfTurn,
            },
            _ => StopReason::Unknown,
        };
        let tokens = value
            .get("usage")
            .and_then(|u| u.get("completion_tokens"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        Ok(Completion {
            text,
            stop,
            tokens,
            timings: Value::Null,
        })
    }
}

/// A failure worth another attempt.
enum Failure {
    Transport(String),
    Status(u16, String),
}

impl Model for OpenAiModel {
    fn generate(&mut self, prompt: &Prompt, options: &GenerationOptions) -> Result<Completion> {
        let url = self.config.endpoint();
        let body = self.request_body(prompt, options)?.to_string();
        let mut wait = self.config.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.attempt(&url, &body, attempts)? {
                Ok(text) => return self.parse_answer(&url, &text, options),
                Err(f) => f,
            };
            if attempts > self.config.max_retries {
                return Err(match failure {
                    Failure::Transport(message) => ModelError::Unreachable {
                        url,
                        attempts,
                        message,
                    },
                    Failure::Status(status, body) => ModelError::Http {
                        url,
                        status,
                        attempts,
                        body,
                    },
                });
            }
            match &failure {
                Failure::Transport(m) => {
                    tracing::warn!("{url}: attempt {attempts} failed ({m}); retrying in {wait:?}")
                }
                Failure::Status(s, _) => {
                    tracing::warn!("{url}: HTTP {s} on attempt {attempts}; retrying in {wait:?}")
                }
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    fn name(&self) -> String {
        format!("openai:{}@{}", self.config.model, self.config.base_url)
    }
}

/// The image as a `data:image/png;base64,…` URL.
fn data_url(image: &image::RgbImage) -> Result<String> {
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| ModelError::Encode(format!("PNG encoding failed: {e}")))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    ))
}

fn shorten(text: &str) -> String {
    crate::protocol::truncate_chars(text, SHOWN_BODY)
}
