//! The task API over HTTP: `POST /v1/tasks` checks a submission and queues it on its device,
//! `GET /v1/tasks` and `GET /v1/tasks/{id}` report records, `POST /v1/tasks/{id}/cancel` stops
//! a task, `GET /v1/tasks/{id}/events` streams its events (Server-Sent Events) and
//! `GET /v1/tasks/{id}/trajectory[/FILE]` lists and serves its trajectory files. The scheduling
//! is [`super::task_runner`], the records on disk [`super::task_store`].

use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::events;
use super::task_runner::{Backend, CancelError, DeviceSpec, Job, SubmitError};
use super::task_store::{TaskRecord, TaskState};
use super::{ApiError, AppState, EngineSlot};
use crate::agent::{Agent, Profile};
use crate::environment::EnvironmentKind;
use crate::model::ReplayModel;

/// Longest task text, in bytes.
const MAX_TASK_BYTES: usize = 64 << 10;
/// Most recorded replies one task may carry.
const MAX_REPLIES: usize = 10_000;
/// Most steps a task may ask for.
const MAX_STEPS: usize = 10_000;
/// Tasks listed when the client gives no `limit`.
const DEFAULT_LIST_LIMIT: usize = 100;

/// A task submission.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskRequest {
    task: String,
    /// A built-in profile name (or, with `--allow-local-files`, a profile file on the daemon's
    /// machine); by default the one the device implies.
    #[serde(default)]
    profile: Option<String>,
    /// `virtual`, `virtual:NAME`, `desktop`, `desktop:MONITOR`, `window:TITLE` or an ADB serial;
    /// by default the profile's kind of device.
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    max_steps: Option<usize>,
    #[serde(default)]
    max_seconds: Option<f64>,
    #[serde(default)]
    dry_run: bool,
    /// Recorded replies, one per step (the replay backend instead of the daemon's model).
    #[serde(default)]
    replies: Option<Vec<String>>,
    /// A replies file (`{"reply": …}` per line) on the daemon's machine; needs
    /// `--allow-local-files`.
    #[serde(default)]
    replay_file: Option<PathBuf>,
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "the request body is larger than the daemon accepts (--max-body-mb)",
            )
        } else {
            ApiError::new(status, format!("cannot read the request body: {e}"))
        }
    })
}

/// The kind of environment a device string names, and how it is scheduled.
fn parse_device(device: &str) -> Result<(EnvironmentKind, DeviceSpec), ApiError> {
    let bad = |why: &str| {
        ApiError::bad_request(format!(
            "\"device\" {device:?} {why}; use \"virtual\", \"virtual:NAME\", \"desktop\", \"desktop:MONITOR\", \"window:TITLE\" or an ADB serial"
        ))
    };
    if device.is_empty() || device.len() > 256 || device.chars().any(char::is_control) {
        return Err(bad("is empty, too long or holds control characters"));
    }
    let spec = |key: &str, open_arg: Option<&str>| DeviceSpec {
        label: device.to_string(),
        key: key.to_string(),
        open_arg: open_arg.map(str::to_string),
    };
    if device == "virtual" || device.starts_with("virtual:") {
        // Every task gets a fresh in-memory screen; the name only groups tasks into one queue.
        return Ok((EnvironmentKind::Virtual, spec(device, None)));
    }
    if device == "desktop" {
        return Ok((EnvironmentKind::Desktop, spec("desktop", None)));
    }
    if let Some(monitor) = device.strip_prefix("desktop:") {
        if monitor.is_empty() {
            return Err(bad("names no monitor"));
        }
        return Ok((EnvironmentKind::Desktop, spec("desktop", Some(monitor))));
    }
    if device.starts_with("window:") {
        return Ok((EnvironmentKind::Desktop, spec("desktop", Some(device))));
    }
    if device.chars().any(char::is_whitespace) {
        return Err(bad("is not an ADB serial (it holds spaces)"));
    }
    Ok((
        EnvironmentKind::Android,
        spec(&format!("adb:{device}"), Some(device)),
    ))
}

fn kind_name(kind: &EnvironmentKind) -> &'static str {
    match kind {
        EnvironmentKind::Virtual => "virtual",
        EnvironmentKind::Desktop => "desktop",
        EnvironmentKind::Android => "android",
    }
}

/// A profile name with no path in it is a built-in one; anything else is a file.
fn is_builtin_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks a submission and builds the job to queue.
fn build_job(state: &AppState, request: TaskRequest) -> Result<Job, ApiError> {
    if request.task.trim().is_empty() {
        return Err(ApiError::bad_request("\"task\" is empty; say what to do"));
    }
    if request.task.len() > MAX_TASK_BYTES {
        return Err(ApiError::bad_request(format!(
            "\"task\" is longer than {MAX_TASK_BYTES} bytes"
        )));
    }
    if let Some(steps) = request.max_steps
        && !(1..=MAX_STEPS).contains(&steps)
    {
        return Err(ApiError::bad_request(format!(
            "\"max_steps\" must be between 1 and {MAX_STEPS}"
        )));
    }
    if let Some(s) = request.max_seconds
        && !(s.is_finite() && s > 0.0)
    {
        return Err(ApiError::bad_request(
            "\"max_seconds\" must be a positive number",
        ));
    }
    let device = request.device.as_deref().map(parse_device).transpose()?;
    let profile_name = match (&request.profile, &device) {
        (Some(p), _) => p.clone(),
        (None, Some((kind, _))) => kind_name(kind).to_string(),
        (None, None) => "virtual".to_string(),
    };
    if !is_builtin_name(&profile_name) && !state.allow_local_files {
        return Err(ApiError::bad_request(format!(
            "profile {profile_name:?} is a file path; the daemon reads profile files only with --allow-local-files (or use a built-in name: virtual, desktop, android)"
        )));
    }
    let profile = Profile::load(&profile_name)
        .map_err(|e| ApiError::bad_request(format!("profile {profile_name:?}: {e}")))?;
    let (kind, device) = match device {
        Some(d) => d,
        None => {
            let label = match profile.environment {
                EnvironmentKind::Virtual => "virtual",
                EnvironmentKind::Desktop => "desktop",
                EnvironmentKind::Android => "adb",
            };
            (
                profile.environment,
                DeviceSpec {
                    label: label.into(),
                    key: label.into(),
                    open_arg: None,
                },
            )
        }
    };
    if kind != profile.environment {
        return Err(ApiError::bad_request(format!(
            "profile {profile_name:?} drives a {} environment but device {:?} is a {} one; pick a matching \"profile\" or \"device\"",
            kind_name(&profile.environment),
            device.label,
            kind_name(&kind)
        )));
    }
    let mut agent = Agent::new(profile.clone())
        .map_err(|e| ApiError::bad_request(format!("profile {profile_name:?}: {e}")))?;
    if !profile.tools.is_empty() {
        // Only profile files name tools, and those need --allow-local-files (checked above).
        let loaded = crate::tools::Plugins::load(&profile.tools);
        if !loaded.errors.is_empty() {
            let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
            return Err(ApiError::bad_request(format!(
                "profile {profile_name:?}: its tool plugins do not load: {}",
                errors.join("; ")
            )));
        }
        agent = agent.with_plugins(loaded.plugins);
    }
    let backend = match (request.replies, request.replay_file) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give \"replies\" or \"replay_file\", not both",
            ));
        }
        (Some(replies), None) => {
            if replies.len() > MAX_REPLIES {
                return Err(ApiError::bad_request(format!(
                    "\"replies\" holds more than {MAX_REPLIES} replies"
                )));
            }
            Backend::Replay(ReplayModel::from_replies("the request's replies", replies))
        }
        (None, Some(path)) => {
            if !state.allow_local_files {
                return Err(ApiError::bad_request(
                    "\"replay_file\" is read only when the daemon runs with --allow-local-files; send the replies inline as \"replies\"",
                ));
            }
            if !path.is_absolute() {
                return Err(ApiError::bad_request(format!(
                    "\"replay_file\" {} must be an absolute path",
                    path.display()
                )));
            }
            Backend::Replay(
                ReplayModel::open(&path)
                    .map_err(|e| ApiError::bad_request(format!("\"replay_file\": {e}")))?,
            )
        }
        (None, None) => match &state.engine {
            EngineSlot::Ready(engine) => Backend::Embedded {
                engine: engine.clone(),
                name: state.model_name.clone(),
            },
            EngineSlot::Failed(why) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{why}; send \"replies\" to run the task with recorded replies"),
                ));
            }
        },
    };
    Ok(Job {
        task: request.task,
        profile_name,
        profile,
        agent,
        device,
        backend,
        dry_run: request.dry_run,
        max_steps: request.max_steps,
        max_seconds: request.max_seconds,
    })
}

/// `POST /v1/tasks`: queues the task and answers its record (201); 429 with `Retry-After` when
/// the queue is full.
pub async fn submit(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let request: TaskRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a valid task: {e}")))?;
    // Loading a profile file or a replies file touches the disk: off the async threads.
    let s = state.clone();
    let job = tokio::task::spawn_blocking(move || build_job(&s, request))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let tasks = state.tasks.clone();
    let submitted = tokio::task::spawn_blocking(move || tasks.submit(job))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match submitted {
        Ok(record) => Ok((StatusCode::CREATED, Json(record)).into_response()),
        Err(e @ SubmitError::QueueFull(_)) => Ok((
            [(header::RETRY_AFTER, "1")],
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
        )
            .into_response()),
        Err(e @ SubmitError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
        Err(e @ SubmitError::Io(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

/// The value of `name` in a query string (no percent-decoding: the values used are plain).
fn query_value<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `GET /v1/tasks[?state=running][&limit=N]`: newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    uri: Uri,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = match query_value(&uri, "state") {
        None => None,
        Some(s) => Some(serde_json::from_value::<TaskState>(json!(s)).map_err(|_| {
            ApiError::bad_request(format!(
                "state {s:?} is not one of queued, running, done, cancelled, failed, interrupted"
            ))
        })?),
    };
    let limit = match query_value(&uri, "limit") {
        None => DEFAULT_LIST_LIMIT,
        Some(l) => l.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("limit {l:?} is not a non-negative whole number"))
        })?,
    };
    let records: Vec<TaskRecord> = state.tasks.list(filter, limit);
    Ok(Json(json!({"object": "list", "data": records})))
}

fn unknown(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no task {id:?}; see GET /v1/tasks"),
    )
}

/// `GET /v1/tasks/{id}`.
pub async fn get_task(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<TaskRecord>, ApiError> {
    state.tasks.get(&id).map(Json).ok_or_else(|| unknown(&id))
}

/// `POST /v1/tasks/{id}/cancel`: a queued task is cancelled at once (200); a running one is
/// asked to stop after its current action (202, the record still says `running`); a task that
/// has ended answers 409.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<TaskRecord>), ApiError> {
    match state.tasks.cancel(&id) {
        Ok(record) if record.state == TaskState::Running => {
            Ok((StatusCode::ACCEPTED, Json(record)))
        }
        Ok(record) => Ok((StatusCode::OK, Json(record))),
        Err(CancelError::NotFound) => Err(unknown(&id)),
        Err(CancelError::Ended(record)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("task {id} has already ended ({})", record.state.as_str()),
        )),
    }
}

/// `GET /v1/tasks/{id}/events`: the task's events as Server-Sent Events, from the first (or
/// after `Last-Event-ID` / `?after=N`), until its `end` event.
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let after = match headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or_else(|| query_value(&uri, "after"))
    {
        None => 0,
        Some(v) => v.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "Last-Event-ID (or after) {v:?} is not an event number"
            ))
        })?,
    };
    let tasks = state.tasks.clone();
    let lookup = id.clone();
    let source = tokio::task::spawn_blocking(move || tasks.events(&lookup))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .ok_or_else(|| unknown(&id))?;
    Ok(events::stream(source, after).into_response())
}

/// `GET /v1/tasks/{id}/trajectory`: the trajectory's files (relative paths).
pub async fn trajectory_index(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let dir = state.tasks.trace_dir(&id).ok_or_else(|| unknown(&id))?;
    let files = tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        collect_files(&dir, &dir, &mut files);
        files.sort();
        files
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let base = format!("/v1/tasks/{id}/trajectory");
    let data: Vec<_> = files
        .iter()
        .map(|f| json!({"path": f, "url": format!("{base}/{f}")}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

fn collect_files(root: &FsPath, dir: &FsPath, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            collect_files(root, &path, out);
        } else if kind.is_file()
            && path.extension().is_none_or(|e| e != "tmp")
            && let Ok(rel) = path.strip_prefix(root)
            && let Some(rel) = rel.to_str()
        {
            out.push(rel.replace('\\', "/"));
        }
    }
}

/// `GET /v1/tasks/{id}/report`: the task's run as one self-contained HTML page, the page
/// `vlad report` writes (each step's screenshot with the model's box and click point, thought,
/// actions, timings, errors).
pub async fn report(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let dir = state.tasks.trace_dir(&id).ok_or_else(|| unknown(&id))?;
    if !tokio::fs::try_exists(dir.join(crate::agent::trajectory::STEPS_FILE))
        .await
        .unwrap_or(false)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("task {id} has no trajectory yet (it has not started); try again once it runs"),
        ));
    }
    let page = tokio::task::spawn_blocking(move || crate::report::render_report(&dir))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    Ok(axum::response::Html(page).into_response())
}

/// `GET /v1/tasks/{id}/trajectory/{*file}`: one file of the trajectory; anything that would
/// leave the folder is refused with 400.
pub async fn trajectory_file(
    State(state): State<Arc<AppState>>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let dir = state.tasks.trace_dir(&id).ok_or_else(|| unknown(&id))?;
    let relative = FsPath::new(&file);
    let plain = !file.is_empty()
        && !file.contains('\\')
        && !file.contains('\0')
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(ApiError::bad_request(format!(
            "{file:?} is not a file of the trajectory (relative paths inside it only; see GET /v1/tasks/{id}/trajectory)"
        )));
    }
    let path = dir.join(relative);
    let missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("task {id} has no trajectory file {file:?}; see GET /v1/tasks/{id}/trajectory"),
        )
    };
    // Symbolic links must not lead out of the folder either.
    let (real_dir, real_path) = match (
        tokio::fs::canonicalize(&dir).await,
        tokio::fs::canonicalize(&path).await,
    ) {
        (Ok(d), Ok(p)) => (d, p),
        _ => return Err(missing()),
    };
    if !real_path.starts_with(&real_dir) {
        return Err(ApiError::bad_request(format!(
            "{file:?} leads outside the trajectory"
        )));
    }
    if !tokio::fs::metadata(&real_path)
        .await
        .is_ok_and(|m| m.is_file())
    {
        return Err(missing());
    }
    let bytes = tokio::fs::read(&real_path).await.map_err(|_| missing())?;
    let content_type = match real_path.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("jsonl") => "application/x-ndjson",
        Some("toml" | "txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}
