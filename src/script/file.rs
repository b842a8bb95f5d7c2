//! The test file format (TOML): a `[target]` to launch, `[settings]`, and `[[test]]`s whose
//! `steps` are sentences in plain language or explicit action tables.
//!
//! ```toml
//! name = "Login"
//! [target]
//! command = ["python3", "login.py"]   # run in the file's folder, once per test
//! window = "Login"                    # wait for this window; screenshots show only it
//! [settings]
//! timeout = 10                        # seconds a step may keep trying
//! retries = 1
//! [[test]]
//! name = "greets the user"
//! steps = [
//!   'type "Ana" into the name field',
//!   'click the "Log in" button',
//!   'expect "Welcome, Ana" visible',
//!   { step = 'wait until "Saved" is visible', timeout = 20 },
//!   { action = "key", keys = ["ctrl", "s"] },
//! ]
//! ```
//!
//! Every sentence is checked when the file is read, so a typo fails before anything runs.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

use crate::action::{Action, ScrollDirection};

/// Why a test file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ScriptError {
    pub path: PathBuf,
    pub message: String,
}

/// What the tests run against.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Desktop {
        /// The program and its arguments, started in the file's folder before each test and
        /// stopped after it; none to test what is already on the screen.
        command: Option<Vec<String>>,
        /// A window title (exact, then substring) to wait for after launching.
        window: Option<String>,
        /// What screenshots show: the window (when one is named) or the whole monitor.
        capture: Capture,
        /// A monitor id or name for `capture = "screen"`; the primary one by default.
        monitor: Option<String>,
        /// Seconds to wait for the window.
        launch_timeout: f64,
        /// The folder the command runs in (the test file's).
        dir: PathBuf,
    },
    Android {
        /// The app to (re)start before each test.
        package: String,
        /// The device serial; the only connected device by default.
        device: Option<String>,
    },
}

/// What a desktop target's screenshots show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    Window,
    Screen,
}

/// How steps are run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Seconds a step may keep trying: `wait until` polls this long, failed attempts are
    /// retried while time remains.
    pub timeout: f64,
    /// Further attempts of a step that failed.
    pub retries: u32,
    /// Seconds between polls and attempts.
    pub poll_interval: f64,
    /// Seconds to let the screen settle after an action.
    pub settle: f64,
    /// Bits of the 1024-bit difference hash that may differ for a cached answer to count.
    /// 0 (the default): the screen must match pixel for pixel; without a model a step then
    /// polls until it does (a blinking caret comes back). Above 0 also accepts screens that
    /// differ in small details, but a coarse hash cannot tell a changed word apart.
    pub cache_tolerance: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            timeout: 10.0,
            retries: 0,
            poll_interval: 0.5,
            settle: 0.3,
            cache_tolerance: 0,
        }
    }
}

/// A verb that acts on a located thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Click,
    DoubleClick,
    RightClick,
    LongPress,
}

impl Verb {
    /// The action at a point.
    pub fn at(self, (x, y): (i32, i32)) -> Action {
        match self {
            Self::Click => Action::Click { x, y },
            Self::DoubleClick => Action::DoubleClick { x, y },
            Self::RightClick => Action::RightClick { x, y },
            Self::LongPress => Action::LongPress { x, y, ms: 800 },
        }
    }
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// Locate `target` (one grounding), then act on its centre.
    Act {
        verb: Verb,
        target: String,
    },
    /// Type `text`; into `target` first located and clicked, when given.
    Type {
        text: String,
        target: Option<String>,
    },
    /// A key or a combination.
    Press {
        keys: Vec<String>,
    },
    /// Scroll at `target` (located) or the middle of the screen.
    Scroll {
        direction: ScrollDirection,
        amount: u32,
        target: Option<String>,
    },
    Wait {
        seconds: f64,
    },
    /// Poll until `target` is (or is no longer) visible, up to the step's timeout.
    WaitUntil {
        target: String,
        visible: bool,
    },
    /// `target` is (or is not) visible now.
    Expect {
        target: String,
        visible: bool,
    },
    /// An explicit action, in screenshot pixels.
    Action(Action),
}

/// One step as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The sentence (or the action as JSON): the cache key and what reports show.
    pub text: String,
    pub kind: StepKind,
    pub timeout: Option<f64>,
    pub retries: Option<u32>,
}

/// One test: a name and its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct TestCase {
    pub name: String,
    pub steps: Vec<Step>,
}

/// A test file.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    pub path: PathBuf,
    /// The suite name: `name`, else the file name without its extension.
    pub name: String,
    pub target: Target,
    pub settings: Settings,
    pub tests: Vec<TestCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScript {
    name: Option<String>,
    target: RawTarget,
    #[serde(default)]
    settings: Settings,
    #[serde(default, rename = "test")]
    tests: Vec<RawTest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    command: Option<toml::Value>,
    window: Option<String>,
    capture: Option<Capture>,
    monitor: Option<String>,
    launch_timeout: Option<f64>,
    package: Option<String>,
    device: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: String,
    steps: Vec<toml::Value>,
}

/// The sentences a step may be, for error messages.
pub const STEP_FORMS: &str = "click X, double click X, right click X, long press X, \
type \"TEXT\" [into X], press KEYS (e.g. press ctrl+s), scroll up|down|left|right [N] [in X], \
wait N seconds, wait until X is visible|gone, expect X visible, expect no X (or expect X not \
visible); or a table: { step = \"…\", timeout = S, retries = N } or an explicit action such as \
{ action = \"click\", x = 10, y = 20 }";

impl Script {
    /// Reads and checks a test file.
    pub fn load(path: &Path) -> Result<Self, ScriptError> {
        let source = std::fs::read_to_string(path).map_err(|e| ScriptError {
            path: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&source, path)
    }

    /// Reads a test file's text; `path` names it in errors and anchors the command's folder.
    pub fn parse(source: &str, path: &Path) -> Result<Self, ScriptError> {
        let bad = |message: String| ScriptError {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawScript = toml::from_str(source).map_err(|e| bad(e.to_string()))?;
        let s = &raw.settings;
        let positive = |v: f64| v.is_finite() && v >= 0.0;
        if !(positive(s.timeout) && positive(s.poll_interval) && positive(s.settle)) {
            return Err(bad(
                "settings: timeout, poll_interval and settle must be seconds (0 or more)".into(),
            ));
        }
        if s.poll_interval == 0.0 {
            return Err(bad(
                "settings.poll_interval must be above 0 (e.g. 0.5)".into()
            ));
        }
        if s.cache_tolerance > 512 {
            return Err(bad(
                "settings.cache_tolerance is at most 512 of the 1024 hash bits (0 means exact)"
                    .into(),
            ));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let target = target(raw.target, dir).map_err(bad)?;
        if raw.tests.is_empty() {
            return Err(bad(
                "no tests: add at least one [[test]] with a name and steps".into(),
            ));
        }
        let mut tests = Vec::with_capacity(raw.tests.len());
        for t in raw.tests {
            let name = t.name.trim().to_string();
            if name.is_empty() {
                return Err(bad("a [[test]] has an empty name".into()));
            }
            if tests.iter().any(|o: &TestCase| o.name == name) {
                return Err(bad(format!(
                    "two tests are named {name:?}; names must differ"
                )));
            }
            if t.steps.is_empty() {
                return Err(bad(format!("test {name:?} has no steps")));
            }
            let steps = t
                .steps
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    step(v).map_err(|m| bad(format!("test {name:?}, step {}: {m}", i + 1)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            tests.push(TestCase { name, steps });
        }
        let name = raw
            .name
            .filter(|n| !n.trim().is_empty())
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tests".to_string());
        Ok(Script {
            path: path.to_path_buf(),
            name,
            target,
            settings: raw.settings,
            tests,
        })
    }
}

fn target(raw: RawTarget, dir: PathBuf) -> Result<Target, String> {
    if let Some(package) = raw.package {
        if raw.command.is_some() || raw.window.is_some() || raw.capture.is_some() {
            return Err(
                "target: an Android target (package) takes only `device`; command, window and \
                 capture are for desktop targets"
                    .into(),
            );
        }
        if package.trim().is_empty() {
            return Err("target.package is empty; name the app, e.g. com.example.notes".into());
        }
        return Ok(Target::Android {
            package,
            device: raw.device,
        });
    }
    if raw.device.is_some() {
        return Err(
            "target.device is for Android targets (with package); desktop targets use monitor"
                .into(),
        );
    }
    let command = match raw.command {
        None => None,
        Some(toml::Value::String(s)) => {
            if s.contains(['"', '\'']) {
                return Err(
                    "target.command: quotes in a command string are not interpreted; write the \
                     command as a list, e.g. command = [\"python3\", \"my app.py\"]"
                        .into(),
                );
            }
            Some(s.split_whitespace().map(String::from).collect::<Vec<_>>())
        }
        Some(toml::Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    other => Err(format!(
                        "target.command: every item must be a string, found {other}"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => {
            return Err(format!(
                "target.command must be a string or a list of strings, found {other}"
            ));
        }
    };
    if command.as_ref().is_some_and(|c| c.is_empty()) {
        return Err("target.command is empty".into());
    }
    let capture = raw.capture.unwrap_or(if raw.window.is_some() {
        Capture::Window
    } else {
        Capture::Screen
    });
    if capture == Capture::Window && raw.window.is_none() {
        return Err("target.capture = \"window\" needs target.window (its title)".into());
    }
    let launch_timeout = raw.launch_timeout.unwrap_or(20.0);
    if !(launch_timeout.is_finite() && launch_timeout > 0.0) {
        return Err("target.launch_timeout must be a positive number of seconds".into());
    }
    Ok(Target::Desktop {
        command,
        window: raw.window,
        capture,
        monitor: raw.monitor,
        launch_timeout,
        dir,
    })
}

fn step(value: toml::Value) -> Result<Step, String> {
    match value {
        toml::Value::String(text) => Ok(Step {
            kind: sentence(&text)?,
            text: text.trim().to_string(),
            timeout: None,
            retries: None,
        }),
        toml::Value::Table(table) => {
            if table.contains_key("action") {
                let json = serde_json::to_string(&table).map_err(|e| e.to_string())?;
                let action: Action = toml::Value::Table(table).try_into().map_err(|e| {
                    format!("not a valid action ({e}); see `vlad do` for the forms")
                })?;
                return Ok(Step {
                    text: json,
                    kind: StepKind::Action(action),
                    timeout: None,
                    retries: None,
                });
            }
            let mut text = None;
            let mut timeout = None;
            let mut retries = None;
            for (key, v) in table {
                match (key.as_str(), v) {
                    ("step", toml::Value::String(s)) => text = Some(s),
                    ("timeout", toml::Value::Integer(n)) if n >= 0 => timeout = Some(n as f64),
                    ("timeout", toml::Value::Float(f)) if f.is_finite() && f >= 0.0 => {
                        timeout = Some(f)
                    }
                    ("retries", toml::Value::Integer(n)) if (0..=1000).contains(&n) => {
                        retries = Some(n as u32)
                    }
                    (k @ ("step" | "timeout" | "retries"), v) => {
                        return Err(format!("`{k}` cannot be {v}"));
                    }
                    (k, _) => {
                        return Err(format!(
                            "unknown key `{k}`; a step table has step, timeout and retries, or \
                             is an action ({{ action = \"click\", x = 10, y = 20 }})"
                        ));
                    }
                }
            }
            let text = text.ok_or("a step table needs `step = \"…\"` or `action = \"…\"`")?;
            Ok(Step {
                kind: sentence(&text)?,
                text: text.trim().to_string(),
                timeout,
                retries,
            })
        }
        other => Err(format!("a step is a sentence or a table, found {other}")),
    }
}

fn re(pattern: &str) -> Regex {
    // The patterns are literals of this file, checked by its tests.
    Regex::new(pattern).unwrap_or_else(|e| panic!("bad built-in pattern {pattern}: {e}"))
}

/// A quoted text: `"…"` with `\"` and `\\` escapes.
const QUOTED: &str = r#""((?:[^"\\]|\\.)*)""#;

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses one sentence.
pub fn sentence(text: &str) -> Result<StepKind, String> {
    static ACT: LazyLock<Regex> = LazyLock::new(|| {
        re(
            r"(?is)^(click|tap|double[ -]?click|double[ -]?tap|right[ -]?click|long[ -]?press)\s+(?:on\s+)?(.+)$",
        )
    });
    static TYPE: LazyLock<Regex> = LazyLock::new(|| {
        re(&format!(
            r"(?is)^(?:type|enter)\s+{QUOTED}(?:\s+(?:into|in|on)\s+(.+))?$"
        ))
    });
    static PRESS: LazyLock<Regex> =
        LazyLock::new(|| re(r#"(?is)^(?:press|hit)\s+(?:the\s+)?"?([^"]+?)"?(?:\s+keys?)?$"#));
    static SCROLL: LazyLock<Regex> = LazyLock::new(|| {
        re(
            r"(?is)^scroll\s+(up|down|left|right)(?:\s+(\d+)(?:\s+times)?)?(?:\s+(?:in|on|over)\s+(.+))?$",
        )
    });
    static WAIT: LazyLock<Regex> =
        LazyLock::new(|| re(r"(?is)^wait\s+(?:for\s+)?(\d+(?:\.\d+)?)\s*(?:s|secs?|seconds?)$"));
    static WAIT_UNTIL: LazyLock<Regex> = LazyLock::new(|| {
        re(
            r"(?is)^wait\s+(?:until|for)\s+(.+?)\s+(is\s+visible|is\s+shown|appears|is\s+gone|is\s+not\s+visible|disappears)$",
        )
    });
    static EXPECT_NO: LazyLock<Regex> =
        LazyLock::new(|| re(r"(?is)^expect\s+no\s+(.+?)(?:\s+(?:is\s+)?(?:visible|shown))?$"));
    static EXPECT: LazyLock<Regex> = LazyLock::new(|| {
        re(r"(?is)^expect\s+(.+?)(?:\s+(?:is\s+|to\s+be\s+)?(not\s+)?(?:visible|shown))?$")
    });

    let text = text.trim().trim_end_matches('.').trim();
    let unknown = || format!("{text:?} is not a step I understand; write one of: {STEP_FORMS}");
    let nonempty = |s: &str| -> Result<String, String> {
        let s = s.trim();
        if s.is_empty() {
            Err(unknown())
        } else {
            Ok(s.to_string())
        }
    };
    let first = text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match first.as_str() {
        "type" | "enter" => {
            let c = TYPE.captures(text).ok_or_else(|| {
                format!(
                    "{text:?}: put the text in double quotes, e.g. type \"héllo\" into the search box"
                )
            })?;
            let typed = unescape(c.get(1).map_or("", |m| m.as_str()));
            if typed.is_empty() {
                return Err(format!("{text:?}: the text to type is empty"));
            }
            let target = c.get(2).map(|m| nonempty(m.as_str())).transpose()?;
            Ok(StepKind::Type {
                text: typed,
                target,
            })
        }
        "press" | "hit" => {
            let c = PRESS.captures(text).ok_or_else(unknown)?;
            let combo = c.get(1).map_or("", |m| m.as_str()).trim();
            let keys: Vec<String> = combo.split('+').map(|k| k.trim().to_lowercase()).collect();
            if keys
                .iter()
                .any(|k| k.is_empty() || k.contains(char::is_whitespace))
            {
                return Err(format!(
                    "{text:?}: write keys joined by +, e.g. press ctrl+s or press enter"
                ));
            }
            Ok(StepKind::Press { keys })
        }
        "scroll" => {
            let c = SCROLL.captures(text).ok_or_else(unknown)?;
            let direction = match c[1].to_ascii_lowercase().as_str() {
                "up" => ScrollDirection::Up,
                "down" => ScrollDirection::Down,
                "left" => ScrollDirection::Left,
                _ => ScrollDirection::Right,
            };
            let amount = match c.get(2) {
                Some(m) => m
                    .as_str()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| format!("{text:?}: scroll 1 to 100 notches"))?,
                None => 3,
            };
            let target = c.get(3).map(|m| nonempty(m.as_str())).transpose()?;
            Ok(StepKind::Scroll {
                direction,
                amount,
                target,
            })
        }
        "wait" => {
            if let Some(c) = WAIT.captures(text) {
                let seconds: f64 = c[1].parse().map_err(|_| unknown())?;
                return Ok(StepKind::Wait { seconds });
            }
            let c = WAIT_UNTIL.captures(text).ok_or_else(|| {
                format!("{text:?}: write wait N seconds, or wait until X is visible (or is gone)")
            })?;
            let visible = !matches!(
                c[2].to_ascii_lowercase()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .as_slice(),
                ["is", "gone"] | ["is", "not", "visible"] | ["disappears"]
            );
            Ok(StepKind::WaitUntil {
                target: nonempty(&c[1])?,
                visible,
            })
        }
        "expect" => {
            if let Some(c) = EXPECT_NO.captures(text) {
                return Ok(StepKind::Expect {
                    target: nonempty(&c[1])?,
                    visible: false,
                });
            }
            let c = EXPECT.captures(text).ok_or_else(unknown)?;
            Ok(StepKind::Expect {
                target: nonempty(&c[1])?,
                visible: c.get(2).is_none(),
            })
        }
        _ => {
            let c = ACT.captures(text).ok_or_else(unknown)?;
            let verb = c[1].to_ascii_lowercase().replace([' ', '-'], "");
            let verb = match verb.as_str() {
                "click" | "tap" => Verb::Click,
                "doubleclick" | "doubletap" => Verb::DoubleClick,
                "rightclick" => Verb::RightClick,
                _ => Verb::LongPress,
            };
            Ok(StepKind::Act {
                verb,
                target: nonempty(&c[2])?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> StepKind {
        match sentence(text) {
            Ok(k) => k,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn the_documented_sentences_parse() {
        assert_eq!(
            kind(r#"click the "Save" button"#),
            StepKind::Act {
                verb: Verb::Click,
                target: r#"the "Save" button"#.into()
            }
        );
        assert_eq!(
            kind("Double-click on the file icon."),
            StepKind::Act {
                verb: Verb::DoubleClick,
                target: "the file icon".into()
            }
        );
        assert_eq!(
            kind(r#"type "héllo \"x\"" into the "Search" box"#),
            StepKind::Type {
                text: "héllo \"x\"".into(),
                target: Some(r#"the "Search" box"#.into())
            }
        );
        assert_eq!(
            kind(r#"type "abc""#),
            StepKind::Type {
                text: "abc".into(),
                target: None
            }
        );
        assert_eq!(
            kind("press ctrl+S"),
            StepKind::Press {
                keys: vec!["ctrl".into(), "s".into()]
            }
        );
        assert_eq!(
            kind("press the enter key"),
            StepKind::Press {
                keys: vec!["enter".into()]
            }
        );
        assert_eq!(
            kind("scroll down 5 in the list"),
            StepKind::Scroll {
                direction: ScrollDirection::Down,
                amount: 5,
                target: Some("the list".into())
            }
        );
        assert_eq!(kind("wait 1.5 seconds"), StepKind::Wait { seconds: 1.5 });
        assert_eq!(
            kind(r#"wait until "Saved" is visible"#),
            StepKind::WaitUntil {
                target: r#""Saved""#.into(),
                visible: true
            }
        );
        assert_eq!(
            kind("wait until the spinner is gone"),
            StepKind::WaitUntil {
                target: "the spinner".into(),
                visible: false
            }
        );
        assert_eq!(
            kind(r#"expect "Welcome, Ana" visible"#),
            StepKind::Expect {
                target: r#""Welcome, Ana""#.into(),
                visible: true
            }
        );
        assert_eq!(
            kind(r#"expect no "Error" dialog"#),
            StepKind::Expect {
                target: r#""Error" dialog"#.into(),
                visible: false
            }
        );
        assert_eq!(
            kind(r#"expect "Error" is not visible"#),
            StepKind::Expect {
                target: r#""Error""#.into(),
                visible: false
            }
        );
    }

    #[test]
    fn unclear_sentences_are_errors_that_list_the_forms() {
        for bad in [
            "make it work",
            "type héllo into the box",
            "press",
            "wait a bit",
            "click   ",
            r#"type "" into x"#,
        ] {
            let e = sentence(bad);
            assert!(e.is_err(), "{bad} parsed: {e:?}");
        }
        assert!(sentence("fly away").is_err_and(|e| e.contains("expect no X")));
    }

    #[test]
    fn files_are_checked_whole() {
        let path = Path::new("dir/login.toml");
        let ok = Script::parse(
            r#"
[target]
command = ["python3", "app.py"]
window = "Login"
[settings]
retries = 2
[[test]]
name = "one"
steps = ['click "OK"', { step = 'wait until "Done" is visible', timeout = 3 }, { action = "key", keys = ["ctrl", "s"] }]
"#,
            path,
        );
        let s = match ok {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(s.name, "login");
        assert_eq!(s.settings.retries, 2);
        assert!(
            matches!(&s.target, Target::Desktop { capture: Capture::Window, dir, .. } if dir == Path::new("dir"))
        );
        assert_eq!(s.tests[0].steps[1].timeout, Some(3.0));
        assert!(matches!(
            &s.tests[0].steps[2].kind,
            StepKind::Action(Action::Key { keys }) if keys == &["ctrl", "s"]
        ));

        let bad = |src: &str| Script::parse(src, path).err().map(|e| e.to_string());
        let e = bad("[target]\n[[test]]\nname = \"t\"\nsteps = ['fly']\n");
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("login.toml") && e.contains("step 1")),
            "{e:?}"
        );
        let e = bad(
            "[target]\npackage = \"a\"\ncommand = \"x\"\n[[test]]\nname = \"t\"\nsteps = ['click x']\n",
        );
        assert!(e.is_some_and(|e| e.contains("Android")));
        let e = bad("[target]\n[[test]]\nname = \"t\"\nsteps = [{ action = \"fly\" }]\n");
        assert!(e.is_some_and(|e| e.contains("not a valid action")));
        let e =
            bad("[target]\ncommand = 'sh -c \"x\"'\n[[test]]\nname = \"t\"\nsteps = ['click x']\n");
        assert!(e.is_some_and(|e| e.contains("as a list")));
        assert!(bad("[target]\n").is_some_and(|e| e.contains("no tests")));
        assert!(
            bad("[target]\nbogus = 1\n[[test]]\nname = \"t\"\nsteps = ['click x']\n").is_some()
        );
    }
}
