//! Reports: one self-contained HTML page per trajectory folder ([`render_report`]) — every
//! step's screenshot with the model's boxes and the points it acted on drawn over it, the
//! thought, the actions and what became of them, timings and errors — and the drawing helper
//! ([`annotate`]) that `vlad ground --annotate` shares with it.
//!
//! The page needs nothing but itself: screenshots are embedded as `data:` URLs, CSS and the
//! keyboard navigation (←/→ or j/k, Home/End) are inline, nothing is fetched. Markers are SVG
//! drawn in screenshot pixels: `rect.box` for boxes, `circle.point` for points, each with a
//! stable id (`step-N-box-K`, `step-N-point-K`).

pub mod annotate;

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, context};
use serde::Serialize;

use crate::action::Action;
use crate::agent::trajectory::{self, StepRecord, StepTimings, Trajectory};
use crate::agent::{AgentError, Decision};
use crate::environment::Outcome;
use crate::protocol::{CoordMap, ModelFamily, Protocol, Size};

const TEMPLATE: &str = include_str!("report.html.j2");

/// Why no report could be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "{} is not a trajectory folder ({source}); give the folder `vlad run --trace` or `vlad test` wrote",
        dir.display()
    )]
    Trajectory { dir: PathBuf, source: AgentError },
    #[error("the report template failed to render: {0}")]
    Template(#[from] minijinja::Error),
}

/// An image embedded in the page.
#[derive(Debug, Serialize)]
struct ImageView {
    /// `data:<mime>;base64,<data>`: nothing in it needs escaping (the template marks it safe).
    data_url: String,
    width: u32,
    height: u32,
}

#[derive(Debug, Serialize)]
struct BoxView {
    id: String,
    label: Option<String>,
    x: i32,
    y: i32,
    width: i32,
    height: i32,
}

#[derive(Debug, Serialize)]
struct PointView {
    id: String,
    /// The action's tag (`click`, `drag`, …).
    action: String,
    x: i32,
    y: i32,
    /// Where a drag or swipe ends.
    to: Option<(i32, i32)>,
}

#[derive(Debug, Serialize)]
struct ActionView {
    function: String,
    text: String,
    json: String,
    decision: String,
    outcome: String,
    ok: bool,
    perform_s: f64,
}

#[derive(Debug, Serialize)]
struct StepView {
    step: usize,
    id: String,
    image: Option<ImageView>,
    /// Why the screenshot is missing, when it is.
    image_note: Option<String>,
    after: Option<ImageView>,
    boxes: Vec<BoxView>,
    points: Vec<PointView>,
    thought: Option<String>,
    reply: Option<String>,
    answer: Option<String>,
    result: Option<String>,
    actions: Vec<ActionView>,
    errors: Vec<String>,
    timings: StepTimings,
    images_sent: usize,
}

/// Renders the report of the trajectory in `dir` as one HTML page.
pub fn render_report(dir: &Path) -> Result<String, ReportError> {
    let t = trajectory::read(dir).map_err(|source| ReportError::Trajectory {
        dir: dir.to_path_buf(),
        source,
    })?;
    render_trajectory(&t)
}

/// Renders an already loaded trajectory.
pub fn render_trajectory(t: &Trajectory) -> Result<String, ReportError> {
    let family = family_of(t.profile_toml.as_deref());
    let steps: Vec<StepView> = t.steps.iter().map(|s| step_view(t, s, family)).collect();
    let (status, ending) = match &t.result {
        Some(r) => (
            r.status.describe(),
            serde_json::to_value(r.status.ending())
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        ),
        None => (
            "did not end (still running, or killed)".to_string(),
            "unfinished".to_string(),
        ),
    };
    let final_image = t
        .result
        .as_ref()
        .and_then(|r| r.final_screenshot.as_deref())
        .and_then(|rel| embed(&t.dir, rel).ok());
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_template("report.html", TEMPLATE)?;
    let html = env.get_template("report.html")?.render(context! {
        meta => &t.meta,
        status,
        ending,
        elapsed_s => t.result.as_ref().map(|r| r.elapsed_s),
        torn => t.torn,
        steps,
        final_image,
        box_color => annotate::css(annotate::BOX_COLOR),
        point_color => annotate::css(annotate::POINT_COLOR),
        ring_color => annotate::css(annotate::RING_COLOR),
        box_stroke => annotate::BOX_STROKE,
        point_radius => annotate::POINT_RADIUS,
    })?;
    Ok(html)
}

/// The model family a trajectory's profile names (its boxes are in that family's space).
fn family_of(profile_toml: Option<&str>) -> ModelFamily {
    profile_toml
        .and_then(|text| toml::from_str::<toml::Table>(text).ok())
        .and_then(|table| table.get("family").cloned())
        .and_then(|v| v.try_into::<ModelFamily>().ok())
        .unwrap_or_default()
}

/// A screenshot path from a record, kept inside the run folder.
fn inside(dir: &Path, relative: &str) -> Option<PathBuf> {
    let rel = Path::new(relative);
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| dir.join(rel))
}

fn embed(dir: &Path, relative: &str) -> Result<ImageView, String> {
    let path = inside(dir, relative)
        .ok_or_else(|| format!("{relative}: not a path inside the run folder"))?;
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {relative}: {e}"))?;
    let format =
        image::guess_format(&bytes).map_err(|e| format!("{relative} is not an image: {e}"))?;
    let mime = match format {
        image::ImageFormat::Png => "image/png",
        image::ImageFormat::Jpeg => "image/jpeg",
        image::ImageFormat::WebP => "image/webp",
        other => return Err(format!("{relative}: {other:?} images are not embedded")),
    };
    let (width, height) = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format)
        .into_dimensions()
        .map_err(|e| format!("{relative} is not a readable image: {e}"))?;
    let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(ImageView {
        data_url: format!("data:{mime};base64,{data}"),
        width,
        height,
    })
}

/// The boxes in the free text of a reply, in screenshot pixels.
fn reply_boxes(reply: &str, family: ModelFamily, screen: Size) -> Vec<(Option<String>, [i32; 4])> {
    let model_image = match family {
        ModelFamily::Qwen2Vl => screen,
        _ => crate::engine::image::smart_resize(
            screen.height,
            screen.width,
            28,
            56 * 56,
            28 * 28 * 16384,
        )
        .map_or(screen, |(h, w)| Size::new(w, h)),
    };
    let Ok(map) = CoordMap::new(family.coord_space(model_image), screen, 1.0, (0, 0)) else {
        return Vec::new();
    };
    let parsed = Protocol::new(family).parse(reply).map(&map);
    parsed
        .boxes
        .into_iter()
        .map(|b| (b.item.label, [b.item.x1, b.item.y1, b.item.x2, b.item.y2]))
        .collect()
}

/// Where an action acts, and where it ends for drags and swipes.
type Points = ((i32, i32), Option<(i32, i32)>);

/// The points an action acts on.
fn action_points(action: &Action) -> Option<Points> {
    match *action {
        Action::Click { x, y }
        | Action::DoubleClick { x, y }
        | Action::RightClick { x, y }
        | Action::LongPress { x, y, .. }
        | Action::Scroll { x, y, .. } => Some(((x, y), None)),
        Action::Drag {
            x, y, to_x, to_y, ..
        }
        | Action::Swipe {
            x, y, to_x, to_y, ..
        } => Some(((x, y), Some((to_x, to_y)))),
        _ => None,
    }
}

fn decision_text(d: &Decision) -> String {
    match d {
        Decision::Perform => "performed".into(),
        Decision::DryRun => "dry run: not performed".into(),
        Decision::Denied { reason } => format!("denied: {reason}"),
        Decision::Declined { reason } => format!("declined: {reason}"),
        Decision::Skipped { reason } => format!("skipped: {reason}"),
        Decision::Agent => "handled by the agent".into(),
    }
}

fn step_view(t: &Trajectory, s: &StepRecord, family: ModelFamily) -> StepView {
    let id = format!("step-{}", s.step);
    let (image, image_note) = if s.screenshot.is_empty() {
        (None, Some("none was taken".to_string()))
    } else {
        match embed(&t.dir, &s.screenshot) {
            Ok(img) => (Some(img), None),
            Err(note) => (None, Some(note)),
        }
    };
    let after = s
        .screenshot_after
        .as_deref()
        .and_then(|rel| embed(&t.dir, rel).ok());
    let screen = match &image {
        Some(img) => Size::new(img.width, img.height),
        None => Size::new(s.screen_width.max(1), s.screen_height.max(1)),
    };
    let boxes = s
        .reply
        .as_deref()
        .map(|r| reply_boxes(r, family, screen))
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(k, (label, [x1, y1, x2, y2]))| BoxView {
            id: format!("{id}-box-{}", k + 1),
            label,
            x: x1.min(x2),
            y: y1.min(y2),
            width: (x2 - x1).abs(),
            height: (y2 - y1).abs(),
        })
        .collect();
    let points = s
        .actions
        .iter()
        .filter_map(|a| action_points(&a.action).map(|p| (a.action.tag(), p)))
        .enumerate()
        .map(|(k, (tag, ((x, y), to)))| PointView {
            id: format!("{id}-point-{}", k + 1),
            action: tag.to_string(),
            x,
            y,
            to,
        })
        .collect();
    let actions = s
        .actions
        .iter()
        .map(|a| {
            let (outcome, ok) = match &a.outcome {
                Some(Outcome::Done) => ("done".to_string(), true),
                Some(Outcome::Failed { reason }) => (format!("failed: {reason}"), false),
                Some(Outcome::Refused { reason }) => (format!("refused: {reason}"), false),
                None => (
                    String::new(),
                    !matches!(a.decision, Decision::Denied { .. }),
                ),
            };
            ActionView {
                function: a.function.clone(),
                text: a.text.clone(),
                json: serde_json::to_string(&a.action).unwrap_or_default(),
                decision: decision_text(&a.decision),
                outcome,
                ok,
                perform_s: a.perform_s,
            }
        })
        .collect();
    StepView {
        step: s.step,
        id,
        image,
        image_note,
        after,
        boxes,
        points,
        thought: s.thought.clone(),
        reply: s.reply.clone(),
        answer: s.answer.clone(),
        result: s.result.clone(),
        actions,
        errors: s.errors.clone(),
        timings: s.timings.clone(),
        images_sent: s.prompt.images,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_run_folder_are_not_read() {
        let dir = Path::new("run");
        assert!(inside(dir, "screenshots/0000.png").is_some());
        assert!(inside(dir, "../secret.png").is_none());
        assert!(inside(dir, "/etc/passwd").is_none());
    }

    #[test]
    fn qwen2vl_boxes_map_from_thousandths_to_pixels() {
        let reply =
            "<|object_ref_start|>Save<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>";
        let boxes = reply_boxes(reply, ModelFamily::Qwen2Vl, Size::new(1000, 500));
        assert_eq!(
            boxes,
            vec![(Some("Save".to_string()), [100, 100, 300, 200])]
        );
    }

    #[test]
    fn the_family_comes_from_the_profile() {
        assert_eq!(
            family_of(Some("family = \"uitars\"\n")),
            ModelFamily::UiTars
        );
        assert_eq!(family_of(Some("name = \"x\"\n")), ModelFamily::Qwen2Vl);
        assert_eq!(family_of(None), ModelFamily::Qwen2Vl);
    }
}
