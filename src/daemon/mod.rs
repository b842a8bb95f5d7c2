//! `vlad serve`: a tokio + axum service that loads the embedded engine once and serves it over
//! HTTP — an OpenAI-compatible `POST /v1/chat/completions` (streaming and not) and
//! `GET /v1/models` — behind a bearer token, with JSON errors for every bad request and a
//! graceful shutdown on SIGTERM or Ctrl-C — and the task API (`/v1/tasks`: queued per device,
//! event streams, trajectories and HTML reports, records kept under the data dir across
//! restarts) and the MCP tools over streamable HTTP at `/mcp` (see [`crate::mcp`]).
//!
//! Entry point: [`serve`]. Handlers are plain async functions over one `Arc<AppState>`.

mod api_error;
pub mod auth;
mod chat;
mod connections;
mod events;
mod shared_model;
mod task_runner;
mod task_store;
mod tasks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::engine::{EngineError, LoadOptions, Qwen2Vl};
use crate::environment::claims::DeviceClaims;

pub use api_error::ApiError;
pub use auth::{AuthError, load_or_create_token};
pub use task_store::{TaskRecord, TaskState};

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8780";
/// The default largest request body, in bytes (images travel inline as base64).
pub const DEFAULT_BODY_LIMIT: usize = 32 << 20;

/// How long a request may take (reading its body included), streams aside.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send a request's headers, and idle between requests.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one chat completion may generate.
pub const DEFAULT_GENERATION_TIMEOUT: Duration = Duration::from_secs(600);
/// Chat completions waiting for or using the model at once; more get 429.
pub const DEFAULT_MAX_PENDING_CHATS: usize = 16;
/// Tasks waiting for their device at once; more get 429.
pub const DEFAULT_MAX_QUEUED_TASKS: usize = 256;
/// How long a shutdown waits for running tasks to finish their current action.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a shutdown waits for open connections after that.
const DRAIN_TIME: Duration = Duration::from_secs(10);

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
    #[error("the model loader thread failed: {0}")]
    Loader(String),
    #[error("cannot use the data dir {}: {source}; pick another with --data-dir", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// Where task records and trajectories go (`<dir>/tasks/<id>`); [`default_data_dir`]
    /// when `None`.
    pub data_dir: Option<PathBuf>,
    pub limits: Limits,
}

/// Time and admission limits of the daemon.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request's whole handling, its body included (event and chat streams aside).
    pub request_timeout: Duration,
    /// Sending a request's headers, and idling between requests on one connection.
    pub header_timeout: Duration,
    /// One chat completion's generation.
    pub generation_timeout: Duration,
    pub max_pending_chats: usize,
    pub max_queued_tasks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            generation_timeout: DEFAULT_GENERATION_TIMEOUT,
            max_pending_chats: DEFAULT_MAX_PENDING_CHATS,
            max_queued_tasks: DEFAULT_MAX_QUEUED_TASKS,
        }
    }
}

/// The data dir when none is given: `<state dir>/vlad/daemon`.
pub fn default_data_dir() -> PathBuf {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .unwrap_or_else(std::env::temp_dir)
        .join("vlad")
        .join("daemon")
}

/// The loaded model, or why it is not there.
enum EngineSlot {
    /// Shared by chat completions and every task (each locks it per generation).
    Ready(Arc<Mutex<Qwen2Vl>>),
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
    tasks: Arc<task_runner::TaskManager>,
    /// Real devices held by a task or an MCP client's run_task.
    device_claims: DeviceClaims,
    limits: Limits,
    /// Chat completions admitted and not yet answered.
    pending_chats: AtomicUsize,
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
        .route("/v1/tasks/{id}/events", get(tasks::events))
        .route("/v1/tasks/{id}/trajectory", get(tasks::trajectory_index))
        .route("/v1/tasks/{id}/report", get(tasks::report))
        .route(
            "/v1/tasks/{id}/trajectory/{*file}",
            get(tasks::trajectory_file),
        )
        // MCP over streamable HTTP; with a token, the token keeps browsers out instead of a
        // loopback-only Host check.
        .nest_service(
            "/mcp",
            crate::mcp::http_service(
                mcp_models(&state),
                state.token.is_none(),
                state.device_claims.clone(),
            ),
        )
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            time_limit,
        ))
        .with_state(state)
}

/// The model of the MCP tools at `/mcp` (`ground`, `run_task`): handles on the loaded engine.
fn mcp_models(state: &AppState) -> Arc<dyn crate::mcp::ModelSource> {
    match &state.engine {
        EngineSlot::Ready(engine) => {
            let engine = engine.clone();
            let name = state.model_name.clone();
            Arc::new(
                move |cancel: Arc<std::sync::atomic::AtomicBool>| -> Result<Box<dyn crate::model::Model>, String> {
                    Ok(Box::new(shared_model::SharedModel::new(
                        engine.clone(),
                        name.clone(),
                        cancel,
                    )))
                },
            )
        }
        EngineSlot::Failed(reason) => Arc::new(crate::mcp::NoModel::new(reason.clone())),
    }
}

/// Bounds the time a request takes until its response starts (the body read included):
/// `request_timeout` (408), or `generation_timeout` for chat completions (504; their streams
/// are bounded by the generation itself).
async fn time_limit(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let chat = request.method() == Method::POST && request.uri().path() == "/v1/chat/completions";
    let limit = if chat {
        state.limits.generation_timeout
    } else {
        state.limits.request_timeout
    };
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) if chat => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the completion took longer than {} s (--generation-timeout-s); ask for fewer tokens",
                limit.as_secs()
            ),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} s (--request-timeout-s); send the body at once",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
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
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let store = task_store::TaskStore::open(&data_dir).map_err(|source| DaemonError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let max_queued = options.limits.max_queued_tasks;
    // One run per real device, whether it came through the task API or an MCP client.
    let device_claims = DeviceClaims::new();
    let claims = device_claims.clone();
    let tasks = tokio::task::spawn_blocking(move || {
        task_runner::TaskManager::open(store, max_queued, claims)
    })
    .await
    .map_err(|e| DaemonError::Loader(e.to_string()))?;
    tracing::info!(model = %options.model, "loading the model");
    let model = options.model.clone();
    let load = options.load.clone();
    let loaded: Result<Qwen2Vl, EngineError> =
        tokio::task::spawn_blocking(move || Qwen2Vl::load(&model, &load))
            .await
            .map_err(|e| DaemonError::Loader(e.to_string()))?;
    let engine = match loaded {
        Ok(m) => EngineSlot::Ready(Arc::new(Mutex::new(m))),
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
        tasks: tasks.clone(),
        device_claims,
        limits: options.limits.clone(),
        pending_chats: AtomicUsize::new(0),
    });
    let app = router(state, options.body_limit);
    on_ready(addr);
    let header_timeout = options.limits.header_timeout;
    connections::serve(listener, app, header_timeout, DRAIN_TIME, async move {
        shutdown_signal().await;
        // Running tasks finish their current action and record how they ended before the
        // connections (their event streams included) are closed.
        tasks.shutdown(SHUTDOWN_GRACE).await;
    })
    .await;
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
