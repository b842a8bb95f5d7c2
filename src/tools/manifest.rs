//! Plugin manifests: one TOML file per plugin. A subprocess plugin names its command (argv,
//! relative to the manifest's folder), the JSON schema of its arguments, a timeout and whether
//! it is dangerous; an MCP plugin names a server (`[mcp]` with `command` or `url`) whose tools
//! are imported. Every error names the file and the field, and says what to write instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::schema;
use super::subprocess::CommandSpec;
use crate::protocol::Function;

/// A call that takes longer is stopped, unless the manifest says otherwise.
pub const DEFAULT_TIMEOUT_S: f64 = 30.0;
/// The longest `timeout_s` accepted (an hour).
const MAX_TIMEOUT_S: f64 = 3600.0;
/// Bytes of stdout read at most, unless the manifest says otherwise.
pub const DEFAULT_MAX_OUTPUT: usize = 256 * 1024;
const MAX_MAX_OUTPUT: usize = 64 * 1024 * 1024;
/// The longest tool name accepted.
const MAX_NAME: usize = 64;

/// A manifest that cannot be used: the file, the field (when one is to blame) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{message}", path.display(), field.as_ref().map_or(String::new(), |f| format!("`{f}`: ")))]
pub struct ManifestError {
    pub path: PathBuf,
    pub field: Option<String>,
    pub message: String,
}

/// One loaded manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub path: PathBuf,
    /// The tool's name (subprocess) or the server's (MCP).
    pub name: String,
    pub description: String,
    pub timeout: Duration,
    pub dangerous: bool,
    pub kind: Kind,
}

/// What a manifest runs.
#[derive(Debug, Clone)]
pub enum Kind {
    Command {
        spec: CommandSpec,
        /// The JSON schema of the arguments.
        parameters: Value,
    },
    Mcp(McpSpec),
}

/// An MCP server whose tools are imported.
#[derive(Debug, Clone)]
pub struct McpSpec {
    pub transport: McpTransport,
    /// Put before each imported tool's name.
    pub prefix: String,
    /// Import only these tools (their names on the server); all when `None`.
    pub only: Option<Vec<String>>,
    /// Tools (names on the server) that need the user's confirmation.
    pub dangerous_tools: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum McpTransport {
    /// A server started as a child process, speaking MCP on its stdin/stdout.
    Stdio {
        argv: Vec<String>,
        workdir: PathBuf,
        env: Vec<(String, String)>,
    },
    /// A streamable-HTTP server.
    Http { url: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    parameters: Option<toml::Value>,
    #[serde(default)]
    timeout_s: Option<f64>,
    #[serde(default)]
    dangerous: bool,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    max_output_bytes: Option<usize>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    mcp: Option<RawMcp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcp {
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    tools: Option<Vec<String>>,
    #[serde(default)]
    dangerous_tools: Vec<String>,
}

/// Checks a tool name: letters, digits, `_` and `-`, starting with a letter, and not the name
/// of a built-in function (those always mean the built-in).
pub fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "`{name}` is not a usable tool name; use letters, digits, `_` and `-`, starting with a letter"
        ));
    }
    if name.len() > MAX_NAME {
        return Err(format!("`{name}` is longer than {MAX_NAME} characters"));
    }
    if let Some(f) = Function::lookup(name) {
        return Err(format!(
            "`{name}` is a name of the built-in function {}; choose another name",
            f.canonical()
        ));
    }
    Ok(())
}

/// Is `program` a file on PATH?
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(program);
            f.is_file()
        })
    })
}

impl Manifest {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let source = std::fs::read_to_string(path).map_err(|e| ManifestError {
            path: path.to_path_buf(),
            field: None,
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&source, path)
    }

    /// Reads a manifest; `path` is where it lives (commands and folders are relative to it).
    pub fn parse(source: &str, path: &Path) -> Result<Self, ManifestError> {
        let error = |field: Option<&str>, message: String| ManifestError {
            path: path.to_path_buf(),
            field: field.map(str::to_string),
            message,
        };
        let raw: Raw = toml::from_str(source).map_err(|e| {
            error(
                None,
                e.to_string()
                    .trim_end()
                    .replace('\n', " ")
                    .replace("  ", " "),
            )
        })?;
        let dir = std::path::absolute(path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| error(None, format!("cannot resolve its folder: {e}")))?;
        let dir_text = dir.to_string_lossy().into_owned();
        check_name(&raw.name).map_err(|m| error(Some("name"), m))?;
        let timeout_s = raw.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
        if !(timeout_s.is_finite() && timeout_s > 0.0 && timeout_s <= MAX_TIMEOUT_S) {
            return Err(error(
                Some("timeout_s"),
                format!(
                    "must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}, not {timeout_s}"
                ),
            ));
        }
        let max_output = raw.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT);
        if max_output == 0 || max_output > MAX_MAX_OUTPUT {
            return Err(error(
                Some("max_output_bytes"),
                format!("must be between 1 and {MAX_MAX_OUTPUT}"),
            ));
        }
        let workdir = match &raw.workdir {
            None => dir.clone(),
            Some(w) => {
                let w = dir.join(w.replace("{dir}", &dir_text));
                if !w.is_dir() {
                    return Err(error(
                        Some("workdir"),
                        format!("{} is not a folder", w.display()),
                    ));
                }
                w
            }
        };
        let mut env: Vec<(String, String)> = raw
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.replace("{dir}", &dir_text)))
            .collect();
        env.push(("VLAD_TOOL_DIR".into(), dir_text.clone()));
        let argv = |field: &str, command: &[String]| -> Result<Vec<String>, ManifestError> {
            let Some(program) = command.first().filter(|p| !p.trim().is_empty()) else {
                return Err(error(
                    Some(field),
                    "must list the program and its arguments, e.g. [\"python3\", \"{dir}/tool.py\"]"
                        .into(),
                ));
            };
            let program = program.replace("{dir}", &dir_text);
            let resolved = if program.contains('/') {
                let p = dir.join(&program);
                if !p.is_file() {
                    return Err(error(
                        Some(field),
                        format!("the program {} does not exist", p.display()),
                    ));
                }
                p.to_string_lossy().into_owned()
            } else {
                if !on_path(&program) {
                    return Err(error(
                        Some(field),
                        format!(
                            "the program `{program}` is not on PATH; install it or give its path"
                        ),
                    ));
                }
                program
            };
            let mut out = vec![resolved];
            out.extend(command[1..].iter().map(|a| a.replace("{dir}", &dir_text)));
            Ok(out)
        };
        let kind = match (&raw.command, raw.mcp) {
            (Some(_), Some(_)) => {
                return Err(error(
                    Some("mcp"),
                    "a manifest has either `command` (a subprocess tool) or an [mcp] table (a server), not both".into(),
                ));
            }
            (None, None) => {
                return Err(error(
                    Some("command"),
                    "missing: give `command = [\"program\", \"arg\"]`, or an [mcp] table with `command` or `url`".into(),
                ));
            }
            (Some(command), None) => {
                let parameters = match &raw.parameters {
                    None => serde_json::json!({"type": "object", "properties": {}}),
                    Some(p) => serde_json::to_value(p)
                        .map_err(|e| error(Some("parameters"), e.to_string()))?,
                };
                schema::check_schema(&parameters).map_err(|e| {
                    let field = if e.path.is_empty() {
                        "parameters".to_string()
                    } else {
                        format!("parameters.{}", e.path)
                    };
                    error(Some(&field), e.message)
                })?;
                env.push(("VLAD_TOOL_NAME".into(), raw.name.clone()));
                Kind::Command {
                    spec: CommandSpec {
                        argv: argv("command", command)?,
                        workdir,
                        env,
                        timeout: Duration::from_secs_f64(timeout_s),
                        max_output,
                    },
                    parameters,
                }
            }
            (None, Some(mcp)) => {
                if raw.parameters.is_some() {
                    return Err(error(
                        Some("parameters"),
                        "an MCP server describes its own tools; remove `parameters`".into(),
                    ));
                }
                let transport = match (&mcp.command, &mcp.url) {
                    (Some(command), None) => McpTransport::Stdio {
                        argv: argv("mcp.command", command)?,
                        workdir,
                        env,
                    },
                    (None, Some(url)) => {
                        if !(url.starts_with("http://") || url.starts_with("https://")) {
                            return Err(error(
                                Some("mcp.url"),
                                format!("`{url}` is not an http:// or https:// URL"),
                            ));
                        }
                        McpTransport::Http { url: url.clone() }
                    }
                    _ => {
                        return Err(error(
                            Some("mcp"),
                            "give exactly one of `command` (a server on stdio) or `url` (streamable HTTP)".into(),
                        ));
                    }
                };
                if !mcp.prefix.is_empty() {
                    check_name(&format!("{}x", mcp.prefix))
                        .map_err(|_| error(Some("mcp.prefix"), format!("`{}` cannot start a tool name; use letters, digits, `_` and `-`, starting with a letter", mcp.prefix)))?;
                }
                Kind::Mcp(McpSpec {
                    transport,
                    prefix: mcp.prefix,
                    only: mcp.tools,
                    dangerous_tools: mcp.dangerous_tools,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            name: raw.name,
            description: raw.description.unwrap_or_default().trim().to_string(),
            timeout: Duration::from_secs_f64(timeout_s),
            dangerous: raw.dangerous,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(source: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(source, Path::new("plugins/demo.toml"))
    }

    #[test]
    fn a_command_manifest_loads() -> Result<(), ManifestError> {
        let m = parse(
            r#"
name = "upper"
description = "Upper-cases text."
command = ["sh", "{dir}/upper.sh", "--flag"]
timeout_s = 2.5
dangerous = true
[parameters]
type = "object"
required = ["text"]
properties.text = { type = "string" }
"#,
        )?;
        assert_eq!(m.name, "upper");
        assert!(m.dangerous);
        assert_eq!(m.timeout, Duration::from_millis(2500));
        let Kind::Command { spec, parameters } = m.kind else {
            panic!("not a command")
        };
        assert_eq!(spec.argv[0], "sh");
        assert!(
            spec.argv[1].ends_with("plugins/upper.sh") && Path::new(&spec.argv[1]).is_absolute()
        );
        assert_eq!(spec.argv[2], "--flag");
        assert_eq!(parameters["required"][0], "text");
        assert!(spec.workdir.ends_with("plugins"));
        Ok(())
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "name = \"x\"\ncommand = [\"sh\"]\ncolour = 1",
                None,
                "colour",
            ),
            ("command = [\"sh\"]", None, "missing field `name`"),
            (
                "name = \"Click\"\ncommand = [\"sh\"]",
                Some("name"),
                "built-in",
            ),
            (
                "name = \"two words\"\ncommand = [\"sh\"]",
                Some("name"),
                "not a usable",
            ),
            ("name = \"x\"", Some("command"), "missing"),
            ("name = \"x\"\ncommand = []", Some("command"), "must list"),
            (
                "name = \"x\"\ncommand = [\"no-such-program-vlad\"]",
                Some("command"),
                "not on PATH",
            ),
            (
                "name = \"x\"\ncommand = [\"./missing.py\"]",
                Some("command"),
                "does not exist",
            ),
            (
                "name = \"x\"\ncommand = [\"sh\"]\ntimeout_s = 0",
                Some("timeout_s"),
                "above 0",
            ),
            (
                "name = \"x\"\ncommand = [\"sh\"]\nworkdir = \"nope\"",
                Some("workdir"),
                "not a folder",
            ),
            (
                "name = \"x\"\ncommand = [\"sh\"]\nparameters = { type = \"string\" }",
                Some("parameters.type"),
                "object",
            ),
            (
                "name = \"x\"\ncommand = [\"sh\"]\n[parameters.properties.a]\ntype = \"text\"",
                Some("parameters.properties.a.type"),
                "not a JSON type",
            ),
            (
                "name = \"x\"\ncommand = [\"sh\"]\n[mcp]\nurl = \"http://h\"",
                Some("mcp"),
                "not both",
            ),
            (
                "name = \"x\"\n[mcp]\nurl = \"ftp://h\"",
                Some("mcp.url"),
                "http",
            ),
            ("name = \"x\"\n[mcp]\n", Some("mcp"), "exactly one"),
            (
                "name = \"x\"\n[mcp]\nurl = \"http://h\"\nprefix = \"1\"",
                Some("mcp.prefix"),
                "cannot start",
            ),
        ];
        for (source, field, text) in cases {
            let e = parse(source);
            assert!(
                e.as_ref().is_err_and(|e| e.field.as_deref() == field
                    && e.to_string().contains(text)
                    && e.to_string().starts_with("plugins/demo.toml: ")),
                "{source}: {e:?}"
            );
        }
    }

    #[test]
    fn an_mcp_manifest_loads() -> Result<(), ManifestError> {
        let m = parse(
            "name = \"calc\"\n[mcp]\nurl = \"http://127.0.0.1:1/mcp\"\nprefix = \"calc_\"\ntools = [\"add\"]\n",
        )?;
        let Kind::Mcp(spec) = m.kind else {
            panic!("not mcp")
        };
        assert_eq!(spec.prefix, "calc_");
        assert_eq!(spec.only, Some(vec!["add".to_string()]));
        assert!(matches!(spec.transport, McpTransport::Http { .. }));
        Ok(())
    }
}
