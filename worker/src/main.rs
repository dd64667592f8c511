//! The `worker` binary: joins a potluck cluster and runs its slice of the model.
//!
//! `worker bench` measures this machine as the planner will see it (memory budget, memory
//! bandwidth, quantized-matmul throughput; `potluck_engine::device`) and prints it.
//!
//! `worker join` finds the coordinator (mDNS on the LAN, or `--coordinator HOST:PORT`),
//! proves the join token, fetches its slice of the weights over QUIC into a local cache, runs
//! its layers (`worker::join`, over `potluck_node::stage::StageRunner`) and, when the
//! coordinator goes away, joins again with a growing back-off.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use potluck_engine::device::{parse_size, DeviceProfile, MEASURE_TIME_DEFAULT_MS};

/// After a lost coordinator, the first attempt to join again waits this long; each failure
/// doubles the wait up to [`REJOIN_DELAY_MAX_MS`].
const REJOIN_DELAY_MIN_MS: u64 = 1_000;
const REJOIN_DELAY_MAX_MS: u64 = 10_000;
use potluck_node::default_threads;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "Potluck worker: lends this machine's memory and compute to a cluster"
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
    /// Join the cluster run by a coordinator and serve the layers it assigns.
    Join {
        /// Coordinator address (found by mDNS on the LAN when omitted).
        #[arg(long, value_name = "HOST:PORT")]
        coordinator: Option<String>,
        /// The join token `coordinator serve` printed.
        #[arg(long, value_name = "TOKEN", env = "POTLUCK_TOKEN")]
        token: Option<String>,
        /// Name shown on the dashboard (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Compute threads (default: all cores).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Memory this worker may use, e.g. 4GiB, 512MiB, 2G (default: available memory minus
        /// a reserve).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        memory_limit: Option<u64>,
        /// Where this worker's QUIC endpoint listens for the previous stage.
        #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:0")]
        listen: SocketAddr,
        /// Slice cache directory (default: the user's cache dir, potluck/slices).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Identity key file (default: the config dir, potluck/worker.key). Two workers on one
        /// machine need one each.
        #[arg(long, value_name = "PATH")]
        identity: Option<PathBuf>,
        /// This machine's own copy of the coordinator's model: a GGUF file, or a directory of
        /// them. A slice it holds is read from disk (checked tensor by tensor against the
        /// coordinator's hashes, which are remembered next to the identity key) instead of
        /// crossing the network; any other file is reported and the slice is fetched.
        #[arg(long, value_name = "PATH")]
        model: Option<PathBuf>,
    },
    /// Measure this machine as a cluster node (memory budget, memory bandwidth,
    /// quantized-matmul speed) in about a second, and print the figures.
    Bench {
        /// Compute threads (default: all cores).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Cap the memory budget, e.g. 4GiB, 512MiB, 2G (K/M/G/T: powers of 1000; KiB/MiB/
        /// GiB/TiB: powers of 1024).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        memory_limit: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[allow(clippy::too_many_arguments)]
fn join(
    coordinator: Option<String>,
    token: Option<String>,
    name: Option<String>,
    threads: Option<usize>,
    memory_limit: Option<u64>,
    listen: SocketAddr,
    cache_dir: Option<PathBuf>,
    identity: Option<PathBuf>,
    model: Option<PathBuf>,
) -> Result<()> {
    use potluck_worker::join::{JoinConfig, JoinOutcome};
    use potluck_node::net::identity::NodeIdentity;
    use potluck_node::net::token::JoinToken;
    let Some(token) = token else {
        bail!("a join token is required: run `worker join --token TOKEN` with the token `coordinator serve` printed");
    };
    // Pasted tokens often carry a newline or spaces.
    let token = JoinToken::parse(token.trim())?;
    let coordinator = match coordinator {
        Some(text) => Some(
            text.to_socket_addrs()
                .with_context(|| format!("cannot resolve the coordinator address {text:?} (expected HOST:PORT)"))?
                .next()
                .with_context(|| format!("{text:?} resolves to no address"))?,
        ),
        None => None,
    };
    let identity_path = match identity {
        Some(p) => p,
        None => NodeIdentity::default_path("worker").context("no config directory: give --identity PATH")?,
    };
    let identity = NodeIdentity::load_or_create(&identity_path)?;
    let cache_dir = match cache_dir {
        Some(d) => d,
        None => potluck_node::weights::slice_cache::SliceCache::default_root().context("no cache directory: give --cache-dir DIR")?,
    };
    // The worker's own model file(s), opened now so that a bad --model fails before joining.
    let local_models = match model {
        Some(path) => {
            let store = identity_path.parent().map(|dir| dir.join("tensor-hashes"));
            let models = potluck_node::weights::local::LocalModels::open(&path, store.as_deref())?;
            for file in models.paths() {
                println!("worker: offering {} as this machine's copy of the model", file.display());
            }
            Some(std::sync::Arc::new(models))
        }
        None => None,
    };
    let threads = threads.unwrap_or_else(default_threads);
    println!("worker: measuring this machine...");
    let device = DeviceProfile::measure(threads, memory_limit, Duration::from_millis(MEASURE_TIME_DEFAULT_MS))
        .context("measuring this machine")?;
    print!("{device}");
    let name = name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "worker".into())
    });
    let config = JoinConfig {
        coordinator,
        token,
        name,
        identity,
        cache_dir,
        listen,
        threads,
        device: potluck_node::device_summary(&device),
        local_models,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (interrupt_tx, interrupt) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            // SIGTERM (a service manager stopping it) and Ctrl-C: leave cleanly, so the
            // coordinator re-plans at once rather than after the silence timeout.
            potluck_node::signal::shutdown_signal().await;
            let _ = interrupt_tx.send(true);
        });
        let interrupted = || {
            let mut interrupt = interrupt.clone();
            async move {
                let _ = interrupt.wait_for(|&stop| stop).await;
            }
        };
        // Once joined, a lost coordinator is waited for: it may be restarting (its node key
        // and token persist), and the slice cache makes the rejoin quick.
        let mut joined_before = false;
        let mut delay = Duration::from_millis(REJOIN_DELAY_MIN_MS);
        loop {
            match potluck_worker::join::join(config.clone(), interrupted()).await {
                Ok(JoinOutcome::Shutdown) => {
                    println!("worker: the coordinator shut this worker down");
                    return Ok(());
                }
                Ok(JoinOutcome::Interrupted) => {
                    println!("worker: interrupted; left the cluster");
                    return Ok(());
                }
                Ok(JoinOutcome::Refused(reason)) => bail!("the coordinator refused this worker ({reason})"),
                Ok(JoinOutcome::Disconnected(reason)) => {
                    joined_before = true;
                    delay = Duration::from_millis(REJOIN_DELAY_MIN_MS);
                    println!("worker: lost the coordinator ({reason}); joining again in {:.0} s", delay.as_secs_f64());
                }
                Err(e) if joined_before => {
                    println!("worker: cannot join yet ({e:#}); trying again in {:.0} s", delay.as_secs_f64());
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = interrupted() => {
                    println!("worker: interrupted");
                    return Ok(());
                }
            }
            delay = (delay * 2).min(Duration::from_millis(REJOIN_DELAY_MAX_MS));
        }
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    potluck_node::logging::init(cli.log_format);
    match cli.command {
        Command::Join { coordinator, token, name, threads, memory_limit, listen, cache_dir, identity, model } => {
            join(coordinator, token, name, threads, memory_limit, listen, cache_dir, identity, model)
        }
        Command::Bench {
            threads,
            memory_limit,
            json,
        } => {
            let threads = threads.unwrap_or_else(default_threads);
            let profile = DeviceProfile::measure(
                threads,
                memory_limit,
                Duration::from_millis(MEASURE_TIME_DEFAULT_MS),
            )
            .context("measuring this machine")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&profile)?);
            } else {
                print!("{profile}");
            }
            Ok(())
        }
    }
}
