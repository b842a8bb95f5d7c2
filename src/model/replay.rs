//! The replay backend: recorded replies from a JSON Lines file, one `{"reply": "<text>"}` per
//! step. Running out of replies is [`ModelError::Exhausted`], which ends a run with its own
//! status.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Completion, GenerationOptions, Model, ModelError, Prompt, Result, StopReason};

/// Replies read from a file, handed out in order.
#[derive(Debug, Clone)]
pub struct ReplayModel {
    path: PathBuf,
    replies: Vec<String>,
    next: usize,
}

impl ReplayModel {
    /// Reads every reply of `path` now, so a malformed line is reported before the run starts.
    /// Blank lines are skipped.
    pub fn open(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Replay {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let replies = Self::parse(&text).map_err(|message| ModelError::Replay {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            replies,
            next: 0,
        })
    }

    /// Replies given directly (the path is only used in messages).
    pub fn from_replies(path: impl Into<PathBuf>, replies: Vec<String>) -> Self {
        Self {
            path: path.into(),
            replies,
            next: 0,
        }
    }

    fn parse(text: &str) -> std::result::Result<Vec<String>, String> {
        let mut replies = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line)
                .map_err(|e| format!("line {}: not JSON ({e})", i + 1))?;
            let reply = value.get("reply").and_then(Value::as_str).ok_or_else(|| {
                format!(
                    "line {}: expected an object like {{\"reply\": \"<the model's text>\"}}",
                    i + 1
                )
            })?;
            replies.push(reply.to_string());
        }
        Ok(replies)
    }

    /// Replies not yet handed out.
    pub fn remaining(&self) -> usize {
        self.replies.len() - self.next
    }
}

impl Model for ReplayModel {
    fn generate(&mut self, _prompt: &Prompt, options: &GenerationOptions) -> Result<Completion> {
        let Some(reply) = self.replies.get(self.next) else {
            return Err(ModelError::Exhausted {
                path: self.path.clone(),
                step: self.next + 1,
                available: self.replies.len(),
            });
        };
        self.next += 1;
        // As a server would: the text ends before a stop string.
        let (text, stop) = super::cut_at_stop(reply, &options.stop_strings);
        Ok(Completion {
            text,
            stop: stop.map_or(StopReason::EndOfTurn, StopReason::StopString),
            tokens: None,
            timings: Value::Null,
        })
    }

    fn name(&self) -> String {
        format!("replay:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_and_checked() {
        let ok = ReplayModel::parse("{\"reply\": \"a\"}\n\n{\"reply\": \"b *RESULT*\"}\n");
        assert_eq!(ok, Ok(vec!["a".to_string(), "b *RESULT*".to_string()]));
        let bad = ReplayModel::parse("{\"reply\": 1}");
        assert!(bad.is_err_and(|e| e.contains("line 1")));
    }

    #[test]
    fn running_out_is_exhausted() {
        let mut m = ReplayModel::from_replies("r.jsonl", vec!["x *RESULT* y".into()]);
        let options = GenerationOptions {
            stop_strings: vec!["*RESULT*".into()],
            ..Default::default()
        };
        let prompt = Prompt::default();
        let first = m.generate(&prompt, &options);
        assert!(first.is_ok_and(|c| c.text == "x "));
        assert!(
            m.generate(&prompt, &options)
                .is_err_and(|e| e.is_exhausted())
        );
    }
}
