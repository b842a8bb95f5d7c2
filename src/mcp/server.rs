//! The MCP tools: `devices`, `screenshot`, `click`, `type_text`, `key`, `scroll`, `drag`,
//! `ground` and `run_task`, on the desktop or an Android device.
//!
//! Every failure a caller can cause or meet (bad arguments, no display, an unknown serial, an
//! action that failed, no model) is a tool error (`isError: true`) whose text says what went
//! wrong and what to do; protocol errors are left to the SDK. Environment work blocks, so it
//! runs on tokio's blocking pool.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use image::{DynamicImage, ImageFormat, RgbImage};
use rmcp::handler::server::common::{schema_for_empty_input, schema_for_input};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, JsonObject, ProgressNotificationParam,
    ServerCapabilities, ServerConfig,
};
use rmcp::schemars::JsonSchema;
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::args::{
    Button, ClickArgs, DEVICE_DOC, DragArgs, GroundArgs, KeyArgs, NoArgs, RunTaskArgs,
    ScreenshotArgs, ScrollArgs, TypeTextArgs,
};
use super::devices::{self, DeviceSpec, Devices};
use super::models::ModelSource;
use crate::action::Action;
use crate::agent::{
    self, Agent, AgentError, Ending, Event, Hooks, Profile, RunOptions, Secrets, StopSignal,
};
use crate::environment::claims::DeviceClaims;
use crate::environment::{EnvironmentKind, Outcome};

/// Most wheel notches one scroll call may ask for.
const MAX_SCROLL: u32 = 50;

/// The input schema of a tool taking `T`, as the SDK derives it.
fn input_schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    schema_for_input::<T>().unwrap_or_else(|e| {
        tracing::error!("cannot derive a tool's input schema: {e}");
        schema_for_empty_input()
    })
}

/// A tool error: the text is what the caller reads.
fn failure(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text.into())])
}

/// A tool's arguments, or a tool error naming the tool and the problem.
fn parse<T: DeserializeOwned>(tool: &str, args: JsonObject) -> Result<T, CallToolResult> {
    serde_json::from_value(Value::Object(args)).map_err(|e| {
        failure(format!(
            "{tool}: invalid arguments: {e}; see the tool's input schema"
        ))
    })
}

/// Runs blocking work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("the worker thread failed: {e}"))?
}

/// Either way, a tool result.
fn result(r: Result<CallToolResult, CallToolResult>) -> Result<CallToolResult, ErrorData> {
    Ok(r.unwrap_or_else(|e| e))
}

struct Inner {
    devices: Devices,
    models: Arc<dyn ModelSource>,
}

/// The MCP server: its tools over a set of devices and a source of models. Cheap to clone;
/// clones share devices and model.
#[derive(Clone)]
pub struct McpServer {
    inner: Arc<Inner>,
    tool_router: ToolRouter<Self>,
}

impl McpServer {
    pub fn new(models: Arc<dyn ModelSource>) -> Self {
        Self::with_claims(models, DeviceClaims::new())
    }

    /// A server whose runs share `claims` with other users of the devices (the daemon's
    /// task queue), so one device never runs two tasks at once.
    pub fn with_claims(models: Arc<dyn ModelSource>, claims: DeviceClaims) -> Self {
        Self {
            inner: Arc::new(Inner {
                devices: Devices::new(claims),
                models,
            }),
            tool_router: Self::tool_router(),
        }
    }

    /// Performs `action` on `device`; `done` describes it for the reply.
    async fn act(&self, device: Option<&str>, action: Action, done: String) -> CallToolResult {
        let spec = match DeviceSpec::parse(device) {
            Ok(spec) => spec,
            Err(e) => return failure(e),
        };
        let inner = self.inner.clone();
        let key = spec.key();
        let tag = action.tag();
        let outcome = blocking(move || inner.devices.with(&spec, |env| env.perform(&action))).await;
        match outcome {
            Ok(Outcome::Done) => {
                CallToolResult::success(vec![ContentBlock::text(format!("{done} on {key}"))])
            }
            Ok(Outcome::Failed { reason }) => failure(format!("{tag} failed on {key}: {reason}")),
            Ok(Outcome::Refused { reason }) => {
                failure(format!("{tag} is not possible on {key}: {reason}"))
            }
            Err(e) => failure(e),
        }
    }
}

#[tool_router]
impl McpServer {
    #[tool(
        description = "List the screens the other tools can act on: the desktop's monitors and windows and the Android devices adb sees, each with the value to pass as `device`.",
        input_schema = input_schema::<NoArgs>()
    )]
    async fn devices(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        result(
            async {
                let NoArgs {} = parse("devices", args)?;
                let list = blocking(|| Ok(devices::list())).await.map_err(failure)?;
                Ok(CallToolResult::structured(list))
            }
            .await,
        )
    }

    #[tool(
        description = "Take a screenshot of a device. Returns the PNG image and its size; the click, scroll and drag tools take points in this image's pixels.",
        input_schema = input_schema::<ScreenshotArgs>()
    )]
    async fn screenshot(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        result(
            async {
                let args: ScreenshotArgs = parse("screenshot", args)?;
                let spec = DeviceSpec::parse(args.device.as_deref()).map_err(failure)?;
                let inner = self.inner.clone();
                let key = spec.key();
                let (png, width, height, scale) = blocking(move || {
                    let observation = inner.devices.with(&spec, |env| env.observe())?;
                    let (width, height) = (observation.width(), observation.height());
                    let scale = observation.scale_factor;
                    Ok((encode_png(observation.screenshot)?, width, height, scale))
                })
                .await
                .map_err(failure)?;
                let data = base64::engine::general_purpose::STANDARD.encode(png);
                let info =
                    json!({"device": key, "width": width, "height": height, "scale_factor": scale});
                Ok(CallToolResult::success(vec![
                    ContentBlock::image(data, "image/png"),
                    ContentBlock::text(info.to_string()),
                ]))
            }
            .await,
        )
    }

    #[tool(
        description = "Click (a tap on Android) at a point in pixels of the device's last screenshot.",
        input_schema = input_schema::<ClickArgs>()
    )]
    async fn click(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        let args: ClickArgs = match parse("click", args) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        let (x, y) = (args.x, args.y);
        let (action, what) = match (args.button, args.double) {
            (Button::Left, false) => (Action::Click { x, y }, "clicked"),
            (Button::Left, true) => (Action::DoubleClick { x, y }, "double-clicked"),
            (Button::Right, false) => (Action::RightClick { x, y }, "right-clicked"),
            (Button::Right, true) => {
                return Ok(failure(
                    "click: a double click works with the left button only; drop \"double\" or use button \"left\"",
                ));
            }
        };
        Ok(self
            .act(
                args.device.as_deref(),
                action,
                format!("{what} at ({x}, {y})"),
            )
            .await)
    }

    #[tool(
        description = "Type text into whatever has the keyboard focus on the device.",
        input_schema = input_schema::<TypeTextArgs>()
    )]
    async fn type_text(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        let args: TypeTextArgs = match parse("type_text", args) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        if args.text.is_empty() {
            return Ok(failure(
                "type_text: \"text\" is empty; give the text to type",
            ));
        }
        let chars = args.text.chars().count();
        let action = Action::Type { text: args.text };
        Ok(self
            .act(
                args.device.as_deref(),
                action,
                format!("typed {chars} characters"),
            )
            .await)
    }

    #[tool(
        description = "Press a key or a key combination, e.g. \"enter\", \"ctrl+s\", \"alt+f4\".",
        input_schema = input_schema::<KeyArgs>()
    )]
    async fn key(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        let args: KeyArgs = match parse("key", args) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        let keys: Vec<String> = args
            .keys
            .split('+')
            .map(|k| k.trim().to_lowercase())
            .collect();
        if keys.iter().any(String::is_empty) {
            return Ok(failure(format!(
                "key: {:?} is not a key combination; join key names with \"+\", e.g. \"ctrl+s\"",
                args.keys
            )));
        }
        let combo = keys.join("+");
        Ok(self
            .act(
                args.device.as_deref(),
                Action::Key { keys },
                format!("pressed {combo}"),
            )
            .await)
    }

    #[tool(
        description = "Scroll with the pointer at a point (screenshot pixels); \"down\" shows what is below.",
        input_schema = input_schema::<ScrollArgs>()
    )]
    async fn scroll(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        let args: ScrollArgs = match parse("scroll", args) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        if args.amount == 0 || args.amount > MAX_SCROLL {
            return Ok(failure(format!(
                "scroll: amount {} is out of range; give 1 to {MAX_SCROLL} notches",
                args.amount
            )));
        }
        let what = format!(
            "scrolled {} by {} at ({}, {})",
            args.direction.as_str(),
            args.amount,
            args.x,
            args.y
        );
        let action = Action::Scroll {
            x: args.x,
            y: args.y,
            direction: args.direction,
            amount: args.amount,
        };
        Ok(self.act(args.device.as_deref(), action, what).await)
    }

    #[tool(
        description = "Press at a point, move to another and release (a swipe on Android); points in screenshot pixels.",
        input_schema = input_schema::<DragArgs>()
    )]
    async fn drag(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        let args: DragArgs = match parse("drag", args) {
            Ok(a) => a,
            Err(e) => return Ok(e),
        };
        if args.ms.is_some_and(|ms| ms > 10_000) {
            return Ok(failure("drag: ms is above 10000; give at most 10 seconds"));
        }
        let what = format!(
            "dragged from ({}, {}) to ({}, {})",
            args.x, args.y, args.to_x, args.to_y
        );
        let action = Action::Drag {
            x: args.x,
            y: args.y,
            to_x: args.to_x,
            to_y: args.to_y,
            ms: args.ms,
        };
        Ok(self.act(args.device.as_deref(), action, what).await)
    }

    #[tool(
        description = "Find something on the device's screen by description, using the vision model: returns its box [x1, y1, x2, y2] and the point to click, in screenshot pixels (a fresh screenshot is taken first).",
        input_schema = input_schema::<GroundArgs>()
    )]
    async fn ground(&self, args: JsonObject) -> Result<CallToolResult, ErrorData> {
        result(async {
            let args: GroundArgs = parse("ground", args)?;
            if args.description.trim().is_empty() {
                return Err(failure(
                    "ground: \"description\" is empty; say what to find, e.g. \"the OK button\"",
                ));
            }
            let spec = DeviceSpec::parse(args.device.as_deref()).map_err(failure)?;
            let inner = self.inner.clone();
            let key = spec.key();
            let description = args.description;
            let found = blocking(move || {
                let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mut model = inner
                    .models
                    .acquire(cancel)
                    .map_err(|e| format!("ground needs a vision model: {e}"))?;
                let observation = inner.devices.with(&spec, |env| env.observe())?;
                let rgba = DynamicImage::ImageRgb8(observation.screenshot).to_rgba8();
                let g = crate::grounding::ground(model.as_mut(), &rgba, &description)
                    .map_err(|e| format!("ground: {e}"))?;
                Ok((g, rgba.width(), rgba.height()))
            })
            .await
            .map_err(failure)?;
            let (g, width, height) = found;
            Ok(CallToolResult::structured(json!({
                "device": key,
                "label": g.label,
                "bbox": g.bbox,
                "point": [g.point.0, g.point.1],
                "reply": g.reply,
                "width": width,
                "height": height,
            })))
        }
        .await)
    }

    #[tool(
        description = "Let vlad's agent do a task on a device: it looks at the screen, asks the vision model what to do, acts, and repeats until done. Reports each step as progress (when the request carries a progress token) and returns how the run ended, the answer and the trace folder. Cancelling the request stops the run after the current action.",
        input_schema = input_schema::<RunTaskArgs>()
    )]
    async fn run_task(
        &self,
        args: JsonObject,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        result(self.run_task_inner(args, context).await)
    }
}

impl McpServer {
    async fn run_task_inner(
        &self,
        args: JsonObject,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, CallToolResult> {
        let args: RunTaskArgs = parse("run_task", args)?;
        if args.task.trim().is_empty() {
            return Err(failure("run_task: \"task\" is empty; say what to do"));
        }
        if args.max_steps == Some(0) {
            return Err(failure("run_task: max_steps is 0; give at least 1"));
        }
        if args
            .max_seconds
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            return Err(failure(
                "run_task: max_seconds must be a positive number of seconds",
            ));
        }
        let spec = DeviceSpec::parse(args.device.as_deref()).map_err(failure)?;
        let profile_name = args.agent.clone().unwrap_or_else(|| match spec.kind() {
            EnvironmentKind::Android => "android".to_string(),
            _ => "desktop".to_string(),
        });
        let profile = Profile::load(&profile_name)
            .map_err(|e| failure(format!("run_task: agent {profile_name:?}: {e}")))?;
        if profile.environment != EnvironmentKind::Virtual && profile.environment != spec.kind() {
            return Err(failure(format!(
                "run_task: agent {profile_name:?} drives {:?} screens but device {} is {:?}; pick a matching agent or device",
                profile.environment,
                spec.key(),
                spec.kind()
            )));
        }
        let total = args.max_steps.unwrap_or(profile.limits.max_steps);
        let agent = Agent::new(profile).map_err(|e| failure(format!("run_task: {e}")))?;
        let stop = StopSignal::new();
        let flag = stop.flag();
        let options = RunOptions {
            dry_run: args.dry_run,
            max_steps: args.max_steps,
            max_seconds: args.max_seconds,
            trace_dir: None,
            secrets: Secrets::new(),
            stop,
            seed: 0,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let inner = self.inner.clone();
        let task = args.task;
        let cancel = flag.clone();
        let run = tokio::task::spawn_blocking(move || -> Result<agent::RunReport, String> {
            let mut hooks = ProgressHooks { tx };
            let mut model = inner
                .models
                .acquire(cancel)
                .map_err(|e| format!("run_task needs a vision model: {e}"))?;
            if agent.profile().environment == EnvironmentKind::Virtual {
                let mut env = agent::open_environment(agent.profile(), None)
                    .map_err(|e| format!("run_task: {e}"))?;
                return agent
                    .run(&task, model.as_mut(), env.as_mut(), &options, &mut hooks)
                    .map_err(|e| format!("run_task: {e}"));
            }
            let guard = inner.devices.claim(&spec)?;
            let report = inner.devices.with_claimed(&guard, &spec, |env| {
                match agent.run(&task, model.as_mut(), env, &options, &mut hooks) {
                    Err(AgentError::Environment(e)) => Err(e),
                    other => Ok(other),
                }
            })?;
            report.map_err(|e| format!("run_task: {e}"))
        });
        let token = context.meta.get_progress_token();
        let ct = context.ct.clone();
        // A cancelled request may drop this future instead of waking it: stop the run then too.
        let _stop_on_drop = StopOnDrop(flag.clone());
        // The hooks own the sender: the channel closes when the run's thread is done, after
        // its last event, so every step is reported before the result.
        let mut cancelled = false;
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some((step, message)) => {
                        if let Some(token) = &token {
                            let param = ProgressNotificationParam::new(token.clone(), step as f64)
                                .with_total(total as f64)
                                .with_message(message);
                            if let Err(e) = context.peer.notify_progress(param).await {
                                tracing::debug!("cannot send progress: {e}");
                            }
                        }
                    }
                    None => break,
                },
                () = ct.cancelled(), if !cancelled => {
                    cancelled = true;
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
        let joined = run.await;
        let report = joined
            .map_err(|e| failure(format!("run_task: the worker thread failed: {e}")))?
            .map_err(failure)?;
        let ending = report.status.ending();
        let value = json!({
            "status": report.status,
            "summary": report.status.describe(),
            "steps": report.steps,
            "elapsed_s": report.elapsed_s,
            "trace": report.trace_dir,
        });
        Ok(match ending {
            Ending::Finished | Ending::NeedsUser => CallToolResult::structured(value),
            Ending::GaveUp | Ending::Stopped | Ending::Error => {
                CallToolResult::structured_error(value)
            }
        })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("vlad", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "vlad sees and drives screens. Take a screenshot, then act with points in its pixels; `ground` finds things by description. `device`: {DEVICE_DOC}."
            ))
    }
}

/// Asks a run to stop when dropped (harmless once it has ended).
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Sends each recorded step of a run as progress: (step, one line about it).
struct ProgressHooks {
    tx: mpsc::UnboundedSender<(usize, String)>,
}

impl Hooks for ProgressHooks {
    fn event(&mut self, event: &Event<'_>) {
        let message = match event {
            Event::Started { meta, .. } => (
                0,
                format!(
                    "started on {} with {}",
                    meta.environment.identity, meta.model
                ),
            ),
            Event::Step { record } => {
                let actions: Vec<&str> = record.actions.iter().map(|a| a.action.tag()).collect();
                let mut line = format!("step {}", record.step);
                if !actions.is_empty() {
                    line.push_str(&format!(": {}", actions.join(", ")));
                }
                if let Some(error) = record.errors.last() {
                    line.push_str(&format!(" (error: {error})"));
                }
                (record.step, line)
            }
            _ => return,
        };
        // The receiver is gone only once the run is over.
        let _ = self.tx.send(message);
    }
}

/// PNG bytes of a screenshot.
fn encode_png(image: RgbImage) -> Result<Vec<u8>, String> {
    let mut png = Vec::new();
    DynamicImage::ImageRgb8(image)
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|e| format!("cannot encode the screenshot as PNG: {e}"))?;
    Ok(png)
}
