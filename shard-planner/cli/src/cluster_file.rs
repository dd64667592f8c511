//! The cluster file: nodes and links in the units people quote (GiB, GB/s, GFLOPS, ms,
//! Mbit/s), turned into the planner's byte- and microsecond-based profiles.
//!
//! ```toml
//! description = "…"
//! first_node = "macbook-pro"          # optional: the coordinator, pinned to stage 0
//!
//! [network]                           # the link between any two nodes…
//! rtt_ms = 0.3
//! bandwidth_mbit_per_s = 1000
//!
//! [[node]]
//! id = "macbook-pro"
//! backend = "metal"                   # cpu | cuda | metal | vulkan | rocm
//! memory_budget_gib = 27
//! memory_bandwidth_gb_per_s = 400
//! matmul_gflops = 10000
//!
//! [[link]]                            # …unless overridden for a pair (both directions)
//! between = ["gaming-laptop-gpu", "gaming-laptop-cpu"]
//! rtt_ms = 0.0
//! bandwidth_mbit_per_s = 128000
//! ```

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use potluck_shard_planner::{Backend, LinkMatrix, LinkProfile, NodeProfile};
use serde::Deserialize;

/// Most bytes of cluster file read: a home cluster's file is a few KB.
const CLUSTER_FILE_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    description: Option<String>,
    first_node: Option<String>,
    network: LinkSpec,
    #[serde(rename = "node")]
    nodes: Vec<NodeSpec>,
    #[serde(default, rename = "link")]
    links: Vec<LinkOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSpec {
    id: String,
    backend: Backend,
    memory_budget_gib: f64,
    memory_bandwidth_gb_per_s: f64,
    matmul_gflops: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkSpec {
    rtt_ms: f64,
    bandwidth_mbit_per_s: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkOverride {
    between: [String; 2],
    rtt_ms: f64,
    bandwidth_mbit_per_s: f64,
}

/// A cluster ready for the planner.
pub struct Cluster {
    pub description: Option<String>,
    pub first_node: Option<String>,
    pub nodes: Vec<NodeProfile>,
    pub links: LinkMatrix,
}

/// `value × scale`, rounded, for a finite non-negative value.
fn scaled(what: &str, value: f64, scale: f64) -> Result<u64> {
    ensure!(
        value.is_finite() && value >= 0.0,
        "{what} must be a non-negative number, got {value}"
    );
    let scaled = (value * scale).round();
    ensure!(scaled < u64::MAX as f64, "{what} is too large: {value}");
    Ok(scaled as u64)
}

impl LinkSpec {
    fn profile(self, what: &str) -> Result<LinkProfile> {
        Ok(LinkProfile {
            rtt_us: scaled(&format!("{what} rtt_ms"), self.rtt_ms, 1e3)?,
            // Mbit/s → bytes/s.
            bandwidth_bytes_per_s: scaled(
                &format!("{what} bandwidth_mbit_per_s"),
                self.bandwidth_mbit_per_s,
                1e6 / 8.0,
            )?,
        })
    }
}

pub fn read(path: &Path) -> Result<Cluster> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading cluster file {}", path.display()))?
        .len();
    ensure!(
        size <= CLUSTER_FILE_BYTES_MAX,
        "{} is {size} bytes: not a cluster file",
        path.display()
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading cluster file {}", path.display()))?;
    parse(&text).with_context(|| format!("in cluster file {}", path.display()))
}

pub fn parse(text: &str) -> Result<Cluster> {
    let file: ClusterFile = toml::from_str(text)?;
    let mut nodes = Vec::with_capacity(file.nodes.len());
    for node in &file.nodes {
        let what = format!("node {:?}:", node.id);
        nodes.push(NodeProfile {
            id: node.id.clone(),
            backend: node.backend,
            memory_budget_bytes: scaled(
                &format!("{what} memory_budget_gib"),
                node.memory_budget_gib,
                (1u64 << 30) as f64,
            )?,
            memory_bandwidth_bytes_per_s: scaled(
                &format!("{what} memory_bandwidth_gb_per_s"),
                node.memory_bandwidth_gb_per_s,
                1e9,
            )?,
            matmul_flops_per_s: scaled(&format!("{what} matmul_gflops"), node.matmul_gflops, 1e9)?,
        });
    }
    let mut links = LinkMatrix::uniform(nodes.len(), file.network.profile("[network]")?);
    for link in &file.links {
        let index = |id: &str| {
            nodes
                .iter()
                .position(|node| node.id == id)
                .with_context(|| format!("[[link]] names {id:?}, which is not a [[node]]"))
        };
        let (a, b) = (index(&link.between[0])?, index(&link.between[1])?);
        if a == b {
            bail!("[[link]] joins {:?} to itself", link.between[0]);
        }
        let spec = LinkSpec {
            rtt_ms: link.rtt_ms,
            bandwidth_mbit_per_s: link.bandwidth_mbit_per_s,
        };
        links.set_symmetric(a, b, spec.profile("[[link]]")?);
    }
    Ok(Cluster {
        description: file.description,
        first_node: file.first_node,
        nodes,
        links,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_become_bytes_and_microseconds() {
        let cluster = parse(
            r#"
            [network]
            rtt_ms = 0.3
            bandwidth_mbit_per_s = 1000
            [[node]]
            id = "a"
            backend = "cuda"
            memory_budget_gib = 1.5
            memory_bandwidth_gb_per_s = 900
            matmul_gflops = 40000
            [[node]]
            id = "b"
            backend = "cpu"
            memory_budget_gib = 16
            memory_bandwidth_gb_per_s = 50
            matmul_gflops = 400
            [[link]]
            between = ["a", "b"]
            rtt_ms = 0
            bandwidth_mbit_per_s = 128000
            "#,
        )
        .unwrap();
        assert_eq!(cluster.nodes[0].memory_budget_bytes, 3 << 29);
        assert_eq!(
            cluster.nodes[0].memory_bandwidth_bytes_per_s,
            900_000_000_000
        );
        assert_eq!(
            cluster.links.get(0, 1),
            LinkProfile {
                rtt_us: 0,
                bandwidth_bytes_per_s: 16_000_000_000
            }
        );
        assert_eq!(cluster.links.get(1, 0).rtt_us, 0);
        assert_eq!(cluster.links.get(0, 0).rtt_us, 300);
    }

    #[test]
    fn mistakes_are_reported() {
        let base = "[network]\nrtt_ms = 1\nbandwidth_mbit_per_s = 1\n";
        let node = "[[node]]\nid = \"a\"\nbackend = \"cpu\"\nmemory_budget_gib = 1\nmemory_bandwidth_gb_per_s = 1\nmatmul_gflops = 1\n";
        assert!(parse(&format!("{base}{node}[[link]]\nbetween = [\"a\", \"z\"]\nrtt_ms = 1\nbandwidth_mbit_per_s = 1\n")).is_err());
        assert!(parse(&format!(
            "{base}{}",
            node.replace("= 1\nmatmul", "= -1\nmatmul")
        ))
        .is_err());
        assert!(parse(&format!("{base}{}", node.replace("cpu", "abacus"))).is_err());
        assert!(parse(&format!("{base}{node}colour = \"red\"\n")).is_err());
    }
}
