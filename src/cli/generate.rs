//! `vlad generate`: one completion from the embedded engine, streamed or as JSON.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use vlad::engine::{self, GenerationOptions, LoadOptions, Message, Part, Prompt, Qwen2Vl};

use super::{DeviceArg, DtypeArg};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A local Hugging Face model folder or a hub id.
    #[arg(long, default_value = engine::DEFAULT_MODEL)]
    model: String,
    /// A JSON list of {"role", "content"} messages; paths resolve against the file's folder.
    #[arg(long, conflicts_with_all = ["prompt", "image"])]
    messages: Option<PathBuf>,
    /// The user's text (with --image for images placed before it).
    #[arg(long, required_unless_present = "messages")]
    prompt: Option<String>,
    /// An image to show with --prompt (repeatable; in order).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Smallest image area in pixels after resizing (default: the checkpoint's).
    #[arg(long)]
    min_pixels: Option<u64>,
    /// Store the language model's linear layers quantized (q8_0 or q4k); the vision tower
    /// stays in --dtype.
    #[arg(long)]
    quantize: Option<vlad::engine::Quantization>,
    /// Largest image area in pixels after resizing (default: the checkpoint's).
    #[arg(long)]
    max_pixels: Option<u64>,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Print one JSON object on stdout instead of streaming the text.
    #[arg(long)]
    json: bool,
    /// Report the K largest logits at the first generated position (with --json).
    #[arg(long, default_value_t = 0)]
    top_logits: usize,
}

fn build_prompt(args: &GenerateArgs) -> anyhow::Result<Prompt> {
    if let Some(path) = &args.messages {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read messages file {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let base = path.parent().map(PathBuf::from).unwrap_or_default();
        return Prompt::from_json_messages(&value, &base)
            .with_context(|| format!("in {}", path.display()));
    }
    let mut parts = Vec::new();
    for path in &args.image {
        let img = engine::image::load_rgb(path)
            .with_context(|| format!("cannot load image {}", path.display()))?;
        parts.push(Part::Image(Arc::new(img)));
    }
    parts.push(Part::Text(args.prompt.clone().unwrap_or_default()));
    Ok(Prompt::new(vec![Message::parts("user", parts)]))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompt = build_prompt(&args)?;
    let device = args.device.open()?;
    let load = LoadOptions {
        dtype: args.dtype.resolve(&device),
        device,
        min_pixels: args.min_pixels,
        max_pixels: args.max_pixels,
        quantize: args.quantize,
    };
    let mut model = Qwen2Vl::load(&args.model, &load)
        .with_context(|| format!("cannot load model {}", args.model))?;
    let sampling_flags = args.temperature.is_some() || args.top_p.is_some() || args.top_k.is_some();
    let options = GenerationOptions {
        max_new_tokens: args.max_new_tokens,
        greedy: if args.greedy {
            Some(true)
        } else if sampling_flags {
            Some(false)
        } else {
            None
        },
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop_strings: args.stop.clone(),
        top_logits: args.top_logits,
        ignore_eos: false,
        reuse_cache: true,
        cancel: None,
    };
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let generation = model.generate(&prompt, &options, |text| {
        if stream {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if args.json {
        let out = json!({
            "prompt_token_ids": generation.prompt_token_ids,
            "token_ids": generation.token_ids,
            "text": generation.text,
            "image_grid_thw": generation.image_grid_thw,
            "video_grid_thw": generation.video_grid_thw,
            "top_logits": generation.top_logits.iter().map(|(id, v)| json!([id, v])).collect::<Vec<_>>(),
            "finish_reason": generation.finish_reason,
            "timings": generation.timings,
        });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}
