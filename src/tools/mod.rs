//! Tool plugins: manifests from plugin folders (`tools/`), each a subprocess tool (JSON
//! arguments on stdin, a JSON result on stdout) or an MCP server whose tools are imported.
//! Every tool becomes one more function in the system prompt.
//!
//! The entry type is [`Plugins`]: [`Plugins::load`] reads manifests (collecting every manifest
//! error instead of stopping at the first), [`Plugins::specs`] describes the tools for the
//! prompt, and [`Plugins::call`] runs one call. A call never fails as a whole: a schema
//! mismatch, a non-zero exit, a crash, a timeout, output that is not the expected JSON, an
//! unknown tool or a server that went away all become a [`ToolResult::Failed`] whose reason the
//! model reads.

pub mod manifest;
pub mod mcp;
pub mod schema;
pub mod subprocess;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::action::Action;
use crate::protocol::render::ToolSpec;
pub use manifest::{Manifest, ManifestError};

/// Characters of a tool result written back to the model at most; the rest is cut.
pub const MAX_RESULT_CHARS: usize = 4000;

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ToolResult {
    /// The result, as text for the model.
    Ok { text: String },
    /// Why there is no result, as a sentence for the model.
    Failed { reason: String },
}

/// How a tool runs.
#[derive(Debug)]
enum Runner {
    Command(subprocess::CommandSpec),
    Mcp {
        server: Arc<mcp::McpServer>,
        /// The tool's name on the server.
        remote: String,
    },
}

/// One loaded tool.
#[derive(Debug)]
pub struct Tool {
    spec: ToolSpec,
    dangerous: bool,
    /// The manifest it came from.
    source: PathBuf,
    timeout: Duration,
    runner: Runner,
}

/// What `vlad tools list` shows of a tool.
#[derive(Debug, Clone, Serialize)]
pub struct ToolInfo {
    pub name: String,
    pub description: String,
    /// `command` or `mcp`.
    pub kind: &'static str,
    pub dangerous: bool,
    pub timeout_s: f64,
    pub source: PathBuf,
    pub parameters: Value,
}

/// A plugin that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{}: {message}", path.display())]
    Load { path: PathBuf, message: String },
}

/// The loaded tools.
#[derive(Debug, Default)]
pub struct Plugins {
    tools: Vec<Tool>,
    runtime: Option<Arc<mcp::Runtime>>,
}

/// What loading found: the tools, and every plugin that could not be loaded.
#[derive(Debug, Default)]
pub struct Loaded {
    pub plugins: Plugins,
    pub errors: Vec<PluginError>,
}

impl Plugins {
    /// No tools.
    pub fn none() -> Self {
        Self::default()
    }

    /// Loads every `*.toml` manifest of each folder (not recursing; sorted by name) and each
    /// manifest file given directly. MCP servers are started (or reached) and their tools
    /// listed now.
    pub fn load(paths: &[PathBuf]) -> Loaded {
        let mut loaded = Loaded::default();
        for path in paths {
            if path.is_dir() {
                let entries = match std::fs::read_dir(path) {
                    Ok(entries) => entries,
                    Err(e) => {
                        loaded.errors.push(PluginError::Load {
                            path: path.clone(),
                            message: format!("cannot read the folder: {e}"),
                        });
                        continue;
                    }
                };
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                    .collect();
                files.sort();
                for file in files {
                    loaded.add(&file);
                }
            } else if path.is_file() {
                loaded.add(path);
            } else {
                loaded.errors.push(PluginError::Load {
                    path: path.clone(),
                    message: "no such plugin folder or manifest file".into(),
                });
            }
        }
        loaded
    }

    /// The tools as the model sees them, in load order.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.iter().map(|t| t.spec.clone()).collect()
    }

    /// The tool names, in load order.
    pub fn names(&self) -> Vec<String> {
        self.tools.iter().map(|t| t.spec.name.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// What each tool is, for listings.
    pub fn infos(&self) -> Vec<ToolInfo> {
        self.tools
            .iter()
            .map(|t| ToolInfo {
                name: t.spec.name.clone(),
                description: t.spec.description.clone(),
                kind: match t.runner {
                    Runner::Command(_) => "command",
                    Runner::Mcp { .. } => "mcp",
                },
                dangerous: t.dangerous,
                timeout_s: t.timeout.as_secs_f64(),
                source: t.source.clone(),
                parameters: t.spec.parameters.clone(),
            })
            .collect()
    }

    fn get(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.spec.name == name)
    }

    /// Why `action` needs the user's confirmation, when it calls a tool marked dangerous.
    pub fn confirmation(&self, action: &Action) -> Option<String> {
        match action {
            Action::Tool { name, .. } => self
                .get(name)
                .filter(|t| t.dangerous)
                .map(|t| format!("the tool {} is marked dangerous", t.spec.name)),
            _ => None,
        }
    }

    /// Calls tool `name` with `args`. Never panics and never fails as a whole.
    pub fn call(&self, name: &str, args: &Value) -> ToolResult {
        let Some(tool) = self.get(name) else {
            let known = self.names();
            return ToolResult::Failed {
                reason: if known.is_empty() {
                    format!("there is no tool named {name}; no tools are loaded")
                } else {
                    format!(
                        "there is no tool named {name}; the tools are {}",
                        known.join(", ")
                    )
                },
            };
        };
        if let Err(e) = schema::validate(&tool.spec.parameters, args) {
            return ToolResult::Failed {
                reason: format!("{e} (the parameters are {})", tool.spec.parameters),
            };
        }
        let outcome = match &tool.runner {
            Runner::Command(spec) => {
                let input = serde_json::to_vec(args).unwrap_or_else(|_| b"{}".to_vec());
                subprocess::call(spec, &input)
                    .map(|v| match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .map_err(|e| e.to_string())
            }
            Runner::Mcp { server, remote } => server.call(remote, args, tool.timeout),
        };
        match outcome {
            Ok(text) => ToolResult::Ok {
                text: crate::protocol::truncate_chars(&text, MAX_RESULT_CHARS),
            },
            Err(reason) => ToolResult::Failed {
                reason: crate::protocol::truncate_chars(&reason, MAX_RESULT_CHARS),
            },
        }
    }
}

impl Loaded {
    /// Loads one manifest; its tools, or its error.
    fn add(&mut self, path: &Path) {
        let manifest = match Manifest::load(path) {
            Ok(m) => m,
            Err(e) => {
                self.errors.push(e.into());
                return;
            }
        };
        let tools = match manifest.kind.clone() {
            manifest::Kind::Command { spec, parameters } => vec![Tool {
                spec: ToolSpec {
                    name: manifest.name.clone(),
                    description: manifest.description.clone(),
                    parameters,
                },
                dangerous: manifest.dangerous,
                source: path.to_path_buf(),
                timeout: manifest.timeout,
                runner: Runner::Command(spec),
            }],
            manifest::Kind::Mcp(spec) => match self.import(&manifest, spec) {
                Ok(tools) => tools,
                Err(message) => {
                    self.errors.push(PluginError::Load {
                        path: path.to_path_buf(),
                        message,
                    });
                    return;
                }
            },
        };
        for tool in tools {
            if let Some(other) = self.plugins.get(&tool.spec.name) {
                self.errors.push(PluginError::Load {
                    path: path.to_path_buf(),
                    message: format!(
                        "the tool name {} is taken by {}; rename one (or give the MCP server a `prefix`)",
                        tool.spec.name,
                        other.source.display()
                    ),
                });
                continue;
            }
            self.plugins.tools.push(tool);
        }
    }

    /// Starts an MCP server and makes a tool of each of its tools.
    fn import(
        &mut self,
        manifest: &Manifest,
        spec: manifest::McpSpec,
    ) -> Result<Vec<Tool>, String> {
        let runtime = match &self.plugins.runtime {
            Some(rt) => rt.clone(),
            None => {
                let rt = Arc::new(mcp::Runtime::new()?);
                self.plugins.runtime = Some(rt.clone());
                rt
            }
        };
        let (server, remote) =
            mcp::McpServer::connect(&manifest.name, spec.transport.clone(), runtime)
                .map_err(|e| format!("MCP server {}: {e}", manifest.name))?;
        let server = Arc::new(server);
        if let Some(only) = &spec.only
            && let Some(missing) = only.iter().find(|n| !remote.iter().any(|t| &t.name == *n))
        {
            return Err(format!(
                "`mcp.tools`: the server {} has no tool {missing}; it has {}",
                server.name(),
                remote
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut tools = Vec::new();
        for t in remote {
            if spec.only.as_ref().is_some_and(|o| !o.contains(&t.name)) {
                continue;
            }
            let name = format!("{}{}", spec.prefix, t.name);
            if let Err(e) = manifest::check_name(&name) {
                self.errors.push(PluginError::Load {
                    path: manifest.path.clone(),
                    message: format!(
                        "MCP tool {} of {} is not imported: {e} (a `prefix` in [mcp] can make the names usable)",
                        t.name, manifest.name
                    ),
                });
                continue;
            }
            let description = if t.description.is_empty() {
                manifest.description.clone()
            } else {
                t.description.clone()
            };
            tools.push(Tool {
                spec: ToolSpec {
                    name,
                    description,
                    parameters: t.schema,
                },
                dangerous: manifest.dangerous || spec.dangerous_tools.contains(&t.name),
                source: manifest.path.clone(),
                timeout: manifest.timeout,
                runner: Runner::Mcp {
                    server: server.clone(),
                    remote: t.name,
                },
            });
        }
        Ok(tools)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    #[test]
    fn a_folder_loads_with_its_errors_and_calls_go_through() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        write(
            dir.path(),
            "a_echo.toml",
            r#"
name = "echo_args"
description = "Echoes its arguments."
command = ["sh", "-c", "cat | sed 's/^/{\"ok\": true, \"result\": /; s/$/}/'"]
[parameters]
type = "object"
required = ["n"]
properties.n = { type = "integer" }
"#,
        )?;
        write(dir.path(), "b_broken.toml", "name = \"x\"\ncommand = 3\n")?;
        write(
            dir.path(),
            "c_dup.toml",
            "name = \"echo_args\"\ncommand = [\"sh\"]\n",
        )?;
        write(dir.path(), "notes.txt", "not a manifest")?;
        let loaded = Plugins::load(&[dir.path().to_path_buf()]);
        assert_eq!(loaded.plugins.names(), vec!["echo_args".to_string()]);
        assert_eq!(loaded.errors.len(), 2, "{:?}", loaded.errors);
        assert!(loaded.errors[0].to_string().contains("b_broken.toml"));
        assert!(loaded.errors[1].to_string().contains("is taken by"));

        let plugins = loaded.plugins;
        assert_eq!(
            plugins.call("echo_args", &serde_json::json!({"n": 7})),
            ToolResult::Ok {
                text: "{\"n\":7}".into()
            }
        );
        let mismatch = plugins.call("echo_args", &serde_json::json!({"n": "seven"}));
        assert!(
            matches!(&mismatch, ToolResult::Failed { reason } if reason.contains("argument `n` must be of type integer")),
            "{mismatch:?}"
        );
        let unknown = plugins.call("nope", &serde_json::json!({}));
        assert!(
            matches!(&unknown, ToolResult::Failed { reason } if reason.contains("no tool named nope; the tools are echo_args")),
            "{unknown:?}"
        );
        let missing = Plugins::load(&[dir.path().join("absent")]);
        assert!(
            missing.errors[0]
                .to_string()
                .contains("no such plugin folder")
        );
        Ok(())
    }
}
