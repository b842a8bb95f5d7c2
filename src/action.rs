//! The typed actions vlad performs: the one vocabulary shared by the protocol parser, the
//! executors, the trajectory recorder, the API and the test scripts.
//!
//! The serde form (`{"action": "click", "x": 376, "y": 698}`) is a wire format: keep it stable.
//!
//! Coordinates are a type parameter. The protocol parser produces `Action<f64>`, whose points are
//! in the model's coordinate space; [`Action::map_points`] converts them exactly once into
//! environment pixels, the plain [`Action`] (`Action<i32>`) that executors accept.

use serde::{Deserialize, Serialize};

/// One thing to do on a screen. `C` is the coordinate type: `i32` environment pixels (the
/// default) or `f64` model-space values before mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action<C = i32> {
    /// A left click (desktop) or a tap (Android).
    Click {
        x: C,
        y: C,
    },
    DoubleClick {
        x: C,
        y: C,
    },
    RightClick {
        x: C,
        y: C,
    },
    /// A touch held in place for `ms` milliseconds.
    LongPress {
        x: C,
        y: C,
        ms: u64,
    },
    /// Press at (`x`, `y`), move to (`to_x`, `to_y`), release. `ms`: duration, if the model gave one.
    Drag {
        x: C,
        y: C,
        to_x: C,
        to_y: C,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ms: Option<u64>,
    },
    /// A touch swipe from (`x`, `y`) to (`to_x`, `to_y`). `ms`: duration, if the model gave one.
    Swipe {
        x: C,
        y: C,
        to_x: C,
        to_y: C,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ms: Option<u64>,
    },
    /// Scroll with the pointer at (`x`, `y`); `amount` in wheel notches.
    Scroll {
        x: C,
        y: C,
        direction: ScrollDirection,
        amount: u32,
    },
    /// Type text (any Unicode; a `\n` is a press of Enter).
    Type {
        text: String,
    },
    /// Press a key or a combination at once: `["ctrl", "s"]`. Named keys are lower case.
    Key {
        keys: Vec<String>,
    },
    Wait {
        seconds: f64,
    },
    Home,
    Back,
    Enter,
    AppSwitch,
    /// Launch an app by its name or package.
    OpenApp {
        name: String,
    },
    /// The task is done; `answer` is what the agent reports.
    Finish {
        answer: String,
    },
    /// The agent needs the user; `question` is what it asks.
    CallUser {
        question: String,
    },
    /// A call of a tool plugin with its JSON arguments.
    Tool {
        name: String,
        args: serde_json::Value,
    },
}

/// The direction of a [`Action::Scroll`]: where the viewport moves (`down` shows what is below).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScrollDirection {
    Up,
    Down,
    Left,
    Right,
}

impl ScrollDirection {
    /// The lower-case name used on the wire and in prompts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Left => "left",
            Self::Right => "right",
        }
    }
}

impl<C> Action<C> {
    /// The `action` tag of the wire format (`"click"`, `"long_press"`, …).
    pub fn tag(&self) -> &'static str {
        match self {
            Self::Click { .. } => "click",
            Self::DoubleClick { .. } => "double_click",
            Self::RightClick { .. } => "right_click",
            Self::LongPress { .. } => "long_press",
            Self::Drag { .. } => "drag",
            Self::Swipe { .. } => "swipe",
            Self::Scroll { .. } => "scroll",
            Self::Type { .. } => "type",
            Self::Key { .. } => "key",
            Self::Wait { .. } => "wait",
            Self::Home => "home",
            Self::Back => "back",
            Self::Enter => "enter",
            Self::AppSwitch => "app_switch",
            Self::OpenApp { .. } => "open_app",
            Self::Finish { .. } => "finish",
            Self::CallUser { .. } => "call_user",
            Self::Tool { .. } => "tool",
        }
    }

    /// Converts every point (`x`,`y` and `to_x`,`to_y`) with `f`, stopping at the first error.
    /// Everything that is not a point is kept as it is.
    pub fn map_points<D, E>(
        self,
        mut f: impl FnMut(C, C) -> Result<(D, D), E>,
    ) -> Result<Action<D>, E> {
        Ok(match self {
            Self::Click { x, y } => {
                let (x, y) = f(x, y)?;
                Action::Click { x, y }
            }
            Self::DoubleClick { x, y } => {
                let (x, y) = f(x, y)?;
                Action::DoubleClick { x, y }
            }
            Self::RightClick { x, y } => {
                let (x, y) = f(x, y)?;
                Action::RightClick { x, y }
            }
            Self::LongPress { x, y, ms } => {
                let (x, y) = f(x, y)?;
                Action::LongPress { x, y, ms }
            }
            Self::Drag {
                x,
                y,
                to_x,
                to_y,
                ms,
            } => {
                let (x, y) = f(x, y)?;
                let (to_x, to_y) = f(to_x, to_y)?;
                Action::Drag {
                    x,
                    y,
                    to_x,
                    to_y,
                    ms,
                }
            }
            Self::Swipe {
                x,
                y,
                to_x,
                to_y,
                ms,
            } => {
                let (x, y) = f(x, y)?;
                let (to_x, to_y) = f(to_x, to_y)?;
                Action::Swipe {
                    x,
                    y,
                    to_x,
                    to_y,
                    ms,
                }
            }
            Self::Scroll {
                x,
                y,
                direction,
                amount,
            } => {
                let (x, y) = f(x, y)?;
                Action::Scroll {
                    x,
                    y,
                    direction,
                    amount,
                }
            }
            Self::Type { text } => Action::Type { text },
            Self::Key { keys } => Action::Key { keys },
            Self::Wait { seconds } => Action::Wait { seconds },
            Self::Home => Action::Home,
            Self::Back => Action::Back,
            Self::Enter => Action::Enter,
            Self::AppSwitch => Action::AppSwitch,
            Self::OpenApp { name } => Action::OpenApp { name },
            Self::Finish { answer } => Action::Finish { answer },
            Self::CallUser { question } => Action::CallUser { question },
            Self::Tool { name, args } => Action::Tool { name, args },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_format_matches_the_cli_contract() -> Result<(), serde_json::Error> {
        let cases: Vec<(Action, serde_json::Value)> = vec![
            (
                Action::Click { x: 376, y: 698 },
                json!({"action": "click", "x": 376, "y": 698}),
            ),
            (
                Action::Swipe {
                    x: 1,
                    y: 2,
                    to_x: 3,
                    to_y: 4,
                    ms: None,
                },
                json!({"action": "swipe", "x": 1, "y": 2, "to_x": 3, "to_y": 4}),
            ),
            (
                Action::Scroll {
                    x: 5,
                    y: 6,
                    direction: ScrollDirection::Down,
                    amount: 3,
                },
                json!({"action": "scroll", "x": 5, "y": 6, "direction": "down", "amount": 3}),
            ),
            (Action::AppSwitch, json!({"action": "app_switch"})),
            (
                Action::Key {
                    keys: vec!["ctrl".into(), "s".into()],
                },
                json!({"action": "key", "keys": ["ctrl", "s"]}),
            ),
        ];
        for (action, expected) in cases {
            assert_eq!(serde_json::to_value(&action)?, expected);
            assert_eq!(action.tag(), expected["action"]);
            let back: Action = serde_json::from_value(expected)?;
            assert_eq!(back, action);
        }
        Ok(())
    }

    #[test]
    fn map_points_maps_both_ends_of_a_drag() {
        let drag: Action<f64> = Action::Drag {
            x: 1.0,
            y: 2.0,
            to_x: 3.0,
            to_y: 4.0,
            ms: Some(5),
        };
        let mapped: Result<Action<i32>, ()> =
            drag.map_points(|x, y| Ok(((x * 10.0) as i32, (y * 100.0) as i32)));
        assert_eq!(
            mapped,
            Ok(Action::Drag {
                x: 10,
                y: 200,
                to_x: 30,
                to_y: 400,
                ms: Some(5)
            })
        );
    }
}
