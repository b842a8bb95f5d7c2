//! Tools imported from an MCP server, through rmcp's client: a server started as a child
//! process (stdio) or reached over streamable HTTP. Its tools are listed once at load; each
//! call runs on the plugin runtime with the manifest's timeout. A server that went away (it
//! crashed, the connection dropped) is started again on the next call.
//!
//! The agent loop is synchronous and may itself run inside a tokio runtime (the daemon), so
//! every async operation is spawned on a runtime owned by the plugin set and awaited through
//! a channel, never with `block_on`.

use std::future::Future;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock};
use rmcp::service::RunningService;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use super::manifest::McpTransport;

/// How long starting a server and listing its tools may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing a server gracefully may take; then it is killed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Characters of the server's stderr kept for error messages.
const STDERR_TAIL: usize = 1000;
/// How long a call that lost its server waits for the rest of the server's stderr.
const STDERR_DRAIN: Duration = Duration::from_secs(1);

type Client = RunningService<RoleClient, ()>;

/// The runtime MCP clients run on: one worker thread, shut down in the background when
/// dropped (dropping a runtime in async code would panic).
#[derive(Debug)]
pub struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    pub fn new() -> Result<Self, String> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vlad-mcp")
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
            .map_err(|e| format!("cannot start the MCP client runtime: {e}"))
    }

    /// Runs `future` on the runtime and waits for it, at most `limit`; `None` on timeout.
    fn wait<T, F>(&self, limit: Duration, future: F) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let rt = self.0.as_ref()?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            if let Ok(value) = tokio::time::timeout(limit, future).await {
                let _ = tx.send(value);
            }
        });
        rx.recv_timeout(limit + Duration::from_secs(1)).ok()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A tool as the server lists it.
#[derive(Debug, Clone)]
pub struct RemoteTool {
    pub name: String,
    pub description: String,
    pub schema: Value,
}

/// One server and its connection.
#[derive(Debug)]
pub struct McpServer {
    /// The manifest's name, for messages.
    name: String,
    transport: McpTransport,
    runtime: Arc<Runtime>,
    client: Arc<tokio::sync::Mutex<Option<Client>>>,
    stderr: Arc<StderrTail>,
    /// The process id of a stdio server, to kill it if it does not close in time.
    pid: Arc<Mutex<Option<u32>>>,
}

impl McpServer {
    /// Starts (or reaches) the server and lists its tools.
    pub fn connect(
        name: &str,
        transport: McpTransport,
        runtime: Arc<Runtime>,
    ) -> Result<(Self, Vec<RemoteTool>), String> {
        let server = Self {
            name: name.to_string(),
            transport,
            runtime,
            client: Arc::new(tokio::sync::Mutex::new(None)),
            stderr: Arc::new(StderrTail::default()),
            pid: Arc::new(Mutex::new(None)),
        };
        let (transport, stderr, slot, pid) = (
            server.transport.clone(),
            server.stderr.clone(),
            server.client.clone(),
            server.pid.clone(),
        );
        let listed = server.runtime.wait(CONNECT_TIMEOUT, async move {
            let client = start(transport, stderr, pid).await?;
            let tools = client
                .list_all_tools()
                .await
                .map_err(|e| format!("listing its tools failed: {e}"))?;
            *slot.lock().await = Some(client);
            Ok::<_, String>(tools)
        });
        let tools = match listed {
            Some(Ok(tools)) => tools,
            Some(Err(e)) => return Err(server.with_stderr(e)),
            None => {
                return Err(server.with_stderr(format!(
                    "the server did not start and list its tools within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let tools = tools
            .into_iter()
            .map(|t| RemoteTool {
                name: t.name.to_string(),
                description: t.description.map(|d| d.to_string()).unwrap_or_default(),
                schema: {
                    let mut schema = (*t.input_schema).clone();
                    // Noise for the model.
                    schema.remove("$schema");
                    Value::Object(schema)
                },
            })
            .collect();
        Ok((server, tools))
    }

    /// `message`, with the end of the server's stderr when it wrote any.
    fn with_stderr(&self, message: String) -> String {
        let tail = self.stderr.text();
        if tail.trim().is_empty() {
            message
        } else {
            format!("{message}; the server's error output ends: {}", tail.trim())
        }
    }

    /// Calls `tool` (its name on the server) with `args`; the result as text for the model.
    pub fn call(&self, tool: &str, args: &Value, timeout: Duration) -> Result<String, String> {
        let arguments = match args {
            Value::Object(map) => Some(map.clone()),
            Value::Null => None,
            other => {
                return Err(format!(
                    "the arguments must be a JSON object of named arguments, not {other}"
                ));
            }
        };
        let mut params = CallToolRequestParams::new(tool.to_string());
        params.arguments = arguments;
        let (slot, transport, stderr, pid) = (
            self.client.clone(),
            self.transport.clone(),
            self.stderr.clone(),
            self.pid.clone(),
        );
        let outcome = self.runtime.wait(timeout, async move {
            let mut guard = slot.lock().await;
            if guard.is_none() {
                *guard = Some(
                    start(transport, stderr.clone(), pid)
                        .await
                        .map_err(|e| format!("the server could not be started again: {e}"))?,
                );
            }
            let Some(client) = guard.as_ref() else {
                return Err("the server is not connected".to_string());
            };
            match client.call_tool(params).await {
                Ok(result) => Ok(result),
                Err(rmcp::ServiceError::McpError(e)) => {
                    Err(format!("the server refused the call: {}", e.message))
                }
                Err(e) => {
                    // The connection is gone: start afresh next time.
                    if let Some(client) = guard.take() {
                        drop(client);
                    }
                    // a crashing server's last words may still be in the pipe
                    stderr.wait_closed(STDERR_DRAIN).await;
                    Err(format!("the server went away during the call ({e})"))
                }
            }
        });
        match outcome {
            Some(Ok(result)) => result_text(&result),
            Some(Err(e)) => Err(self.with_stderr(e)),
            None => Err(format!(
                "the tool did not answer within {} s; the call was cancelled",
                timeout.as_secs_f64()
            )),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let slot = self.client.clone();
        let closed = self.runtime.wait(CLOSE_TIMEOUT, async move {
            if let Some(client) = slot.lock().await.take() {
                let _ = client.cancel().await;
            }
        });
        // Still closing (busy with a call): the process has not been reaped, so its id is
        // still its own.
        #[cfg(unix)]
        if closed.is_none()
            && let Some(pid) = self.pid.lock().ok().and_then(|p| *p)
            && let Ok(pid) = libc::pid_t::try_from(pid)
        {
            // SAFETY: kill(2) on the server's process id; it touches no memory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        #[cfg(not(unix))]
        let _ = closed;
    }
}

/// The end of a stdio server's stderr, kept for error messages, and whether the pipe is open.
#[derive(Debug, Default)]
struct StderrTail {
    text: Mutex<String>,
    open: AtomicBool,
}

impl StderrTail {
    /// A new process: forget the last one's output.
    fn open(&self) {
        if let Ok(mut s) = self.text.lock() {
            s.clear();
        }
        self.open.store(true, Ordering::Release);
    }

    fn push(&self, chunk: &str) {
        if let Ok(mut s) = self.text.lock() {
            s.push_str(chunk);
            let len = s.chars().count();
            if len > STDERR_TAIL {
                *s = s.chars().skip(len - STDERR_TAIL).collect();
            }
        }
    }

    fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    fn text(&self) -> String {
        self.text.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (at most `limit`) until the pipe is read to its end.
    async fn wait_closed(&self, limit: Duration) {
        let start = std::time::Instant::now();
        while self.open.load(Ordering::Acquire) && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Starts the transport and the MCP handshake.
async fn start(
    transport: McpTransport,
    stderr: Arc<StderrTail>,
    pid: Arc<Mutex<Option<u32>>>,
) -> Result<Client, String> {
    match transport {
        McpTransport::Stdio { argv, workdir, env } => {
            let Some((program, args)) = argv.split_first() else {
                return Err("the command is empty".into());
            };
            let mut command = tokio::process::Command::new(program);
            command.args(args).current_dir(workdir).envs(env);
            let (child, err) = TokioChildProcess::builder(command)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {program}: {e}"))?;
            if let Ok(mut p) = pid.lock() {
                *p = child.id();
            }
            if let Some(mut err) = err {
                stderr.open();
                tokio::spawn(async move {
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = err.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        stderr.push(&String::from_utf8_lossy(&chunk[..n]));
                    }
                    stderr.close();
                });
            }
            ().serve(child)
                .await
                .map_err(|e| format!("the MCP handshake failed: {e}"))
        }
        McpTransport::Http { url } => {
            // reqwest's rustls has no crypto provider of its own here; another part of vlad
            // may have installed it already.
            let _ = rustls::crypto::ring::default_provider().install_default();
            ().serve(StreamableHttpClientTransport::from_uri(url.clone()))
                .await
                .map_err(|e| format!("the MCP handshake with {url} failed: {e}"))
        }
    }
}

/// The text of a tool result: its text blocks, else its structured content; an error result
/// is an `Err` with that text.
fn result_text(result: &CallToolResult) -> Result<String, String> {
    let mut parts: Vec<String> = result
        .content
        .iter()
        .map(|block| match block {
            ContentBlock::Text(t) => t.text.clone(),
            ContentBlock::Image(i) => format!("(an image, {})", i.mime_type),
            ContentBlock::Audio(a) => format!("(audio, {})", a.mime_type),
            ContentBlock::Resource(_) => "(an embedded resource)".to_string(),
            ContentBlock::ResourceLink(r) => format!("(a resource: {})", r.uri),
            _ => "(content vlad cannot show)".to_string(),
        })
        .collect();
    if parts.is_empty()
        && let Some(structured) = &result.structured_content
    {
        parts.push(structured.to_string());
    }
    let text = parts.join("\n");
    if result.is_error == Some(true) {
        Err(if text.trim().is_empty() {
            "the tool reported an error without a message".to_string()
        } else {
            text
        })
    } else {
        Ok(text)
    }
}
