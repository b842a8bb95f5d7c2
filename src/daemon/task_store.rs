//! Task records on disk: `<data dir>/tasks/<id>/task.json` (written atomically: a temporary
//! file, synced, then renamed), next to the task's `events.jsonl` and its `trajectory/` folder.
//! On start the daemon reads every record back; tasks that were queued or running when the
//! previous daemon stopped are marked `interrupted`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::RunStatus;

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for its device.
    Queued,
    Running,
    /// The agent ended the run (`result` says how: finished, gave up, needs the user, …).
    Done,
    /// Stopped by `POST /v1/tasks/{id}/cancel`.
    Cancelled,
    /// Could not run (the device or the model was not available) or the run broke.
    Failed,
    /// The daemon stopped while the task was queued or running.
    Interrupted,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}

/// What `GET /v1/tasks/{id}` shows and `task.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub task: String,
    pub profile: String,
    /// `virtual`, `virtual:NAME`, `desktop`, `desktop:MONITOR`, `window:TITLE` or an ADB serial.
    pub device: String,
    /// `embedded` (the daemon's model) or `replay`.
    pub backend: String,
    pub dry_run: bool,
    pub max_steps: Option<usize>,
    pub max_seconds: Option<f64>,
    pub state: TaskState,
    /// How the run ended, once it has.
    pub result: Option<RunStatus>,
    /// The model's answer, when it finished.
    pub answer: Option<String>,
    pub steps: usize,
    /// Why the task failed or was interrupted.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub ended_at: Option<f64>,
    /// The trajectory folder on the daemon's machine.
    pub trace_dir: PathBuf,
    /// `GET` these: the event stream and the trajectory's files.
    pub events_url: String,
    pub trajectory_url: String,
}

impl TaskRecord {
    /// The numeric part of `task-N`.
    pub fn number(&self) -> Option<u64> {
        parse_number(&self.id)
    }
}

pub fn parse_number(id: &str) -> Option<u64> {
    id.strip_prefix("task-")?.parse().ok()
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `tasks/` folder of the data dir.
#[derive(Debug, Clone)]
pub struct TaskStore {
    root: PathBuf,
}

impl TaskStore {
    /// Uses (and creates) `<data_dir>/tasks`.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("tasks");
        fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    pub fn task_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn trace_dir(&self, id: &str) -> PathBuf {
        self.task_dir(id).join("trajectory")
    }

    pub fn events_path(&self, id: &str) -> PathBuf {
        self.task_dir(id).join("events.jsonl")
    }

    /// Writes `task.json` atomically.
    pub fn save(&self, record: &TaskRecord) -> std::io::Result<()> {
        let dir = self.task_dir(&record.id);
        fs::create_dir_all(&dir)?;
        let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_atomic(&dir.join("task.json"), &json)
    }

    /// The stored record of `id`, if readable.
    pub fn load(&self, id: &str) -> Option<TaskRecord> {
        let bytes = fs::read(self.task_dir(id).join("task.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every stored record, oldest first; records of a daemon that stopped mid-task are marked
    /// interrupted (and saved so). Unreadable records are skipped with a warning.
    pub fn load_all(&self) -> Vec<TaskRecord> {
        let mut records = Vec::new();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return records;
        };
        for entry in entries.flatten() {
            let path = entry.path().join("task.json");
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if parse_number(&name).is_none() || !path.exists() {
                continue;
            }
            let record: TaskRecord = match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("skipping task record {}: {e}", path.display());
                    continue;
                }
            };
            let mut record = record;
            if !record.state.is_final() {
                record.error = Some(format!(
                    "the daemon stopped while the task was {}",
                    record.state.as_str()
                ));
                record.state = TaskState::Interrupted;
                record.ended_at.get_or_insert_with(now);
                if let Err(e) = self.save(&record) {
                    tracing::warn!("cannot update {}: {e}", path.display());
                }
            }
            records.push(record);
        }
        records.sort_by_key(|r| r.number());
        records
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}
