//! # potluck-shard-planner
//!
//! Decides which node runs which layers. Given the model's per-layer costs
//! ([`ModelProfile`]), each node's measured memory budget, memory bandwidth and matmul
//! throughput ([`NodeProfile`]), the measured links between them ([`LinkMatrix`]) and the
//! workload ([`Workload`]: context length × concurrent sequences, which sizes the KV cache),
//! [`plan`] returns contiguous layer ranges in a stage order that minimise the predicted
//! decode time per token, within every node's memory, and explains itself ([`Plan`]: per
//! stage its layers, memory used / budget, time and hop; why each left-out node was left out).
//!
//! - The cost model ([`cost`]) is memory-bound decode: bytes read per token ÷
//!   bandwidth, plus FLOPs ÷ throughput, plus per hop half the RTT and the activation row ÷
//!   link bandwidth. docs/planner.md derives it and works an example.
//! - For a given stage order a DP places the boundaries exactly; orders are searched
//!   exhaustively up to [`limits::EXHAUSTIVE_ORDER_NODES_MAX`] nodes (so the plan is optimal
//!   under the model) and by seeded local search beyond.
//! - Given the previous plan, a re-plan keeps the layout that moves the fewest bytes unless
//!   the optimum is at least [`limits::REPLAN_GAIN_FRACTION_MIN`] faster.
//! - [`proportional_plan`] is the memory-proportional split exo and llama.cpp use, for
//!   comparison; [`evaluate`] prices any given layout.
//! - [`specs`] computes profiles of well-known models in Q4_K_M from their architecture.
//!
//! **Architecture Invariant:** pure logic. No tokio, no candle, no other workspace crate, no
//! I/O, no clock, no randomness: the same inputs give the same plan, bit for bit. Reading a
//! GGUF header and a cluster file is the CLI's job (`shard-planner/cli`).
//!
//! **API Boundary:** [`Plan`]'s fields are consumed by the coordinator and serialised for the
//! dashboard; they only grow.

mod baseline;
mod cluster;
pub mod cost;
mod display;
mod error;
pub mod limits;
mod model;
mod plan;
mod replan;
mod search;
pub mod specs;

use std::collections::BTreeSet;
use std::ops::Range;

pub use cluster::{Backend, LinkMatrix, LinkProfile, NodeProfile, Objective, Workload};
pub use display::format_bytes;
pub use error::PlanError;
pub use model::{dense_layer_flops_per_token, head_flops_per_token, ModelProfile};
pub use plan::{
    ExcludedNode, ExclusionReason, Hop, Plan, PlanMethod, Replan, ReplanDecision, Stage,
};

use cost::CostModel;
use limits::{LAYERS_MAX, NODES_MAX};
use search::Layout;

/// The plan for one machine with no workers: it runs every layer itself.
// One stage is a list of one range, not a range of layer indices.
#[allow(clippy::single_range_in_vec_init)]
pub fn single_node_plan(n_layers: u32) -> Vec<Range<u32>> {
    vec![0..n_layers]
}

/// Everything a plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    pub model: &'a ModelProfile,
    pub nodes: &'a [NodeProfile],
    /// Indexed like `nodes`.
    pub links: &'a LinkMatrix,
    pub workload: Workload,
    /// The node that must be stage 0 (the coordinator, which tokenizes and embeds).
    pub first_node_id: Option<&'a str>,
    /// The plan in force, if any: a re-plan then prefers moving few weights.
    pub previous: Option<&'a Plan>,
    /// What [`plan`] minimises (latency unless set).
    pub objective: Objective,
}

impl<'a> PlanRequest<'a> {
    pub fn new(
        model: &'a ModelProfile,
        nodes: &'a [NodeProfile],
        links: &'a LinkMatrix,
        workload: Workload,
    ) -> Self {
        Self {
            model,
            nodes,
            links,
            workload,
            first_node_id: None,
            previous: None,
            objective: Objective::Latency,
        }
    }

    pub fn with_objective(mut self, objective: Objective) -> Self {
        self.objective = objective;
        self
    }

    pub fn with_first_node(mut self, node_id: &'a str) -> Self {
        self.first_node_id = Some(node_id);
        self
    }

    pub fn with_previous(mut self, previous: &'a Plan) -> Self {
        self.previous = Some(previous);
        self
    }
}

/// Checks the request's shape; returns the pinned first node's index.
fn validate(request: &PlanRequest) -> Result<Option<usize>, PlanError> {
    let model = request.model;
    let nodes = request.nodes;
    if nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    if nodes.len() > NODES_MAX {
        return Err(PlanError::TooManyNodes {
            nodes: nodes.len(),
            max: NODES_MAX,
        });
    }
    if model.n_layers == 0 {
        return Err(PlanError::NoLayers);
    }
    if model.n_layers > LAYERS_MAX {
        return Err(PlanError::TooManyLayers {
            n_layers: model.n_layers,
            max: LAYERS_MAX,
        });
    }
    for (field, got) in [
        ("layer_weight_bytes", model.layer_weight_bytes.len()),
        (
            "layer_read_bytes_per_token",
            model.layer_read_bytes_per_token.len(),
        ),
        ("layer_flops_per_token", model.layer_flops_per_token.len()),
    ] {
        if got != model.n_layers as usize {
            return Err(PlanError::LayerCountMismatch {
                field,
                got,
                n_layers: model.n_layers,
            });
        }
    }
    let mut ids = BTreeSet::new();
    for node in nodes {
        if !ids.insert(node.id.as_str()) {
            return Err(PlanError::DuplicateNodeId(node.id.clone()));
        }
        if node.memory_bandwidth_bytes_per_s == 0 {
            return Err(PlanError::ZeroMemoryBandwidth(node.id.clone()));
        }
        if node.matmul_flops_per_s == 0 {
            return Err(PlanError::ZeroMatmulThroughput(node.id.clone()));
        }
    }
    if request.links.n_nodes() != nodes.len() || !request.links.is_square() {
        return Err(PlanError::LinkMatrixSize {
            expected: nodes.len(),
            got: request.links.n_nodes(),
        });
    }
    for (a, from) in nodes.iter().enumerate() {
        for (b, to) in nodes.iter().enumerate() {
            if a != b && request.links.get(a, b).bandwidth_bytes_per_s == 0 {
                return Err(PlanError::ZeroLinkBandwidth {
                    from: from.id.clone(),
                    to: to.id.clone(),
                });
            }
        }
    }
    request
        .first_node_id
        .map(|id| {
            nodes
                .iter()
                .position(|node| node.id == id)
                .ok_or_else(|| PlanError::UnknownFirstNode(id.to_string()))
        })
        .transpose()
}

/// The model cannot fit in the sum of the budgets: say by how much.
fn check_total_memory(cm: &CostModel) -> Result<(), PlanError> {
    let n = cm.n_layers();
    // If one node holds everything there is a plan; otherwise every plan has two or more
    // stages, and the first holds the embedding while the last holds the head (a copy of the
    // embedding when tied).
    if (0..cm.nodes.len()).any(|node| cm.stage_fits(node, 0, n)) {
        return Ok(());
    }
    let weight_bytes = cm
        .model
        .layers_weight_bytes()
        .saturating_add(cm.model.ends_weight_bytes(true, false))
        .saturating_add(cm.model.ends_weight_bytes(false, true));
    let kv_cache_bytes = cm.kv_cache_bytes(0, n);
    let required_bytes = weight_bytes.saturating_add(kv_cache_bytes);
    let available_bytes = total_budget_bytes(cm);
    if required_bytes > available_bytes {
        return Err(PlanError::ModelDoesNotFit {
            required_bytes,
            weight_bytes,
            kv_cache_bytes,
            available_bytes,
            missing_bytes: required_bytes - available_bytes,
        });
    }
    Ok(())
}

fn total_budget_bytes(cm: &CostModel) -> u64 {
    cm.nodes.iter().fold(0u64, |sum, node| {
        sum.saturating_add(node.memory_budget_bytes)
    })
}

fn no_feasible_split(cm: &CostModel) -> PlanError {
    let n = cm.n_layers();
    let weight_bytes = cm.model.layers_weight_bytes().saturating_add(
        cm.model.ends_weight_bytes(true, false) + cm.model.ends_weight_bytes(false, true),
    );
    PlanError::NoFeasibleSplit {
        required_bytes: weight_bytes.saturating_add(cm.kv_cache_bytes(0, n)),
        available_bytes: total_budget_bytes(cm),
        largest_layer_bytes: cm.heaviest_layer_bytes(),
        embedding_bytes: cm.model.embedding_bytes,
        head_bytes: cm.model.head_bytes,
    }
}

/// The fastest plan under the cost model that fits every node's memory (see the crate docs).
pub fn plan(request: &PlanRequest) -> Result<Plan, PlanError> {
    let first = validate(request)?;
    let mut cm = CostModel::new(
        request.model,
        request.nodes,
        request.links,
        request.workload,
    );
    cm.objective = request.objective;
    check_total_memory(&cm)?;
    if let Some(node) = first {
        let needed_bytes = cm.stage_memory_bytes(0, 1);
        let budget_bytes = cm.nodes[node].memory_budget_bytes;
        if needed_bytes > budget_bytes {
            return Err(PlanError::FirstNodeTooSmall {
                node_id: cm.nodes[node].id.clone(),
                needed_bytes,
                budget_bytes,
            });
        }
    }
    let seed: Vec<usize> = baseline::proportional_layout(&cm)
        .iter()
        .map(|s| s.0)
        .collect();
    let result = search::search(&cm, first, &[seed]);
    let method = if result.exhaustive {
        PlanMethod::Exhaustive {
            orders_evaluated: result.orders_evaluated,
        }
    } else {
        PlanMethod::Heuristic {
            orders_evaluated: result.orders_evaluated,
        }
    };
    let optimum = result.best.clone().ok_or_else(|| no_feasible_split(&cm))?;
    let optimum_layout = optimum.1.clone();
    let (layout, replan) = match request.previous {
        Some(previous) => {
            let (_, layout, replan) = replan::choose(&cm, first, previous, optimum);
            (layout, Some(replan))
        }
        None => (optimum.1, None),
    };
    let excluded = explain_exclusions(
        &cm,
        &layout,
        &optimum_layout,
        &result.best_with_node_s,
        replan.as_ref(),
    );
    Ok(plan::build_plan(&cm, &layout, excluded, method, replan))
}

fn explain_exclusions(
    cm: &CostModel,
    layout: &Layout,
    optimum: &Layout,
    best_with_node_s: &[f64],
    replan: Option<&Replan>,
) -> Vec<ExcludedNode> {
    let lightest_layer_bytes = cm.lightest_layer_bytes();
    (0..cm.nodes.len())
        .filter(|&node| !layout.iter().any(|stage| stage.0 == node))
        .map(|node| {
            let profile = &cm.nodes[node];
            let reason = if lightest_layer_bytes > profile.memory_budget_bytes {
                ExclusionReason::CannotHoldOneLayer {
                    needed_bytes: lightest_layer_bytes,
                    budget_bytes: profile.memory_budget_bytes,
                }
            } else if let (Some(replan), true) = (replan, optimum.iter().any(|s| s.0 == node)) {
                ExclusionReason::PreviousPlanKept {
                    optimum_token_time_ms: replan.optimum_token_time_ms,
                }
            } else if best_with_node_s[node].is_finite() {
                ExclusionReason::SlowsPipeline {
                    best_token_time_ms_with_node: best_with_node_s[node] * 1e3,
                }
            } else {
                ExclusionReason::NoFeasiblePlanWithNode
            };
            ExcludedNode {
                node_id: profile.id.clone(),
                reason,
            }
        })
        .collect()
}

/// The memory-proportional split (exo, llama.cpp) on the same inputs, priced by the same cost
/// model. It ignores the pinned first node and the previous plan, and may not fit
/// ([`Plan::fits`]): that is part of the comparison.
pub fn proportional_plan(request: &PlanRequest) -> Result<Plan, PlanError> {
    validate(request)?;
    let cm = CostModel::new(
        request.model,
        request.nodes,
        request.links,
        request.workload,
    );
    let layout = baseline::proportional_layout(&cm);
    let excluded = (0..cm.nodes.len())
        .filter(|&node| !layout.iter().any(|stage| stage.0 == node))
        .map(|node| ExcludedNode {
            node_id: cm.nodes[node].id.clone(),
            reason: ExclusionReason::NoProportionalShare,
        })
        .collect();
    Ok(plan::build_plan(
        &cm,
        &layout,
        excluded,
        PlanMethod::MemoryProportional,
        None,
    ))
}

/// Bytes a stage holding `layers` of `model` needs under `workload`: its weights (with the
/// embedding on the first stage and the head on the last) and its KV cache. The planner's
/// own memory check, for callers that decide before planning (a coordinator deciding whether
/// to load a model at all).
pub fn stage_memory_bytes(model: &ModelProfile, layers: Range<u32>, workload: Workload) -> u64 {
    let links = LinkMatrix::uniform(0, LinkProfile { rtt_us: 0, bandwidth_bytes_per_s: 1 });
    cost::CostModel::new(model, &[], &links, workload).stage_memory_bytes(layers.start, layers.end)
}

/// Prices a given layout: `(node id, layer range)` per stage in pipeline order. The stages
/// must tile `0..n_layers`, each non-empty, each node at most once. The result may not fit.
pub fn evaluate(request: &PlanRequest, stages: &[(&str, Range<u32>)]) -> Result<Plan, PlanError> {
    validate(request)?;
    let cm = CostModel::new(
        request.model,
        request.nodes,
        request.links,
        request.workload,
    );
    let mut layout = Vec::with_capacity(stages.len());
    let mut expected_start = 0;
    for (node_id, layers) in stages {
        let node = cm
            .nodes
            .iter()
            .position(|node| node.id == *node_id)
            .ok_or_else(|| PlanError::InvalidAssignment(format!("unknown node {node_id:?}")))?;
        if layout.iter().any(|&(n, _, _)| n == node) {
            return Err(PlanError::InvalidAssignment(format!(
                "node {node_id:?} appears twice"
            )));
        }
        if layers.start != expected_start || layers.end <= layers.start {
            return Err(PlanError::InvalidAssignment(format!(
                "stage {:?} on {node_id:?} does not continue from layer {expected_start}",
                layers
            )));
        }
        expected_start = layers.end;
        layout.push((node, layers.start, layers.end));
    }
    if expected_start != cm.n_layers() {
        return Err(PlanError::InvalidAssignment(format!(
            "the stages end at layer {expected_start}, the model has {}",
            cm.n_layers()
        )));
    }
    let excluded = Vec::new();
    Ok(plan::build_plan(
        &cm,
        &layout,
        excluded,
        PlanMethod::Given,
        None,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn single_node_covers_every_layer() {
        assert_eq!(super::single_node_plan(30), vec![0..30]);
    }
}
