//! `vlad bench`: time one agent step (vision, prefill, decode) at native screenshot sizes.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use vlad::engine::bench::{self, BenchOptions};
use vlad::engine::config::{ModelConfig, QWEN2_VL_2B_CONFIG, QWEN2_VL_7B_CONFIG};
use vlad::engine::{LoadOptions, Qwen2Vl};

use super::{DeviceArg, DtypeArg};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// `2b` or `7b` (the released shapes with random weights, no download) or a model folder.
    #[arg(long, default_value = "2b")]
    config: String,
    /// Tokenizer folder for `2b`/`7b` (tokenizer.json + chat template), e.g. the one
    /// scripts/build-qwen2vl-tokenizer.sh builds.
    #[arg(long, default_value = "tests/data/qwen2vl-tokenizer")]
    tokenizer: PathBuf,
    /// Screenshot sizes, comma-separated WIDTHxHEIGHT.
    #[arg(
        long,
        default_value = "640x360,1280x720,1920x1080",
        value_delimiter = ','
    )]
    sizes: Vec<String>,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Decode steps to time after the prefill.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Timed runs per size after one warm-up (0: time the warm-up run only).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Largest image area in pixels (default: the released checkpoints' 12,845,056).
    #[arg(long, default_value_t = 12_845_056)]
    max_pixels: u64,
    /// Store the language model's linear layers quantized (q8_0 or q4k); the vision tower
    /// stays in --dtype.
    #[arg(long)]
    quantize: Option<vlad::engine::Quantization>,
    /// Instead of independent sizes: an agent conversation of this many steps on the first size
    /// (each step adds a new screenshot), timing every step to show what the KV-cache reuse of
    /// the unchanged history saves.
    #[arg(long)]
    history_steps: Option<usize>,
    /// One JSON list of rows on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time every phase of the engine (attention, MLP, norms, ...) over the timed runs and
    /// print the breakdown per size. The device is drained around each phase, so on a GPU these
    /// runs are slower than plain ones.
    #[arg(long)]
    profile: bool,
}

fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s
        .trim()
        .split_once('x')
        .with_context(|| format!("size {s:?} must be WIDTHxHEIGHT, e.g. 1920x1080"))?;
    let w: u32 = w.parse().with_context(|| format!("bad width in {s:?}"))?;
    let h: u32 = h.parse().with_context(|| format!("bad height in {s:?}"))?;
    if w < 28 || h < 28 {
        bail!("size {s:?} is smaller than one 28x28 block");
    }
    Ok((w, h))
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let sizes = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let device = args.device.open()?;
    let load = LoadOptions {
        dtype: args.dtype.resolve(&device),
        device,
        min_pixels: None,
        max_pixels: Some(args.max_pixels),
        quantize: args.quantize,
    };
    let random_config = match args.config.as_str() {
        "2b" => Some(QWEN2_VL_2B_CONFIG),
        "7b" => Some(QWEN2_VL_7B_CONFIG),
        _ => None,
    };
    let start = std::time::Instant::now();
    let mut model = match random_config {
        Some(json) => {
            if !args.tokenizer.join("tokenizer.json").exists() {
                bail!(
                    "{} has no tokenizer.json: build it with scripts/build-qwen2vl-tokenizer.sh or pass --tokenizer DIR",
                    args.tokenizer.display()
                );
            }
            let config = ModelConfig::from_json_str(json, Path::new(&args.config))?;
            Qwen2Vl::with_random_weights(config, &args.tokenizer, &load)?
        }
        None => Qwen2Vl::load(&args.config, &load)
            .with_context(|| format!("cannot load model {}", args.config))?,
    };
    eprintln!(
        "model {} ({:?}{}) ready in {:.1} s",
        args.config,
        args.dtype,
        args.quantize
            .map(|q| format!(", LM {q}"))
            .unwrap_or_default(),
        start.elapsed().as_secs_f64()
    );
    if !model.device().is_cuda() {
        eprintln!("CPU kernels: {}", vlad::engine::cpu_kernels());
    }
    let options = BenchOptions {
        sizes,
        decode_tokens: args.decode_tokens,
        runs: args.runs,
        profile: args.profile,
    };
    let json = args.json;
    let mut stdout = std::io::stdout().lock();
    if let Some(steps) = args.history_steps {
        if !json {
            writeln!(
                stdout,
                "{:>5} {:>8} {:>8} {:>9} {:>10} {:>9} {:>8} {:>9}",
                "step",
                "tokens",
                "reused",
                "vision_s",
                "prefill_s",
                "decode_s",
                "step_s",
                "vs_step1"
            )?;
        }
        let rows = bench::run_history(
            &mut model,
            options.sizes[0],
            steps,
            args.decode_tokens,
            |r| {
                if !json {
                    let _ = writeln!(
                        stdout,
                        "{:>5} {:>8} {:>8} {:>9.2} {:>10.2} {:>9.2} {:>8.2} {:>9.2}",
                        r.step,
                        r.prompt_tokens,
                        r.reused_prompt_tokens,
                        r.vision_s,
                        r.prefill_s,
                        r.decode_s,
                        r.step_s,
                        r.vs_first
                    );
                }
            },
        )?;
        if json {
            writeln!(stdout, "{}", serde_json::to_string(&rows)?)?;
        }
        return Ok(());
    }
    if !json {
        writeln!(
            stdout,
            "{:>10} {:>12} {:>7} {:>6} {:>9} {:>10} {:>11} {:>9} {:>8} {:>10}{}",
            "size",
            "grid t,h,w",
            "tokens",
            "prep_s",
            "vision_s",
            "prefill_s",
            "decode_tok/s",
            "decode_GB/s",
            "step_s",
            "peak_rss",
            if model.device().is_cuda() {
                format!(" {:>10}", "peak_vram")
            } else {
                String::new()
            }
        )?;
    }
    let rows = bench::run(&mut model, &options, |row| {
        if !json {
            let bytes = |b: Option<u64>| match b {
                Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
                Some(b) => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
                None => "-".into(),
            };
            let rss = bytes(row.peak_rss_bytes);
            let vram = row
                .peak_vram_bytes
                .map(|b| format!(" {:>10}", bytes(Some(b))))
                .unwrap_or_default();
            let [t, h, w] = row.grid_thw;
            let _ = writeln!(
                stdout,
                "{:>10} {:>12} {:>7} {:>6.3} {:>9.3} {:>10.3} {:>11.2} {:>11.1} {:>8.3} {:>10}{vram}",
                row.size,
                format!("{t},{h},{w}"),
                row.prompt_tokens,
                row.preprocess_s,
                row.vision_s,
                row.prefill_s,
                row.decode_tokens_per_s,
                row.decode_gb_per_s,
                row.step_s,
                rss
            );
            if let Some(phases) = &row.profile {
                let total: f64 = phases.iter().map(|p| p.seconds).sum();
                let _ = writeln!(stdout, "{:>10} per run: {total:.3} s", "phases");
                for p in phases {
                    let _ = writeln!(
                        stdout,
                        "{:>10} {:>28} {:>9.4} s {:>5.1}% {:>8} calls",
                        "",
                        p.phase,
                        p.seconds,
                        100.0 * p.seconds / total.max(1e-12),
                        p.calls
                    );
                }
            }
        }
    })?;
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&rows)?)?;
    }
    Ok(())
}
