//! `vlad mcp`: an MCP server on stdin/stdout (the tools are [`vlad::mcp`]). Stdout carries the
//! protocol only; logs and progress go to stderr.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use vlad::mcp::{self, LazyModel, McpServer, ModelSource, NoModel};

use super::run::{ModelArgs, open_model};

#[derive(Debug, Args)]
pub struct McpArgs {
    /// The model for the ground and run_task tools, opened on first use.
    #[command(flatten)]
    model: ModelArgs,
    /// Serve without a model: ground and run_task answer with an error (the screen tools work).
    #[arg(long, conflicts_with_all = ["model", "replies", "base_url"])]
    no_model: bool,
}

pub fn run(args: McpArgs) -> anyhow::Result<()> {
    let models: Arc<dyn ModelSource> = if args.no_model {
        Arc::new(NoModel::new(
            "vlad mcp was started with --no-model; restart it without that flag (and with --model, --backend openai or --backend replay to choose one)",
        ))
    } else {
        let model = args.model;
        Arc::new(LazyModel::new(move || {
            open_model(&model, None).map_err(|e| format!("{e:#}"))
        }))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(mcp::serve_stdio(McpServer::new(models)))?;
    Ok(())
}
