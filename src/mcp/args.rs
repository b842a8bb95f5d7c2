//! The arguments of the MCP tools: what clients send, with the JSON schemas clients see
//! (descriptions included) derived from the same types. Unknown fields are refused so a typo
//! is an error, not a silent default.

use rmcp::schemars::JsonSchema;
use serde::Deserialize;

use crate::action::ScrollDirection;

/// The `device` argument every screen tool takes.
pub const DEVICE_DOC: &str = "\"desktop\" (default: the primary monitor), \"desktop:MONITOR\", \"desktop:window:TITLE\", or an Android serial (see the devices tool)";

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ScreenshotArgs {
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
}

/// A mouse button.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars", inline)]
#[serde(rename_all = "lowercase")]
pub enum Button {
    #[default]
    Left,
    Right,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ClickArgs {
    /// x in pixels of the device's last screenshot, from its left edge.
    pub x: i32,
    /// y in pixels of the device's last screenshot, from its top edge.
    pub y: i32,
    /// Which button (default left; a tap on Android).
    #[serde(default)]
    pub button: Button,
    /// A double click (left button only).
    #[serde(default)]
    pub double: bool,
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct TypeTextArgs {
    /// The text to type (any Unicode; a newline presses Enter).
    pub text: String,
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct KeyArgs {
    /// A key or a combination pressed at once, joined by "+": "enter", "ctrl+s", "ctrl+shift+t"; on Android also "home", "back".
    pub keys: String,
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
}

fn default_amount() -> u32 {
    3
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ScrollArgs {
    /// x of the pointer while scrolling, in screenshot pixels.
    pub x: i32,
    /// y of the pointer while scrolling, in screenshot pixels.
    pub y: i32,
    /// Where the view moves: "down" shows what is below.
    #[schemars(with = "DirectionSchema")]
    pub direction: ScrollDirection,
    /// Wheel notches, 1 to 50 (default 3).
    #[serde(default = "default_amount")]
    pub amount: u32,
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
}

/// The schema of [`ScrollDirection`] (which lives in the action types, without a schema).
#[derive(JsonSchema)]
#[schemars(crate = "rmcp::schemars", rename_all = "lowercase", inline)]
#[allow(dead_code)]
enum DirectionSchema {
    Up,
    Down,
    Left,
    Right,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct DragArgs {
    /// Start x, in screenshot pixels.
    pub x: i32,
    /// Start y, in screenshot pixels.
    pub y: i32,
    /// End x, in screenshot pixels.
    pub to_x: i32,
    /// End y, in screenshot pixels.
    pub to_y: i32,
    /// How long the move takes, in milliseconds (default 400, at most 10000).
    #[serde(default)]
    pub ms: Option<u64>,
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct GroundArgs {
    /// What to find, in plain words: "the Save button", "the search field".
    pub description: String,
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct RunTaskArgs {
    /// The task, in plain language.
    pub task: String,
    /// "desktop" (default: the primary monitor), "desktop:MONITOR", "desktop:window:TITLE", or an Android serial (see the devices tool).
    #[serde(default)]
    pub device: Option<String>,
    /// The agent profile: "desktop", "android", "virtual" (an in-memory test screen) or a profile TOML file (default: "desktop", or "android" for a serial).
    #[serde(default)]
    pub agent: Option<String>,
    /// At most this many model calls (default: the profile's).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// At most this many seconds (default: the profile's).
    #[serde(default)]
    pub max_seconds: Option<f64>,
    /// Do everything but act.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}
