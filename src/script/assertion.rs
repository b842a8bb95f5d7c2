//! Assertions: asking the model whether something is visible on a screenshot
//! (`prompts/assert.j2`) and reading its answer strictly — `yes` with exactly one box, or a
//! bare `no`. Anything else (no yes/no first, both words, a yes without a box, a no with one) is
//! ambiguous, and an ambiguous answer fails the step with the reply shown.

use std::sync::{Arc, LazyLock};

use image::RgbImage;
use minijinja::{Environment, UndefinedBehavior, context};

use crate::engine::{GenerationOptions, Message, Part, Prompt};
use crate::model::{Model, ModelError, StopReason};
use crate::protocol::coords::{CoordMap, CoordSpace, Size};
use crate::protocol::grounding as boxes;

const TEMPLATE: &str = include_str!("../../prompts/assert.j2");
const BOX_END: &str = "<|box_end|>";
/// Tokens allowed for the answer: "yes" and one box need far fewer.
const MAX_NEW_TOKENS: usize = 64;

/// What the model answered, read strictly.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub visible: bool,
    /// Where the model saw it, in screenshot pixels (only with `visible`).
    pub bbox: Option<[i32; 4]>,
}

/// Why an assertion could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum AssertError {
    #[error("cannot render prompts/assert.j2: {0}")]
    Prompt(#[from] minijinja::Error),
    #[error("the model failed: {0}")]
    Model(#[from] ModelError),
}

/// The request: the screenshot, then the rendered question.
pub fn prompt(screenshot: &RgbImage, description: &str) -> Result<Prompt, AssertError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_trim_blocks(true);
    env.add_template("assert.j2", TEMPLATE)?;
    let text = env
        .get_template("assert.j2")?
        .render(context! { description => description.trim() })?;
    Ok(Prompt::new(vec![Message::parts(
        "user",
        vec![
            Part::Image(Arc::new(screenshot.clone())),
            Part::Text(text.trim_end().to_string()),
        ],
    )]))
}

/// Asks `model` whether `description` is visible on `screenshot`; returns its raw reply (the
/// box end put back when generation stopped at it).
pub fn ask(
    model: &mut dyn Model,
    screenshot: &RgbImage,
    description: &str,
) -> Result<String, AssertError> {
    let request = prompt(screenshot, description)?;
    let options = GenerationOptions {
        max_new_tokens: MAX_NEW_TOKENS,
        greedy: Some(true),
        stop_strings: vec![BOX_END.to_string()],
        ..Default::default()
    };
    let completion = model.generate(&request, &options)?;
    let mut reply = completion.text;
    if completion.stop == StopReason::StopString(BOX_END.to_string()) {
        reply.push_str(BOX_END);
    }
    Ok(reply)
}

/// Reads an answer for a screenshot of `size`; `Err` says why it is ambiguous.
pub fn parse(reply: &str, size: Size) -> Result<Verdict, String> {
    static WORD: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"[A-Za-z]+").unwrap_or_else(|e| panic!("{e}")));
    let scan = boxes::find_boxes(reply);
    if let Some((e, _)) = scan.errors.first() {
        return Err(format!("its box cannot be read: {e}"));
    }
    // The words outside boxes and their labels.
    let mut text = String::with_capacity(reply.len());
    let mut pos = 0;
    for (_, span) in &scan.boxes {
        text.push_str(reply.get(pos..span.start).unwrap_or(""));
        text.push(' ');
        pos = span.end;
    }
    text.push_str(reply.get(pos..).unwrap_or(""));
    let words: Vec<String> = WORD
        .find_iter(&text)
        .map(|m| m.as_str().to_ascii_lowercase())
        .collect();
    let yes = words.iter().any(|w| w == "yes");
    let no = words.iter().any(|w| w == "no");
    let first = words.first().map(String::as_str);
    let visible = match (first, yes, no) {
        (Some("yes"), true, false) => true,
        (Some("no"), false, true) => false,
        (_, true, true) => return Err("it says both yes and no".into()),
        _ => return Err("it does not start with yes or no".into()),
    };
    let corners = match scan.boxes.as_slice() {
        [(b, _)] => Some([b.x1, b.y1, b.x2, b.y2]),
        [] => {
            // Servers may strip the special tokens and leave the numbers.
            let numbers = boxes::numbers_in(&text);
            match numbers.len() {
                0 => None,
                2 | 4 => boxes::corners(&text).ok(),
                n => return Err(format!("it holds {n} numbers, not one box")),
            }
        }
        many => return Err(format!("it gives {} boxes, not one", many.len())),
    };
    match (visible, corners) {
        (false, None) => Ok(Verdict {
            visible: false,
            bbox: None,
        }),
        (false, Some(_)) => Err("it says no but gives a box".into()),
        (true, None) => Err("it says yes but gives no box of what it saw".into()),
        (true, Some([x1, y1, x2, y2])) => {
            let map = CoordMap::onto_screen(CoordSpace::Relative1000, size)
                .map_err(|e| format!("the screenshot cannot be mapped: {e}"))?;
            let outside = |e| format!("its box lies outside the image: {e}");
            let (ax, ay) = map.map_point(x1.min(x2), y1.min(y2)).map_err(outside)?;
            let (bx, by) = map.map_point(x1.max(x2), y1.max(y2)).map_err(outside)?;
            Ok(Verdict {
                visible: true,
                bbox: Some([ax, ay, bx, by]),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: Size = Size {
        width: 1000,
        height: 500,
    };

    #[test]
    fn clear_answers_are_read() {
        assert_eq!(
            parse("yes <|box_start|>(100,200),(300,400)<|box_end|>", SIZE),
            Ok(Verdict {
                visible: true,
                bbox: Some([100, 100, 300, 200])
            })
        );
        assert_eq!(
            parse("Yes. <|object_ref_start|>no entry sign<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|>", SIZE)
                .map(|v| v.visible),
            Ok(true)
        );
        assert_eq!(
            parse("No.", SIZE),
            Ok(Verdict {
                visible: false,
                bbox: None
            })
        );
        assert_eq!(
            parse("yes (100,200),(300,400)", SIZE).map(|v| v.bbox),
            Ok(Some([100, 100, 300, 200]))
        );
    }

    #[test]
    fn ambiguous_answers_are_errors() {
        for reply in [
            "",
            "maybe",
            "I think yes <|box_start|>(1,2),(3,4)<|box_end|>",
            "yes or no",
            "yes",
            "no <|box_start|>(1,2),(3,4)<|box_end|>",
            "yes <|box_start|>(1,2),(3,4)<|box_end|> <|box_start|>(5,6),(7,8)<|box_end|>",
            "yes <|box_start|>(1,2),(3,4000)<|box_end|>",
            "yes <|box_start|>(1,2,3)<|box_end|>",
            "yes (1,2,3)",
        ] {
            assert!(parse(reply, SIZE).is_err(), "{reply:?} was read as clear");
        }
    }

    #[test]
    fn the_prompt_holds_the_image_and_the_question() -> Result<(), AssertError> {
        let img = RgbImage::new(8, 6);
        let p = prompt(&img, "  \"Welcome, Ana\" ")?;
        let crate::engine::Content::Parts(parts) = &p.messages[0].content else {
            panic!("parts expected");
        };
        assert!(matches!(&parts[0], Part::Image(i) if i.dimensions() == (8, 6)));
        assert!(
            matches!(&parts[1], Part::Text(t) if t.contains("visible on it: \"Welcome, Ana\"\n"))
        );
        Ok(())
    }
}
