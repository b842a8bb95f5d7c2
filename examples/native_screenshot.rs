//! A native-resolution screenshot through a model with the real Qwen2-VL-2B shapes and random
//! weights: shows that a 1920×1080 step completes in f32 on a small CPU and reports its time and
//! peak memory. No download: the processor files come from a tokenizer folder.
//!
//! `cargo run --release --example native_screenshot -- TOKENIZER_DIR [WIDTHxHEIGHT] [f32|bf16]`
//! (TOKENIZER_DIR: e.g. tests/data/qwen2vl-tokenizer, built by scripts/build-qwen2vl-tokenizer.sh)

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use image::{Rgb, RgbImage};
use vlad::engine::config::{ModelConfig, QWEN2_VL_2B_CONFIG};
use vlad::engine::{GenerationOptions, LoadOptions, Message, Part, Prompt, Qwen2Vl};

/// A deterministic screenshot-like picture: title bar, sidebar, rows of text-like bars.
fn screenshot(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        if y < h / 18 {
            Rgb([40, 44, 52])
        } else if x < w / 6 {
            Rgb([225, 228, 232])
        } else if (y / 9) % 3 == 0 && ((x * 7 + y * 3) / 37) % 5 != 0 {
            Rgb([60, 60, (x % 200) as u8])
        } else {
            Rgb([245, 246, 248])
        }
    })
}

fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tokenizer_dir = args
        .next()
        .unwrap_or_else(|| "tests/data/qwen2vl-tokenizer".into());
    let size = args.next().unwrap_or_else(|| "1920x1080".into());
    let dtype = match args.next().as_deref() {
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        _ => DType::F32,
    };
    let (w, h) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("size must be WIDTHxHEIGHT, got {size}"))?;
    let config = ModelConfig::from_json_str(QWEN2_VL_2B_CONFIG, Path::new("qwen2-vl-2b.json"))?;
    let options = LoadOptions {
        dtype,
        max_pixels: Some(12_845_056),
        ..Default::default()
    };
    let start = Instant::now();
    let mut model = Qwen2Vl::with_random_weights(config, Path::new(&tokenizer_dir), &options)?;
    eprintln!(
        "built 2B-shaped model with random weights ({dtype:?}) in {:.1} s; RSS {:?}, peak {:?}",
        start.elapsed().as_secs_f64(),
        status_bytes("VmRSS:"),
        peak_rss_bytes()
    );
    let prompt = Prompt::new(vec![Message::parts(
        "user",
        vec![
            Part::Image(Arc::new(screenshot(w, h))),
            Part::Text("Where is the search box?".into()),
        ],
    )]);
    let prepared = model.prepare(&prompt)?;
    eprintln!(
        "{w}x{h}: grid {:?}, {} prompt tokens",
        prepared.image_grids(),
        prepared.input_ids.len()
    );
    let vision_start = Instant::now();
    model.encode_media(&prepared.images)?;
    eprintln!(
        "vision tower alone: {:.1} s; RSS {:?}, peak {:?}",
        vision_start.elapsed().as_secs_f64(),
        status_bytes("VmRSS:"),
        peak_rss_bytes()
    );
    let generation_options = GenerationOptions {
        max_new_tokens: 8,
        greedy: Some(true),
        ..Default::default()
    };
    let out = model.generate(&prompt, &generation_options, |_| {})?;
    println!(
        "{}",
        serde_json::json!({
            "size": size,
            "dtype": format!("{dtype:?}"),
            "grid_thw": out.image_grid_thw,
            "prompt_tokens": out.prompt_token_ids.len(),
            "vision_s": out.timings.vision_s,
            "prefill_s": out.timings.prefill_s,
            "decode_tokens_per_s": out.timings.decode_tokens_per_s,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
    Ok(())
}
