//! The functions the model may call, in one table: canonical names, every alias real models
//! use (paper, Qwen-Agent, Qwen2.5-VL computer/mobile use, UI-TARS, AndroidWorld-style), their
//! parameters with their own aliases and defaults, and the binding of written arguments to a
//! typed [`Action`] in model space.
//!
//! Names match case-insensitively and ignoring `_`, `-` and spaces: `DoubleClick`,
//! `double_click` and `left double` are one name.

use serde_json::{Map, Value};

use super::args::Args;
use super::grounding;
use crate::action::{Action, ScrollDirection};

/// A built-in function of the agent protocol; each becomes one kind of [`Action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    Click,
    DoubleClick,
    RightClick,
    LongPress,
    Drag,
    Swipe,
    Scroll,
    Type,
    Key,
    Wait,
    Home,
    Back,
    Enter,
    AppSwitch,
    OpenApp,
    Finish,
    CallUser,
}

/// The alias table: the first name of each row is the canonical one shown to models.
const TABLE: &[(Function, &[&str])] = &[
    (
        Function::Click,
        &[
            "Click",
            "Tap",
            "LeftClick",
            "LeftSingle",
            "SingleClick",
            "Touch",
            "TapOn",
            "ClickOn",
        ],
    ),
    (
        Function::DoubleClick,
        &["DoubleClick", "LeftDouble", "DoubleTap", "DblClick"],
    ),
    (
        Function::RightClick,
        &["RightClick", "RightSingle", "ContextClick"],
    ),
    (
        Function::LongPress,
        &[
            "LongPress",
            "LongTap",
            "LongClick",
            "PressAndHold",
            "TouchAndHold",
        ],
    ),
    (Function::Drag, &["Drag", "DragAndDrop", "DragTo"]),
    (Function::Swipe, &["Swipe", "Fling"]),
    (Function::Scroll, &["Scroll", "ScrollTo"]),
    (
        Function::Type,
        &[
            "Type",
            "TypeText",
            "Input",
            "InputText",
            "SetText",
            "EnterText",
            "Write",
        ],
    ),
    (
        Function::Key,
        &[
            "Key", "Hotkey", "KeyPress", "PressKey", "Keys", "KeyCombo", "Shortcut",
        ],
    ),
    (Function::Wait, &["Wait", "Sleep", "Pause"]),
    (
        Function::Home,
        &["Home", "PressHome", "GoHome", "NavigateHome"],
    ),
    (
        Function::Back,
        &["Back", "PressBack", "GoBack", "NavigateBack"],
    ),
    (
        Function::Enter,
        &["Enter", "PressEnter", "Return", "Submit"],
    ),
    (
        Function::AppSwitch,
        &[
            "AppSwitch",
            "Recent",
            "RecentApps",
            "Overview",
            "PressRecent",
            "SwitchApp",
        ],
    ),
    (
        Function::OpenApp,
        &[
            "OpenApp",
            "Open",
            "Launch",
            "LaunchApp",
            "StartApp",
            "Awake",
        ],
    ),
    (
        Function::Finish,
        &[
            "Finish",
            "Done",
            "Terminate",
            "Finished",
            "Stop",
            "Complete",
            "TaskComplete",
            "Answer",
        ],
    ),
    (
        Function::CallUser,
        &[
            "CallUser",
            "AskUser",
            "Ask",
            "CallHuman",
            "AskHuman",
            "RequestHelp",
        ],
    ),
];

/// Names models use for things vlad deliberately does not do, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "mouse_move",
        "vlad does not hover; click the target instead",
    ),
    ("hover", "vlad does not hover; click the target instead"),
    ("middle_click", "use Click or RightClick"),
    (
        "triple_click",
        "use DoubleClick, or Drag across the text to select it",
    ),
    (
        "left_click_drag",
        "it gives no start point; use Drag with start and end",
    ),
];

/// Keeps letters and digits, lower-cased: the form names are compared in.
pub(crate) fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

impl Function {
    /// Every built-in function, in table order.
    pub fn all() -> impl Iterator<Item = Function> {
        TABLE.iter().map(|(f, _)| *f)
    }

    /// The name shown to models (`Click`, `LongPress`, …).
    pub fn canonical(self) -> &'static str {
        self.aliases().first().copied().unwrap_or("")
    }

    /// All names of this function, canonical first.
    pub fn aliases(self) -> &'static [&'static str] {
        TABLE
            .iter()
            .find(|(f, _)| *f == self)
            .map_or(&[], |(_, names)| names)
    }

    /// The function a model-written name means, if any.
    pub fn lookup(name: &str) -> Option<Function> {
        let wanted = normalize(name);
        if wanted.is_empty() {
            return None;
        }
        TABLE
            .iter()
            .find(|(_, names)| names.iter().any(|n| normalize(n) == wanted))
            .map(|(f, _)| *f)
    }

    /// The parameters, in the order positional arguments bind to them.
    pub fn params(self) -> &'static [&'static Param] {
        match self {
            Self::Click | Self::DoubleClick | Self::RightClick => &[&POINT],
            Self::LongPress => &[&POINT, &PRESS_MS],
            Self::Drag | Self::Swipe => &[&START, &END, &MOVE_MS],
            Self::Scroll => &[&POINT, &DIRECTION, &AMOUNT],
            Self::Type => &[&TEXT],
            Self::Key => &[&KEYS],
            Self::Wait => &[&SECONDS],
            Self::Home | Self::Back | Self::Enter | Self::AppSwitch => &[],
            Self::OpenApp => &[&APP],
            Self::Finish => &[&ANSWER],
            Self::CallUser => &[&QUESTION],
        }
    }
}

impl Function {
    /// The function an action comes from; `None` for a tool call.
    pub fn of<C>(action: &Action<C>) -> Option<Function> {
        Some(match action {
            Action::Click { .. } => Self::Click,
            Action::DoubleClick { .. } => Self::DoubleClick,
            Action::RightClick { .. } => Self::RightClick,
            Action::LongPress { .. } => Self::LongPress,
            Action::Drag { .. } => Self::Drag,
            Action::Swipe { .. } => Self::Swipe,
            Action::Scroll { .. } => Self::Scroll,
            Action::Type { .. } => Self::Type,
            Action::Key { .. } => Self::Key,
            Action::Wait { .. } => Self::Wait,
            Action::Home => Self::Home,
            Action::Back => Self::Back,
            Action::Enter => Self::Enter,
            Action::AppSwitch => Self::AppSwitch,
            Action::OpenApp { .. } => Self::OpenApp,
            Action::Finish { .. } => Self::Finish,
            Action::CallUser { .. } => Self::CallUser,
            Action::Tool { .. } => return None,
        })
    }
}

/// The functions an agent profile shows its model, each under the name the profile uses
/// (`Tap` on Android, `Click` on the desktop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionSpace {
    entries: Vec<(Function, String)>,
}

impl ActionSpace {
    /// Click, DoubleClick, RightClick, Drag, Scroll, Type, Key, Wait, Finish, CallUser.
    pub fn desktop() -> Self {
        Self::builtin(&[
            "Click",
            "DoubleClick",
            "RightClick",
            "Drag",
            "Scroll",
            "Type",
            "Key",
            "Wait",
            "Finish",
            "CallUser",
        ])
    }

    /// Tap, LongPress, Swipe, Type, Home, Back, Enter, AppSwitch, OpenApp, Wait, Finish,
    /// CallUser.
    pub fn android() -> Self {
        Self::builtin(&[
            "Tap",
            "LongPress",
            "Swipe",
            "Type",
            "Home",
            "Back",
            "Enter",
            "AppSwitch",
            "OpenApp",
            "Wait",
            "Finish",
            "CallUser",
        ])
    }

    fn builtin(names: &[&str]) -> Self {
        let entries = names
            .iter()
            .filter_map(|n| Function::lookup(n).map(|f| (f, (*n).to_string())))
            .collect();
        Self { entries }
    }

    /// The functions a profile lists, by any of their names; each is shown as written.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, CallError> {
        let mut entries: Vec<(Function, String)> = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            let function = Function::lookup(name).ok_or_else(|| CallError::Unknown {
                name: name.to_string(),
            })?;
            if !entries.iter().any(|(f, _)| *f == function) {
                entries.push((function, name.to_string()));
            }
        }
        Ok(Self { entries })
    }

    /// The functions with their shown names, in the profile's order.
    pub fn functions(&self) -> impl Iterator<Item = (Function, &str)> {
        self.entries.iter().map(|(f, n)| (*f, n.as_str()))
    }

    pub fn contains(&self, function: Function) -> bool {
        self.entries.iter().any(|(f, _)| *f == function)
    }

    /// The name shown for `function`: the profile's, or the canonical one.
    pub fn name_of(&self, function: Function) -> &str {
        self.entries
            .iter()
            .find(|(f, _)| *f == function)
            .map_or(function.canonical(), |(_, n)| n.as_str())
    }
}

/// What a name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Builtin(Function),
    /// A tool of the agent profile, by its exact name.
    Tool(String),
}

/// Resolves a model-written function name: an exact tool name first (the profile chose it),
/// then the built-ins with their aliases, then tools compared like built-ins.
pub fn resolve(name: &str, tools: &[String]) -> Result<Resolved, CallError> {
    let trimmed = name.trim();
    if let Some(tool) = tools.iter().find(|t| t.as_str() == trimmed) {
        return Ok(Resolved::Tool(tool.clone()));
    }
    if let Some(f) = Function::lookup(trimmed) {
        return Ok(Resolved::Builtin(f));
    }
    let wanted = normalize(trimmed);
    if let Some(tool) = tools.iter().find(|t| normalize(t) == wanted) {
        return Ok(Resolved::Tool(tool.clone()));
    }
    if let Some((_, why)) = UNSUPPORTED.iter().find(|(n, _)| normalize(n) == wanted) {
        return Err(CallError::Unsupported {
            name: trimmed.to_string(),
            reason: why,
        });
    }
    Err(CallError::Unknown {
        name: trimmed.to_string(),
    })
}

/// The kind of value a parameter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `(x,y)`, `[x,y]`, `"x,y"`, a box (its centre), or `{"x":..,"y":..}`.
    Point,
    Text,
    /// `"ctrl+s"`, `"ctrl s"` or `["ctrl","s"]`.
    Keys,
    /// `up`, `down`, `left` or `right`.
    Direction,
    /// A whole number of at least 1.
    Count,
    Millis,
    Seconds,
}

/// One parameter of a function.
#[derive(Debug, PartialEq)]
pub struct Param {
    /// The name shown to models.
    pub name: &'static str,
    /// Other names models use for it.
    pub aliases: &'static [&'static str],
    pub kind: ParamKind,
    /// Whether the model must give it; the others have defaults (see the `DEFAULT_` constants)
    /// or, for the durations of Drag and Swipe, leave the choice to the executor.
    pub required: bool,
    /// Sibling keys that can spell the point instead: `{"x": 1, "y": 2}`.
    pub xy_keys: &'static [(&'static str, &'static str)],
}

const POINT: Param = Param {
    name: "point",
    aliases: &[
        "coordinate",
        "coordinates",
        "coord",
        "position",
        "pos",
        "location",
        "start_box",
        "box",
        "bbox",
        "target",
        "xy",
        "at",
        "center",
    ],
    kind: ParamKind::Point,
    required: true,
    xy_keys: &[("x", "y")],
};
const START: Param = Param {
    name: "start",
    aliases: &[
        "from",
        "start_point",
        "start_box",
        "start_coordinate",
        "source",
        "begin",
        "point",
        "coordinate",
    ],
    kind: ParamKind::Point,
    required: true,
    xy_keys: &[
        ("start_x", "start_y"),
        ("x1", "y1"),
        ("from_x", "from_y"),
        ("x", "y"),
    ],
};
const END: Param = Param {
    name: "end",
    aliases: &[
        "to",
        "end_point",
        "end_box",
        "end_coordinate",
        "coordinate2",
        "target",
        "destination",
        "dest",
    ],
    kind: ParamKind::Point,
    required: true,
    xy_keys: &[("end_x", "end_y"), ("x2", "y2"), ("to_x", "to_y")],
};
const DIRECTION: Param = Param {
    name: "direction",
    aliases: &["dir", "scroll_direction"],
    kind: ParamKind::Direction,
    required: true,
    xy_keys: &[],
};
const AMOUNT: Param = Param {
    name: "amount",
    aliases: &[
        "clicks",
        "steps",
        "times",
        "distance",
        "count",
        "scroll_amount",
        "delta",
    ],
    kind: ParamKind::Count,
    required: false,
    xy_keys: &[],
};
const PRESS_MS: Param = Param {
    name: "ms",
    aliases: &[
        "duration_ms",
        "duration",
        "time_ms",
        "milliseconds",
        "hold_ms",
    ],
    kind: ParamKind::Millis,
    required: false,
    xy_keys: &[],
};
const MOVE_MS: Param = Param {
    name: "ms",
    aliases: &["duration_ms", "duration", "time_ms", "milliseconds"],
    kind: ParamKind::Millis,
    required: false,
    xy_keys: &[],
};
const TEXT: Param = Param {
    name: "text",
    aliases: &["content", "value", "input", "string", "str"],
    kind: ParamKind::Text,
    required: true,
    xy_keys: &[],
};
const KEYS: Param = Param {
    name: "keys",
    aliases: &["key", "combo", "hotkey", "key_combo", "shortcut", "text"],
    kind: ParamKind::Keys,
    required: true,
    xy_keys: &[],
};
const SECONDS: Param = Param {
    name: "seconds",
    aliases: &["second", "secs", "time", "duration", "s"],
    kind: ParamKind::Seconds,
    required: false,
    xy_keys: &[],
};
const APP: Param = Param {
    name: "name",
    aliases: &[
        "app",
        "app_name",
        "package",
        "package_name",
        "application",
        "text",
    ],
    kind: ParamKind::Text,
    required: true,
    xy_keys: &[],
};
const ANSWER: Param = Param {
    name: "answer",
    aliases: &["content", "text", "result", "message", "response", "status"],
    kind: ParamKind::Text,
    required: false,
    xy_keys: &[],
};
const QUESTION: Param = Param {
    name: "question",
    aliases: &["content", "text", "message", "query", "prompt"],
    kind: ParamKind::Text,
    required: false,
    xy_keys: &[],
};

/// A long press without `ms` holds this long.
pub const DEFAULT_PRESS_MS: u64 = 1000;
/// A scroll without `amount` moves this many wheel notches.
pub const DEFAULT_SCROLL_AMOUNT: u32 = 3;
/// A wait without `seconds` lasts this long.
pub const DEFAULT_WAIT_SECONDS: f64 = 5.0;

/// Longest hold or move accepted, in milliseconds (a minute).
const MAX_MS: f64 = 60_000.0;
/// Longest wait accepted, in seconds (an hour).
const MAX_SECONDS: f64 = 3600.0;
/// Most wheel notches in one scroll.
const MAX_AMOUNT: f64 = 1000.0;

/// Why a call could not become an action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("`{name}` is not a known function")]
    Unknown { name: String },
    #[error("`{name}` is not supported: {reason}")]
    Unsupported { name: String, reason: &'static str },
    #[error("missing argument `{param}`")]
    Missing { param: &'static str },
    #[error("argument `{param}` {reason}, not `{found}`")]
    Invalid {
        param: &'static str,
        reason: &'static str,
        found: String,
    },
    #[error("the arguments must be an object like {{\"{param}\": ...}}")]
    Shape { param: &'static str },
}

/// Binds the written arguments of a built-in function to its parameters. Points stay in model
/// space. Unknown extra arguments are ignored.
pub fn bind(function: Function, args: &Args) -> Result<Action<f64>, CallError> {
    let b = Binder::new(function, args)?;
    Ok(match function {
        Function::Click => {
            let (x, y) = b.point(&POINT)?;
            Action::Click { x, y }
        }
        Function::DoubleClick => {
            let (x, y) = b.point(&POINT)?;
            Action::DoubleClick { x, y }
        }
        Function::RightClick => {
            let (x, y) = b.point(&POINT)?;
            Action::RightClick { x, y }
        }
        Function::LongPress => {
            let (x, y) = b.point(&POINT)?;
            let ms = b.millis(&PRESS_MS)?.unwrap_or(DEFAULT_PRESS_MS);
            Action::LongPress { x, y, ms }
        }
        Function::Drag | Function::Swipe => {
            let (x, y) = b.point(&START)?;
            let (to_x, to_y) = b.point(&END)?;
            let ms = b.millis(&MOVE_MS)?;
            if function == Function::Drag {
                Action::Drag {
                    x,
                    y,
                    to_x,
                    to_y,
                    ms,
                }
            } else {
                Action::Swipe {
                    x,
                    y,
                    to_x,
                    to_y,
                    ms,
                }
            }
        }
        Function::Scroll => {
            let (x, y) = b.point(&POINT)?;
            let direction = b.direction(&DIRECTION)?;
            let amount = b.count(&AMOUNT)?;
            Action::Scroll {
                x,
                y,
                direction,
                amount,
            }
        }
        Function::Type => Action::Type {
            text: b.text(&TEXT)?.unwrap_or_default(),
        },
        Function::Key => Action::Key {
            keys: b.keys(&KEYS)?,
        },
        Function::Wait => Action::Wait {
            seconds: b.seconds(&SECONDS)?,
        },
        Function::Home => Action::Home,
        Function::Back => Action::Back,
        Function::Enter => Action::Enter,
        Function::AppSwitch => Action::AppSwitch,
        Function::OpenApp => Action::OpenApp {
            name: b.text(&APP)?.unwrap_or_default(),
        },
        Function::Finish => Action::Finish {
            answer: b.text(&ANSWER)?.unwrap_or_default(),
        },
        Function::CallUser => Action::CallUser {
            question: b.text(&QUESTION)?.unwrap_or_default(),
        },
    })
}

/// Finds the value of each parameter among the written arguments.
struct Binder<'a> {
    named: Option<&'a Map<String, Value>>,
    /// Positional values by parameter name.
    positional: Vec<(&'static str, &'a Value)>,
}

impl<'a> Binder<'a> {
    fn new(function: Function, args: &'a Args) -> Result<Self, CallError> {
        let params = function.params();
        let mut positional = Vec::new();
        let named = match args {
            Args::None => None,
            Args::Named(map) => Some(map),
            Args::Positional(values) => {
                // `[(1,2),(3,4)]` for Drag/Swipe: one list of both points.
                let spread = match values.as_slice() {
                    [Value::Array(items)]
                        if items.len() == 2
                            && params.get(..2).is_some_and(|ps| {
                                ps.iter().all(|p| p.kind == ParamKind::Point)
                            })
                            && items.iter().all(|v| !v.is_number()) =>
                    {
                        Some(items.iter().collect::<Vec<_>>())
                    }
                    _ => None,
                };
                let values: Vec<&Value> = spread.unwrap_or_else(|| values.iter().collect());
                if values.len() > params.len() {
                    let param = params.first().map_or("…", |p| p.name);
                    return Err(CallError::Shape { param });
                }
                positional = params.iter().map(|p| p.name).zip(values).collect();
                None
            }
        };
        Ok(Self { named, positional })
    }

    /// The value written for `param`, under its name or an alias, or by position.
    fn find(&self, param: &Param) -> Option<&'a Value> {
        if let Some(map) = self.named {
            let names = std::iter::once(param.name).chain(param.aliases.iter().copied());
            for name in names {
                let wanted = normalize(name);
                if let Some((_, v)) = map.iter().find(|(k, _)| normalize(k) == wanted) {
                    return Some(v);
                }
            }
            return None;
        }
        self.positional
            .iter()
            .find(|(n, _)| *n == param.name)
            .map(|(_, v)| *v)
    }

    fn point(&self, param: &'static Param) -> Result<(f64, f64), CallError> {
        if let Some(value) = self.find(param) {
            return point_of(value).ok_or_else(|| CallError::Invalid {
                param: param.name,
                reason: "must be a point like (x,y) or [x,y]",
                found: short(value),
            });
        }
        if let Some(map) = self.named {
            for (kx, ky) in param.xy_keys {
                if let (Some(x), Some(y)) = (map.get(*kx), map.get(*ky)) {
                    return match (number_of(x), number_of(y)) {
                        (Some(x), Some(y)) => Ok((x, y)),
                        _ => Err(CallError::Invalid {
                            param: param.name,
                            reason: "must have numbers for x and y",
                            found: format!("{kx}: {}, {ky}: {}", short(x), short(y)),
                        }),
                    };
                }
            }
        }
        Err(CallError::Missing { param: param.name })
    }

    fn text(&self, param: &'static Param) -> Result<Option<String>, CallError> {
        match self.find(param) {
            None | Some(Value::Null) if !param.required => Ok(None),
            None => Err(CallError::Missing { param: param.name }),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
            Some(v) => Err(CallError::Invalid {
                param: param.name,
                reason: "must be text",
                found: short(v),
            }),
        }
    }

    fn keys(&self, param: &'static Param) -> Result<Vec<String>, CallError> {
        let invalid = |v: &Value| CallError::Invalid {
            param: param.name,
            reason: "must name keys, like \"ctrl+s\" or [\"ctrl\", \"s\"]",
            found: short(v),
        };
        let value = self
            .find(param)
            .ok_or(CallError::Missing { param: param.name })?;
        let keys = match value {
            Value::String(s) => split_keys(s),
            Value::Array(items) => {
                let mut keys = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => keys.extend(split_keys(s)),
                        Value::Number(n) => keys.push(n.to_string()),
                        _ => return Err(invalid(value)),
                    }
                }
                keys
            }
            Value::Number(n) => vec![n.to_string()],
            _ => return Err(invalid(value)),
        };
        if keys.is_empty() {
            return Err(invalid(value));
        }
        Ok(keys)
    }

    fn direction(&self, param: &'static Param) -> Result<ScrollDirection, CallError> {
        let value = self
            .find(param)
            .ok_or(CallError::Missing { param: param.name })?;
        let word = value.as_str().map(|s| s.trim().to_lowercase());
        match word.as_deref() {
            Some("up" | "upward" | "upwards") => Ok(ScrollDirection::Up),
            Some("down" | "downward" | "downwards") => Ok(ScrollDirection::Down),
            Some("left") => Ok(ScrollDirection::Left),
            Some("right") => Ok(ScrollDirection::Right),
            _ => Err(CallError::Invalid {
                param: param.name,
                reason: "must be up, down, left or right",
                found: short(value),
            }),
        }
    }

    /// A number in `0..=max`, or the parameter's default when it is not given.
    fn number(
        &self,
        param: &'static Param,
        max: f64,
        reason: &'static str,
    ) -> Result<Option<f64>, CallError> {
        let value = match self.find(param) {
            None | Some(Value::Null) if param.required => {
                return Err(CallError::Missing { param: param.name });
            }
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        match number_of(value) {
            Some(n) if (0.0..=max).contains(&n) => Ok(Some(n)),
            _ => Err(CallError::Invalid {
                param: param.name,
                reason,
                found: short(value),
            }),
        }
    }

    fn millis(&self, param: &'static Param) -> Result<Option<u64>, CallError> {
        let ms = self.number(param, MAX_MS, "must be milliseconds from 0 to 60000")?;
        // In 0..=60000, so the conversion is exact after rounding.
        Ok(ms.map(|ms| ms.round() as u64))
    }

    fn seconds(&self, param: &'static Param) -> Result<f64, CallError> {
        let seconds = self.number(param, MAX_SECONDS, "must be seconds from 0 to 3600")?;
        Ok(seconds.unwrap_or(DEFAULT_WAIT_SECONDS))
    }

    fn count(&self, param: &'static Param) -> Result<u32, CallError> {
        const REASON: &str = "must be a whole number from 1 to 1000";
        let Some(n) = self.number(param, MAX_AMOUNT, REASON)? else {
            return Ok(DEFAULT_SCROLL_AMOUNT);
        };
        if n < 1.0 || n.fract() != 0.0 {
            return Err(CallError::Invalid {
                param: param.name,
                reason: REASON,
                found: n.to_string(),
            });
        }
        // A whole number in 1..=1000.
        Ok(n as u32)
    }
}

/// A number, or a string holding only a number.
fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

/// Reads a point from any of the shapes models write: a pair, a box (its centre), a text
/// with two or four numbers, nested pairs, or an object with x/y (x1..y2) keys.
pub(crate) fn point_of(value: &Value) -> Option<(f64, f64)> {
    let numbers: Vec<f64> = match value {
        Value::String(s) => grounding::numbers_in(s),
        Value::Array(items) => {
            let mut numbers = Vec::new();
            for item in items {
                if let Some(n) = number_of(item) {
                    numbers.push(n);
                    continue;
                }
                // `[[x1,y1],[x2,y2]]`, `[(x,y)]` or `["x1,y1", "x2,y2"]`.
                match item {
                    Value::Array(_) | Value::String(_) if items.len() <= 2 => {
                        let (x, y) = point_of(item)?;
                        numbers.extend([x, y]);
                    }
                    _ => return None,
                }
            }
            numbers
        }
        Value::Object(map) => {
            let get = |k: &str| map.get(k).and_then(number_of);
            match (
                get("x"),
                get("y"),
                get("x1"),
                get("y1"),
                get("x2"),
                get("y2"),
            ) {
                (Some(x), Some(y), ..) => vec![x, y],
                (_, _, Some(x1), Some(y1), Some(x2), Some(y2)) => vec![x1, y1, x2, y2],
                _ => return None,
            }
        }
        _ => return None,
    };
    let corners = grounding::corners_of(&numbers).ok()?;
    Some(grounding::centre(corners))
}

/// Splits `"ctrl+s"` or `"ctrl s"` into key names; named keys are lower-cased, single
/// characters keep their case, and a trailing `+` key survives (`"ctrl++"`).
fn split_keys(text: &str) -> Vec<String> {
    let text = text.trim();
    if text == "+" {
        return vec!["+".to_string()];
    }
    let mut parts: Vec<&str> = if text.contains('+') {
        text.split('+').map(str::trim).collect()
    } else {
        text.split_whitespace().collect()
    };
    // "ctrl++" splits into ["ctrl", "", ""]: the last empty pair is the plus key.
    let plus_key = text.ends_with("++");
    parts.retain(|p| !p.is_empty());
    let mut keys: Vec<String> = parts
        .into_iter()
        .map(|p| {
            if p.chars().count() > 1 {
                p.to_lowercase()
            } else {
                p.to_string()
            }
        })
        .collect();
    if plus_key {
        keys.push("+".to_string());
    }
    keys
}

/// A value as short text for an error message.
fn short(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    super::truncate_chars(&text, 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::args::parse_value;

    fn call(function: Function, args: &str) -> Result<Action<f64>, CallError> {
        let value = parse_value(args).map(|(v, _)| v).unwrap_or(Value::Null);
        bind(function, &Args::from_value(value))
    }

    #[test]
    fn every_alias_is_unique_and_resolves_to_its_row() {
        let mut seen = std::collections::HashSet::new();
        for (function, names) in TABLE {
            for name in *names {
                assert!(seen.insert(normalize(name)), "duplicate alias {name}");
                assert_eq!(Function::lookup(name), Some(*function));
            }
        }
        for (name, _) in UNSUPPORTED {
            assert!(!seen.contains(&normalize(name)), "{name} is both");
        }
    }

    #[test]
    fn names_match_case_and_separator_insensitively() {
        assert_eq!(
            Function::lookup("double_click"),
            Some(Function::DoubleClick)
        );
        assert_eq!(Function::lookup("PRESS HOME"), Some(Function::Home));
        assert_eq!(Function::lookup("left_single"), Some(Function::Click));
        assert_eq!(Function::lookup(""), None);
        let tools = vec!["web_search".to_string()];
        assert_eq!(
            resolve("WebSearch", &tools),
            Ok(Resolved::Tool("web_search".into()))
        );
        assert!(matches!(
            resolve("mouse_move", &tools),
            Err(CallError::Unsupported { .. })
        ));
    }

    #[test]
    fn points_come_in_many_shapes() {
        let click = |x, y| Ok(Action::Click { x, y });
        assert_eq!(
            call(Function::Click, "{\"point\": (348,291)}"),
            click(348.0, 291.0)
        );
        assert_eq!(
            call(Function::Click, "{\"point\": \"348, 291\"}"),
            click(348.0, 291.0)
        );
        assert_eq!(
            call(Function::Click, "{\"x\": 348, \"y\": \"291\"}"),
            click(348.0, 291.0)
        );
        assert_eq!(call(Function::Click, "(348,291)"), click(348.0, 291.0));
        assert_eq!(
            call(Function::Click, "{\"box\": [[10,20],[30,40]]}"),
            click(20.0, 30.0)
        );
        assert_eq!(
            call(Function::Click, "{\"point\": [10,20,30,40]}"),
            click(20.0, 30.0)
        );
        assert_eq!(
            call(Function::Click, "{\"point\": [[7,8]]}"),
            click(7.0, 8.0)
        );
        assert_eq!(
            call(
                Function::Click,
                "{\"point\": <|box_start|>(1,2),(1,2)<|box_end|>}"
            ),
            click(1.0, 2.0)
        );
        assert!(matches!(
            call(Function::Click, "{\"point\": \"the OK button\"}"),
            Err(CallError::Invalid { param: "point", .. })
        ));
        assert_eq!(
            call(Function::Click, "{}"),
            Err(CallError::Missing { param: "point" })
        );
    }

    #[test]
    fn drag_takes_a_list_of_two_points() {
        assert_eq!(
            call(Function::Drag, "[(1,2),(3,4)]"),
            Ok(Action::Drag {
                x: 1.0,
                y: 2.0,
                to_x: 3.0,
                to_y: 4.0,
                ms: None
            })
        );
    }

    #[test]
    fn keys_split_and_normalise() {
        assert_eq!(split_keys("Ctrl+S"), vec!["ctrl", "S"]);
        assert_eq!(split_keys("ctrl shift t"), vec!["ctrl", "shift", "t"]);
        assert_eq!(split_keys("ctrl++"), vec!["ctrl", "+"]);
        assert_eq!(split_keys("+"), vec!["+"]);
        assert_eq!(split_keys(" "), Vec::<String>::new());
        assert!(call(Function::Key, "{\"keys\": \"\"}").is_err());
    }

    #[test]
    fn defaults_and_ranges() {
        assert_eq!(
            call(Function::Scroll, "{point: (1,2), direction: Down}"),
            Ok(Action::Scroll {
                x: 1.0,
                y: 2.0,
                direction: ScrollDirection::Down,
                amount: 3
            })
        );
        assert!(
            call(
                Function::Scroll,
                "{point: (1,2), direction: down, amount: 0}"
            )
            .is_err()
        );
        assert!(
            call(
                Function::Scroll,
                "{point: (1,2), direction: down, amount: 2.5}"
            )
            .is_err()
        );
        assert_eq!(
            call(Function::Wait, "{}"),
            Ok(Action::Wait { seconds: 5.0 })
        );
        assert!(call(Function::Wait, "{seconds: -1}").is_err());
        assert_eq!(
            call(Function::Finish, ""),
            Ok(Action::Finish {
                answer: String::new()
            })
        );
        assert_eq!(
            call(Function::Type, "{text: 42}"),
            Ok(Action::Type { text: "42".into() })
        );
        assert_eq!(
            call(Function::Type, "{}"),
            Err(CallError::Missing { param: "text" })
        );
    }
}
