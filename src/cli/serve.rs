//! `vlad serve`: flags of the daemon; the service is [`vlad::daemon`].

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use std::time::Duration;

use vlad::daemon::{self, AuthMode, Limits, ServeOptions};
use vlad::engine::{self, LoadOptions};

use super::{DeviceArg, DtypeArg};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default; port 0 picks a free port).
    #[arg(long, default_value = daemon::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Model folder or Hugging Face hub id of a Qwen2-VL checkpoint.
    #[arg(long, default_value = engine::DEFAULT_MODEL)]
    model: String,
    /// The name clients pass as "model" (default: the folder's name or the hub id).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Store the language model's linear layers quantized (q8_0 or q4k) for faster decoding.
    #[arg(long, value_name = "q8_0|q4k")]
    quantize: Option<engine::Quantization>,
    /// Serve without a bearer token (anyone who can reach the address can use the API).
    #[arg(long)]
    no_auth: bool,
    /// Where the bearer token is kept (created with mode 0600 on first start; default
    /// <config dir>/vlad/token).
    #[arg(long, env = "VLAD_TOKEN_FILE", conflicts_with = "no_auth")]
    token_file: Option<PathBuf>,
    /// Accept image_url parts that are absolute local file paths (or file:// URLs).
    #[arg(long)]
    allow_local_files: bool,
    /// Where task records and trajectories are kept, across restarts (default:
    /// <state dir>/vlad/daemon).
    #[arg(long, env = "VLAD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = daemon::DEFAULT_BODY_LIMIT >> 20)]
    max_body_mb: usize,
    /// Seconds a request may take, its body included (event and chat streams aside).
    #[arg(long, default_value_t = daemon::DEFAULT_REQUEST_TIMEOUT.as_secs_f64())]
    request_timeout_s: f64,
    /// Seconds a client may take to send a request's headers, or idle between requests.
    #[arg(long, default_value_t = daemon::DEFAULT_HEADER_TIMEOUT.as_secs_f64())]
    header_timeout_s: f64,
    /// Seconds one chat completion may generate.
    #[arg(long, default_value_t = daemon::DEFAULT_GENERATION_TIMEOUT.as_secs_f64())]
    generation_timeout_s: f64,
    /// Chat completions waiting for the model at once; more are answered 429 (retry).
    #[arg(long, default_value_t = daemon::DEFAULT_MAX_PENDING_CHATS)]
    max_pending_chats: usize,
    /// Tasks waiting for their device at once; more are answered 429 (retry).
    #[arg(long, default_value_t = daemon::DEFAULT_MAX_QUEUED_TASKS)]
    max_queued_tasks: usize,
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} {value}: give a positive number of seconds"))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let auth = if args.no_auth {
        AuthMode::Disabled
    } else {
        match args.token_file {
            Some(path) => AuthMode::TokenFile(path),
            None => AuthMode::TokenFile(daemon::auth::default_token_path()?),
        }
    };
    let token_path = match &auth {
        AuthMode::TokenFile(p) => Some(p.clone()),
        AuthMode::Disabled => None,
    };
    let device = args.device.open()?;
    let options = ServeOptions {
        listen: args.listen,
        model: args.model,
        served_model_name: args.served_model_name,
        load: LoadOptions {
            dtype: args.dtype.resolve(&device),
            device,
            min_pixels: None,
            max_pixels: None,
            quantize: args.quantize,
        },
        auth,
        allow_local_files: args.allow_local_files,
        body_limit: args.max_body_mb.saturating_mul(1 << 20),
        data_dir: args.data_dir,
        limits: Limits {
            request_timeout: seconds("request-timeout-s", args.request_timeout_s)?,
            header_timeout: seconds("header-timeout-s", args.header_timeout_s)?,
            generation_timeout: seconds("generation-timeout-s", args.generation_timeout_s)?,
            max_pending_chats: args.max_pending_chats.max(1),
            max_queued_tasks: args.max_queued_tasks,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::serve(options, |addr| {
        match &token_path {
            Some(p) => eprintln!("vlad serve: token in {}", p.display()),
            None => eprintln!("vlad serve: authentication is off (--no-auth)"),
        }
        eprintln!("vlad serve: listening on http://{addr}");
    }))?;
    Ok(())
}
