//! Agent profiles (`agents/*.toml`): which environment, which functions and prompt, which model
//! family, the limits of a run and its safety rules. `desktop`, `android` and `virtual` are built
//! in; any other profile is a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AgentError;
use crate::environment::EnvironmentKind;
use crate::environment::virtual_screen::{VirtualScreen, Widget};
use crate::protocol::render::PromptKind;
use crate::protocol::{ActionSpace, ModelFamily};

/// The profiles compiled into vlad, by name.
const BUILTIN: [(&str, &str); 3] = [
    ("desktop", include_str!("../../agents/desktop.toml")),
    ("android", include_str!("../../agents/android.toml")),
    ("virtual", include_str!("../../agents/virtual.toml")),
];

/// One agent profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub environment: EnvironmentKind,
    /// Which system prompt (`desktop`, `android`, `grounding`).
    pub prompt: PromptKind,
    /// A folder with edited prompt files (relative to the profile file); the built-in ones
    /// otherwise.
    #[serde(default)]
    pub prompt_dir: Option<PathBuf>,
    /// The reply format of the model.
    #[serde(default)]
    pub family: ModelFamily,
    /// Function names shown to the model; the prompt kind's set when empty.
    #[serde(default)]
    pub functions: Vec<String>,
    /// Tool plugin folders or manifest files (relative to the profile file); their tools are
    /// offered besides the functions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<PathBuf>,
    /// The embedded model to load when the command line names none.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub safety: Safety,
    /// The screen of a `virtual` environment.
    #[serde(default)]
    pub screen: Option<ScreenSpec>,
}

/// When a run stops on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Model calls at most.
    pub max_steps: usize,
    /// Wall-clock seconds at most (checked between actions).
    pub max_seconds: f64,
    /// Screenshots kept as images in the prompt; older ones become a text placeholder.
    pub history_images: usize,
    /// Stop when the same action is asked for on an unchanged screen this many times in a row.
    pub max_repeats: usize,
    /// Stop after this many steps in a row with a parse or execution error.
    pub max_errors: usize,
    /// Tokens per reply at most.
    pub max_new_tokens: usize,
    /// A reply without any function call is the final answer (the paper's convention). When
    /// false it is reported back as an error and only Finish ends the task.
    pub answer_without_call: bool,
    /// Milliseconds to wait after acting before the next screenshot.
    pub settle_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 30,
            max_seconds: 900.0,
            history_images: 2,
            max_repeats: 3,
            max_errors: 3,
            max_new_tokens: 512,
            answer_without_call: true,
            settle_ms: 0,
        }
    }
}

/// What the agent may do without asking.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Safety {
    /// Action tags (`click`, `type`, `key`, …) or tool names allowed; all when empty.
    pub allow_actions: Vec<String>,
    /// Action tags or tool names never performed.
    pub deny_actions: Vec<String>,
    /// Apps that OpenApp may open (case-insensitive); all when empty.
    pub allow_apps: Vec<String>,
    /// Apps that OpenApp must not open.
    pub deny_apps: Vec<String>,
    /// Action tags or tool names that need the user's confirmation.
    pub confirm_actions: Vec<String>,
    /// Key combinations that need the user's confirmation, e.g. `ctrl+alt+delete`.
    pub confirm_keys: Vec<String>,
    /// Typing a `{{secret:NAME}}` needs the user's confirmation.
    pub confirm_secrets: bool,
}

/// A virtual screen and its widgets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenSpec {
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub widgets: Vec<WidgetSpec>,
}

/// One widget of a [`ScreenSpec`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WidgetSpec {
    pub name: String,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    #[serde(default = "white")]
    pub color: [u8; 3],
}

fn white() -> [u8; 3] {
    [255, 255, 255]
}

impl ScreenSpec {
    /// A fresh virtual screen with these widgets.
    pub fn build(&self) -> VirtualScreen {
        self.widgets
            .iter()
            .fold(VirtualScreen::new(self.width, self.height), |screen, w| {
                screen.with_widget(Widget::new(
                    w.name.clone(),
                    w.x,
                    w.y,
                    w.width,
                    w.height,
                    w.color,
                ))
            })
    }
}

impl Profile {
    /// A built-in profile by name, or a profile file.
    pub fn load(spec: &str) -> Result<Self, AgentError> {
        if let Some((_, source)) = BUILTIN.iter().find(|(n, _)| *n == spec) {
            return Self::from_toml(source, None);
        }
        let path = Path::new(spec);
        if !path.exists() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(AgentError::Profile {
                path: path.to_path_buf(),
                message: format!(
                    "no such file, and not a built-in profile ({})",
                    names.join(", ")
                ),
            });
        }
        let source = std::fs::read_to_string(path).map_err(|e| AgentError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_toml(&source, Some(path))
    }

    /// Reads a profile; `path` (the file it came from) anchors a relative `prompt_dir`.
    pub fn from_toml(source: &str, path: Option<&Path>) -> Result<Self, AgentError> {
        let shown = path.map_or_else(|| PathBuf::from("<built-in>"), Path::to_path_buf);
        let bad = |message: String| AgentError::Profile {
            path: shown.clone(),
            message,
        };
        let mut profile: Profile = toml::from_str(source).map_err(|e| bad(e.to_string()))?;
        if let (Some(dir), Some(file)) = (&profile.prompt_dir, path)
            && dir.is_relative()
        {
            let base = file.parent().unwrap_or(Path::new("."));
            profile.prompt_dir = Some(base.join(dir));
        }
        if let Some(file) = path {
            let base = file.parent().unwrap_or(Path::new("."));
            for tools in &mut profile.tools {
                if tools.is_relative() {
                    *tools = base.join(&*tools);
                }
            }
        }
        profile.action_space().map_err(|e| bad(e.to_string()))?;
        if profile.environment == EnvironmentKind::Virtual && profile.screen.is_none() {
            return Err(bad(
                "a virtual environment needs a [screen] table with width and height".into(),
            ));
        }
        if profile.limits.max_steps == 0 {
            return Err(bad("limits.max_steps must be at least 1".into()));
        }
        if profile.limits.max_new_tokens == 0 {
            return Err(bad("limits.max_new_tokens must be at least 1".into()));
        }
        Ok(profile)
    }

    /// The profile as TOML (kept with a trajectory so that it can be replayed).
    pub fn to_toml(&self) -> Result<String, AgentError> {
        toml::to_string(self).map_err(|e| AgentError::Profile {
            path: PathBuf::from(&self.name),
            message: e.to_string(),
        })
    }

    /// The functions shown to the model.
    pub fn action_space(&self) -> Result<ActionSpace, crate::protocol::CallError> {
        if self.functions.is_empty() {
            Ok(self.prompt.default_space())
        } else {
            ActionSpace::from_names(&self.functions)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_load() {
        for (name, _) in BUILTIN {
            let p = Profile::load(name);
            assert!(p.is_ok(), "{name}: {p:?}");
        }
    }

    #[test]
    fn tool_folders_are_relative_to_the_profile() -> Result<(), AgentError> {
        let source = "name = \"x\"\nenvironment = \"desktop\"\nprompt = \"desktop\"\ntools = [\"../tools\", \"/opt/t\"]\n";
        let p = Profile::from_toml(source, Some(Path::new("agents/mine.toml")))?;
        assert_eq!(
            p.tools,
            vec![PathBuf::from("agents/../tools"), PathBuf::from("/opt/t")]
        );
        assert!(p.to_toml()?.contains("tools = ["));
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_functions_are_reported() {
        let base = "name = \"x\"\nenvironment = \"desktop\"\nprompt = \"desktop\"\n";
        assert!(Profile::from_toml(&format!("{base}colour = 1\n"), None).is_err());
        let bad = Profile::from_toml(&format!("{base}functions = [\"Fly\"]\n"), None);
        assert!(bad.is_err_and(|e| e.to_string().contains("Fly")));
    }
}
