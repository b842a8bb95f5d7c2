//! `vlad devices`: the monitors, windows and Android devices vlad can work on.

use std::io::Write;

use clap::Args;
use serde_json::json;

#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Lists everything; a source that cannot be reached (no display, no adb server) is reported
/// and the rest still listed. Exit 1 only when no source could be reached.
pub fn run(args: DevicesArgs) -> anyhow::Result<()> {
    let vlad::environment::Inventory {
        monitors,
        windows,
        android: devices,
        errors,
    } = vlad::environment::inventory();
    let reached = monitors.is_some() || devices.is_some();

    let mut out = std::io::stdout().lock();
    if args.json {
        let report = json!({
            "monitors": monitors.clone().unwrap_or_default(),
            "windows": windows.clone().unwrap_or_default(),
            "android": devices.clone().unwrap_or_default(),
            "errors": errors,
        });
        writeln!(out, "{report}")?;
    } else {
        writeln!(out, "monitors:")?;
        for m in monitors.iter().flatten() {
            let r = m.physical;
            writeln!(
                out,
                "  {:<6} {:<12} {}x{}+{}+{} scale {}{}",
                m.id,
                m.name,
                r.width,
                r.height,
                r.x,
                r.y,
                m.scale_factor,
                if m.primary { " primary" } else { "" }
            )?;
        }
        writeln!(out, "windows:")?;
        for w in windows.iter().flatten() {
            let r = w.physical;
            writeln!(
                out,
                "  {:<10} {}x{}+{}+{} {:?} ({})",
                w.id, r.width, r.height, r.x, r.y, w.title, w.app_name
            )?;
        }
        writeln!(out, "android:")?;
        for d in devices.iter().flatten() {
            writeln!(
                out,
                "  {:<20} {} {}",
                d.serial,
                d.state,
                d.model.as_deref().unwrap_or("")
            )?;
        }
        for (source, e) in &errors {
            writeln!(out, "({source}: {})", e.as_str().unwrap_or_default())?;
        }
    }
    out.flush()?;
    if !reached {
        anyhow::bail!("neither a display nor an adb server could be reached (see above)");
    }
    Ok(())
}
