//! Fuzzing the parser with proptest: arbitrary text, soups of the tokens the formats are made
//! of, and mutations (cuts, deletions, insertions) of the real replies of the reply table.
//! Every family must return a result for every input: no panic, spans on character
//! boundaries, JSON that serialises.
//!
//! `cargo fuzz` needs a nightly toolchain, which CI does not have; these bounded runs take its
//! place (`PROPTEST_CASES=100000 cargo test --release --test protocol_fuzz` for a long run).

use proptest::prelude::*;
use vlad::protocol::{CoordMap, CoordSpace, ModelFamily, Protocol, Size};

const FAMILIES: [ModelFamily; 3] = [
    ModelFamily::Qwen2Vl,
    ModelFamily::Qwen25Vl,
    ModelFamily::UiTars,
];

const TOKENS: &[&str] = &[
    "*FUNCTION*",
    "*ARGS*",
    "*RESULT*",
    "*RETURN*",
    "**FUNCTION**",
    "✿FUNCTION✿",
    "✿ARGS✿",
    "✿RESULT✿",
    ":",
    ": ",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "\"",
    "'",
    "“",
    "”",
    ",",
    "=",
    "\\",
    "\\u",
    "\\ud83d",
    "\\n",
    "Tap",
    "Click",
    "Type",
    "Drag",
    "Scroll",
    "Key",
    "Finish",
    "web_search",
    "point",
    "text",
    "start",
    "end",
    "direction",
    "down",
    "x",
    "y",
    "348",
    "291",
    "-1",
    "1e999",
    "0.5",
    "1000",
    "1001",
    "True",
    "None",
    "<|box_start|>",
    "<|box_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<point>",
    "</point>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "<|im_end|>",
    "Thought:",
    "Action:",
    "click(",
    "start_box=",
    "computer_use",
    "\"action\"",
    "left_click",
    "你好",
    "😀",
    "é",
    "\n",
    " ",
    "\t",
    "\r\n",
    "\u{0}",
];

fn check(text: &str) -> Result<(), TestCaseError> {
    let maps = [
        CoordMap::onto_screen(CoordSpace::Relative1000, Size::new(1080, 2400)),
        CoordMap::new(
            CoordSpace::ImagePixels(Size::new(1288, 728)),
            Size::new(2576, 1456),
            1.5,
            (-1920, 0),
        ),
    ];
    for family in FAMILIES {
        let reply = Protocol::new(family).with_tools(["web_search"]).parse(text);
        prop_assert!(reply.turn_end <= text.len() && text.is_char_boundary(reply.turn_end));
        for span in reply
            .calls
            .iter()
            .map(|c| &c.span)
            .chain(reply.errors.iter().map(|e| &e.span))
        {
            prop_assert!(
                text.get(span.clone()).is_some(),
                "span {:?} of {:?}",
                span,
                text
            );
        }
        for map in maps.iter().flatten() {
            let mapped = reply.clone().map(map);
            let json = mapped.to_json();
            prop_assert!(json.get("errors").is_some_and(|e| e.is_array()));
            prop_assert!(serde_json::to_string(&json).is_ok());
            for error in &mapped.errors {
                let _ = error.to_string();
                let _ = error.char_offset(text);
            }
        }
    }
    Ok(())
}

fn replies() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/protocol/replies.json"
    );
    let table: serde_json::Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    table
        .as_array()
        .map(|cases| {
            cases
                .iter()
                .filter_map(|c| c.get("reply")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An edit of a reply, at character positions (taken modulo the length).
#[derive(Debug, Clone)]
enum Edit {
    Cut(usize),
    Delete(usize, usize),
    Insert(usize, String),
    Duplicate(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop::sample::select(TOKENS.to_vec()).prop_map(str::to_string);
    prop_oneof![
        any::<usize>().prop_map(Edit::Cut),
        (any::<usize>(), 1usize..8).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), prop_oneof![token, "(?s).{1,4}"]).prop_map(|(at, s)| Edit::Insert(at, s)),
        (any::<usize>(), 1usize..30).prop_map(|(at, n)| Edit::Duplicate(at, n)),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| {
        if chars.is_empty() {
            0
        } else {
            i % (chars.len() + 1)
        }
    };
    let join = |parts: &[&[char]]| parts.iter().flat_map(|p| p.iter()).collect::<String>();
    match edit {
        Edit::Cut(i) => chars.iter().take(at(*i)).collect(),
        Edit::Delete(i, n) => {
            let start = at(*i);
            let end = (start + n).min(chars.len());
            join(&[
                chars.get(..start).unwrap_or(&[]),
                chars.get(end..).unwrap_or(&[]),
            ])
        }
        Edit::Insert(i, s) => {
            let start = at(*i);
            let ins: Vec<char> = s.chars().collect();
            join(&[
                chars.get(..start).unwrap_or(&[]),
                &ins,
                chars.get(start..).unwrap_or(&[]),
            ])
        }
        Edit::Duplicate(i, n) => {
            let start = at(*i);
            let end = (start + n).min(chars.len());
            let slice = chars.get(start..end).unwrap_or(&[]);
            join(&[
                chars.get(..end).unwrap_or(&[]),
                slice,
                chars.get(end..).unwrap_or(&[]),
            ])
        }
    }
}

/// 1000 cases per property in CI; `PROPTEST_CASES` sets more for a long run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
        check(&text)?;
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(prop::sample::select(TOKENS.to_vec()), 0..60)) {
        check(&tokens.concat())?;
    }

    #[test]
    fn mutated_real_replies_never_panic(index in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..5)) {
        let replies = replies();
        prop_assume!(!replies.is_empty());
        let mut text = index.get(&replies).clone();
        for e in &edits {
            text = apply(&text, e);
        }
        check(&text)?;
    }
}

#[test]
fn pathological_inputs_return() -> Result<(), TestCaseError> {
    let deep = format!("*FUNCTION*: Type *ARGS*: {}", "[".repeat(100_000));
    check(&deep)?;
    let many = "*FUNCTION*: Back *ARGS*: {}\n".repeat(2_000);
    check(&many)?;
    let boxes = "<|box_start|>".repeat(5_000);
    check(&boxes)?;
    let quotes = format!(
        "*FUNCTION*: Type *ARGS*: {{'text': '{}'}}",
        "it's ".repeat(5_000)
    );
    check(&quotes)?;
    Ok(())
}
