//! Why a plan could not be made. Every variant is an expected condition of user input or of
//! a cluster too small for the model, with what it takes to fix it.

use crate::display::format_bytes;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("the cluster has no nodes")]
    NoNodes,
    #[error("{nodes} nodes exceed the planner's limit of {max}")]
    TooManyNodes { nodes: usize, max: usize },
    #[error("the model has no layers")]
    NoLayers,
    #[error("the model has {n_layers} layers, over the planner's limit of {max}")]
    TooManyLayers { n_layers: u32, max: u32 },
    #[error("the model profile's `{field}` has {got} entries for {n_layers} layers")]
    LayerCountMismatch {
        field: &'static str,
        got: usize,
        n_layers: u32,
    },
    #[error("node id {0:?} appears more than once")]
    DuplicateNodeId(String),
    #[error("node {0:?} reports zero memory bandwidth")]
    ZeroMemoryBandwidth(String),
    #[error("node {0:?} reports zero matmul throughput")]
    ZeroMatmulThroughput(String),
    #[error("the link matrix is for {got} nodes but the cluster has {expected}")]
    LinkMatrixSize { expected: usize, got: usize },
    #[error("the link from {from:?} to {to:?} has zero bandwidth")]
    ZeroLinkBandwidth { from: String, to: String },
    #[error("the pinned first node {0:?} is not in the cluster")]
    UnknownFirstNode(String),
    #[error(
        "the model does not fit: split across nodes it needs at least {} (weights {} + KV cache \
         {}) but the nodes offer {}: {} missing. Add a node, or lower the context or the number \
         of sequences",
        format_bytes(*required_bytes),
        format_bytes(*weight_bytes),
        format_bytes(*kv_cache_bytes),
        format_bytes(*available_bytes),
        format_bytes(*missing_bytes)
    )]
    ModelDoesNotFit {
        required_bytes: u64,
        weight_bytes: u64,
        kv_cache_bytes: u64,
        available_bytes: u64,
        missing_bytes: u64,
    },
    #[error(
        "the pinned first node {node_id:?} cannot hold the embedding and one layer: it needs {} \
         and its budget is {} ({} missing)",
        format_bytes(*needed_bytes),
        format_bytes(*budget_bytes),
        format_bytes(needed_bytes.saturating_sub(*budget_bytes))
    )]
    FirstNodeTooSmall {
        node_id: String,
        needed_bytes: u64,
        budget_bytes: u64,
    },
    #[error(
        "no contiguous split fits: the budgets add up to {} of the {} needed, but layers are \
         indivisible (the largest with its KV cache takes {}) and the first and last stages also \
         hold the embedding ({}) and the head ({}). Add memory, or lower the context or the \
         number of sequences",
        format_bytes(*available_bytes),
        format_bytes(*required_bytes),
        format_bytes(*largest_layer_bytes),
        format_bytes(*embedding_bytes),
        format_bytes(*head_bytes)
    )]
    NoFeasibleSplit {
        required_bytes: u64,
        available_bytes: u64,
        largest_layer_bytes: u64,
        embedding_bytes: u64,
        head_bytes: u64,
    },
    #[error("invalid stage assignment: {0}")]
    InvalidAssignment(String),
}
