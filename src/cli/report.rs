//! `vlad report DIR -o report.html`: one self-contained HTML page of a trajectory folder (a
//! `vlad run --trace` folder or one test of `vlad test`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A trajectory folder (`run.json`, `trajectory.jsonl`, `screenshots/`).
    dir: PathBuf,
    /// Where to write the page; `-` for stdout [default: DIR/report.html].
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let html = vlad::report::render_report(&args.dir)?;
    let output = args.output.unwrap_or_else(|| args.dir.join("report.html"));
    if output.as_os_str() == "-" {
        let mut out = std::io::stdout().lock();
        out.write_all(html.as_bytes())?;
        return Ok(());
    }
    std::fs::write(&output, html)
        .with_context(|| format!("cannot write the report to {}", output.display()))?;
    eprintln!("vlad: report written to {}", output.display());
    Ok(())
}
