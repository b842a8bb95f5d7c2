//! Grounding tokens: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`,
//! bare boxes without a label, and the number runs inside point and box texts (`"(348,291)"`,
//! `"<point>348 291</point>"`, `"[1, 2, 3, 4]"`).
//!
//! A box of two equal corners is a point; a click on a box means its centre.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

const BOX_START: &str = "<|box_start|>";
const BOX_END: &str = "<|box_end|>";
const REF_START: &str = "<|object_ref_start|>";
const REF_END: &str = "<|object_ref_end|>";

/// A box the model drew, with the referring expression before it when there was one.
/// Coordinates are model space (`f64`) or environment pixels (`i32`) after mapping.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroundedBox<C = i32> {
    #[serde(rename = "ref")]
    pub label: Option<String>,
    pub x1: C,
    pub y1: C,
    pub x2: C,
    pub y2: C,
}

/// Why a box could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoxError {
    #[error("`<|box_start|>` is never closed by `<|box_end|>` (was the reply cut off?)")]
    Unclosed,
    #[error("a box needs two corners (x1,y1),(x2,y2) or one point (x,y), found {count} numbers")]
    Shape { count: usize },
}

/// The boxes found in a text, each with its byte span (label included), and the boxes that
/// could not be read with theirs.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Scan {
    pub boxes: Vec<(GroundedBox<f64>, Range<usize>)>,
    pub errors: Vec<(BoxError, Range<usize>)>,
}

/// Finds every `<|box_start|>…<|box_end|>` in `text`.
pub(crate) fn find_boxes(text: &str) -> Scan {
    let mut boxes = Vec::new();
    let mut errors = Vec::new();
    let mut pos = 0;
    while let Some(found) = text.get(pos..).and_then(|rest| rest.find(BOX_START)) {
        let start = pos + found;
        let content_start = start + BOX_START.len();
        let (label, span_start) = label_before(text, start);
        let Some(len) = text
            .get(content_start..)
            .and_then(|rest| rest.find(BOX_END))
        else {
            // No `<|box_end|>` anywhere after this: no later box can be closed either.
            let end = super::line_end(text, content_start);
            errors.push((BoxError::Unclosed, span_start..end));
            break;
        };
        let content = text.get(content_start..content_start + len).unwrap_or("");
        let end = content_start + len + BOX_END.len();
        match corners(content) {
            Ok([x1, y1, x2, y2]) => boxes.push((
                GroundedBox {
                    label,
                    x1,
                    y1,
                    x2,
                    y2,
                },
                span_start..end,
            )),
            Err(e) => errors.push((e, span_start..end)),
        }
        pos = end;
    }
    Scan { boxes, errors }
}

/// The `<|object_ref_start|>label<|object_ref_end|>` right before `box_start` (whitespace
/// allowed between), and where the whole grounded box starts.
fn label_before(text: &str, box_start: usize) -> (Option<String>, usize) {
    let before = text.get(..box_start).unwrap_or("").trim_end();
    let Some(without_end) = before.strip_suffix(REF_END) else {
        return (None, box_start);
    };
    match without_end.rfind(REF_START) {
        Some(at) => {
            let label = without_end.get(at + REF_START.len()..).unwrap_or("").trim();
            (Some(label.to_string()), at)
        }
        None => (None, box_start),
    }
}

/// The numbers in a point or box text, in order: `(176,106),(232,160)` gives four.
pub fn numbers_in(text: &str) -> Vec<f64> {
    static NUMBER: LazyLock<Regex> =
        LazyLock::new(|| super::pattern(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"));
    NUMBER
        .find_iter(text)
        .filter_map(|m| m.as_str().parse::<f64>().ok())
        .collect()
}

/// Two numbers are a point (a degenerate box), four are a box; anything else is an error.
pub fn corners(text: &str) -> Result<[f64; 4], BoxError> {
    corners_of(&numbers_in(text))
}

pub(crate) fn corners_of(numbers: &[f64]) -> Result<[f64; 4], BoxError> {
    match *numbers {
        [x, y] => Ok([x, y, x, y]),
        [x1, y1, x2, y2] => Ok([x1, y1, x2, y2]),
        _ => Err(BoxError::Shape {
            count: numbers.len(),
        }),
    }
}

/// The centre of a box, which is the point itself for a degenerate one.
pub fn centre([x1, y1, x2, y2]: [f64; 4]) -> (f64, f64) {
    ((x1 + x2) / 2.0, (y1 + y2) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_labelled_and_bare_boxes() {
        let text = "It is <|object_ref_start|>the eyes on a giraffe<|object_ref_end|><|box_start|>(176,106),(232,160)<|box_end|> and <|box_start|>(5,6)<|box_end|>";
        let Scan { boxes, errors } = find_boxes(text);
        assert!(errors.is_empty());
        assert_eq!(boxes.len(), 2);
        assert_eq!(boxes[0].0.label.as_deref(), Some("the eyes on a giraffe"));
        assert_eq!(
            [boxes[0].0.x1, boxes[0].0.y1, boxes[0].0.x2, boxes[0].0.y2],
            [176.0, 106.0, 232.0, 160.0]
        );
        assert_eq!(
            text.get(boxes[0].1.clone())
                .map(|s| s.starts_with(REF_START)),
            Some(true)
        );
        assert_eq!(boxes[1].0.label, None);
        assert_eq!([boxes[1].0.x1, boxes[1].0.x2], [5.0, 5.0]);
    }

    #[test]
    fn reports_unclosed_and_misshapen_boxes() {
        let Scan { boxes, errors } = find_boxes("<|box_start|>(1,2),(3,4)\nmore");
        assert!(boxes.is_empty());
        assert_eq!(errors, vec![(BoxError::Unclosed, 0..24)]);
        let errors = find_boxes("<|box_start|>(1,2,3)<|box_end|>").errors;
        assert_eq!(errors[0].0, BoxError::Shape { count: 3 });
    }

    #[test]
    fn reads_point_texts() {
        assert_eq!(numbers_in("<point>348 291</point>"), vec![348.0, 291.0]);
        assert_eq!(numbers_in("(12.5, -3)"), vec![12.5, -3.0]);
        assert_eq!(centre([10.0, 20.0, 30.0, 41.0]), (20.0, 30.5));
    }
}
