//! Trajectories: one folder per run. `run.json` (task, profile, model, screen), `profile.toml`
//! (to replay it), `trajectory.jsonl` (one line per step), `screenshots/NNNN.png` (screenshot
//! `n` is what the model saw at step `n + 1`) and `result.json` (how the run ended).
//!
//! Writes are crash-safe: files are written to a temporary name and renamed, step lines are
//! appended and synced, so a killed run loses at most the step in progress. [`read`] skips a
//! torn last line.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AgentError;
use crate::action::Action;
use crate::environment::{Description, Outcome};

pub const STEPS_FILE: &str = "trajectory.jsonl";
pub const RUN_FILE: &str = "run.json";
pub const RESULT_FILE: &str = "result.json";
pub const PROFILE_FILE: &str = "profile.toml";
pub const SCREENSHOTS: &str = "screenshots";

/// What a run was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMeta {
    pub vlad_version: String,
    /// The task as given, secrets as `{{secret:NAME}}`.
    pub task: String,
    pub profile: String,
    pub model: String,
    pub environment: Description,
    pub dry_run: bool,
    /// Seconds since the Unix epoch.
    pub started_at: f64,
}

/// What the model was shown at one step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PromptSummary {
    pub messages: usize,
    /// Screenshots sent as images.
    pub images: usize,
    /// Older screenshots replaced by a placeholder.
    pub placeholders: usize,
    /// Characters of text in the whole prompt.
    pub text_chars: usize,
    pub continued: bool,
}

/// What the gate decided for an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Performed.
    Perform,
    /// Not performed: a dry run.
    DryRun,
    /// Not performed: the profile forbids it.
    Denied { reason: String },
    /// Not performed: the user did not confirm it.
    Declined { reason: String },
    /// Not performed: the run stopped first.
    Skipped { reason: String },
    /// Handled by the agent (Finish, CallUser).
    Agent,
}

/// One action of a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionRecord {
    /// The function as the model wrote it.
    pub function: String,
    /// The call as written (secrets redacted).
    pub text: String,
    /// The action with model-space coordinates.
    pub model: Value,
    /// The action in screenshot pixels, as performed (secrets as placeholders).
    pub action: Action,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default)]
    pub perform_s: f64,
}

/// Seconds spent in each phase of a step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepTimings {
    pub generate_s: f64,
    pub perform_s: f64,
    pub observe_s: f64,
    pub total_s: f64,
}

/// One line of `trajectory.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// Counts from 1.
    pub step: usize,
    /// The screenshot the model saw (relative to the run folder).
    pub screenshot: String,
    /// The screenshot after the step's actions, when one was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot_after: Option<String>,
    pub screen_width: u32,
    pub screen_height: u32,
    pub prompt: PromptSummary,
    /// The model's reply (secrets redacted); `None` when the model gave none.
    pub reply: Option<String>,
    #[serde(default)]
    pub stop: Option<String>,
    #[serde(default)]
    pub thought: Option<String>,
    pub actions: Vec<ActionRecord>,
    /// A final answer without a call.
    #[serde(default)]
    pub answer: Option<String>,
    /// Parse, mapping, execution and model errors, as sentences.
    pub errors: Vec<String>,
    /// The text written back after `*RESULT*:` (the screenshot follows it).
    #[serde(default)]
    pub result: Option<String>,
    pub timings: StepTimings,
    /// The backend's own timings.
    #[serde(default)]
    pub model_timings: Value,
}

/// How a run ended (`result.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub status: super::RunStatus,
    pub steps: usize,
    pub elapsed_s: f64,
    #[serde(default)]
    pub final_screenshot: Option<String>,
}

/// Writes one run folder.
#[derive(Debug)]
pub struct TrajectoryWriter {
    dir: PathBuf,
    steps: File,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_error(&tmp))?;
    f.write_all(bytes).map_err(io_error(&tmp))?;
    f.sync_all().map_err(io_error(&tmp))?;
    fs::rename(&tmp, path).map_err(io_error(path))
}

impl TrajectoryWriter {
    /// Creates the folder (it may exist but must not hold a trajectory already).
    pub fn create(dir: &Path, meta: &RunMeta, profile_toml: &str) -> Result<Self, AgentError> {
        fs::create_dir_all(dir.join(SCREENSHOTS)).map_err(io_error(dir))?;
        let steps_path = dir.join(STEPS_FILE);
        if steps_path.exists() {
            return Err(AgentError::Trace(format!(
                "{} already holds a trajectory; pick another --trace folder",
                dir.display()
            )));
        }
        let meta_json =
            serde_json::to_vec_pretty(meta).map_err(|e| AgentError::Trace(e.to_string()))?;
        write_atomic(&dir.join(RUN_FILE), &meta_json)?;
        write_atomic(&dir.join(PROFILE_FILE), profile_toml.as_bytes())?;
        let steps = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&steps_path)
            .map_err(io_error(&steps_path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            steps,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves screenshot number `index`; returns its path relative to the run folder.
    pub fn save_screenshot(&self, index: usize, image: &RgbImage) -> Result<String, AgentError> {
        let relative = format!("{SCREENSHOTS}/{index:04}.png");
        let path = self.dir.join(&relative);
        let mut png = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| AgentError::Trace(format!("cannot encode {}: {e}", path.display())))?;
        write_atomic(&path, &png)?;
        Ok(relative)
    }

    /// Appends one step and syncs it to disk.
    pub fn append(&mut self, step: &StepRecord) -> Result<(), AgentError> {
        let mut line = serde_json::to_string(step).map_err(|e| AgentError::Trace(e.to_string()))?;
        line.push('\n');
        let path = self.dir.join(STEPS_FILE);
        self.steps
            .write_all(line.as_bytes())
            .map_err(io_error(&path))?;
        self.steps.sync_data().map_err(io_error(&path))
    }

    /// Writes `result.json`.
    pub fn finish(&self, result: &RunResult) -> Result<(), AgentError> {
        let json =
            serde_json::to_vec_pretty(result).map_err(|e| AgentError::Trace(e.to_string()))?;
        write_atomic(&self.dir.join(RESULT_FILE), &json)
    }
}

/// A run folder as read back.
#[derive(Debug, Clone)]
pub struct Trajectory {
    pub dir: PathBuf,
    pub meta: RunMeta,
    pub profile_toml: Option<String>,
    pub steps: Vec<StepRecord>,
    /// `None` when the run did not end (killed, or still running).
    pub result: Option<RunResult>,
    /// True when a torn last line (a crash mid-write) was skipped.
    pub torn: bool,
}

impl Trajectory {
    /// Loads a screenshot named in a step record.
    pub fn screenshot(&self, relative: &str) -> Result<RgbImage, AgentError> {
        let path = self.dir.join(relative);
        let img = image::open(&path)
            .map_err(|e| AgentError::Trace(format!("cannot read {}: {e}", path.display())))?;
        Ok(img.to_rgb8())
    }
}

/// Reads a run folder. Every complete line must parse; a torn last line is skipped.
pub fn read(dir: &Path) -> Result<Trajectory, AgentError> {
    let meta_path = dir.join(RUN_FILE);
    let meta_text = fs::read_to_string(&meta_path).map_err(io_error(&meta_path))?;
    let meta: RunMeta = serde_json::from_str(&meta_text)
        .map_err(|e| AgentError::Trace(format!("{}: {e}", meta_path.display())))?;
    let profile_toml = fs::read_to_string(dir.join(PROFILE_FILE)).ok();
    let steps_path = dir.join(STEPS_FILE);
    let text = fs::read_to_string(&steps_path).map_err(io_error(&steps_path))?;
    let mut steps = Vec::new();
    let mut torn = false;
    let complete = text.ends_with('\n') || text.is_empty();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepRecord>(line) {
            Ok(step) => steps.push(step),
            Err(_) if i + 1 == lines.len() && !complete => torn = true,
            Err(e) => {
                return Err(AgentError::Trace(format!(
                    "{} line {}: {e}",
                    steps_path.display(),
                    i + 1
                )));
            }
        }
    }
    let result_path = dir.join(RESULT_FILE);
    let result = match fs::read_to_string(&result_path) {
        Ok(t) => Some(
            serde_json::from_str(&t)
                .map_err(|e| AgentError::Trace(format!("{}: {e}", result_path.display())))?,
        ),
        Err(_) => None,
    };
    Ok(Trajectory {
        dir: dir.to_path_buf(),
        meta,
        profile_toml,
        steps,
        result,
        torn,
    })
}

/// A fresh run folder under the user's state directory (`~/.local/state/vlad/runs/…`).
pub fn default_dir() -> PathBuf {
    let base = dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .unwrap_or_else(std::env::temp_dir);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    base.join("vlad")
        .join("runs")
        .join(format!("run-{now}-{}", std::process::id()))
}
