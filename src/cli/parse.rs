//! `vlad parse`: one model reply in, one JSON object of actions (screen pixels) out.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, CommandFactory, error::ErrorKind};

use vlad::protocol::cli::{ParseOptions, parse_command, read_input};
use vlad::protocol::{ModelFamily, Size};

#[derive(Debug, Args)]
pub struct ParseArgs {
    /// The reply format: qwen2vl (*FUNCTION*/*ARGS*, 0-1000), qwen25vl (<tool_call>) or uitars.
    #[arg(long, default_value = "qwen2vl")]
    family: ModelFamily,
    /// The image the model saw, after resizing: WIDTHxHEIGHT.
    #[arg(long)]
    image_size: Size,
    /// The screen the points are mapped onto: WIDTHxHEIGHT [default: the image size].
    #[arg(long)]
    screen_size: Option<Size>,
    /// Environment pixels per screen pixel (e.g. 2 for a HiDPI screen captured at logical size).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// A tool the model may call besides the built-in functions (repeatable).
    #[arg(long = "tool", value_name = "NAME")]
    tools: Vec<String>,
    /// The reply to parse; `-` or nothing reads standard input.
    file: Option<PathBuf>,
}

/// Prints the parse result. Problems in the reply are part of the JSON (exit 0); unusable
/// options or an unreadable input are usage errors (exit 2).
pub fn run(args: ParseArgs) -> anyhow::Result<()> {
    let usage = |message: String| -> ! {
        crate::Cli::command()
            .error(ErrorKind::ValueValidation, message)
            .exit()
    };
    let input = read_input(args.file.as_deref()).unwrap_or_else(|e| usage(e.to_string()));
    let options = ParseOptions {
        family: args.family,
        image_size: args.image_size,
        screen_size: args.screen_size,
        scale: args.scale,
        tools: args.tools,
    };
    let json = parse_command(&options, &input).unwrap_or_else(|e| usage(e.to_string()));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}")?;
    stdout.flush()?;
    Ok(())
}
