//! Speed and memory measurement of one agent step: a synthetic screenshot at native resolution
//! through the vision tower, the prefill of the whole prompt, and a fixed number of decode steps.
//! `vlad bench` prints these rows; `scripts/bench-vs-reference.sh` compares them with the
//! reference implementation measured in the same run.

use std::sync::Arc;
use std::time::Instant;

use image::{Rgb, RgbImage};
use serde::Serialize;

use super::device_memory;
use super::error::{EngineError, Result};
use super::profile;
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
    /// Also time every phase of the engine ([`profile`]) over the timed runs.
    pub profile: bool,
}

/// One phase of a profiled size, per timed run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRow {
    /// A phase of [`profile`], or `other` for the time no phase covers.
    pub phase: String,
    pub seconds: f64,
    pub calls: f64,
}

/// One size's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub size: String,
    pub grid_thw: [usize; 3],
    pub image_tokens: usize,
    pub prompt_tokens: usize,
    /// Chat template, tokens, resizing, patches and content hashes on the host: not part of
    /// `step_s`, as the reference's timings leave its processor out too.
    pub preprocess_s: f64,
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_tokens_per_s: f64,
    /// Vision + prefill + 64 decode tokens, the shape of one agent step.
    pub step_s: f64,
    /// Peak resident memory of this process so far (Linux; `None` elsewhere).
    pub peak_rss_bytes: Option<u64>,
    /// Peak GPU memory the engine held during this size's runs (CUDA; `None` elsewhere).
    pub peak_vram_bytes: Option<u64>,
    /// Bytes of language-model weights one decode step reads (all linear layers).
    pub decode_weight_bytes: usize,
    /// `decode_weight_bytes` × tokens/s: the memory bandwidth decoding achieves.
    pub decode_gb_per_s: f64,
    pub timed_runs: usize,
    /// With [`BenchOptions::profile`]: seconds and calls per timed run of every phase, largest
    /// first (the device drained around each phase, so these runs are slower on a GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<PhaseRow>>,
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

/// The recorded phases per run, largest first, and `other`: the time of the runs no phase covers.
fn phase_rows(
    phases: Vec<(&'static str, profile::Phase)>,
    total_s: f64,
    runs: usize,
) -> Vec<PhaseRow> {
    let runs = runs as f64;
    let covered: f64 = phases.iter().map(|(_, p)| p.seconds).sum();
    let mut rows: Vec<PhaseRow> = phases
        .into_iter()
        .map(|(name, p)| PhaseRow {
            phase: name.to_string(),
            seconds: p.seconds / runs,
            calls: p.calls as f64 / runs,
        })
        .collect();
    rows.push(PhaseRow {
        phase: "other".into(),
        seconds: (total_s - covered).max(0.0) / runs,
        calls: 0.0,
    });
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    rows
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
        let (mut preprocess, mut vision, mut prefill, mut decode) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut last = None;
        device_memory::reset_peak(model.device());
        let mut profiled_s = 0.0;
        profile::set_enabled(options.profile);
        for run in 0..=options.runs {
            if run == 1 {
                // the warm-up's phases are not part of the profile
                profile::take();
            }
            let start = Instant::now();
            let out = model.generate(&prompt, &generation, |_| {})?;
            let seconds = start.elapsed().as_secs_f64();
            tracing::info!(size = %format!("{w}x{h}"), run, seconds, "bench run");
            if run > 0 || options.runs == 0 {
                profiled_s += seconds;
                preprocess.push(out.timings.preprocess_s);
                vision.push(out.timings.vision_s);
                prefill.push(out.timings.prefill_s);
                decode.push(out.timings.decode_tokens_per_s);
            }
            last = Some(out);
        }
        profile::set_enabled(false);
        let phases = options
            .profile
            .then(|| phase_rows(profile::take(), profiled_s, options.runs.max(1)));
        let Some(out) = last else { continue };
        let grid = out.image_grid_thw.first().copied().unwrap_or([0, 0, 0]);
        let (vision_s, prefill_s, rate) = (median(vision), median(prefill), median(decode));
        let decode_weight_bytes = model.decode_weight_bytes();
        let row = BenchRow {
            size: format!("{w}x{h}"),
            grid_thw: grid,
            image_tokens: grid.iter().product::<usize>() / 4,
            prompt_tokens: out.prompt_token_ids.len(),
            preprocess_s: median(preprocess),
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
            peak_vram_bytes: device_memory::peak_bytes(model.device()),
            decode_weight_bytes,
            decode_gb_per_s: decode_weight_bytes as f64 * rate / 1e9,
            timed_runs: options.runs.max(1),
            profile: phases,
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// One step of a simulated agent conversation.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryStepRow {
    /// 1-based.
    pub step: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV cache came from the previous step.
    pub reused_prompt_tokens: usize,
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Everything the engine spent on this step, processing included.
    pub step_s: f64,
    /// This step's time over step 1's.
    pub vs_first: f64,
}

/// An agent run's shape: each step adds the previous reply and a new screenshot of `size` to
/// one growing conversation and generates `decode_tokens` tokens, so step N pays for the new
/// screenshot and tokens only when the KV cache of the unchanged prefix is reused.
pub fn run_history(
    model: &mut Qwen2Vl,
    (w, h): (u32, u32),
    steps: usize,
    decode_tokens: usize,
    mut on_row: impl FnMut(&HistoryStepRow),
) -> Result<Vec<HistoryStepRow>> {
    if decode_tokens == 0 || steps == 0 {
        return Err(EngineError::Option(
            "--history-steps and --decode-tokens must be at least 1".into(),
        ));
    }
    let generation = GenerationOptions {
        max_new_tokens: decode_tokens,
        greedy: Some(true),
        ignore_eos: true,
        ..Default::default()
    };
    // A different screen every step: shift the picture so no two screenshots are equal.
    let screen = |step: usize| {
        let mut screen = synthetic_screenshot(w, h);
        let shade = (step * 37 % 200) as u8;
        for p in screen.pixels_mut().take(w as usize * 8) {
            *p = Rgb([shade, 255 - shade, shade / 2]);
        }
        Part::Image(Arc::new(screen))
    };
    // One untimed step on a screen of its own first, so step 1 does not carry one-time costs
    // (a GPU's kernel compilation and memory pool growth), which would flatter the later steps.
    let warm_up = Prompt::new(vec![Message::parts(
        "user",
        vec![screen(0), Part::Text("Warm-up: what do you see?".into())],
    )]);
    // (step 1, like the warm-up, starts from nothing: it is a new run's first step)
    let fresh = GenerationOptions {
        reuse_cache: false,
        ..generation.clone()
    };
    model.generate(&warm_up, &fresh, |_| {})?;
    let mut messages = Vec::new();
    let mut rows: Vec<HistoryStepRow> = Vec::new();
    for step in 1..=steps {
        messages.push(Message::parts(
            "user",
            vec![
                screen(step),
                Part::Text(format!("Step {step}: what do you do next?")),
            ],
        ));
        let prompt = Prompt::new(messages.clone());
        let start = Instant::now();
        let options = if step == 1 { &fresh } else { &generation };
        let out = model.generate(&prompt, options, |_| {})?;
        let step_s = start.elapsed().as_secs_f64();
        let first = rows.first().map_or(step_s, |r| r.step_s);
        let row = HistoryStepRow {
            step,
            prompt_tokens: out.prompt_token_ids.len(),
            reused_prompt_tokens: out.reused_prompt_tokens,
            vision_s: out.timings.vision_s,
            prefill_s: out.timings.prefill_s,
            decode_s: if out.timings.decode_tokens_per_s > 0.0 {
                out.token_ids.len() as f64 / out.timings.decode_tokens_per_s
            } else {
                0.0
            },
            step_s,
            vs_first: step_s / first,
        };
        on_row(&row);
        rows.push(row);
        messages.push(Message::text("assistant", out.text));
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
