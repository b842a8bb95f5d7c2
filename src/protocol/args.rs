//! A lenient reader for the JSON-like argument text models write after `*ARGS*`, inside
//! `<tool_call>` and between the parentheses of a UI-TARS call.
//!
//! Accepts JSON plus what models actually emit: tuples `(348,291)`, single-quoted strings,
//! unquoted keys and words, `=` as well as `:` after keys, trailing and missing commas, Python
//! literals (`True`, `None`), raw newlines in strings and grounding tokens
//! (`<|box_start|>(1,2),(3,4)<|box_end|>`, `<point>1 2</point>`) as values, which are kept as
//! strings for the point reader. Tuples become arrays. Every failure carries the byte offset
//! where reading stopped; nothing here indexes or slices at an unchecked position.

use serde_json::{Map, Number, Value};

/// How deep arrays and objects may nest before the reader gives up (protects the stack).
pub const MAX_DEPTH: usize = 32;

/// Why argument text could not be read. `offset` is a byte offset into the text given to the
/// reader, always on a character boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("the arguments end before they are complete (was the reply cut off?)")]
    UnexpectedEnd { offset: usize },
    #[error("a string is never closed (was the reply cut off?)")]
    UnterminatedString { offset: usize },
    #[error("expected {expected} but found `{found}`")]
    Unexpected {
        offset: usize,
        found: String,
        expected: &'static str,
    },
    #[error("`{text}` is not a usable number")]
    BadNumber { offset: usize, text: String },
    #[error("the arguments nest more than {MAX_DEPTH} levels deep")]
    TooDeep { offset: usize },
}

impl ArgsError {
    /// Byte offset into the text given to the reader where reading stopped.
    pub fn offset(&self) -> usize {
        match self {
            Self::UnexpectedEnd { offset }
            | Self::UnterminatedString { offset }
            | Self::Unexpected { offset, .. }
            | Self::BadNumber { offset, .. }
            | Self::TooDeep { offset } => *offset,
        }
    }
}

/// Arguments as the model wrote them, before they are matched to a function's parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Args {
    /// No arguments at all (empty `*ARGS*`, `{}`, `()`, `null`).
    None,
    /// `{"point": (1,2)}` or `start_box='(1,2)'`.
    Named(Map<String, Value>),
    /// Values without names, bound to parameters in order: `*ARGS*: (348,291)`.
    Positional(Vec<Value>),
}

impl Args {
    /// Interprets one value read after `*ARGS*` or as `arguments`: an object gives named
    /// arguments, a string holding an object is read once more (double-encoded JSON), `null`
    /// gives none and anything else is a single positional value.
    pub fn from_value(value: Value) -> Args {
        match value {
            Value::Null => Args::None,
            Value::Object(map) if map.is_empty() => Args::None,
            Value::Object(map) => Args::Named(map),
            Value::String(s) if s.trim_start().starts_with('{') => match parse_value(s.trim()) {
                Ok((Value::Object(map), _)) => Args::from_value(Value::Object(map)),
                _ => Args::Positional(vec![Value::String(s)]),
            },
            other => Args::Positional(vec![other]),
        }
    }

    /// The arguments as one JSON value (what a tool receives).
    pub fn into_json(self) -> Value {
        match self {
            Args::None => Value::Object(Map::new()),
            Args::Named(map) => Value::Object(map),
            Args::Positional(mut values) if values.len() == 1 => values.remove(0),
            Args::Positional(values) => Value::Array(values),
        }
    }
}

/// Reads one value at the start of `text` (leading whitespace allowed). Returns the value and
/// the number of bytes consumed; text after the value is left to the caller.
pub fn parse_value(text: &str) -> Result<(Value, usize), ArgsError> {
    let mut reader = Reader { text, pos: 0 };
    reader.skip_ws();
    let value = reader.value(0)?;
    Ok((value, reader.pos))
}

/// Reads the inside of a call's parentheses, `start_box='(1,2)', direction='down')`, up to and
/// including the closing `)`. Returns the arguments and the bytes consumed.
pub fn parse_call_args(text: &str) -> Result<(Args, usize), ArgsError> {
    let mut reader = Reader { text, pos: 0 };
    let mut named = Map::new();
    let mut positional = Vec::new();
    loop {
        reader.skip_ws();
        match reader.peek() {
            None => return Err(ArgsError::UnexpectedEnd { offset: reader.pos }),
            Some(')') => {
                reader.bump();
                break;
            }
            Some(',') => {
                reader.bump();
                continue;
            }
            Some(_) => {}
        }
        if let Some(key) = reader.key_before_separator() {
            reader.skip_ws();
            let value = reader.value(1)?;
            named.entry(key).or_insert(value);
        } else {
            positional.push(reader.value(1)?);
        }
        reader.skip_ws();
        match reader.peek() {
            Some(',') | Some(')') => {}
            None => return Err(ArgsError::UnexpectedEnd { offset: reader.pos }),
            Some(c) => return Err(reader.unexpected(c, "`,` or `)`")),
        }
    }
    let args = match (named.is_empty(), positional.is_empty()) {
        (true, true) => Args::None,
        (false, true) => Args::Named(named),
        (true, false) => Args::Positional(positional),
        (false, false) => {
            // Mixed: name the positional ones by position so nothing is lost.
            for (i, value) in positional.into_iter().enumerate() {
                named.entry(format!("#{i}")).or_insert(value);
            }
            Args::Named(named)
        }
    };
    Ok((args, reader.pos))
}

/// Characters that end an unquoted word.
fn ends_word(c: char) -> bool {
    matches!(c, ',' | '}' | ']' | ')' | '{' | '[' | '(' | '\n' | '\r')
}

struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn rest(&self) -> &str {
        self.text.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    fn unexpected(&self, found: char, expected: &'static str) -> ArgsError {
        ArgsError::Unexpected {
            offset: self.pos,
            found: found.to_string(),
            expected,
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ArgsError> {
        if depth > MAX_DEPTH {
            return Err(ArgsError::TooDeep { offset: self.pos });
        }
        let Some(c) = self.peek() else {
            return Err(ArgsError::UnexpectedEnd { offset: self.pos });
        };
        match c {
            '{' => self.object(depth),
            '[' => self.sequence(']', depth),
            '(' => self.sequence(')', depth),
            '"' | '\'' => self.string(c).map(Value::String),
            '“' => self.string('”').map(Value::String),
            '‘' => self.string('’').map(Value::String),
            '<' => self.token_value(),
            '-' | '+' | '.' | '0'..='9' => self.number_or_word(),
            c if ends_word(c) || c == ':' || c == '=' => Err(self.unexpected(c, "a value")),
            _ => Ok(word_value(self.word())),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ArgsError> {
        self.bump(); // '{'
        let mut map = Map::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Err(ArgsError::UnexpectedEnd { offset: self.pos }),
                Some('}') => {
                    self.bump();
                    return Ok(Value::Object(map));
                }
                Some(',') => {
                    self.bump();
                    continue;
                }
                Some(_) => {}
            }
            let key = self.key()?;
            self.skip_ws();
            match self.peek() {
                Some(':') | Some('=') => {
                    self.bump();
                }
                None => return Err(ArgsError::UnexpectedEnd { offset: self.pos }),
                Some(c) => return Err(self.unexpected(c, "`:` after the key")),
            }
            self.skip_ws();
            let value = self.value(depth + 1)?;
            // The first of duplicate keys wins, as in most JSON readers models were shown.
            map.entry(key).or_insert(value);
            self.skip_ws();
            match self.peek() {
                Some(',') | Some('}') => {}
                None => return Err(ArgsError::UnexpectedEnd { offset: self.pos }),
                // A missing comma before the next key.
                Some('"') | Some('\'') => {}
                Some(c) if c.is_alphabetic() || c == '_' => {}
                Some(c) => return Err(self.unexpected(c, "`,` or `}`")),
            }
        }
    }

    fn sequence(&mut self, close: char, depth: usize) -> Result<Value, ArgsError> {
        self.bump(); // '[' or '('
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Err(ArgsError::UnexpectedEnd { offset: self.pos }),
                Some(c) if c == close => {
                    self.bump();
                    return Ok(Value::Array(items));
                }
                Some(',') => {
                    self.bump();
                    continue;
                }
                Some(_) => {}
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(',') => {}
                Some(c) if c == close => {}
                None => return Err(ArgsError::UnexpectedEnd { offset: self.pos }),
                Some(c) => {
                    let expected = if close == ']' {
                        "`,` or `]`"
                    } else {
                        "`,` or `)`"
                    };
                    return Err(self.unexpected(c, expected));
                }
            }
        }
    }

    fn key(&mut self) -> Result<String, ArgsError> {
        match self.peek() {
            Some(q @ ('"' | '\'')) => self.string(q),
            Some(c) if ends_word(c) || c == ':' || c == '=' => Err(self.unexpected(c, "a key")),
            None => Err(ArgsError::UnexpectedEnd { offset: self.pos }),
            Some(_) => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| !(ends_word(c) || c == ':' || c == '=' || c.is_whitespace()))
                {
                    self.bump();
                }
                Ok(self.text.get(start..self.pos).unwrap_or("").to_string())
            }
        }
    }

    /// In a call's parentheses: `name=` or `name:` ahead? Consumes it and returns the name.
    fn key_before_separator(&mut self) -> Option<String> {
        let start = self.pos;
        let key = match self.peek() {
            Some(c) if c.is_alphabetic() || c == '_' => {
                while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    self.bump();
                }
                self.text.get(start..self.pos).unwrap_or("").to_string()
            }
            _ => return None,
        };
        self.skip_ws();
        if self.eat("=") || self.eat(":") {
            Some(key)
        } else {
            self.pos = start;
            None
        }
    }

    /// A quoted string; the reader stands on the opening quote, `close` ends it.
    fn string(&mut self, close: char) -> Result<String, ArgsError> {
        let start = self.pos;
        self.bump(); // opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.bump() else {
                return Err(ArgsError::UnterminatedString { offset: start });
            };
            if c == close && (close == '"' || self.closes_here()) {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = self.bump() else {
                return Err(ArgsError::UnterminatedString { offset: start });
            };
            match e {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                '/' => out.push('/'),
                'u' => match self.unicode_escape() {
                    Some(ch) => out.push(ch),
                    None => out.push_str("\\u"),
                },
                '\\' | '"' | '\'' => out.push(e),
                e if e == close => out.push(e),
                // An escape JSON does not know: keep it as written.
                other => {
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }

    /// Whether a single quote just read ends its string: only if a delimiter (or the end)
    /// follows, so that `'it's ok'` keeps its apostrophe.
    fn closes_here(&self) -> bool {
        match self.rest().trim_start().chars().next() {
            None => true,
            Some(c) => matches!(c, ',' | '}' | ']' | ')' | ':' | '=' | '<' | '*' | '✿'),
        }
    }

    /// After `\u`: four hex digits, and a low surrogate after a high one. Leaves the position
    /// unchanged when the digits are not there.
    fn unicode_escape(&mut self) -> Option<char> {
        let first = self.hex4()?;
        if (0xD800..0xDC00).contains(&first) {
            let save = self.pos;
            if self.eat("\\u")
                && let Some(low) = self.hex4()
                && (0xDC00..0xE000).contains(&low)
            {
                let code = 0x10000 + ((first - 0xD800) << 10) + (low - 0xDC00);
                return char::from_u32(code);
            }
            self.pos = save;
            return Some('\u{FFFD}');
        }
        Some(char::from_u32(first).unwrap_or('\u{FFFD}'))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.rest().get(..4)?;
        if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let code = u32::from_str_radix(digits, 16).ok()?;
        self.pos += 4;
        Some(code)
    }

    /// An unquoted run of text up to a delimiter, trimmed.
    fn word(&mut self) -> &str {
        let start = self.pos;
        while self.peek().is_some_and(|c| !ends_word(c)) {
            self.bump();
        }
        let word = self.text.get(start..self.pos).unwrap_or("");
        // Give back trailing whitespace so the caller sees the delimiter next.
        let trimmed = word.trim_end();
        self.pos = start + trimmed.len();
        trimmed
    }

    /// A number, or a word that merely starts like one (`12px`).
    fn number_or_word(&mut self) -> Result<Value, ArgsError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
        {
            self.bump();
        }
        let continues_word = self
            .peek()
            .is_some_and(|c| c.is_alphabetic() || matches!(c, '_' | '%'));
        if continues_word {
            self.pos = start;
            return Ok(word_value(self.word()));
        }
        let text = self.text.get(start..self.pos).unwrap_or("");
        number_value(text).ok_or_else(|| ArgsError::BadNumber {
            offset: start,
            text: text.to_string(),
        })
    }

    /// `<|box_start|>…<|box_end|>`, `<|object_ref_start|>…<|box_end|>`, `<point>…</point>`,
    /// `<bbox>…</bbox>`: kept whole as a string for the point reader.
    fn token_value(&mut self) -> Result<Value, ArgsError> {
        const PAIRS: [(&str, &str); 4] = [
            ("<|object_ref_start|>", "<|box_end|>"),
            ("<|box_start|>", "<|box_end|>"),
            ("<point>", "</point>"),
            ("<bbox>", "</bbox>"),
        ];
        let start = self.pos;
        for (open, close) in PAIRS {
            if self.rest().starts_with(open) {
                return match self.rest().find(close) {
                    Some(at) => {
                        let end = self.pos + at + close.len();
                        let token = self.text.get(start..end).unwrap_or("").to_string();
                        self.pos = end;
                        Ok(Value::String(token))
                    }
                    None => Err(ArgsError::UnexpectedEnd {
                        offset: self.text.len(),
                    }),
                };
            }
        }
        Ok(word_value(self.word()))
    }
}

/// JSON/Python literals and numbers; anything else is a string.
fn word_value(word: &str) -> Value {
    match word {
        "true" | "True" => Value::Bool(true),
        "false" | "False" => Value::Bool(false),
        "null" | "None" | "none" => Value::Null,
        _ => number_value(word).unwrap_or_else(|| Value::String(word.to_string())),
    }
}

/// A JSON number from `text`, keeping integers integral as serde_json does.
fn number_value(text: &str) -> Option<Value> {
    let text = text.strip_prefix('+').unwrap_or(text);
    if text.is_empty() || !text.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    if let Ok(n) = text.parse::<u64>() {
        return Some(Value::Number(n.into()));
    }
    if let Ok(n) = text.parse::<i64>() {
        return Some(Value::Number(n.into()));
    }
    // Rust also reads "inf" and "NaN"; only accept what looks like a decimal number.
    if !text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | 'e' | 'E' | '+'))
    {
        return None;
    }
    let f = text.parse::<f64>().ok()?;
    Number::from_f64(f).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(text: &str) -> Value {
        match parse_value(text) {
            Ok((v, _)) => v,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    #[test]
    fn reads_json_and_what_models_write_instead() {
        assert_eq!(
            value(r#"{"point": (348,291)}"#),
            json!({"point": [348, 291]})
        );
        assert_eq!(value("{'text': 'it\\'s'}"), json!({"text": "it's"}));
        assert_eq!(value("{'text': 'it's ok'}"), json!({"text": "it's ok"}));
        assert_eq!(value("{point: [1, 2,], }"), json!({"point": [1, 2]}));
        assert_eq!(
            value("{direction = down, amount=3}"),
            json!({"direction": "down", "amount": 3})
        );
        assert_eq!(value(r#"{"a": 1 "b": 2}"#), json!({"a": 1, "b": 2}));
        assert_eq!(
            value("{ok: True, n: None, f: -2.5}"),
            json!({"ok": true, "n": null, "f": -2.5})
        );
        assert_eq!(value(r#""\u4f60\u597d \ud83d\ude00""#), json!("你好 😀"));
        assert_eq!(value("“smart”"), json!("smart"));
        assert_eq!(
            value("{point: <|box_start|>(1,2),(3,4)<|box_end|>}"),
            json!({"point": "<|box_start|>(1,2),(3,4)<|box_end|>"})
        );
        assert_eq!(value("12px"), json!("12px"));
        assert_eq!(value("{\"t\": \"a\nb\"}"), json!({"t": "a\nb"}));
    }

    #[test]
    fn reports_where_reading_stopped() {
        assert_eq!(
            parse_value(r#"{"point": (348,"#),
            Err(ArgsError::UnexpectedEnd { offset: 15 })
        );
        assert_eq!(
            parse_value(r#"{"text": "abc"#),
            Err(ArgsError::UnterminatedString { offset: 9 })
        );
        assert_eq!(
            parse_value(r#"{"a": 1; "b": 2}"#),
            Err(ArgsError::Unexpected {
                offset: 7,
                found: ";".into(),
                expected: "`,` or `}`"
            })
        );
        assert!(matches!(
            parse_value("1e999"),
            Err(ArgsError::BadNumber { .. })
        ));
        let deep = "[".repeat(100);
        assert!(matches!(parse_value(&deep), Err(ArgsError::TooDeep { .. })));
    }

    #[test]
    fn reads_call_arguments() {
        let (args, used) = match parse_call_args("start_box='(1,2)', direction='down') tail") {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(used, 36);
        assert_eq!(
            args,
            Args::Named(
                json!({"start_box": "(1,2)", "direction": "down"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            )
        );
        assert_eq!(parse_call_args(")").map(|(a, _)| a), Ok(Args::None));
        assert_eq!(
            parse_call_args("'(5,6)')").map(|(a, _)| a),
            Ok(Args::Positional(vec![json!("(5,6)")]))
        );
    }
}
