//! The plan: what each stage holds and costs, why nodes were left out, and how it was found.
//! Its fields are the contract with the coordinator and the dashboard: add, don't rename.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::cluster::{Backend, Objective};
use crate::cost::CostModel;
use crate::search::Layout;

/// A layer assignment with its predicted cost. Made by [`crate::plan`] (always fits),
/// [`crate::proportional_plan`] and [`crate::evaluate`] (may not fit: see [`Plan::fits`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub model_name: String,
    pub n_layers: u32,
    /// Tokens per sequence the KV caches are sized for.
    pub context_tokens: u32,
    /// Sequences the KV caches are sized for.
    pub sequences: u32,
    /// Pipeline order: stage 0 embeds, the last stage holds the head and samples.
    pub stages: Vec<Stage>,
    /// Nodes that hold no layers, each with the reason.
    pub excluded: Vec<ExcludedNode>,
    /// Predicted time to decode one token of one sequence at full context: every stage's
    /// time plus every hop, including the token's return from the last stage to stage 0.
    pub token_time_ms: f64,
    /// `1000 / token_time_ms` (0 for a model that costs nothing, so JSON stays finite).
    pub tokens_per_s: f64,
    /// Every stage within its node's memory budget.
    pub fits: bool,
    pub method: PlanMethod,
    /// Present when a previous plan was given: what the re-plan chose and what it moves.
    pub replan: Option<Replan>,
    /// What the layout was chosen to minimise (`token_time_ms` is one sequence's token
    /// time either way).
    #[serde(default)]
    pub objective: Objective,
}

/// One node's part of the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub node_id: String,
    pub backend: Backend,
    /// Half-open block range `[start, end)`.
    pub layers: Range<u32>,
    pub holds_embedding: bool,
    pub holds_head: bool,
    /// Blocks plus the embedding and/or head this stage holds.
    pub weight_bytes: u64,
    /// KV cache for every sequence at full context, for this stage's blocks.
    pub kv_cache_bytes: u64,
    /// `weight_bytes + kv_cache_bytes`.
    pub memory_used_bytes: u64,
    pub memory_budget_bytes: u64,
    pub fits: bool,
    /// Streaming the weights and one sequence's KV cache from memory, per token.
    pub read_time_ms: f64,
    /// The matmuls, per token.
    pub compute_time_ms: f64,
    /// `read_time_ms + compute_time_ms`.
    pub stage_time_ms: f64,
    /// The hop out of this stage: one activation row to the next stage, or, from the last
    /// stage, the sampled token id back to stage 0. None for a single-stage plan.
    pub hop: Option<Hop>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    pub to_node_id: String,
    pub payload_bytes: u64,
    pub rtt_us: u64,
    pub bandwidth_bytes_per_s: u64,
    /// `rtt_us / 2 + payload_bytes / bandwidth`.
    pub time_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExcludedNode {
    pub node_id: String,
    pub reason: ExclusionReason,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExclusionReason {
    /// Its budget is below the lightest block plus that block's KV cache.
    CannotHoldOneLayer {
        needed_bytes: u64,
        budget_bytes: u64,
    },
    /// Including it would make tokens slower: the best plan that uses the node costs this much: one sequence's token time, or under
    /// [`Objective::Throughput`] the bottleneck (the plan's `objective` says which).
    SlowsPipeline { best_token_time_ms_with_node: f64 },
    /// It could hold a layer, but no feasible plan that uses it was found.
    NoFeasiblePlanWithNode,
    /// The optimum uses it, but the previous plan was kept because the optimum is less than
    /// [`crate::limits::REPLAN_GAIN_FRACTION_MIN`] faster.
    PreviousPlanKept { optimum_token_time_ms: f64 },
    /// The memory-proportional split rounded its share to zero layers.
    NoProportionalShare,
}

/// How the layout was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlanMethod {
    /// Every ordered subset of nodes solved exactly: optimal under the cost model.
    Exhaustive { orders_evaluated: u64 },
    /// Seeded local search over orders, each order solved exactly.
    Heuristic { orders_evaluated: u64 },
    /// Layers ∝ memory budget in the given node order (exo's and llama.cpp's split).
    MemoryProportional,
    /// A layout given by the caller, evaluated.
    Given,
}

/// What a re-plan (a plan made with a previous plan in hand) decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replan {
    pub decision: ReplanDecision,
    /// Weight bytes that must be sent to nodes that did not hold them in the previous plan.
    pub moved_bytes: u64,
    /// The fastest plan's predicted time and what it would have moved.
    pub optimum_token_time_ms: f64,
    pub optimum_moved_bytes: u64,
    /// The threshold in force ([`crate::limits::REPLAN_GAIN_FRACTION_MIN`]).
    pub gain_fraction_min: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplanDecision {
    /// The previous plan still fits and the optimum is not materially faster.
    KeptPrevious,
    /// The previous plan's surviving nodes, in its order, with the layers re-split.
    ResplitPreviousOrder,
    /// The fastest plan (the previous one is gone, does not fit, or is materially slower).
    NewOptimum,
}

impl Plan {
    /// The slowest stage or hop: what paces the pipeline when every stage works on its own
    /// group of sequences at once.
    pub fn bottleneck_ms(&self) -> f64 {
        self.stages
            .iter()
            .flat_map(|s| std::iter::once(s.stage_time_ms).chain(s.hop.as_ref().map(|h| h.time_ms)))
            .fold(0.0, f64::max)
    }

    /// The stages' layer ranges in pipeline order (what [`crate::single_node_plan`] returns
    /// for one node).
    pub fn layer_ranges(&self) -> Vec<Range<u32>> {
        self.stages
            .iter()
            .map(|stage| stage.layers.clone())
            .collect()
    }

    /// The stage that runs `layer_idx`.
    pub fn stage_for_layer(&self, layer_idx: u32) -> Option<&Stage> {
        self.stages
            .iter()
            .find(|stage| stage.layers.contains(&layer_idx))
    }

    /// Sum of the stages' hop times (activations and the token's return).
    pub fn hops_time_ms(&self) -> f64 {
        self.stages
            .iter()
            .filter_map(|stage| stage.hop.as_ref())
            .map(|hop| hop.time_ms)
            .sum()
    }
}

/// Builds the full explanation of a layout.
pub(crate) fn build_plan(
    cm: &CostModel,
    layout: &Layout,
    excluded: Vec<ExcludedNode>,
    method: PlanMethod,
    replan: Option<Replan>,
) -> Plan {
    let n = cm.n_layers();
    let mut stages = Vec::with_capacity(layout.len());
    let mut token_time_s = 0.0;
    for (i, &(node, start, end)) in layout.iter().enumerate() {
        let profile = &cm.nodes[node];
        let time = cm.stage_time(node, start, end);
        let next = match layout.get(i + 1) {
            Some(&(next, _, _)) => Some((next, cm.model.activation_bytes_per_token)),
            None if layout.len() > 1 => Some((layout[0].0, crate::limits::TOKEN_ID_BYTES)),
            None => None,
        };
        let hop = next.map(|(to, payload_bytes)| {
            let link = cm.links.get(node, to);
            Hop {
                to_node_id: cm.nodes[to].id.clone(),
                payload_bytes,
                rtt_us: link.rtt_us,
                bandwidth_bytes_per_s: link.bandwidth_bytes_per_s,
                time_ms: cm.hop_time_s(node, to, payload_bytes) * 1e3,
            }
        });
        // Same order of additions as `search::layout_cost_s`, so the totals agree exactly.
        token_time_s += time.total_s();
        if let Some((to, payload_bytes)) = next {
            token_time_s += cm.hop_time_s(node, to, payload_bytes);
        }
        let weight_bytes = cm.weight_bytes(start, end);
        let kv_cache_bytes = cm.kv_cache_bytes(start, end);
        let memory_used_bytes = weight_bytes.saturating_add(kv_cache_bytes);
        stages.push(Stage {
            node_id: profile.id.clone(),
            backend: profile.backend,
            layers: start..end,
            holds_embedding: start == 0,
            holds_head: end == n,
            weight_bytes,
            kv_cache_bytes,
            memory_used_bytes,
            memory_budget_bytes: profile.memory_budget_bytes,
            fits: memory_used_bytes <= profile.memory_budget_bytes,
            read_time_ms: time.read_s * 1e3,
            compute_time_ms: time.compute_s * 1e3,
            stage_time_ms: time.total_s() * 1e3,
            hop,
        });
    }
    let token_time_ms = token_time_s * 1e3;
    Plan {
        model_name: cm.model.name.clone(),
        n_layers: n,
        context_tokens: cm.workload.context_tokens,
        sequences: cm.workload.sequences,
        fits: stages.iter().all(|stage| stage.fits),
        stages,
        excluded,
        token_time_ms,
        tokens_per_s: if token_time_ms > 0.0 {
            1e3 / token_time_ms
        } else {
            0.0
        },
        method,
        replan,
        objective: cm.objective,
    }
}
