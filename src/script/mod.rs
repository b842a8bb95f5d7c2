//! Scripted UI tests (`vlad test`): test files in plain language ([`file`](mod@file)), run step by step
//! against a desktop or Android app ([`target`]) — grounded steps locate their target with one
//! `ground` call, assertions ask the model yes/no plus a box ([`assertion`]), explicit actions
//! go straight to the environment — with the model's answers cached per step and screen
//! ([`cache`]), a trajectory per test, a terminal summary and JUnit XML ([`junit`]).
//!
//! Entry point: [`run_script`].

pub mod assertion;
pub mod cache;
pub mod file;
pub mod junit;
mod runner;
pub mod target;

use std::path::{Path, PathBuf};

use crate::model::Model;

pub use file::{Script, ScriptError};
pub use runner::run_script;

/// Why a test file could not be run at all (single tests that cannot run are
/// [`CaseStatus::Error`] instead).
#[derive(Debug, thiserror::Error)]
pub enum UiTestError {
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
}

/// How a test ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CaseStatus {
    Passed,
    /// An expectation was not met (an assertion, a wait, a thing that could not be found).
    Failed {
        message: String,
        detail: String,
    },
    /// The test could not run as written (the app did not start, no model, no cached answer).
    Error {
        message: String,
        detail: String,
    },
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Passed,
    Failed,
    Error,
    /// Not run: an earlier step failed.
    Skipped,
}

/// One step's result.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub text: String,
    pub status: StepStatus,
    pub message: Option<String>,
    /// Where its answers came from (`cache hit`, `asked the model (…)`), when it needed any.
    pub source: Option<String>,
    pub attempts: u32,
    pub time_s: f64,
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub status: CaseStatus,
    pub steps: Vec<StepResult>,
    pub time_s: f64,
    /// Its trajectory folder, when one was written.
    pub trace: Option<PathBuf>,
}

/// How the cache served a file's steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answers replayed from the cache.
    pub hits: usize,
    /// Answers the model gave (and the cache recorded).
    pub asked: usize,
    /// Of those, how many replaced a recording whose screen no longer matched.
    pub changed: usize,
    /// Cache misses that could not ask a model (`--no-model`).
    pub unanswered: usize,
}

/// One test file's results.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    pub name: String,
    pub file: PathBuf,
    /// When it started, ISO 8601 UTC.
    pub timestamp: String,
    pub time_s: f64,
    pub cases: Vec<CaseResult>,
    pub cache: CacheStats,
    pub cache_file: PathBuf,
}

/// Opens a model (or says why it cannot).
type Opener<'a> = Box<dyn FnMut() -> Result<Box<dyn Model>, String> + 'a>;

/// Where the model comes from: opened the first time a step needs it (a fully cached run
/// never loads one), or not at all (`--no-model`).
pub struct ModelSlot<'a> {
    open: Option<Opener<'a>>,
    model: Option<Box<dyn Model>>,
    failed: Option<String>,
}

impl<'a> ModelSlot<'a> {
    /// No model: cached answers only.
    pub fn none() -> Self {
        Self {
            open: None,
            model: None,
            failed: None,
        }
    }

    /// A model opened by `open` when first needed.
    pub fn lazy(open: impl FnMut() -> Result<Box<dyn Model>, String> + 'a) -> Self {
        Self {
            open: Some(Box::new(open)),
            model: None,
            failed: None,
        }
    }

    /// A model already open.
    pub fn open(model: Box<dyn Model>) -> Self {
        Self {
            open: None,
            model: Some(model),
            failed: None,
        }
    }

    /// Whether a model may be asked.
    pub fn allowed(&self) -> bool {
        self.model.is_some() || self.open.is_some()
    }

    /// What answers come from, for trajectories.
    pub fn describe(&self) -> String {
        match (&self.model, &self.open) {
            (Some(m), _) => m.name(),
            (None, Some(_)) => "cached answers (a model is opened when one is missing)".into(),
            (None, None) => "cached answers only (no model)".into(),
        }
    }

    fn get(&mut self) -> Result<&mut dyn Model, String> {
        if self.model.is_none() {
            if let Some(e) = &self.failed {
                return Err(e.clone());
            }
            let open = self
                .open
                .as_mut()
                .ok_or_else(|| "no model may be asked".to_string())?;
            match open() {
                Ok(m) => self.model = Some(m),
                Err(e) => {
                    let e = format!("cannot open the model: {e}");
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        match self.model.as_mut() {
            Some(m) => Ok(m.as_mut()),
            None => Err("no model".into()),
        }
    }
}

/// Where a test file's answers are cached: `<dir>/<file name>.cache.json`, `dir` being
/// `cache_dir` or the file's own folder.
pub fn cache_path(script: &Path, cache_dir: Option<&Path>) -> PathBuf {
    let name = script
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tests".into());
    let dir = cache_dir.map(Path::to_path_buf).unwrap_or_else(|| {
        script
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    });
    dir.join(format!("{name}.cache.json"))
}

/// What a run needs besides the file and the model.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// Trajectories go to `<trace_root>/<suite>/<test>/`.
    pub trace_root: PathBuf,
    /// Where cache files live (the test file's folder by default).
    pub cache_dir: Option<PathBuf>,
}

/// What happens during a run, for progress displays.
#[derive(Debug)]
pub enum Progress<'a> {
    TestStarted {
        suite: &'a str,
        test: &'a str,
    },
    Step {
        index: usize,
        result: &'a StepResult,
    },
    TestFinished {
        case: &'a CaseResult,
    },
}

/// The terminal summary of a run.
pub fn summary(suites: &[SuiteResult]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let (mut passed, mut failed, mut errors) = (0, 0, 0);
    for suite in suites {
        let _ = writeln!(out, "{} ({})", suite.name, suite.file.display());
        for case in &suite.cases {
            let (mark, why) = match &case.status {
                CaseStatus::Passed => {
                    passed += 1;
                    ("PASS ", String::new())
                }
                CaseStatus::Failed { message, .. } => {
                    failed += 1;
                    ("FAIL ", format!(": {message}"))
                }
                CaseStatus::Error { message, .. } => {
                    errors += 1;
                    ("ERROR", format!(": {message}"))
                }
            };
            let _ = writeln!(out, "  {mark} {} ({:.2} s){why}", case.name, case.time_s);
            if let Some(trace) = &case.trace
                && case.status != CaseStatus::Passed
            {
                let _ = writeln!(out, "        trajectory: {}", trace.display());
            }
        }
        let c = suite.cache;
        let _ = write!(
            out,
            "  cache {}: {} answer(s) replayed, {} asked the model",
            suite.cache_file.display(),
            c.hits,
            c.asked
        );
        if c.changed > 0 {
            let _ = write!(out, " ({} because the screen changed)", c.changed);
        }
        if c.unanswered > 0 {
            let _ = write!(out, ", {} missing without a model", c.unanswered);
        }
        out.push('\n');
    }
    let total = passed + failed + errors;
    let _ = writeln!(
        out,
        "{total} test(s): {passed} passed, {failed} failed, {errors} error(s)"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_files_sit_next_to_the_script_or_in_the_cache_dir() {
        assert_eq!(
            cache_path(Path::new("ui/login.toml"), None),
            PathBuf::from("ui/login.toml.cache.json")
        );
        assert_eq!(
            cache_path(Path::new("login.toml"), Some(Path::new("c"))),
            PathBuf::from("c/login.toml.cache.json")
        );
        assert_eq!(
            cache_path(Path::new("login.toml"), None),
            PathBuf::from("./login.toml.cache.json")
        );
    }

    #[test]
    fn a_slot_without_a_model_refuses() {
        let mut slot = ModelSlot::none();
        assert!(!slot.allowed());
        assert!(slot.get().is_err());
        let mut calls = 0;
        let mut failing = ModelSlot::lazy(|| {
            calls += 1;
            Err("no weights".to_string())
        });
        assert!(failing.allowed());
        assert!(failing.get().is_err_and(|e| e.contains("no weights")));
        // The failure is remembered; the model is not opened again for every step.
        assert!(failing.get().is_err());
        drop(failing);
        assert_eq!(calls, 1);
    }
}
