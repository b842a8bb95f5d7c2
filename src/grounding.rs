//! Grounding: ask the model where something is on a screenshot and get it back in screenshot
//! pixels — a box and its centre as the point to click.
//!
//! The request is the `grounding` prompt of `prompts/` (Qwen2-VL's grounding format: the model
//! answers `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
//! with coordinates 0–1000 of the image). The first box of the reply counts; a box of two equal
//! corners (`(x,y)`) is a point. Servers that strip the special tokens leave only the number
//! run, which is read as well when it is exactly one point or one box.

use std::sync::Arc;

use image::{DynamicImage, RgbImage, RgbaImage};
use serde::Serialize;

use crate::engine::{GenerationOptions, Message, Part, Prompt};
use crate::model::{Model, ModelError, StopReason};
use crate::protocol::coords::{CoordError, CoordMap, CoordSpace, Size};
use crate::protocol::grounding::{self as boxes, BoxError};
use crate::protocol::render::{PromptContext, PromptKind, Prompts, RenderError};

/// Where the model's box ends; generation stops right after it.
const BOX_END: &str = "<|box_end|>";
/// Where a referring expression ends; a bare number run is read after it.
const REF_END: &str = "<|object_ref_end|>";
/// Tokens allowed for the reply: a label and one box need far fewer.
const MAX_NEW_TOKENS: usize = 128;

/// A thing the model located on a screenshot, in screenshot pixels.
#[derive(Debug, Clone, Serialize)]
pub struct Grounding {
    /// The model's name for what it found, when it gave one.
    pub label: Option<String>,
    /// x1, y1, x2, y2 in screenshot pixels (equal corners for a point).
    pub bbox: [i32; 4],
    /// The click point: the centre of the box.
    pub point: (i32, i32),
    /// The model's raw text.
    pub reply: String,
}

/// Why nothing was located.
#[derive(Debug, thiserror::Error)]
pub enum GroundingError {
    #[error(
        "nothing to look for: the description is empty; say what to find, e.g. \"the OK button\""
    )]
    EmptyDescription,
    #[error("the screenshot is empty ({width}x{height} pixels)")]
    EmptyImage { width: u32, height: u32 },
    #[error("cannot render the grounding prompt: {0}")]
    Prompt(#[from] RenderError),
    #[error("the model failed: {0}")]
    Model(#[from] ModelError),
    #[error(
        "the model's reply has no box (expected <|box_start|>(x1,y1),(x2,y2)<|box_end|>); it said: {reply:?}"
    )]
    NoBox { reply: String },
    #[error("the model's box cannot be read ({error}); it said: {reply:?}")]
    BadBox { error: BoxError, reply: String },
    #[error("the model's box lies outside the image ({error}); it said: {reply:?}")]
    OutsideImage { error: CoordError, reply: String },
}

/// Asks `model` where `description` is on `screenshot` (greedy, a small token budget, stopping
/// after the first box) and maps the box from 0–1000 into the screenshot's pixels.
pub fn ground(
    model: &mut dyn Model,
    screenshot: &RgbaImage,
    description: &str,
) -> Result<Grounding, GroundingError> {
    let description = description.trim();
    if description.is_empty() {
        return Err(GroundingError::EmptyDescription);
    }
    let (width, height) = screenshot.dimensions();
    if width == 0 || height == 0 {
        return Err(GroundingError::EmptyImage { width, height });
    }
    let prompt = grounding_prompt(
        DynamicImage::ImageRgba8(screenshot.clone()).to_rgb8(),
        description,
    )?;
    let options = GenerationOptions {
        max_new_tokens: MAX_NEW_TOKENS,
        greedy: Some(true),
        stop_strings: vec![BOX_END.to_string()],
        ..Default::default()
    };
    let completion = model.generate(&prompt, &options)?;
    // The stop string is cut from the text; put it back so the box reads as closed.
    let mut reply = completion.text;
    if completion.stop == StopReason::StopString(BOX_END.to_string()) {
        reply.push_str(BOX_END);
    }
    locate(reply, Size::new(width, height))
}

/// The request: the screenshot, then the rendered `grounding` prompt with the description.
fn grounding_prompt(image: RgbImage, description: &str) -> Result<Prompt, GroundingError> {
    let prompts = Prompts::builtin()?;
    let text = prompts.system_prompt(
        PromptKind::Grounding,
        &PromptContext {
            query: Some(description.to_string()),
            ..Default::default()
        },
    )?;
    Ok(Prompt::new(vec![Message::parts(
        "user",
        vec![Part::Image(Arc::new(image)), Part::Text(text)],
    )]))
}

/// The first box of `reply`, mapped onto a screenshot of `size`.
fn locate(reply: String, size: Size) -> Result<Grounding, GroundingError> {
    let scan = boxes::find_boxes(&reply);
    let (label, corners) = match scan.boxes.first() {
        Some((b, _)) => (b.label.clone(), [b.x1, b.y1, b.x2, b.y2]),
        None => {
            if let Some((error, _)) = scan.errors.first() {
                return Err(GroundingError::BadBox {
                    error: error.clone(),
                    reply,
                });
            }
            // No box tokens at all: the special tokens may have been stripped by a server.
            let after_label = reply.rsplit(REF_END).next().unwrap_or(&reply);
            let numbers = boxes::numbers_in(after_label);
            if numbers.is_empty() {
                return Err(GroundingError::NoBox { reply });
            }
            match boxes::corners_of(&numbers) {
                Ok(corners) => (None, corners),
                Err(error) => return Err(GroundingError::BadBox { error, reply }),
            }
        }
    };
    let outside = |error| GroundingError::OutsideImage {
        error,
        reply: reply.clone(),
    };
    let map = CoordMap::onto_screen(CoordSpace::Relative1000, size).map_err(outside)?;
    let [x1, y1, x2, y2] = corners;
    let (ax, ay) = map.map_point(x1.min(x2), y1.min(y2)).map_err(outside)?;
    let (bx, by) = map.map_point(x1.max(x2), y1.max(y2)).map_err(outside)?;
    let (cx, cy) = boxes::centre(corners);
    let point = map.map_point(cx, cy).map_err(outside)?;
    Ok(Grounding {
        label,
        bbox: [ax, ay, bx, by],
        point,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Content;
    use crate::model::{Completion, ReplayModel};

    fn screenshot(width: u32, height: u32) -> RgbaImage {
        RgbaImage::from_pixel(width, height, image::Rgba([10, 20, 30, 255]))
    }

    fn replay(reply: &str) -> ReplayModel {
        ReplayModel::from_replies("replies.jsonl", vec![reply.to_string()])
    }

    #[test]
    fn a_labelled_box_maps_to_pixels() -> Result<(), GroundingError> {
        let mut model = replay(
            "<|object_ref_start|>the OK button<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|> and more text",
        );
        let g = ground(&mut model, &screenshot(1000, 500), "the OK button")?;
        assert_eq!(g.label.as_deref(), Some("the OK button"));
        assert_eq!(g.bbox, [100, 100, 300, 200]);
        assert_eq!(g.point, (200, 150));
        // The replay backend cut the text at the stop string; the box end is put back.
        assert!(g.reply.ends_with(BOX_END));
        assert!(!g.reply.contains("more text"));
        Ok(())
    }

    #[test]
    fn a_point_reply_is_a_degenerate_box() -> Result<(), GroundingError> {
        let mut model = replay("<|box_start|>(500,250)<|box_end|>");
        let g = ground(&mut model, &screenshot(640, 480), "the clock")?;
        assert_eq!(g.label, None);
        assert_eq!(g.bbox, [320, 120, 320, 120]);
        assert_eq!(g.point, (320, 120));
        Ok(())
    }

    #[test]
    fn stripped_special_tokens_still_read() -> Result<(), GroundingError> {
        let mut model = replay("the OK button(100,200),(300,400)");
        let g = ground(&mut model, &screenshot(1000, 1000), "the OK button")?;
        assert_eq!(g.bbox, [100, 200, 300, 400]);
        Ok(())
    }

    #[test]
    fn no_box_is_an_error_with_the_reply() {
        let mut model = replay("I do not see any button here.");
        let err = ground(&mut model, &screenshot(100, 100), "the OK button");
        match err {
            Err(GroundingError::NoBox { reply }) => {
                assert_eq!(reply, "I do not see any button here.")
            }
            other => panic!("expected NoBox, got {other:?}"),
        }
    }

    #[test]
    fn out_of_range_and_misshapen_boxes_are_errors() {
        let mut model = replay("<|box_start|>(100,200),(1300,400)<|box_end|>");
        let err = ground(&mut model, &screenshot(100, 100), "x");
        assert!(
            matches!(err, Err(GroundingError::OutsideImage { ref reply, .. }) if reply.contains("1300")),
            "{err:?}"
        );
        let mut model = replay("<|box_start|>(1,2,3)<|box_end|>");
        let err = ground(&mut model, &screenshot(100, 100), "x");
        assert!(
            matches!(
                err,
                Err(GroundingError::BadBox {
                    error: BoxError::Shape { count: 3 },
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn bad_input_and_model_failures_are_errors() {
        let mut model = replay("<|box_start|>(1,2)<|box_end|>");
        assert!(matches!(
            ground(&mut model, &screenshot(10, 10), "  "),
            Err(GroundingError::EmptyDescription)
        ));
        assert!(matches!(
            ground(&mut model, &screenshot(0, 10), "x"),
            Err(GroundingError::EmptyImage { .. })
        ));
        let mut empty = ReplayModel::from_replies("none.jsonl", Vec::new());
        assert!(matches!(
            ground(&mut empty, &screenshot(10, 10), "x"),
            Err(GroundingError::Model(_))
        ));
    }

    /// Records the prompt and options it was asked with.
    struct Recorder {
        prompt: Option<Prompt>,
        options: Option<GenerationOptions>,
    }

    impl Model for Recorder {
        fn generate(
            &mut self,
            prompt: &Prompt,
            options: &GenerationOptions,
        ) -> crate::model::Result<Completion> {
            self.prompt = Some(prompt.clone());
            self.options = Some(options.clone());
            Ok(Completion {
                text: "<|box_start|>(0,0),(1000,1000)".to_string(),
                stop: StopReason::StopString(BOX_END.to_string()),
                tokens: None,
                timings: serde_json::Value::Null,
            })
        }

        fn name(&self) -> String {
            "recorder".to_string()
        }
    }

    #[test]
    fn the_request_holds_the_image_and_the_description() -> Result<(), GroundingError> {
        let mut model = Recorder {
            prompt: None,
            options: None,
        };
        let g = ground(&mut model, &screenshot(64, 32), "the red square")?;
        assert_eq!(g.bbox, [0, 0, 63, 31]);
        assert_eq!(g.point, (32, 16));
        let options = model.options.as_ref().map(|o| {
            (
                o.greedy,
                o.max_new_tokens <= MAX_NEW_TOKENS,
                o.stop_strings.clone(),
            )
        });
        assert_eq!(options, Some((Some(true), true, vec![BOX_END.to_string()])));
        let prompt = model.prompt.expect("the model was asked");
        assert_eq!(prompt.messages.len(), 1);
        let Content::Parts(parts) = &prompt.messages[0].content else {
            panic!("the user turn should have parts");
        };
        assert!(matches!(&parts[0], Part::Image(img) if img.dimensions() == (64, 32)));
        assert!(matches!(
            &parts[1],
            Part::Text(t) if t.contains("<|object_ref_start|>the red square<|object_ref_end|>")
        ));
        Ok(())
    }
}
