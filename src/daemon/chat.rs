//! The OpenAI-compatible endpoint: `GET /v1/models` and `POST /v1/chat/completions` (JSON or
//! Server-Sent Events) over the embedded engine. Requests are checked and their images decoded
//! before generation starts, so a bad request gets a 4xx rather than a broken stream.

use std::convert::Infallible;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{ApiError, AppState, EngineSlot};
use crate::engine::{
    self, Content, EngineError, FinishReason, Generation, GenerationOptions, Message, Part, Prompt,
    Qwen2Vl,
};

/// Largest width or height of an image in a request, in pixels.
const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most bytes an image may take once decoded.
const MAX_IMAGE_ALLOC: u64 = 512 << 20;

/// A chat-completions request. Fields vlad does not implement are accepted only at their
/// neutral value; anything unknown is a 400 that names it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    /// Accepted and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    /// vLLM's extensions for continuing an unfinished assistant turn.
    #[serde(default)]
    continue_final_message: bool,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<ChatContent>,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatContent {
    Text(String),
    Parts(Vec<ChatPart>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ChatPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Object {
        url: String,
        #[serde(default)]
        #[allow(dead_code)]
        detail: Option<String>,
    },
    Bare(String),
}

impl ImageUrl {
    fn url(&self) -> &str {
        match self {
            Self::Object { url, .. } | Self::Bare(url) => url,
        }
    }
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "vlad",
        }],
    }))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "the request body is larger than the daemon accepts; send smaller images or raise --max-body-mb",
            )
        } else {
            ApiError::new(status, format!("cannot read the request body: {e}"))
        }
    })?;
    let request: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a valid chat-completions request: {e}"
        ))
    })?;
    if request.model != state.model_name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model {:?} is not served here; this daemon serves {:?} (GET /v1/models)",
                request.model, state.model_name
            ),
        ));
    }
    if let EngineSlot::Failed(why) = &state.engine {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why.clone()));
    }
    let (prompt, options) = build(&request, state.allow_local_files)?;
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = now();
    let admission = match Admission::enter(&state) {
        Ok(a) => a,
        Err(e) => return Ok(with_retry_after(e)),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let options = GenerationOptions {
        cancel: Some(cancel.clone()),
        ..options
    };
    if request.stream {
        Ok(stream(
            state,
            prompt,
            options,
            id,
            created,
            include_usage,
            admission,
            cancel,
        )
        .into_response())
    } else {
        // A client that goes away (or the time limit) drops this future: stop generating.
        let _cancel_on_drop = CancelOnDrop(cancel);
        let s = state.clone();
        let generation = tokio::task::spawn_blocking(move || {
            let _admission = admission;
            with_engine(&s, |m| m.generate(&prompt, &options, |_| {}))
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("generation failed: {e}"),
            )
        })??;
        Ok(Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "finish_reason": finish_reason(&generation.finish_reason),
            }],
            "usage": usage(&generation),
        }))
        .into_response())
    }
}

/// Checks a request and turns it into the engine's prompt and options (images decoded here).
fn build(
    request: &ChatRequest,
    allow_local_files: bool,
) -> Result<(Prompt, GenerationOptions), ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::bad_request(
            "\"messages\" is empty; send at least one message",
        ));
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "\"n\" must be 1: vlad returns one choice per request",
        ));
    }
    for (name, value) in [
        ("frequency_penalty", request.frequency_penalty),
        ("presence_penalty", request.presence_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad_request(format!(
                "\"{name}\" is not supported; leave it out or at 0"
            )));
        }
    }
    if request.add_generation_prompt == Some(request.continue_final_message) {
        return Err(ApiError::bad_request(
            "\"add_generation_prompt\" must be the opposite of \"continue_final_message\"",
        ));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (index, m) in request.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::bad_request(format!(
                "messages[{index}]: role {:?} is not supported (system, user or assistant)",
                m.role
            )));
        }
        let content = match &m.content {
            None => Content::Text(String::new()),
            Some(ChatContent::Text(t)) => Content::Text(t.clone()),
            Some(ChatContent::Parts(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (p, part) in parts.iter().enumerate() {
                    out.push(match part {
                        ChatPart::Text { text } => Part::Text(text.clone()),
                        ChatPart::ImageUrl { image_url } => Part::Image(Arc::new(
                            decode_image(image_url.url(), allow_local_files).map_err(|e| {
                                ApiError::bad_request(format!(
                                    "messages[{index}].content[{p}]: {e}"
                                ))
                            })?,
                        )),
                    });
                }
                Content::Parts(out)
            }
        };
        messages.push(Message {
            role: m.role.clone(),
            content,
        });
    }
    if request.continue_final_message
        && request
            .messages
            .last()
            .is_none_or(|m| m.role != "assistant")
    {
        return Err(ApiError::bad_request(
            "\"continue_final_message\" needs an assistant message last",
        ));
    }
    let max_new_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(GenerationOptions::default().max_new_tokens);
    if max_new_tokens == 0 {
        return Err(ApiError::bad_request("\"max_tokens\" must be at least 1"));
    }
    if let Some(t) = request.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::bad_request(
            "\"temperature\" must be between 0 and 2",
        ));
    }
    if let Some(p) = request.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::bad_request("\"top_p\" must be in (0, 1]"));
    }
    let stop_strings = match &request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("\"stop\" strings must not be empty"));
    }
    let greedy = match request.temperature {
        Some(0.0) => Some(true),
        Some(_) => Some(false),
        None if request.top_p.is_some() => Some(false),
        None => None,
    };
    let options = GenerationOptions {
        max_new_tokens,
        greedy,
        temperature: request.temperature.filter(|t| *t > 0.0),
        top_p: request.top_p,
        seed: request.seed.unwrap_or_else(rand::random),
        stop_strings,
        ..GenerationOptions::default()
    };
    let prompt = Prompt {
        messages,
        continue_final_message: request.continue_final_message,
    };
    Ok((prompt, options))
}

/// Decodes an `image_url`: a base64 data URL, or (when allowed) a local file path.
fn decode_image(url: &str, allow_local_files: bool) -> Result<image::RgbImage, String> {
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, payload) = rest
            .split_once(',')
            .ok_or("the data URL has no comma before its payload")?;
        if !meta.ends_with(";base64") {
            return Err("only base64 data URLs are supported (data:image/png;base64,…)".into());
        }
        base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| format!("the data URL's base64 is invalid: {e}"))?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(
            "remote image URLs are not fetched; send the image as a base64 data URL".into(),
        );
    } else {
        let path = url.strip_prefix("file://").unwrap_or(url);
        if !allow_local_files {
            return Err(format!(
                "{url:?} is not a data URL; local file paths are refused unless the daemon runs with --allow-local-files"
            ));
        }
        if !std::path::Path::new(path).is_absolute() {
            return Err(format!("local image path {path:?} must be absolute"));
        }
        std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?
    };
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| format!("cannot decode the image (PNG, JPEG or WebP): {e}"))?;
    Ok(engine::image::to_rgb_like_pillow(decoded))
}

/// Runs `f` on the loaded engine (callers are on a blocking thread).
fn with_engine(
    state: &AppState,
    f: impl FnOnce(&mut Qwen2Vl) -> Result<Generation, EngineError>,
) -> Result<Generation, ApiError> {
    let EngineSlot::Ready(mutex) = &state.engine else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is not loaded",
        ));
    };
    // A panic during an earlier generation may have left the KV cache half-written.
    let mut engine = mutex.lock().map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "an earlier generation crashed and left the model in an unknown state; restart `vlad serve`",
        )
    })?;
    f(&mut engine).map_err(engine_error)
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Image(_)
        | EngineError::Prompt(_)
        | EngineError::Option(_)
        | EngineError::Template(_) => ApiError::bad_request(e.to_string()),
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos(_) | FinishReason::StopString(_) => "stop",
        FinishReason::MaxTokens => "length",
        // Only a client that went away cancels; nobody reads this one.
        FinishReason::Cancelled => "stop",
    }
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_token_ids.len(),
        "completion_tokens": g.token_ids.len(),
        "total_tokens": g.prompt_token_ids.len() + g.token_ids.len(),
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A chat completion admitted past the daemon's limit of pending ones; leaving frees the slot.
struct Admission(Arc<AppState>);

impl Admission {
    /// 429 with `Retry-After` when `max_pending_chats` completions are already waiting or running.
    fn enter(state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = state.limits.max_pending_chats;
        let admitted = state
            .pending_chats
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            Ok(Self(state.clone()))
        } else {
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{limit} completions are already waiting for the model; retry shortly"),
            ))
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.pending_chats.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets the generation's cancel flag when dropped (the request's future went away).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The `Retry-After` a 429 carries.
fn with_retry_after(error: ApiError) -> Response {
    if error.status == StatusCode::TOO_MANY_REQUESTS {
        ([(header::RETRY_AFTER, "1")], error).into_response()
    } else {
        error.into_response()
    }
}

/// The SSE answer: a role chunk, one chunk per piece of text, a final chunk with the finish
/// reason, optionally a usage chunk, then `[DONE]` (an error after the start is sent as an
/// `{"error": …}` event before `[DONE]`). The blocking generation thread writes the events; a
/// client that goes away cancels the generation at the next token, and so does the daemon's
/// generation time limit (reported as an error event).
#[allow(clippy::too_many_arguments)]
fn stream(
    state: Arc<AppState>,
    prompt: Prompt,
    options: GenerationOptions,
    id: String,
    created: u64,
    include_usage: bool,
    admission: Admission,
    cancel: Arc<AtomicBool>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let model = state.model_name.clone();
    let deadline = Instant::now() + state.limits.generation_timeout;
    let limit_s = state.limits.generation_timeout.as_secs();
    tokio::task::spawn_blocking(move || {
        let _admission = admission;
        let timed_out = AtomicBool::new(false);
        let chunk = |delta: Value, finish: Option<&str>| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        };
        let send = |v: Value| {
            if tx.send(v.to_string()).is_err() {
                // The client went away.
                cancel.store(true, Ordering::SeqCst);
            }
        };
        send(chunk(json!({"role": "assistant", "content": ""}), None));
        let result = with_engine(&state, |m| {
            m.generate(&prompt, &options, |t| {
                send(chunk(json!({"content": t}), None));
                if Instant::now() >= deadline {
                    timed_out.store(true, Ordering::SeqCst);
                    cancel.store(true, Ordering::SeqCst);
                }
            })
        });
        match result {
            Ok(_) if timed_out.load(Ordering::SeqCst) => send(
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the completion took longer than {limit_s} s (--generation-timeout-s); ask for fewer tokens"
                    ),
                )
                .body(),
            ),
            Ok(g) => {
                send(chunk(json!({}), Some(finish_reason(&g.finish_reason))));
                if include_usage {
                    let mut u = chunk(json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&g);
                    send(u);
                }
            }
            Err(e) => send(e.body()),
        }
        let _ = tx.send("[DONE]".to_string());
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok(Event::default().data(data)), rx))
    });
    Sse::new(events)
}
