//! The nodes and the links between them, as measured (or, for planning on paper, as quoted).

use serde::{Deserialize, Serialize};

/// Where a node runs its matmuls. Informational for the plan's table: the numbers that matter
/// (bandwidth, throughput, budget) are measured per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Cpu,
    Cuda,
    Metal,
    Vulkan,
    Rocm,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Metal => "metal",
            Backend::Vulkan => "vulkan",
            Backend::Rocm => "rocm",
        }
    }
}

/// One node: one memory pool with one compute engine. A machine with a GPU and spare RAM is
/// two nodes (the GPU node and the CPU node) joined by a link of ~0 RTT and PCIe bandwidth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProfile {
    /// Stable across re-plans: a re-plan matches stages to nodes by id.
    pub id: String,
    pub backend: Backend,
    /// Bytes this node may fill with weights and KV cache (free memory less a safety margin).
    pub memory_budget_bytes: u64,
    /// Measured streaming read bandwidth of the memory the weights live in.
    pub memory_bandwidth_bytes_per_s: u64,
    /// Measured quantized-matmul throughput with the weights already in cache (compute only).
    pub matmul_flops_per_s: u64,
}

/// One direction of a link between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkProfile {
    /// Measured round-trip time; a hop costs half of it one way.
    pub rtt_us: u64,
    pub bandwidth_bytes_per_s: u64,
}

/// Links between every ordered pair of nodes, indexed like the node list. The diagonal is
/// never used (a node does not hop to itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkMatrix {
    n_nodes: usize,
    /// Row-major: `links[from * n_nodes + to]`.
    links: Vec<LinkProfile>,
}

impl LinkMatrix {
    /// Every pair joined by the same link (one switch, one kind of network).
    pub fn uniform(n_nodes: usize, link: LinkProfile) -> Self {
        Self {
            n_nodes,
            links: vec![link; n_nodes * n_nodes],
        }
    }

    pub fn n_nodes(&self) -> usize {
        self.n_nodes
    }

    /// One link per ordered pair: false only for a matrix deserialised from bad input.
    pub(crate) fn is_square(&self) -> bool {
        self.n_nodes.checked_mul(self.n_nodes) == Some(self.links.len())
    }

    pub fn get(&self, from: usize, to: usize) -> LinkProfile {
        self.links[from * self.n_nodes + to]
    }

    /// Sets both directions between `a` and `b`.
    pub fn set_symmetric(&mut self, a: usize, b: usize, link: LinkProfile) {
        self.set(a, b, link);
        self.set(b, a, link);
    }

    pub fn set(&mut self, from: usize, to: usize, link: LinkProfile) {
        self.links[from * self.n_nodes + to] = link;
    }
}

/// What the planner minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Objective {
    /// One sequence's token time: every stage plus every hop (the default; a model that
    /// fits one fast node stays there).
    #[default]
    Latency,
    /// The pipeline's throughput with many sequences in flight: the slowest stage or hop
    /// (every stage works on its own group of sequences at once, so the bottleneck sets the
    /// pace). Uses every node that lowers the bottleneck, and balances the stages' times.
    Throughput,
}

/// What the cluster must serve: the KV cache is sized for `sequences` of `context_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Tokens per sequence the KV cache must hold (prompt + generated).
    pub context_tokens: u32,
    /// Sequences served at once, each with its own cache.
    pub sequences: u32,
}
