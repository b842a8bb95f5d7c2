//! `vlad calibrate`: click markers vlad draws itself and report where the clicks landed.

use std::io::Write;

use clap::Args;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The monitor to test, by id or name (default: the primary monitor).
    #[arg(long, value_name = "ID")]
    monitor: Option<String>,
    /// The largest acceptable distance, in pixels, between a marker and its click.
    #[arg(long, default_value_t = 2.0)]
    tolerance: f64,
}

/// Prints the calibration as JSON; exit 1 when a click missed by more than the tolerance.
#[cfg(target_os = "linux")]
pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    use vlad::environment::desktop::DesktopTarget;
    let target = match args.monitor {
        Some(m) => DesktopTarget::Monitor(m),
        None => DesktopTarget::Primary,
    };
    let report = vlad::environment::desktop::calibrate::calibrate(target, args.tolerance)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    stdout.flush()?;
    if !report.ok {
        anyhow::bail!(
            "clicks missed their markers by up to {:.1} px (offset {:?}, scale {:?}); see the JSON above",
            report.max_error,
            report.offset,
            report.scale
        );
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn run(_args: CalibrateArgs) -> anyhow::Result<()> {
    let _ = std::io::stdout().flush();
    anyhow::bail!("vlad calibrate is implemented for X11 (Linux) only")
}
