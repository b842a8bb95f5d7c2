//! A small MCP server built with the official Rust SDK (rmcp), for trying vlad's MCP tool
//! plugins and for their tests. Tools: `add` (two numbers), `echo` (text back), `slow` (sleeps
//! before answering), `fail` (an error result) and `crash` (the server exits at once, as a
//! crashing server would).
//!
//! ```sh
//! cargo build --example mcp_tool_server
//! target/debug/examples/mcp_tool_server                   # MCP on stdin/stdout
//! target/debug/examples/mcp_tool_server --http 127.0.0.1:0  # streamable HTTP on /mcp; prints the URL
//! ```
//!
//! A plugin manifest that imports its tools (see tools/README.md):
//!
//! ```toml
//! name = "demo"
//! [mcp]
//! command = ["target/debug/examples/mcp_tool_server"]
//! ```

use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock};
use rmcp::schemars::JsonSchema;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use serde::Deserialize;

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
struct AddArgs {
    /// The first number.
    a: f64,
    /// The second number.
    b: f64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
struct EchoArgs {
    /// The text to send back.
    text: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
struct SlowArgs {
    /// How long to wait before answering, in seconds.
    seconds: f64,
}

#[derive(Debug, Clone)]
struct DemoServer {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl DemoServer {
    fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }

    #[tool(description = "Add two numbers.")]
    async fn add(&self, Parameters(args): Parameters<AddArgs>) -> String {
        format!("{}", args.a + args.b)
    }

    #[tool(description = "Send the text back unchanged.")]
    async fn echo(&self, Parameters(args): Parameters<EchoArgs>) -> String {
        args.text
    }

    #[tool(description = "Wait some seconds, then answer \"done\".")]
    async fn slow(&self, Parameters(args): Parameters<SlowArgs>) -> String {
        let seconds = if args.seconds.is_finite() {
            args.seconds.clamp(0.0, 3600.0)
        } else {
            0.0
        };
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        "done".to_string()
    }

    #[tool(description = "Answer with an error result.")]
    async fn fail(&self) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text("the demo tool failed on purpose")])
    }

    #[tool(description = "Exit the server at once, as a crash would.")]
    async fn crash(&self) -> String {
        eprintln!("mcp_tool_server: crashing on request");
        std::process::exit(3);
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for DemoServer {}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            let running = DemoServer::new().serve(rmcp::transport::stdio()).await?;
            running.waiting().await?;
        }
        [flag, addr] if flag == "--http" => {
            let service = StreamableHttpService::new(
                || Ok(DemoServer::new()),
                Arc::new(LocalSessionManager::default()),
                StreamableHttpServerConfig::default(),
            );
            let router = axum::Router::new().nest_service("/mcp", service);
            let listener = tokio::net::TcpListener::bind(addr.as_str()).await?;
            println!("http://{}/mcp", listener.local_addr()?);
            axum::serve(listener, router).await?;
        }
        _ => {
            eprintln!("usage: mcp_tool_server [--http ADDR]");
            std::process::exit(2);
        }
    }
    Ok(())
}
