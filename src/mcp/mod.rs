//! vlad as an MCP server: other agents (Claude Desktop, Cursor, any MCP client) see and drive
//! the desktop and Android devices through vlad's tools, over stdio (`vlad mcp`,
//! [`serve_stdio`]) or streamable HTTP (`/mcp` on the daemon, [`http_service`]).
//!
//! Entry type: [`McpServer`] (the tools, in [`server`]); devices are named and kept in
//! [`devices`]; models come from a [`ModelSource`].

pub mod args;
pub mod devices;
pub mod models;
pub mod server;

use std::sync::Arc;

use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::environment::claims::DeviceClaims;

pub use models::{LazyModel, ModelSource, NoModel};
pub use server::McpServer;

/// Why the MCP server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("the MCP session could not start: {0}")]
    Start(String),
    #[error("the MCP server task failed: {0}")]
    Join(String),
}

/// Serves `server` on stdin/stdout until the client closes the connection. Nothing else may
/// write to stdout meanwhile (logs go to stderr).
pub async fn serve_stdio(server: McpServer) -> Result<(), McpError> {
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Start(e.to_string()))?;
    running
        .waiting()
        .await
        .map_err(|e| McpError::Join(e.to_string()))?;
    Ok(())
}

/// The MCP endpoint over streamable HTTP, as a tower service to mount on an axum router
/// (`Router::nest_service("/mcp", …)`); one [`McpServer`] is shared by all sessions.
///
/// `check_host`: accept only loopback `Host` headers (DNS-rebinding protection). Turn it off
/// only when something else keeps browsers out, such as a bearer token.
pub fn http_service(
    models: Arc<dyn ModelSource>,
    check_host: bool,
    claims: DeviceClaims,
) -> StreamableHttpService<McpServer, LocalSessionManager> {
    let server = McpServer::with_claims(models, claims);
    let mut config = StreamableHttpServerConfig::default();
    if !check_host {
        config = config.disable_allowed_hosts();
    }
    StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}
