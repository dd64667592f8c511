//! LAN discovery by hand: announce a node, or list the nodes announcing themselves.
//!
//! ```text
//! discovery_probe advertise PORT          # print the fresh node id, announce until killed
//! discovery_probe discover [TIMEOUT_MS]   # print `NODE_ID ADDR...` per node; exit 1 if none
//! ```
//!
//! mDNS never crosses loopback, so run the two on different machines, or on the test hosts
//! of `examples/netns_cluster.sh` (`netns_cluster.sh exec w1 target/debug/examples/...`).
//! `RUST_LOG=debug` shows what libp2p's mDNS sends and hears.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use potluck_node::net::discovery::{advertise, discover, DISCOVERY_TIMEOUT_MS};
use potluck_node::net::identity::NodeIdentity;

const USAGE: &str = "usage: discovery_probe advertise PORT | discovery_probe discover [TIMEOUT_MS]";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(std::env::args().skip(1).collect()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("discovery_probe: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> anyhow::Result<ExitCode> {
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["advertise", port] => {
            let port: u16 = port.parse().with_context(|| format!("bad port '{port}'"))?;
            let identity = NodeIdentity::generate();
            let _advertiser = advertise(&identity, port)?;
            // Rust's stdout is line-buffered even into a pipe, so a reader gets this at once.
            println!("{}", identity.node_id());
            loop {
                std::thread::park();
            }
        }
        ["discover", rest @ ..] if rest.len() <= 1 => {
            let timeout_ms = match rest.first() {
                Some(text) => text
                    .parse()
                    .with_context(|| format!("bad timeout '{text}' (milliseconds)"))?,
                None => DISCOVERY_TIMEOUT_MS,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let started = Instant::now();
            let nodes = runtime.block_on(discover(Duration::from_millis(timeout_ms)))?;
            let elapsed_ms = started.elapsed().as_millis();
            for node in &nodes {
                let addresses: Vec<String> =
                    node.addresses.iter().map(ToString::to_string).collect();
                println!("{} {}", node.node_id, addresses.join(" "));
            }
            if nodes.is_empty() {
                eprintln!("discovery_probe: no node answered within {timeout_ms} ms");
                return Ok(ExitCode::from(1));
            }
            eprintln!(
                "discovery_probe: {} node(s) in {elapsed_ms} ms",
                nodes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("{USAGE}"),
    }
}
