//! The `vlad` command line: parses flags and calls the library.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vlad — a vision-language agent with an embedded Qwen2-VL engine.
#[derive(Debug, Parser)]
#[command(name = "vlad", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a completion with the embedded Qwen2-VL engine.
    Generate(cli::generate::GenerateArgs),
    /// Parse one model reply into actions; prints JSON (exit 0 even when the reply has errors).
    Parse(cli::parse::ParseArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VLAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Parse(args) => cli::parse::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
