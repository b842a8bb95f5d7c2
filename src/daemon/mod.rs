//! `vlad serve`: a tokio + axum service that loads the embedded engine once and serves it over
//! HTTP — an OpenAI-compatible `POST /v1/chat/completions` (streaming and not) and
//! `GET /v1/models` — behind a bearer token, with JSON errors for every bad request and a
//! graceful shutdown on SIGTERM or Ctrl-C — and a first task API (`/v1/tasks`).
//!
//! Entry point: [`serve`]. Handlers are plain async functions over one `Arc<AppState>`.

mod api_error;
pub mod auth;
mod chat;
mod tasks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::engine::{EngineError, LoadOptions, Qwen2Vl};

pub use api_error::ApiError;
pub use auth::{AuthError, load_or_create_token};

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8780";
/// The default largest request body, in bytes (images travel inline as base64).
pub const DEFAULT_BODY_LIMIT: usize = 32 << 20;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}; pick another address with --listen")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("the model loader thread failed: {0}")]
    Loader(String),
}

/// How clients authenticate.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// A bearer token kept in this file (created with mode 0600 when missing).
    TokenFile(PathBuf),
    /// No authentication (`--no-auth`).
    Disabled,
}

/// Everything `vlad serve` needs to know.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// A model folder or hub id.
    pub model: String,
    /// The name clients use in `"model"`; defaults to the folder's name or the hub id.
    pub served_model_name: Option<String>,
    pub load: LoadOptions,
    pub auth: AuthMode,
    /// Accept `image_url`s that are local file paths (`file://` or absolute).
    pub allow_local_files: bool,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Where task trajectories go (`<dir>/tasks/<id>`); the agent's default when `None`.
    pub data_dir: Option<PathBuf>,
}

/// The loaded model, or why it is not there.
enum EngineSlot {
    Ready(Box<Mutex<Qwen2Vl>>),
    Failed(String),
}

/// State shared by every handler.
pub struct AppState {
    engine: EngineSlot,
    model_name: String,
    /// Unix seconds when the model was loaded (`created` in `/v1/models`).
    created: u64,
    token: Option<String>,
    allow_local_files: bool,
    tasks: tasks::Tasks,
    data_dir: Option<PathBuf>,
}

/// The name a model is served under when none is given: a folder's last component, or the hub id.
pub fn default_served_name(model: &str) -> String {
    let path = std::path::Path::new(model);
    if path.is_dir()
        && let Some(name) = path.file_name().and_then(|n| n.to_str())
    {
        return name.to_string();
    }
    model.to_string()
}

/// Builds the router over `state` (used by [`serve`]; public for embedding in other services).
pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    let api = Router::new()
        .route("/v1/models", get(chat::list_models))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/tasks", post(tasks::submit).get(tasks::list))
        .route("/v1/tasks/{id}", get(tasks::get_task))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(api_error::not_found)
        .method_not_allowed_fallback(api_error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Loads the model, binds `options.listen`, calls `on_ready` with the bound address and serves
/// until SIGTERM or Ctrl-C. A model that fails to load is logged and answered with 503.
pub async fn serve(
    options: ServeOptions,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), DaemonError> {
    let token = match &options.auth {
        AuthMode::TokenFile(path) => Some(load_or_create_token(path)?),
        AuthMode::Disabled => None,
    };
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: options.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| DaemonError::Bind {
        addr: options.listen,
        source,
    })?;
    tracing::info!(model = %options.model, "loading the model");
    let model = options.model.clone();
    let load = options.load.clone();
    let loaded: Result<Qwen2Vl, EngineError> =
        tokio::task::spawn_blocking(move || Qwen2Vl::load(&model, &load))
            .await
            .map_err(|e| DaemonError::Loader(e.to_string()))?;
    let engine = match loaded {
        Ok(m) => EngineSlot::Ready(Box::new(Mutex::new(m))),
        Err(e) => {
            tracing::error!("cannot load model {}: {e}", options.model);
            EngineSlot::Failed(format!("cannot load model {}: {e}", options.model))
        }
    };
    let state = Arc::new(AppState {
        engine,
        model_name: options
            .served_model_name
            .clone()
            .unwrap_or_else(|| default_served_name(&options.model)),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        token,
        allow_local_files: options.allow_local_files,
        tasks: tasks::Tasks::default(),
        data_dir: options.data_dir.clone(),
    });
    let app = router(state, options.body_limit);
    on_ready(addr);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(DaemonError::Serve)?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
