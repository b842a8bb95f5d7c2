//! The loop's own texts for the model (task turn, history placeholder, action results), from
//! `prompts/agent.toml`.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use super::AgentError;

const BUILTIN: &str = include_str!("../../prompts/agent.toml");
const NAMES: [&str; 7] = [
    "task",
    "placeholder",
    "failed",
    "refused",
    "dry_run",
    "user_answer",
    "no_call",
];

/// The compiled texts.
#[derive(Debug)]
pub struct Texts {
    env: Environment<'static>,
}

impl Texts {
    pub fn builtin() -> Result<Self, AgentError> {
        Self::from_source(BUILTIN, "prompts/agent.toml")
    }

    /// `dir/agent.toml` if it exists, the built-in texts otherwise.
    pub fn from_dir(dir: &Path) -> Result<Self, AgentError> {
        let path = dir.join("agent.toml");
        match std::fs::read_to_string(&path) {
            Ok(source) => Self::from_source(&source, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::builtin(),
            Err(e) => Err(AgentError::Io {
                path: path.clone(),
                source: e,
            }),
        }
    }

    fn from_source(source: &str, name: &str) -> Result<Self, AgentError> {
        let bad = |message: String| AgentError::Prompt(format!("{name}: {message}"));
        let table: BTreeMap<String, String> =
            toml::from_str(source).map_err(|e| bad(e.to_string()))?;
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        for key in NAMES {
            let text = table
                .get(key)
                .ok_or_else(|| bad(format!("no `{key}` text; add one")))?;
            env.add_template_owned(key, text.clone())
                .map_err(|e| bad(format!("`{key}`: {e}")))?;
        }
        Ok(Self { env })
    }

    /// Renders text `name` with `ctx`.
    pub fn render(&self, name: &str, ctx: impl Serialize) -> Result<String, AgentError> {
        let template = self
            .env
            .get_template(name)
            .map_err(|e| AgentError::Prompt(format!("agent text `{name}`: {e}")))?;
        template
            .render(ctx)
            .map_err(|e| AgentError::Prompt(format!("agent text `{name}`: {e}")))
    }
}
