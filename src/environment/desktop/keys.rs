//! Key names the model and the CLI use, and the one table that turns them into enigo keys.
//!
//! Names are case-insensitive. A combo is a list of names (`["ctrl", "s"]`) or one name joined
//! with `+` (`"ctrl+shift+t"`; a lone `+` is the plus key). Any other single character is that
//! character (`"a"`, `"é"`, `"/"`); letters in a combo are taken in lower case, so `ctrl+A` is
//! Control with the A key, not Control+Shift+A.

use enigo::Key;

/// One named key of the table: the names that mean it and the enigo key.
struct Named {
    names: &'static [&'static str],
    key: Key,
    modifier: bool,
}

/// The key-name table. Keep it the only place names are mapped.
const TABLE: &[Named] = &[
    Named {
        names: &["ctrl", "control", "ctl"],
        key: Key::Control,
        modifier: true,
    },
    Named {
        names: &["alt", "option", "opt"],
        key: Key::Alt,
        modifier: true,
    },
    Named {
        names: &["shift"],
        key: Key::Shift,
        modifier: true,
    },
    Named {
        names: &["super", "win", "windows", "meta", "cmd", "command"],
        key: Key::Meta,
        modifier: true,
    },
    Named {
        names: &["enter", "return"],
        key: Key::Return,
        modifier: false,
    },
    Named {
        names: &["tab"],
        key: Key::Tab,
        modifier: false,
    },
    Named {
        names: &["esc", "escape"],
        key: Key::Escape,
        modifier: false,
    },
    Named {
        names: &["backspace", "back_space"],
        key: Key::Backspace,
        modifier: false,
    },
    Named {
        names: &["delete", "del"],
        key: Key::Delete,
        modifier: false,
    },
    Named {
        names: &["home"],
        key: Key::Home,
        modifier: false,
    },
    Named {
        names: &["end"],
        key: Key::End,
        modifier: false,
    },
    Named {
        names: &["pageup", "page_up", "pgup", "prior"],
        key: Key::PageUp,
        modifier: false,
    },
    Named {
        names: &["pagedown", "page_down", "pgdn", "next"],
        key: Key::PageDown,
        modifier: false,
    },
    Named {
        names: &["up", "arrowup", "up_arrow"],
        key: Key::UpArrow,
        modifier: false,
    },
    Named {
        names: &["down", "arrowdown", "down_arrow"],
        key: Key::DownArrow,
        modifier: false,
    },
    Named {
        names: &["left", "arrowleft", "left_arrow"],
        key: Key::LeftArrow,
        modifier: false,
    },
    Named {
        names: &["right", "arrowright", "right_arrow"],
        key: Key::RightArrow,
        modifier: false,
    },
    Named {
        names: &["space", "spacebar"],
        key: Key::Space,
        modifier: false,
    },
    Named {
        names: &["capslock", "caps_lock"],
        key: Key::CapsLock,
        modifier: false,
    },
    Named {
        names: &["f1"],
        key: Key::F1,
        modifier: false,
    },
    Named {
        names: &["f2"],
        key: Key::F2,
        modifier: false,
    },
    Named {
        names: &["f3"],
        key: Key::F3,
        modifier: false,
    },
    Named {
        names: &["f4"],
        key: Key::F4,
        modifier: false,
    },
    Named {
        names: &["f5"],
        key: Key::F5,
        modifier: false,
    },
    Named {
        names: &["f6"],
        key: Key::F6,
        modifier: false,
    },
    Named {
        names: &["f7"],
        key: Key::F7,
        modifier: false,
    },
    Named {
        names: &["f8"],
        key: Key::F8,
        modifier: false,
    },
    Named {
        names: &["f9"],
        key: Key::F9,
        modifier: false,
    },
    Named {
        names: &["f10"],
        key: Key::F10,
        modifier: false,
    },
    Named {
        names: &["f11"],
        key: Key::F11,
        modifier: false,
    },
    Named {
        names: &["f12"],
        key: Key::F12,
        modifier: false,
    },
];

/// A key name that is not in the table and is not a single character.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("unknown key name {0:?}; use one of {names} or a single character", names = known_names())]
    Unknown(String),
    #[error("the key combination is empty")]
    Empty,
}

/// The first name of every table entry, for error messages and prompts.
pub fn known_names() -> String {
    TABLE
        .iter()
        .map(|n| n.names[0])
        .collect::<Vec<_>>()
        .join(", ")
}

/// One key of a combo, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedKey {
    pub key: Key,
    /// ctrl, alt, shift, super: held while the rest of the combo is pressed.
    pub modifier: bool,
}

/// Resolves one key name.
pub fn resolve(name: &str) -> Result<ResolvedKey, KeyError> {
    let lower = name.trim().to_lowercase();
    if let Some(n) = TABLE.iter().find(|n| n.names.contains(&lower.as_str())) {
        return Ok(ResolvedKey {
            key: n.key,
            modifier: n.modifier,
        });
    }
    let mut chars = name.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Ok(ResolvedKey {
            // Letters in lower case: `ctrl+A` means the A key with Control, not also Shift.
            key: Key::Unicode(c.to_lowercase().next().unwrap_or(c)),
            modifier: false,
        }),
        _ => Err(KeyError::Unknown(name.to_string())),
    }
}

/// Resolves a combo given as a list of names, each of which may itself be `a+b+c`.
pub fn resolve_combo<S: AsRef<str>>(keys: &[S]) -> Result<Vec<ResolvedKey>, KeyError> {
    let mut out = Vec::new();
    for k in keys {
        for part in split_plus(k.as_ref()) {
            out.push(resolve(part)?);
        }
    }
    if out.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(out)
}

/// Splits `ctrl+shift+t` on `+`, keeping a literal `+` key (`"+"`, `"ctrl++"`).
fn split_plus(s: &str) -> Vec<&str> {
    let s = s.trim();
    if s.is_empty() {
        return Vec::new();
    }
    if s == "+" {
        return vec!["+"];
    }
    let mut parts: Vec<&str> = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find('+') {
            // A '+' at the very start of what remains is the plus key itself.
            Some(0) => {
                parts.push("+");
                rest = &rest[1..];
                rest = rest.strip_prefix('+').unwrap_or(rest);
            }
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            None => {
                parts.push(rest);
                rest = "";
            }
        }
    }
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(combo: &[&str]) -> Vec<Key> {
        match resolve_combo(combo) {
            Ok(v) => v.into_iter().map(|k| k.key).collect(),
            Err(e) => panic!("{combo:?}: {e}"),
        }
    }

    #[test]
    fn every_name_the_brief_lists_resolves() {
        for name in [
            "ctrl",
            "alt",
            "shift",
            "super",
            "enter",
            "tab",
            "esc",
            "backspace",
            "delete",
            "home",
            "end",
            "pageup",
            "pagedown",
            "up",
            "down",
            "left",
            "right",
            "space",
            "f1",
            "f5",
            "f12",
        ] {
            assert!(resolve(name).is_ok(), "{name}");
        }
        assert_eq!(resolve("F12").map(|k| k.key), Ok(Key::F12));
        assert_eq!(resolve("Return").map(|k| k.key), Ok(Key::Return));
    }

    #[test]
    fn combos_split_on_plus_and_keep_the_plus_key() {
        assert_eq!(keys(&["ctrl", "s"]), vec![Key::Control, Key::Unicode('s')]);
        assert_eq!(
            keys(&["ctrl+shift+t"]),
            vec![Key::Control, Key::Shift, Key::Unicode('t')]
        );
        assert_eq!(keys(&["ctrl++"]), vec![Key::Control, Key::Unicode('+')]);
        assert_eq!(keys(&["+"]), vec![Key::Unicode('+')]);
        assert_eq!(keys(&["Ctrl+A"]), vec![Key::Control, Key::Unicode('a')]);
        assert_eq!(keys(&["é"]), vec![Key::Unicode('é')]);
    }

    #[test]
    fn modifiers_are_marked() {
        let combo = resolve_combo(&["ctrl+alt+delete"]).unwrap_or_default();
        assert_eq!(
            combo.iter().map(|k| k.modifier).collect::<Vec<_>>(),
            vec![true, true, false]
        );
    }

    #[test]
    fn unknown_names_and_empty_combos_are_errors_that_list_the_table() {
        let err = resolve_combo(&["ctrl", "hyperdrive"]);
        assert!(matches!(&err, Err(KeyError::Unknown(n)) if n == "hyperdrive"));
        if let Err(e) = err {
            assert!(e.to_string().contains("pagedown"), "{e}");
        }
        assert_eq!(resolve_combo::<&str>(&[]), Err(KeyError::Empty));
        assert_eq!(resolve_combo(&[" "]), Err(KeyError::Empty));
    }
}
