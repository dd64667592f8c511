//! The `worker` binary: joins a potluck cluster and runs its slice of the model.
//!
//! `worker bench` measures this machine as the planner will see it (memory budget, memory
//! bandwidth, quantized-matmul throughput; `potluck_engine::device`) and prints it.
//!
//! Status: the cluster issue (discovery over libp2p, slices over QUIC) fills `join` in. Until
//! then `worker join` explains that clustering is not available, rather than pretending.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use potluck_engine::device::{parse_size, DeviceProfile, MEASURE_TIME_DEFAULT_MS};
use potluck_worker::default_threads;
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
}

#[derive(Subcommand)]
enum Command {
    /// Join the cluster run by a coordinator and serve the layers it assigns.
    Join {
        /// Coordinator address (found by mDNS on the LAN when omitted).
        #[arg(long, value_name = "HOST:PORT")]
        coordinator: Option<String>,
        /// The join token `coordinator serve` printed.
        #[arg(long, value_name = "TOKEN")]
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

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Join { .. } => bail!(
            "this build of potluck cannot join a cluster yet (protocol v{}): run `coordinator serve` on one machine, which serves every layer itself",
            potluck_protocol::PROTOCOL_VERSION
        ),
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
