//! A task's event log and its Server-Sent Events stream. Events are numbered from 1, appended
//! to `events.jsonl` in the task's folder as they happen and kept in memory while the task is
//! live; a client that connects late (or reconnects with `Last-Event-ID`) gets the past events
//! first, then the new ones as they come. A client that goes away only drops its own stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

/// The name of the event that ends every task's stream.
pub const END_EVENT: &str = "end";

/// One event: its number, its type (the SSE `event:` field) and its JSON data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskEvent {
    pub id: u64,
    pub event: String,
    pub data: Value,
}

struct LogInner {
    events: Vec<TaskEvent>,
    file: Option<File>,
    closed: bool,
}

/// The events of a live task.
pub struct EventLog {
    inner: Mutex<LogInner>,
    /// Bumped on every change; streams wait on it.
    version: watch::Sender<u64>,
    path: PathBuf,
}

impl EventLog {
    /// Starts a log that appends to `path` (created or continued).
    pub fn create(path: &Path) -> std::io::Result<Arc<Self>> {
        let events = read_file(path);
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Arc::new(Self {
            inner: Mutex::new(LogInner {
                events,
                file: Some(file),
                closed: false,
            }),
            version: watch::Sender::new(0),
            path: path.to_path_buf(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event; a closed log ignores it.
    pub fn push(&self, event: &str, data: Value) {
        {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            let id = inner.events.last().map_or(1, |e| e.id + 1);
            let record = TaskEvent {
                id,
                event: event.to_string(),
                data,
            };
            if let Some(file) = inner.file.as_mut() {
                let mut line = serde_json::to_string(&record).unwrap_or_default();
                line.push('\n');
                if let Err(e) = file.write_all(line.as_bytes()) {
                    tracing::warn!("cannot append to {}: {e}", self.path.display());
                }
            }
            inner.events.push(record);
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Appends the final event and closes the log (the file is synced and let go).
    pub fn close(&self, data: Value) {
        self.push(END_EVENT, data);
        {
            let mut inner = self.lock();
            inner.closed = true;
            if let Some(file) = inner.file.take()
                && let Err(e) = file.sync_data()
            {
                tracing::warn!("cannot sync {}: {e}", self.path.display());
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// The events after `after`, and whether the log is closed.
    fn since(&self, after: u64) -> (Vec<TaskEvent>, bool) {
        let inner = self.lock();
        let events = inner
            .events
            .iter()
            .filter(|e| e.id > after)
            .cloned()
            .collect();
        (events, inner.closed)
    }
}

/// Reads a stored log; a torn last line (a crash mid-write) is skipped.
pub fn read_file(path: &Path) -> Vec<TaskEvent> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Where a stream's events come from.
pub enum Source {
    /// A task that is still queued or running.
    Live(Arc<EventLog>),
    /// A task that has ended: its stored events.
    Stored(Vec<TaskEvent>),
}

struct StreamState {
    source: Source,
    receiver: Option<watch::Receiver<u64>>,
    pending: VecDeque<TaskEvent>,
    after: u64,
    done: bool,
}

fn to_sse(e: &TaskEvent) -> Event {
    Event::default()
        .id(e.id.to_string())
        .event(e.event.clone())
        .data(e.data.to_string())
}

/// The SSE response: every event after `after` (0: all), then new ones until the task ends.
/// Comment lines keep idle connections alive (and let the server notice a gone client).
pub fn stream(
    source: Source,
    after: u64,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let receiver = match &source {
        Source::Live(log) => Some(log.version.subscribe()),
        Source::Stored(_) => None,
    };
    let state = StreamState {
        source,
        receiver,
        pending: VecDeque::new(),
        after,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                s.after = e.id;
                let sse = to_sse(&e);
                return Some((Ok(sse), s));
            }
            if s.done {
                return None;
            }
            match &s.source {
                Source::Stored(events) => {
                    s.pending = events.iter().filter(|e| e.id > s.after).cloned().collect();
                    s.done = true;
                }
                Source::Live(log) => {
                    // Mark the current version seen before reading, so a push in between wakes us.
                    if let Some(rx) = s.receiver.as_mut() {
                        rx.borrow_and_update();
                    }
                    let (events, closed) = log.since(s.after);
                    if !events.is_empty() {
                        s.pending = events.into();
                        continue;
                    }
                    if closed {
                        return None;
                    }
                    let changed = match s.receiver.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => false,
                    };
                    if !changed {
                        // The log is gone: send what it holds and end.
                        let (events, _) = log.since(s.after);
                        s.pending = events.into();
                        s.done = true;
                    }
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}
