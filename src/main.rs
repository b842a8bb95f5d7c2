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
    /// Time one agent step (vision, prefill, decode) and peak memory at native screenshot sizes.
    Bench(cli::bench::BenchArgs),
    /// Parse one model reply into actions; prints JSON (exit 0 even when the reply has errors).
    Parse(cli::parse::ParseArgs),
    /// Run a task: observe, ask the model, act, until done (exit 0 finished, 1 error, 3 needs
    /// the user, 4 gave up, 5 stopped).
    Run(cli::run::RunArgs),
    /// Perform a recorded run's actions again, without a model (--verify: stop on drift).
    Replay(cli::replay::ReplayArgs),
    /// List monitors, windows and Android devices.
    Devices(cli::devices::DevicesArgs),
    /// Save a screenshot of a monitor, a window or an Android device as PNG.
    Screenshot(cli::screenshot::ScreenshotArgs),
    /// Perform typed actions (the JSON `vlad parse` prints) on a screen; points in its pixels.
    Do(cli::do_action::DoArgs),
    /// Click markers on screen and report where the clicks landed (offset and scale, JSON).
    Calibrate(cli::calibrate::CalibrateArgs),
    /// Run the daemon: OpenAI-compatible chat completions, the task API and MCP (`/mcp`) over
    /// HTTP behind a bearer token (stops on SIGTERM or Ctrl-C).
    Serve(cli::serve::ServeArgs),
    /// An MCP server on stdio: screenshot, click, type_text, key, scroll, drag, ground and
    /// run_task tools for the desktop and Android devices (for Claude Desktop and other clients).
    Mcp(cli::mcp::McpArgs),
    /// Submit, list, show, watch and cancel tasks of a running `vlad serve`.
    Tasks(cli::tasks::TasksArgs),
    /// List tool plugins (and manifests that do not load), or call one tool as the agent would.
    Tools(cli::tools::ToolsArgs),
    /// Locate something on an image with the model: prints its box and click point
    /// (--annotate draws them).
    Ground(cli::ground::GroundArgs),
    /// Run UI test files (plain-language steps, cached model answers); JUnit XML with --junit
    /// (exit 0 all passed, 1 a test failed, 2 an invalid file).
    Test(cli::test::TestArgs),
    /// Write one self-contained HTML page of a trajectory folder.
    Report(cli::report::ReportArgs),
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
        Command::Bench(args) => cli::bench::run(args),
        Command::Parse(args) => cli::parse::run(args),
        Command::Run(args) => return cli::run::main(args),
        Command::Replay(args) => return cli::replay::main(args),
        Command::Devices(args) => cli::devices::run(args),
        Command::Screenshot(args) => cli::screenshot::run(args),
        Command::Do(args) => cli::do_action::run(args),
        Command::Calibrate(args) => cli::calibrate::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Mcp(args) => cli::mcp::run(args),
        Command::Tasks(args) => return cli::tasks::main(args),
        Command::Tools(args) => cli::tools::run(args),
        Command::Ground(args) => cli::ground::run(args),
        Command::Test(args) => return cli::test::main(args),
        Command::Report(args) => cli::report::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
