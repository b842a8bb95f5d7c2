//! Library use of the embedded engine: describe an image.
//!
//! `cargo run --release --example describe_image -- MODEL_DIR_OR_HUB_ID image.png`

use std::sync::Arc;

use vlad::engine::{GenerationOptions, LoadOptions, Message, Part, Prompt, Qwen2Vl, image};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(path)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: describe_image MODEL_DIR_OR_HUB_ID IMAGE");
    };
    let mut model = Qwen2Vl::load(&model, &LoadOptions::default())?;
    let picture = image::load_rgb(std::path::Path::new(&path))?;
    let prompt = Prompt::new(vec![Message::parts(
        "user",
        vec![
            Part::Image(Arc::new(picture)),
            Part::Text("Describe this image.".into()),
        ],
    )]);
    let options = GenerationOptions {
        max_new_tokens: 128,
        ..Default::default()
    };
    model.generate(&prompt, &options, |text| print!("{text}"))?;
    println!();
    Ok(())
}
