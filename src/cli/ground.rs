//! `vlad ground IMAGE "description"`: asks the model where something is on an image and prints
//! the box and the click point (JSON with `--json`); `--annotate OUT.png` draws them on a copy.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::run::{ModelArgs, open_model};

#[derive(Debug, Args)]
pub struct GroundArgs {
    /// The image: a screenshot (PNG, JPEG or WebP).
    image: PathBuf,
    /// What to find, in plain language, e.g. "the Save button".
    description: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object: label, box, point, image size and the model's reply.
    #[arg(long)]
    json: bool,
    /// Also write a copy of the image with the box and the point drawn on it (PNG).
    #[arg(long, value_name = "OUT.png")]
    annotate: Option<PathBuf>,
}

pub fn run(args: GroundArgs) -> anyhow::Result<()> {
    let image = image::open(&args.image)
        .with_context(|| {
            format!(
                "cannot read the image {} (give a PNG, JPEG or WebP file)",
                args.image.display()
            )
        })?
        .to_rgba8();
    let mut model = open_model(&args.model, None)?;
    let g = vlad::grounding::ground(model.as_mut(), &image, &args.description)?;
    if let Some(out) = &args.annotate {
        vlad::report::annotate::annotate(&image, g.bbox, g.point)
            .save_with_format(out, image::ImageFormat::Png)
            .with_context(|| format!("cannot write the annotated image to {}", out.display()))?;
    }
    let [x1, y1, x2, y2] = g.bbox;
    let (px, py) = g.point;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let value = json!({
            "label": g.label,
            "box": g.bbox,
            "point": [px, py],
            "image": {"width": image.width(), "height": image.height()},
            "reply": g.reply,
            "annotated": args.annotate,
        });
        writeln!(stdout, "{value}")?;
    } else {
        writeln!(stdout, "box: ({x1},{y1}),({x2},{y2})")?;
        writeln!(stdout, "point: ({px},{py})")?;
        if let Some(label) = &g.label {
            writeln!(stdout, "label: {label}")?;
        }
    }
    Ok(())
}
