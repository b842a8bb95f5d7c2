//! The task scheduler: one running task per device, the others queued in order; tasks on
//! different devices run at the same time, each on its own thread. Every state change is saved
//! to disk and sent as an event; a cancel stops a running task within one step (the agent's
//! [`StopSignal`], which also cancels its generation), and a shutdown stops every running task
//! after its current action and marks the queued ones interrupted.
//!
//! Memory stays bounded however many tasks the data dir holds: live tasks and the newest
//! [`FINISHED_IN_MEMORY`] finished ones are kept in memory, older ones only as numbers, their
//! records read back from disk when asked for.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::events::{self, EventLog, Source};
use super::shared_model::SharedModel;
use super::task_store::{TaskRecord, TaskState, TaskStore, now, parse_number};
use crate::agent::{
    Agent, Event, Hooks, Profile, RunOptions, RunReport, RunStatus, StopSignal, open_environment,
};
use crate::engine::Qwen2Vl;
use crate::environment::claims::DeviceClaims;
use crate::model::{Model, ReplayModel};

/// Finished tasks whose records stay in memory; older ones are read from disk.
pub const FINISHED_IN_MEMORY: usize = 500;

/// What a task runs on, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// As the client wrote it (shown in records).
    pub label: String,
    /// Tasks with the same key take turns.
    pub key: String,
    /// Passed to [`open_environment`]: a monitor, `window:TITLE` or an ADB serial.
    pub open_arg: Option<String>,
}

/// Where a task's replies come from.
pub enum Backend {
    /// The daemon's loaded engine, shared with every other task and chat client.
    Embedded {
        engine: Arc<Mutex<Qwen2Vl>>,
        name: String,
    },
    Replay(ReplayModel),
}

impl Backend {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Embedded { .. } => "embedded",
            Self::Replay(_) => "replay",
        }
    }
}

/// A checked submission, ready to queue.
pub struct Job {
    pub task: String,
    pub profile_name: String,
    pub profile: Profile,
    pub agent: Agent,
    pub device: DeviceSpec,
    pub backend: Backend,
    pub dry_run: bool,
    pub max_steps: Option<usize>,
    pub max_seconds: Option<f64>,
}

/// Why a submission was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the daemon is shutting down and takes no new tasks")]
    ShuttingDown,
    #[error("{0} tasks are already queued; retry when some have run")]
    QueueFull(usize),
    #[error("cannot store the task: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a cancel did nothing.
#[derive(Debug)]
pub enum CancelError {
    NotFound,
    Ended(Box<TaskRecord>),
}

struct Entry {
    record: TaskRecord,
    stop: StopSignal,
    /// While the task is queued or running.
    log: Option<Arc<EventLog>>,
    /// Until the task starts.
    job: Option<Job>,
    device_key: String,
    cancel_requested: bool,
}

#[derive(Default)]
struct Inner {
    /// Live tasks and the newest finished ones.
    entries: BTreeMap<u64, Entry>,
    /// Finished tasks whose records are on disk only.
    archived: BTreeSet<u64>,
    /// How many of `entries` are finished.
    finished: usize,
    queues: HashMap<String, VecDeque<u64>>,
    busy: HashSet<String>,
    next: u64,
    running: usize,
    shutting_down: bool,
}

impl Inner {
    /// Moves the oldest finished records out of memory beyond [`FINISHED_IN_MEMORY`].
    fn evict(&mut self) {
        while self.finished > FINISHED_IN_MEMORY {
            let Some(n) = self
                .entries
                .iter()
                .find(|(_, e)| e.record.state.is_final())
                .map(|(n, _)| *n)
            else {
                break;
            };
            self.entries.remove(&n);
            self.archived.insert(n);
            self.finished -= 1;
        }
    }
}

/// Every task of this data dir.
pub struct TaskManager {
    store: TaskStore,
    /// Real devices held by runs, shared with the daemon's MCP tools.
    claims: DeviceClaims,
    inner: Mutex<Inner>,
    max_queued: usize,
}

impl TaskManager {
    /// Reads the stored tasks back (marking unfinished ones interrupted).
    pub fn open(store: TaskStore, max_queued: usize, claims: DeviceClaims) -> Arc<Self> {
        let mut inner = Inner::default();
        for record in store.load_all() {
            let Some(n) = record.number() else { continue };
            inner.next = inner.next.max(n);
            inner.finished += 1;
            inner.entries.insert(
                n,
                Entry {
                    device_key: record.device.clone(),
                    record,
                    stop: StopSignal::new(),
                    log: None,
                    job: None,
                    cancel_requested: false,
                },
            );
        }
        inner.evict();
        let manager = Arc::new(Self {
            store,
            claims: claims.clone(),
            inner: Mutex::new(inner),
            max_queued,
        });
        let weak = Arc::downgrade(&manager);
        // On a thread of its own: a claim may be released while this manager's lock is held.
        claims.on_release(move |key| {
            let (weak, key) = (weak.clone(), key.to_string());
            let _ = std::thread::Builder::new()
                .name("vlad-device-free".into())
                .spawn(move || {
                    if let Some(manager) = weak.upgrade() {
                        let mut inner = manager.lock();
                        manager.start_next(&mut inner, &key);
                    }
                });
        });
        manager
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, record: &TaskRecord) {
        if let Err(e) = self.store.save(record) {
            tracing::error!("cannot save task {}: {e}", record.id);
        }
    }

    /// Queues `job` (and starts it when its device is free); answers its record.
    pub fn submit(self: &Arc<Self>, job: Job) -> Result<TaskRecord, SubmitError> {
        let mut inner = self.lock();
        if inner.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        let queued: usize = inner.queues.values().map(VecDeque::len).sum();
        if queued >= self.max_queued {
            return Err(SubmitError::QueueFull(queued));
        }
        let n = inner.next + 1;
        let id = format!("task-{n}");
        let record = TaskRecord {
            id: id.clone(),
            task: job.task.clone(),
            profile: job.profile_name.clone(),
            device: job.device.label.clone(),
            backend: job.backend.label().to_string(),
            dry_run: job.dry_run,
            max_steps: job.max_steps,
            max_seconds: job.max_seconds,
            state: TaskState::Queued,
            result: None,
            answer: None,
            steps: 0,
            error: None,
            created_at: now(),
            started_at: None,
            ended_at: None,
            trace_dir: self.store.trace_dir(&id),
            events_url: format!("/v1/tasks/{id}/events"),
            trajectory_url: format!("/v1/tasks/{id}/trajectory"),
        };
        self.store.save(&record)?;
        let log = EventLog::create(&self.store.events_path(&id))?;
        inner.next = n;
        let key = job.device.key.clone();
        let queue = inner.queues.entry(key.clone()).or_default();
        queue.push_back(n);
        let position = queue.len();
        log.push(
            "state",
            json!({"state": "queued", "device": record.device, "position": position}),
        );
        inner.entries.insert(
            n,
            Entry {
                record,
                stop: StopSignal::new(),
                log: Some(log),
                job: Some(job),
                device_key: key.clone(),
                cancel_requested: false,
            },
        );
        self.start_next(&mut inner, &key);
        inner
            .entries
            .get(&n)
            .map(|e| e.record.clone())
            .or_else(|| self.store.load(&id))
            .ok_or_else(|| SubmitError::Io(std::io::Error::other(format!("{id} vanished"))))
    }

    /// Starts the first queued task of `key` when nothing runs there.
    fn start_next(self: &Arc<Self>, inner: &mut Inner, key: &str) {
        if inner.busy.contains(key) || inner.shutting_down {
            return;
        }
        let Some(&first) = inner.queues.get(key).and_then(VecDeque::front) else {
            return;
        };
        // A real device may be held by an MCP client's run_task: wait for its release (the
        // listener registered in `open` starts the queue again then).
        let claim = if key.starts_with("virtual") {
            None
        } else {
            match self.claims.try_claim(key, &format!("task-{first}")) {
                Ok(claim) => Some(claim),
                Err(holder) => {
                    tracing::info!("task-{first} waits: {key} is held by {holder}");
                    return;
                }
            }
        };
        let Some(n) = inner.queues.get_mut(key).and_then(VecDeque::pop_front) else {
            return;
        };
        let Some(entry) = inner.entries.get_mut(&n) else {
            return;
        };
        let (Some(job), Some(log)) = (entry.job.take(), entry.log.clone()) else {
            return;
        };
        entry.record.state = TaskState::Running;
        entry.record.started_at = Some(now());
        let record = entry.record.clone();
        let stop = entry.stop.clone();
        inner.busy.insert(key.to_string());
        inner.running += 1;
        self.save(&record);
        log.push("state", json!({"state": "running"}));
        let manager = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vlad-{}", record.id))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_job(job, &record, stop, log)
                }))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(format!("the run crashed: {what}"))
                });
                // The device is free for others before the next task of its queue starts.
                drop(claim);
                manager.finish(n, outcome);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a thread for task-{n}: {e}");
            inner.busy.remove(key);
            inner.running -= 1;
            self.end(
                inner,
                n,
                TaskState::Failed,
                Some(format!("cannot start a thread: {e}")),
            );
        }
    }

    /// Records how a run ended and starts the next task of its device.
    fn finish(self: &Arc<Self>, n: u64, outcome: Result<RunReport, String>) {
        let mut inner = self.lock();
        let shutting_down = inner.shutting_down;
        let Some(entry) = inner.entries.get_mut(&n) else {
            return;
        };
        let key = entry.device_key.clone();
        let cancel_requested = entry.cancel_requested;
        let r = &mut entry.record;
        let (state, error) = match outcome {
            Ok(report) => {
                r.steps = report.steps;
                if let RunStatus::Finished { answer } = &report.status {
                    r.answer = Some(answer.clone());
                }
                let verdict = match &report.status {
                    RunStatus::Interrupted | RunStatus::Aborted { .. } if cancel_requested => {
                        (TaskState::Cancelled, None)
                    }
                    RunStatus::Interrupted | RunStatus::Aborted { .. } if shutting_down => (
                        TaskState::Interrupted,
                        Some("the daemon was stopped during the task".to_string()),
                    ),
                    _ if cancel_requested => (TaskState::Cancelled, None),
                    RunStatus::Error { message } => (TaskState::Failed, Some(message.clone())),
                    _ => (TaskState::Done, None),
                };
                r.result = Some(report.status);
                verdict
            }
            Err(message) if cancel_requested => (TaskState::Cancelled, Some(message)),
            Err(message) => (TaskState::Failed, Some(message)),
        };
        inner.busy.remove(&key);
        inner.running = inner.running.saturating_sub(1);
        self.end(&mut inner, n, state, error);
        self.start_next(&mut inner, &key);
    }

    /// Puts a task in a final state: saved, its log closed with the record; answers the record.
    fn end(
        &self,
        inner: &mut Inner,
        n: u64,
        state: TaskState,
        error: Option<String>,
    ) -> Option<TaskRecord> {
        let entry = inner.entries.get_mut(&n)?;
        entry.record.state = state;
        if error.is_some() {
            entry.record.error = error;
        }
        entry.record.ended_at = Some(now());
        entry.job = None;
        self.save(&entry.record);
        if let Some(log) = entry.log.take() {
            log.close(serde_json::to_value(&entry.record).unwrap_or(Value::Null));
        }
        let record = entry.record.clone();
        inner.finished += 1;
        inner.evict();
        Some(record)
    }

    /// Records, newest first, optionally only those in `state`, at most `limit` (older ones
    /// read from disk).
    pub fn list(&self, state: Option<TaskState>, limit: usize) -> Vec<TaskRecord> {
        let (mut records, archived): (Vec<TaskRecord>, Vec<u64>) = {
            let inner = self.lock();
            let records = inner
                .entries
                .values()
                .rev()
                .filter(|e| state.is_none_or(|s| e.record.state == s))
                .take(limit)
                .map(|e| e.record.clone())
                .collect::<Vec<_>>();
            // Archived tasks have all ended: no need to look there for live ones.
            let live = matches!(state, Some(TaskState::Queued | TaskState::Running));
            let archived = if records.len() < limit && !live {
                inner.archived.iter().rev().copied().collect()
            } else {
                Vec::new()
            };
            (records, archived)
        };
        for n in archived {
            if records.len() >= limit {
                break;
            }
            if let Some(r) = self.store.load(&format!("task-{n}"))
                && state.is_none_or(|s| r.state == s)
            {
                records.push(r);
            }
        }
        records
    }

    /// The record of `id`: in memory, or read from disk for an old one.
    pub fn get(&self, id: &str) -> Option<TaskRecord> {
        let n = parse_number(id)?;
        {
            let inner = self.lock();
            if let Some(e) = inner.entries.get(&n) {
                return Some(e.record.clone());
            }
            if !inner.archived.contains(&n) {
                return None;
            }
        }
        self.store.load(id)
    }

    fn known(&self, n: u64) -> bool {
        let inner = self.lock();
        inner.entries.contains_key(&n) || inner.archived.contains(&n)
    }

    /// Where the events of `id` come from now.
    pub fn events(&self, id: &str) -> Option<Source> {
        let n = parse_number(id)?;
        let log = {
            let inner = self.lock();
            match inner.entries.get(&n) {
                Some(entry) => entry.log.clone(),
                None if inner.archived.contains(&n) => None,
                None => return None,
            }
        };
        Some(match log {
            Some(log) => Source::Live(log),
            None => Source::Stored(events::read_file(&self.store.events_path(id))),
        })
    }

    /// The trajectory folder of `id` (under this data dir, wherever it was when the task ran).
    pub fn trace_dir(&self, id: &str) -> Option<PathBuf> {
        let n = parse_number(id)?;
        self.known(n).then(|| self.store.trace_dir(id))
    }

    /// Cancels a queued task at once, or asks a running one to stop after its current action.
    pub fn cancel(self: &Arc<Self>, id: &str) -> Result<TaskRecord, CancelError> {
        let n = parse_number(id).ok_or(CancelError::NotFound)?;
        let mut inner = self.lock();
        if inner.archived.contains(&n) {
            drop(inner);
            return match self.store.load(id) {
                Some(record) => Err(CancelError::Ended(Box::new(record))),
                None => Err(CancelError::NotFound),
            };
        }
        let entry = inner.entries.get_mut(&n).ok_or(CancelError::NotFound)?;
        match entry.record.state {
            TaskState::Queued => {
                let key = entry.device_key.clone();
                if let Some(q) = inner.queues.get_mut(&key) {
                    q.retain(|x| *x != n);
                }
                self.end(&mut inner, n, TaskState::Cancelled, None)
                    .ok_or(CancelError::NotFound)
            }
            TaskState::Running => {
                if !entry.cancel_requested {
                    entry.cancel_requested = true;
                    entry.stop.request_stop();
                    if let Some(log) = &entry.log {
                        log.push("cancel_requested", json!({}));
                    }
                }
                Ok(entry.record.clone())
            }
            _ => Err(CancelError::Ended(Box::new(entry.record.clone()))),
        }
    }

    /// Stops taking tasks, marks the queued ones interrupted, asks the running ones to stop
    /// after their current action and waits up to `grace` for them to record how they ended.
    pub async fn shutdown(self: &Arc<Self>, grace: Duration) {
        {
            let mut inner = self.lock();
            inner.shutting_down = true;
            let queued: Vec<u64> = inner.queues.drain().flat_map(|(_, q)| q).collect();
            for n in queued {
                self.end(
                    &mut inner,
                    n,
                    TaskState::Interrupted,
                    Some("the daemon was stopped before the task started".into()),
                );
            }
            for entry in inner.entries.values() {
                if entry.record.state == TaskState::Running {
                    entry.stop.request_stop();
                }
            }
        }
        let start = Instant::now();
        loop {
            let running = self.lock().running;
            if running == 0 {
                break;
            }
            if start.elapsed() >= grace {
                tracing::warn!(
                    "{running} task(s) still running after {grace:?}; they are marked interrupted on the next start"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs one task on its own thread: opens the device, runs the agent, streams events.
fn run_job(
    job: Job,
    record: &TaskRecord,
    stop: StopSignal,
    log: Arc<EventLog>,
) -> Result<RunReport, String> {
    let mut env = open_environment(&job.profile, job.device.open_arg.as_deref())
        .map_err(|e| format!("cannot open device {:?}: {e}", job.device.label))?;
    let mut model: Box<dyn Model> = match job.backend {
        Backend::Embedded { engine, name } => Box::new(SharedModel::new(engine, name, stop.flag())),
        Backend::Replay(m) => Box::new(m),
    };
    let options = RunOptions {
        dry_run: job.dry_run,
        max_steps: job.max_steps,
        max_seconds: job.max_seconds,
        trace_dir: Some(record.trace_dir.clone()),
        stop,
        ..Default::default()
    };
    let mut hooks = TaskHooks {
        log,
        files_url: record.trajectory_url.clone(),
    };
    job.agent
        .run(
            &job.task,
            model.as_mut(),
            env.as_mut(),
            &options,
            &mut hooks,
        )
        .map_err(|e| e.to_string())
}

/// Turns the agent's events into the task's event log.
struct TaskHooks {
    log: Arc<EventLog>,
    files_url: String,
}

impl TaskHooks {
    fn url(&self, relative: &str) -> String {
        format!("{}/{relative}", self.files_url)
    }
}

impl Hooks for TaskHooks {
    fn event(&mut self, event: &Event<'_>) {
        match event {
            Event::Started { meta, .. } => self.log.push(
                "started",
                json!({
                    "model": meta.model,
                    "environment": meta.environment,
                    "dry_run": meta.dry_run,
                    "trajectory_url": self.files_url,
                    "screenshot_url": self.url("screenshots/0000.png"),
                }),
            ),
            Event::Reply {
                step,
                text,
                seconds,
            } => self.log.push(
                "reply",
                json!({"step": step, "text": text, "seconds": seconds}),
            ),
            Event::Action { step, record } => {
                let mut data = serde_json::to_value(record).unwrap_or(Value::Null);
                data["step"] = json!(step);
                self.log.push("action", data);
            }
            Event::Step { record } => {
                let mut data = serde_json::to_value(record).unwrap_or(Value::Null);
                data["screenshot_url"] = json!(self.url(&record.screenshot));
                if let Some(after) = &record.screenshot_after {
                    data["screenshot_after_url"] = json!(self.url(after));
                }
                self.log.push("step", data);
            }
            Event::Finished { status } => {
                let answer = match status {
                    RunStatus::Finished { answer } => Some(answer.clone()),
                    _ => None,
                };
                self.log.push(
                    "finished",
                    json!({"result": status, "answer": answer, "summary": status.describe()}),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish_job(key: &str) -> Job {
        let profile = Profile::load("virtual").unwrap();
        Job {
            task: "Say ok".into(),
            profile_name: "virtual".into(),
            agent: Agent::new(profile.clone()).unwrap(),
            profile,
            device: DeviceSpec {
                label: key.into(),
                key: key.into(),
                open_arg: None,
            },
            backend: Backend::Replay(ReplayModel::from_replies(
                "test replies",
                vec![r#" *FUNCTION*: Finish *ARGS*: {"answer": "ok"}"#.into()],
            )),
            dry_run: false,
            max_steps: None,
            max_seconds: None,
        }
    }

    fn wait_state(manager: &TaskManager, id: &str, want: TaskState) -> TaskRecord {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let record = manager.get(id).unwrap();
            if record.state == want || Instant::now() > deadline {
                return record;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_device_held_elsewhere_keeps_its_tasks_queued_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let claims = DeviceClaims::new();
        let manager = TaskManager::open(TaskStore::open(dir.path()).unwrap(), 8, claims.clone());
        let held = claims.try_claim("desktop", "an MCP run_task").unwrap();
        let record = manager.submit(finish_job("desktop")).unwrap();
        // Another device's queue is not held up.
        let other = manager.submit(finish_job("adb:emulator-5554")).unwrap();
        assert_eq!(
            wait_state(&manager, &other.id, TaskState::Done).state,
            TaskState::Done
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(manager.get(&record.id).unwrap().state, TaskState::Queued);
        drop(held);
        let done = wait_state(&manager, &record.id, TaskState::Done);
        assert_eq!(done.state, TaskState::Done, "{done:?}");
        assert!(claims.holder("desktop").is_none(), "released after the run");
        let again = manager.submit(finish_job("desktop")).unwrap();
        assert_eq!(
            wait_state(&manager, &again.id, TaskState::Done).state,
            TaskState::Done
        );
    }
}
