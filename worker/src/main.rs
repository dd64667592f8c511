//! The `worker` binary: joins a potluck cluster and runs its slice of the model.
//!
//! Status: the cluster issue (discovery over libp2p, slices over QUIC) fills this in. Until
//! then `worker join` explains that clustering is not available, rather than pretending.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "worker", version, about = "Potluck worker: lends this machine's memory and compute to a cluster")]
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
        /// Memory this worker may use, e.g. 4GiB (default: available memory minus a reserve).
        #[arg(long, value_name = "SIZE")]
        memory_limit: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Join { .. } => bail!(
            "this build of potluck cannot join a cluster yet (protocol v{}): run `coordinator serve` on one machine, which serves every layer itself",
            potluck_protocol::PROTOCOL_VERSION
        ),
    }
}
