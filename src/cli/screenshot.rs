//! `vlad screenshot`: one screenshot of a monitor, a window or an Android device, saved as PNG.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use vlad::environment::Environment;
use vlad::environment::android::AndroidDevice;
use vlad::environment::desktop::{DesktopEnvironment, DesktopTarget};

/// Which screen: at most one of `--monitor`, `--window`, `--device` (default: the primary
/// monitor).
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct TargetArgs {
    /// A monitor by id or name (see `vlad devices`).
    #[arg(long, value_name = "ID")]
    pub monitor: Option<String>,
    /// A window by title (exact, then substring) or app name (see `vlad devices`).
    #[arg(long, value_name = "TITLE")]
    pub window: Option<String>,
    /// An Android device by serial (see `vlad devices`).
    #[arg(long, value_name = "SERIAL")]
    pub device: Option<String>,
}

impl TargetArgs {
    /// Opens the chosen environment.
    pub fn open(&self) -> anyhow::Result<Box<dyn Environment>> {
        if let Some(serial) = &self.device {
            let device = AndroidDevice::connect(Some(serial))
                .with_context(|| format!("cannot open Android device {serial:?}"))?;
            return Ok(Box::new(device));
        }
        let target = match (&self.monitor, &self.window) {
            (Some(m), _) => DesktopTarget::Monitor(m.clone()),
            (None, Some(w)) => DesktopTarget::Window(w.clone()),
            (None, None) => DesktopTarget::Primary,
        };
        Ok(Box::new(DesktopEnvironment::open(target)?))
    }
}

#[derive(Debug, Args)]
pub struct ScreenshotArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Where to write the PNG.
    #[arg(short = 'o', long, value_name = "FILE.png")]
    output: PathBuf,
}

/// Captures, writes the PNG, and prints what was captured as one JSON line.
pub fn run(args: ScreenshotArgs) -> anyhow::Result<()> {
    let mut env = args.target.open()?;
    let obs = env.observe()?;
    obs.screenshot
        .save_with_format(&args.output, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let summary = serde_json::json!({
        "path": args.output,
        "width": obs.width(),
        "height": obs.height(),
        "scale_factor": obs.scale_factor,
        "origin": [obs.origin.0, obs.origin.1],
        "identity": obs.identity,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{summary}")?;
    stdout.flush()?;
    Ok(())
}
