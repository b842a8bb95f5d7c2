//! The safety gate between a parsed action and the screen (allow/deny lists, confirmation of
//! sensitive actions, dry runs) and the secrets of a task: `{{secret:NAME}}` is typed as the
//! secret's value but never logged, recorded or shown to the model in clear text.

use std::collections::BTreeMap;
use std::path::Path;

use regex::Regex;

use super::AgentError;
use super::profile::Safety;
use crate::action::Action;

/// Secret values by name.
#[derive(Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.values.keys()).finish()
    }
}

/// `{{secret:NAME}}`, spaces allowed inside the braces.
fn secret_pattern() -> Regex {
    crate::protocol::pattern(r"\{\{\s*secret:([A-Za-z0-9_]+)\s*\}\}")
}

impl Secrets {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.values.insert(name.into(), value.into());
    }

    /// Reads `NAME=value` lines (blank lines and `#` comments skipped).
    pub fn from_file(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut secrets = Self::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (name, value) = line.split_once('=').ok_or_else(|| {
                AgentError::Secret(format!(
                    "{} line {}: expected NAME=value",
                    path.display(),
                    i + 1
                ))
            })?;
            secrets.insert(name.trim(), value);
        }
        Ok(secrets)
    }

    /// Every secret the text names, taken from `files` first, then from the environment
    /// variable `VLAD_SECRET_<NAME>`. A name found nowhere is an error.
    pub fn for_text(text: &str, from_file: &Secrets) -> Result<Self, AgentError> {
        let mut secrets = from_file.clone();
        for name in Self::names_in(text) {
            if secrets.values.contains_key(&name) {
                continue;
            }
            match std::env::var(format!("VLAD_SECRET_{name}")) {
                Ok(v) => secrets.insert(name, v),
                Err(_) => {
                    return Err(AgentError::Secret(format!(
                        "the task uses {{{{secret:{name}}}}} but no value is given; set VLAD_SECRET_{name} or pass --secrets FILE with a line {name}=..."
                    )));
                }
            }
        }
        Ok(secrets)
    }

    /// The secret names `text` refers to, in order, without repeats.
    pub fn names_in(text: &str) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for c in secret_pattern().captures_iter(text) {
            let name = c[1].to_string();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// True when `text` refers to a secret.
    pub fn mentions(text: &str) -> bool {
        secret_pattern().is_match(text)
    }

    /// `text` with every `{{secret:NAME}}` replaced by its value; an unknown name is an error
    /// naming it.
    pub fn reveal(&self, text: &str) -> Result<String, String> {
        let mut missing = None;
        let out = secret_pattern().replace_all(text, |c: &regex::Captures<'_>| {
            match self.values.get(&c[1]) {
                Some(v) => v.clone(),
                None => {
                    missing.get_or_insert_with(|| c[1].to_string());
                    String::new()
                }
            }
        });
        match missing {
            Some(name) => Err(format!("there is no secret named {name}")),
            None => Ok(out.into_owned()),
        }
    }

    /// `text` with every secret value replaced by its `{{secret:NAME}}` placeholder.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        // Longest first, so that a secret containing another is replaced whole.
        let mut values: Vec<(&String, &String)> =
            self.values.iter().filter(|(_, v)| !v.is_empty()).collect();
        values.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        for (name, value) in values {
            out = out.replace(value.as_str(), &format!("{{{{secret:{name}}}}}"));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// What the gate decided for one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Never performed; why.
    Deny(String),
    /// Needs the user's yes; why.
    Confirm(String),
}

/// Checks `action` against a profile's rules.
pub fn check(rules: &Safety, action: &Action) -> Verdict {
    let tag = action.tag();
    let tool = match action {
        Action::Tool { name, .. } => Some(name.as_str()),
        _ => None,
    };
    let listed = |list: &[String]| {
        list.iter().any(|l| {
            let l = l.trim().to_lowercase();
            l == tag || tool.is_some_and(|t| t.to_lowercase() == l)
        })
    };
    if listed(&rules.deny_actions) {
        return Verdict::Deny(format!("the profile denies {tag}"));
    }
    if !rules.allow_actions.is_empty() && !listed(&rules.allow_actions) {
        return Verdict::Deny(format!("the profile does not allow {tag}"));
    }
    if let Action::OpenApp { name } = action {
        let app = name.trim().to_lowercase();
        if rules
            .deny_apps
            .iter()
            .any(|a| a.trim().to_lowercase() == app)
        {
            return Verdict::Deny(format!("the profile denies the app {name}"));
        }
        if !rules.allow_apps.is_empty()
            && !rules
                .allow_apps
                .iter()
                .any(|a| a.trim().to_lowercase() == app)
        {
            return Verdict::Deny(format!("the profile does not allow the app {name}"));
        }
    }
    if listed(&rules.confirm_actions) {
        return Verdict::Confirm(format!("the profile marks {tag} as sensitive"));
    }
    if let Action::Key { keys } = action {
        let pressed = key_set(keys.iter().map(String::as_str));
        if rules
            .confirm_keys
            .iter()
            .any(|combo| key_set(combo.split('+')) == pressed)
        {
            return Verdict::Confirm(format!("{} is a sensitive key combination", keys.join("+")));
        }
    }
    if let Action::Type { text } = action
        && rules.confirm_secrets
        && Secrets::mentions(text)
    {
        return Verdict::Confirm("it types a secret".into());
    }
    Verdict::Allow
}

/// Key names normalised for comparison, as a sorted set.
fn key_set<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut set: Vec<String> = keys
        .map(|k| {
            let k = k.trim().to_lowercase();
            match k.as_str() {
                "control" => "ctrl".to_string(),
                "del" => "delete".to_string(),
                "option" => "alt".to_string(),
                "win" | "windows" | "meta" | "cmd" | "command" => "super".to_string(),
                "return" => "enter".to_string(),
                "esc" => "escape".to_string(),
                _ => k,
            }
        })
        .filter(|k| !k.is_empty())
        .collect();
    set.sort();
    set.dedup();
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_reveal_and_redact() {
        let mut s = Secrets::new();
        s.insert("PW", "hunter2");
        assert_eq!(
            s.reveal("pw: {{ secret:PW }}!").as_deref(),
            Ok("pw: hunter2!")
        );
        assert!(s.reveal("{{secret:NOPE}}").is_err());
        assert_eq!(s.redact("typed hunter2"), "typed {{secret:PW}}");
        assert_eq!(
            Secrets::names_in("{{secret:A}} {{secret:B}} {{secret:A}}"),
            ["A", "B"]
        );
    }

    #[test]
    fn gate_follows_the_lists() {
        let rules = Safety {
            deny_actions: vec!["right_click".into()],
            deny_apps: vec!["Bank".into()],
            confirm_keys: vec!["ctrl+alt+del".into()],
            ..Default::default()
        };
        assert!(matches!(
            check(&rules, &Action::RightClick { x: 1, y: 1 }),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            check(
                &rules,
                &Action::OpenApp {
                    name: "bank".into()
                }
            ),
            Verdict::Deny(_)
        ));
        let combo = Action::Key {
            keys: vec!["Delete".into(), "alt".into(), "control".into()],
        };
        assert!(matches!(check(&rules, &combo), Verdict::Confirm(_)));
        assert_eq!(check(&rules, &Action::Click { x: 1, y: 1 }), Verdict::Allow);
    }
}
