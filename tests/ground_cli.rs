//! `vlad ground IMAGE "description"` with recorded model replies: the box and click point in
//! image pixels (plain and `--json`), `--annotate` drawing them in the marker colours (checked
//! pixel by pixel against the input image), and replies without a box failing with the reply.

#[path = "support/cli.rs"]
mod cli;

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::Result;
use cli::{replies_file, text, vlad};
use image::{Rgb, RgbImage};
use vlad::report::annotate::{BOX_COLOR, POINT_COLOR};

/// A 400x300 screen with a green 120x50 button at (140, 200).
fn screen(dir: &Path) -> Result<PathBuf> {
    let mut img = RgbImage::from_pixel(400, 300, Rgb([240, 240, 240]));
    for y in 200..250 {
        for x in 140..260 {
            img.put_pixel(x, y, Rgb([60, 180, 75]));
        }
    }
    let path = dir.join("screen.png");
    img.save(&path)?;
    Ok(path)
}

/// `vlad ground IMAGE DESCRIPTION --backend replay --replies REPLIES EXTRA…`.
fn ground(image: &Path, description: &str, replies: &Path, extra: &[&str]) -> Result<Output> {
    let mut args = vec![
        "ground",
        image.to_str().unwrap_or_default(),
        description,
        "--backend",
        "replay",
        "--replies",
        replies.to_str().unwrap_or_default(),
    ];
    args.extend_from_slice(extra);
    vlad(&args)
}

// The button in 0-1000 of a 400x300 image: (140,200)-(260,250) -> (350,667)-(650,833).
const REPLY: &str = "<|object_ref_start|>the green button<|object_ref_end|><|box_start|>(350,667),(650,833)<|box_end|>";

#[test]
fn prints_the_box_and_point_and_draws_them() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let image = screen(tmp.path())?;
    let replies = replies_file(tmp.path(), &[REPLY])?;
    let annotated = tmp.path().join("annotated.png");
    let out = ground(
        &image,
        "the green button",
        &replies,
        &[
            "--json",
            "--annotate",
            annotated.to_str().unwrap_or_default(),
        ],
    )?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["box"], serde_json::json!([140, 200, 260, 250]), "{v}");
    assert_eq!(v["point"], serde_json::json!([200, 225]), "{v}");
    assert_eq!(v["label"], "the green button");
    assert_eq!(v["image"], serde_json::json!({"width": 400, "height": 300}));

    // The annotated copy: marker colours on the box edges and at the point, the rest untouched.
    let input = image::open(&image)?.to_rgb8();
    let drawn = image::open(&annotated)?.to_rgb8();
    assert_eq!(drawn.dimensions(), (400, 300));
    let at = |x: u32, y: u32| drawn.get_pixel(x, y).0;
    for (x, y) in [(140, 225), (260, 225), (200, 200), (200, 250), (140, 200)] {
        assert_eq!(at(x, y), BOX_COLOR, "box edge at ({x}, {y})");
    }
    assert_eq!(at(200, 225), POINT_COLOR, "click point");
    let mut changed = 0;
    for (x, y, p) in drawn.enumerate_pixels() {
        if p != input.get_pixel(x, y) {
            changed += 1;
            let near_edge = (x as i32 - 140).abs() <= 1
                || (x as i32 - 260).abs() <= 1
                || (y as i32 - 200).abs() <= 1
                || (y as i32 - 250).abs() <= 1;
            let near_point = (x as i32 - 200).pow(2) + (y as i32 - 225).pow(2) <= 49;
            assert!(near_edge || near_point, "pixel ({x}, {y}) changed");
        }
    }
    assert!(changed > 500, "only {changed} pixels drawn");

    // Without --json: the same numbers for people.
    let out = ground(&image, "the green button", &replies, &[])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "box: (140,200),(260,250)\npoint: (200,225)\nlabel: the green button\n"
    );
    Ok(())
}

#[test]
fn replies_without_a_box_and_bad_images_are_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let image = screen(tmp.path())?;
    let replies = replies_file(tmp.path(), &["There is no such button."])?;
    let annotated = tmp.path().join("annotated.png");
    let out = ground(
        &image,
        "the red button",
        &replies,
        &["--annotate", annotated.to_str().unwrap_or_default()],
    )?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no box") && stderr.contains("There is no such button."),
        "{stderr}"
    );
    assert!(!annotated.exists(), "nothing is drawn without a box");

    let missing = tmp.path().join("missing.png");
    let out = ground(&missing, "x", &replies, &[])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read the image"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
