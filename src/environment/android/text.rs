//! Text for the device shell: quoting words for `sh`, the `%s` escaping of `input text`, and
//! splitting typed text into what `input text` can send, Enter/Tab key presses, and what needs the
//! ADBKeyboard IME (base64 broadcast).

use base64::Engine as _;

/// The ADBKeyboard IME (<https://github.com/senzhk/ADBKeyBoard>).
pub const ADB_KEYBOARD_IME: &str = "com.android.adbkeyboard/.AdbIME";

/// One step of typing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    Text(&'a str),
    /// A `\n`: press Enter.
    Enter,
    /// A `\t`: press Tab.
    Tab,
}

/// Splits `text` at newlines and tabs (typed as key presses); `\r\n` counts as one newline.
pub(crate) fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let key = match c {
            '\n' => Some(Piece::Enter),
            '\t' => Some(Piece::Tab),
            _ => None,
        };
        if let Some(key) = key {
            let chunk = text[start..i].strip_suffix('\r').unwrap_or(&text[start..i]);
            if !chunk.is_empty() {
                out.push(Piece::Text(chunk));
            }
            out.push(key);
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        out.push(Piece::Text(&text[start..]));
    }
    out
}

/// Whether `input text` can type `chunk` exactly: printable ASCII only, and no literal `%s`
/// (which `input text` always turns into a space; it has no escape for it).
pub(crate) fn input_text_can_type(chunk: &str) -> bool {
    chunk.bytes().all(|b| (0x20..=0x7e).contains(&b)) && !chunk.contains("%s")
}

/// The shell command that types `chunk` (which must pass [`input_text_can_type`]): spaces become
/// `%s` (`input text` takes one word), then the word is quoted for `sh`.
pub(crate) fn input_text_command(chunk: &str) -> String {
    format!("input text {}", shell_quote(&chunk.replace(' ', "%s")))
}

/// The ADBKeyboard broadcast that types `chunk` (any Unicode).
pub(crate) fn broadcast_command(chunk: &str) -> String {
    format!(
        "am broadcast -a ADB_INPUT_B64 --es msg {}",
        base64_utf8(chunk)
    )
}

/// Standard base64 (with padding) of the UTF-8 bytes: what ADBKeyboard decodes.
pub fn base64_utf8(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
}

/// Quotes `word` for a POSIX shell: bare when it is made of safe characters, else in single
/// quotes with each `'` written as `'\''`.
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A short, safe rendering of typed text for messages.
pub(crate) fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(60).collect();
    if text.chars().count() > 60 {
        s.push('…');
    }
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc.d_e-1"), "abc.d_e-1");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /);`x`"), "'$(rm -rf /);`x`'");
    }

    #[test]
    fn input_text_escaping() {
        assert_eq!(input_text_command("hello world"), "input text hello%sworld");
        assert_eq!(input_text_command("a&b"), "input text 'a&b'");
        assert!(input_text_can_type(
            "50% off; \"quoted\" 'single' `tick` $HOME \\"
        ));
        assert!(!input_text_can_type("literal %s"));
        assert!(!input_text_can_type("héllo"));
        assert!(!input_text_can_type("bell\u{7}"));
    }

    #[test]
    fn pieces_split_keys() {
        assert_eq!(
            pieces("a b\r\nc\td\n"),
            vec![
                Piece::Text("a b"),
                Piece::Enter,
                Piece::Text("c"),
                Piece::Tab,
                Piece::Text("d"),
                Piece::Enter
            ]
        );
        assert_eq!(pieces(""), vec![]);
    }

    #[test]
    fn base64_matches_coreutils() {
        // `printf 'héllo 世界' | base64`
        assert_eq!(base64_utf8("héllo 世界"), "aMOpbGxvIOS4lueVjA==");
    }
}
