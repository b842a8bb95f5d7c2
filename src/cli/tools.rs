//! `vlad tools list [PATH…]` shows the tool plugins a folder holds (and every manifest that
//! does not load, with the file and the field); `vlad tools call NAME ARGS` runs one tool as the
//! agent would, for plugin authors. Also the loader `vlad run --tools` uses.

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};

use vlad::tools::{Plugins, ToolResult};

#[derive(Debug, Args)]
pub struct ToolsArgs {
    #[command(subcommand)]
    command: ToolsCommand,
}

#[derive(Debug, Subcommand)]
enum ToolsCommand {
    /// List the tools of plugin folders or manifests, and the manifests that do not load
    /// (exit 1 when any does not).
    List {
        /// Plugin folders or manifest files [default: ./tools].
        paths: Vec<PathBuf>,
        /// One JSON object on stdout: {"tools": [...], "errors": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Call one tool with JSON arguments, as the agent would; prints the result (exit 1 when
    /// the call failed).
    Call {
        /// The tool's name.
        name: String,
        /// The arguments as a JSON object; `-` reads them from stdin.
        #[arg(default_value = "{}")]
        args: String,
        /// Plugin folders or manifest files [default: ./tools].
        #[arg(long = "tools", value_name = "PATH")]
        tools: Vec<PathBuf>,
    },
}

fn or_default(paths: &[PathBuf]) -> Vec<PathBuf> {
    if paths.is_empty() {
        vec![PathBuf::from("tools")]
    } else {
        paths.to_vec()
    }
}

/// Loads the plugins of `paths`; any manifest that does not load is an error listing them all.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Plugins> {
    let loaded = Plugins::load(paths);
    if !loaded.errors.is_empty() {
        let list: Vec<String> = loaded.errors.iter().map(|e| format!("  {e}")).collect();
        bail!(
            "tool plugins that do not load (fix or remove them; `vlad tools list` shows them):\n{}",
            list.join("\n")
        );
    }
    Ok(loaded.plugins)
}

pub fn run(args: ToolsArgs) -> anyhow::Result<()> {
    match args.command {
        ToolsCommand::List { paths, json } => {
            let loaded = Plugins::load(&or_default(&paths));
            let infos = loaded.plugins.infos();
            let mut out = std::io::stdout().lock();
            if json {
                let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "tools": infos, "errors": errors })
                )?;
            } else {
                for t in &infos {
                    let danger = if t.dangerous { ", dangerous" } else { "" };
                    writeln!(
                        out,
                        "{} ({}, timeout {} s{danger}) from {}",
                        t.name,
                        t.kind,
                        t.timeout_s,
                        t.source.display()
                    )?;
                    if !t.description.is_empty() {
                        writeln!(out, "    {}", t.description)?;
                    }
                    writeln!(out, "    parameters: {}", t.parameters)?;
                }
                if infos.is_empty() {
                    writeln!(out, "no tools")?;
                }
                for e in &loaded.errors {
                    eprintln!("error: {e}");
                }
            }
            if !loaded.errors.is_empty() {
                bail!("{} plugin(s) do not load", loaded.errors.len());
            }
            Ok(())
        }
        ToolsCommand::Call { name, args, tools } => {
            let text = if args == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                args
            };
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "the arguments are not JSON ({e}); give an object like '{{\"text\": \"hi\"}}'"
                )
            })?;
            let plugins = load(&or_default(&tools))?;
            match plugins.call(&name, &value) {
                ToolResult::Ok { text } => {
                    writeln!(std::io::stdout().lock(), "{text}")?;
                    Ok(())
                }
                ToolResult::Failed { reason } => bail!("{name} failed: {reason}"),
            }
        }
    }
}
