//! The task API skeleton: `POST /v1/tasks` runs the agent in a thread, `GET /v1/tasks` and
//! `GET /v1/tasks/{id}` report state, `POST /v1/tasks/{id}/cancel` asks it to stop between
//! actions. This slice runs virtual-screen profiles with recorded replies only; records live in
//! memory (no persistence, queueing or event stream yet).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::agent::{Agent, NoHooks, Profile, RunOptions, RunStatus, StopSignal, open_environment};
use crate::environment::EnvironmentKind;
use crate::model::ReplayModel;

/// A task submission.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskRequest {
    task: String,
    /// A built-in profile name or a profile file on the daemon's machine.
    #[serde(default = "default_profile")]
    profile: String,
    /// The model's replies, in order (the replay backend).
    replies: Vec<String>,
    #[serde(default)]
    max_steps: Option<usize>,
    #[serde(default)]
    dry_run: bool,
}

fn default_profile() -> String {
    "virtual".into()
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Running,
    Done,
}

/// What `GET /v1/tasks/{id}` shows.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRecord {
    pub id: String,
    pub task: String,
    pub profile: String,
    pub state: TaskState,
    /// How the run ended, once it has.
    pub result: Option<RunStatus>,
    pub steps: usize,
    pub trace_dir: Option<PathBuf>,
    /// Why the run could not start or failed, when it did.
    pub error: Option<String>,
}

struct TaskEntry {
    record: TaskRecord,
    stop: StopSignal,
}

/// Every task of this daemon run.
#[derive(Default)]
pub struct Tasks {
    entries: Mutex<Vec<TaskEntry>>,
    next: std::sync::atomic::AtomicU64,
}

impl Tasks {
    fn with<T>(&self, f: impl FnOnce(&mut Vec<TaskEntry>) -> T) -> T {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError::new(e.status(), format!("cannot read the request body: {e}")))
}

/// `POST /v1/tasks`: starts the task and answers its record (201).
pub async fn submit(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TaskRecord>), ApiError> {
    let body = read_body(body)?;
    let request: TaskRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a valid task: {e}")))?;
    if request.task.trim().is_empty() {
        return Err(ApiError::bad_request("\"task\" is empty"));
    }
    let profile = Profile::load(&request.profile)
        .map_err(|e| ApiError::bad_request(format!("profile {:?}: {e}", request.profile)))?;
    if !matches!(profile.environment, EnvironmentKind::Virtual) {
        return Err(ApiError::bad_request(
            "this daemon runs tasks on virtual-screen profiles only so far",
        ));
    }
    let agent = Agent::new(profile.clone())
        .map_err(|e| ApiError::bad_request(format!("profile {:?}: {e}", request.profile)))?;
    let mut env = open_environment(&profile, None)
        .map_err(|e| ApiError::bad_request(format!("cannot open the environment: {e}")))?;
    let n = state
        .tasks
        .next
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1;
    let id = format!("task-{n}");
    let trace_dir = state.data_dir.as_ref().map(|d| d.join("tasks").join(&id));
    let stop = StopSignal::new();
    let record = TaskRecord {
        id: id.clone(),
        task: request.task.clone(),
        profile: request.profile.clone(),
        state: TaskState::Running,
        result: None,
        steps: 0,
        trace_dir: trace_dir.clone(),
        error: None,
    };
    state.tasks.with(|e| {
        e.push(TaskEntry {
            record: record.clone(),
            stop: stop.clone(),
        })
    });
    let options = RunOptions {
        dry_run: request.dry_run,
        max_steps: request.max_steps,
        trace_dir,
        stop,
        ..Default::default()
    };
    let mut model = ReplayModel::from_replies(format!("{id} replies"), request.replies);
    let worker_state = state.clone();
    tokio::task::spawn_blocking(move || {
        let outcome = agent.run(
            &request.task,
            &mut model,
            env.as_mut(),
            &options,
            &mut NoHooks,
        );
        worker_state.tasks.with(|entries| {
            if let Some(entry) = entries.iter_mut().find(|e| e.record.id == id) {
                let r = &mut entry.record;
                r.state = TaskState::Done;
                match outcome {
                    Ok(report) => {
                        r.result = Some(report.status);
                        r.steps = report.steps;
                        r.trace_dir = Some(report.trace_dir);
                    }
                    Err(e) => r.error = Some(e.to_string()),
                }
            }
        });
    });
    Ok((StatusCode::CREATED, Json(record)))
}

/// `GET /v1/tasks`.
pub async fn list(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let records: Vec<TaskRecord> = state
        .tasks
        .with(|e| e.iter().map(|e| e.record.clone()).collect());
    Json(serde_json::json!({"object": "list", "data": records}))
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
    state
        .tasks
        .with(|e| {
            e.iter()
                .find(|e| e.record.id == id)
                .map(|e| e.record.clone())
        })
        .map(Json)
        .ok_or_else(|| unknown(&id))
}

/// `POST /v1/tasks/{id}/cancel`: asks a running task to stop between actions (202); a finished
/// task answers 409.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<TaskRecord>), ApiError> {
    let found = state.tasks.with(|e| {
        e.iter().find(|e| e.record.id == id).map(|e| {
            if e.record.state == TaskState::Running {
                e.stop.request_stop();
            }
            e.record.clone()
        })
    });
    match found {
        None => Err(unknown(&id)),
        Some(r) if r.state == TaskState::Done => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("task {id} has already ended"),
        )),
        Some(r) => Ok((StatusCode::ACCEPTED, Json(r))),
    }
}
