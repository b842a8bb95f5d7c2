//! Speed and memory measurement of one agent step: a synthetic screenshot at native resolution
//! through the vision tower, the prefill of the whole prompt, and a fixed number of decode steps.
//! `vlad bench` prints these rows; `scripts/bench-vs-reference.sh` compares them with the
//! reference implementation measured in the same run.

use std::sync::Arc;
use std::time::Instant;

use image::{Rgb, RgbImage};
use serde::Serialize;

use super::error::{EngineError, Result};
use super::{GenerationOptions, Message, Part, Prompt, Qwen2Vl};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Screenshot sizes (width, height).
    pub sizes: Vec<(u32, u32)>,
    /// Decode steps timed after the prefill.
    pub decode_tokens: usize,
    /// Timed runs per size after one warm-up run (medians are reported); 0 = the warm-up only.
    pub runs: usize,
}

/// One size's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub size: String,
    pub grid_thw: [usize; 3],
    pub image_tokens: usize,
    pub prompt_tokens: usize,
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_tokens_per_s: f64,
    /// Vision + prefill + 64 decode tokens, the shape of one agent step.
    pub step_s: f64,
    /// Peak resident memory of this process so far (Linux; `None` elsewhere).
    pub peak_rss_bytes: Option<u64>,
    pub timed_runs: usize,
}

/// A deterministic screenshot-like picture: title bar, sidebar, rows of text-like bars, buttons.
pub fn synthetic_screenshot(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let bar = height / 18;
        if y < bar {
            Rgb([40, 44, 52])
        } else if x < width / 6 {
            if (y / 24) % 2 == 0 && x > 12 && x < width / 6 - 12 {
                Rgb([200, 204, 210])
            } else {
                Rgb([225, 228, 232])
            }
        } else if (y / 9) % 3 == 0 && ((x * 7 + y * 3) / 37) % 5 != 0 {
            Rgb([(40 + x % 50) as u8, 60, (x % 200) as u8])
        } else if (x / 120) % 6 == 5 && (y / 40) % 5 == 4 {
            Rgb([30, 120, 220])
        } else {
            Rgb([245, 246, 248])
        }
    })
}

/// Peak resident set size of this process (`VmHWM`), on Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Measures every size; `on_row` sees each row as soon as it is done.
pub fn run(
    model: &mut Qwen2Vl,
    options: &BenchOptions,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    if options.decode_tokens == 0 {
        return Err(EngineError::Option(
            "--decode-tokens must be at least 1".into(),
        ));
    }
    let mut rows = Vec::new();
    for &(w, h) in &options.sizes {
        let prompt = Prompt::new(vec![Message::parts(
            "user",
            vec![
                Part::Image(Arc::new(synthetic_screenshot(w, h))),
                Part::Text("Where is the search box? Answer with a point.".into()),
            ],
        )]);
        let generation = GenerationOptions {
            max_new_tokens: options.decode_tokens + 1,
            greedy: Some(true),
            ignore_eos: true,
            // every run must pay for the whole prompt
            reuse_cache: false,
            ..Default::default()
        };
        let (mut vision, mut prefill, mut decode) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = None;
        for run in 0..=options.runs {
            let start = Instant::now();
            let out = model.generate(&prompt, &generation, |_| {})?;
            tracing::info!(size = %format!("{w}x{h}"), run, seconds = start.elapsed().as_secs_f64(), "bench run");
            if run > 0 || options.runs == 0 {
                vision.push(out.timings.vision_s);
                prefill.push(out.timings.prefill_s);
                decode.push(out.timings.decode_tokens_per_s);
            }
            last = Some(out);
        }
        let Some(out) = last else { continue };
        let grid = out.image_grid_thw.first().copied().unwrap_or([0, 0, 0]);
        let (vision_s, prefill_s, rate) = (median(vision), median(prefill), median(decode));
        let row = BenchRow {
            size: format!("{w}x{h}"),
            grid_thw: grid,
            image_tokens: grid.iter().product::<usize>() / 4,
            prompt_tokens: out.prompt_token_ids.len(),
            vision_s,
            prefill_s,
            decode_tokens_per_s: rate,
            step_s: vision_s
                + prefill_s
                + if rate > 0.0 {
                    64.0 / rate
                } else {
                    f64::INFINITY
                },
            peak_rss_bytes: peak_rss_bytes(),
            timed_runs: options.runs.max(1),
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd_lists() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn synthetic_screenshot_is_deterministic_and_not_flat() {
        let a = synthetic_screenshot(320, 200);
        assert_eq!(a, synthetic_screenshot(320, 200));
        let distinct: std::collections::HashSet<_> = a.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 10);
    }
}
