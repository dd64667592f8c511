//! The cost model: predicted decode time of a stage and of a hop, and a stage's memory.
//!
//! Decode is memory-bound: for each token a stage streams its weights (and the sequence's KV
//! cache) from memory once, then does the matmuls. So a stage holding blocks `[a, b)` costs
//!
//! ```text
//! read_s    = (Σ read bytes of a..b + Σ_{l in a..b} min(context, kv_positions_max(l))
//!              × kv_bytes_per_token_per_layer + head_bytes if last) / memory_bandwidth
//! compute_s = (Σ flops of a..b + head_flops if last) / matmul_throughput
//! stage_s   = read_s + compute_s
//! ```
//!
//! (added, not overlapped: a conservative bound that also stays right when a CPU node is
//! compute-bound), and a hop from node u to node v carrying `p` bytes costs
//! `rtt(u, v) / 2 + p / bandwidth(u, v)`. A token's decode time is the sum over stages, plus
//! a hop of one activation row between consecutive stages, plus the hop that returns the
//! sampled token id from the last stage to stage 0. docs/planner.md derives it.

use crate::cluster::{LinkMatrix, NodeProfile, Objective, Workload};
use crate::model::ModelProfile;

/// Precomputed prefix sums so that any stage's cost is O(1).
pub(crate) struct CostModel<'a> {
    pub model: &'a ModelProfile,
    pub nodes: &'a [NodeProfile],
    pub links: &'a LinkMatrix,
    pub workload: Workload,
    /// How stage and hop times combine into a layout's cost (see [`CostModel::chain_s`]).
    pub objective: Objective,
    prefix_weight_bytes: Vec<u64>,
    prefix_read_bytes: Vec<u64>,
    prefix_flops: Vec<u64>,
    /// One sequence's cache at full context, summed over blocks: a sliding-window block
    /// holds its window only. Memory counts every sequence's; time one sequence's (its
    /// attention reads its whole cache: the plan must hold up at the end of a long answer,
    /// not only at its start).
    prefix_kv_sequence_bytes: Vec<u64>,
}

/// The two parts of a stage's predicted time, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StageTime {
    pub read_s: f64,
    pub compute_s: f64,
}

impl StageTime {
    pub fn total_s(self) -> f64 {
        self.read_s + self.compute_s
    }
}

fn prefix_sums(values: &[u64]) -> Vec<u64> {
    let mut sums = Vec::with_capacity(values.len() + 1);
    let mut total = 0u64;
    sums.push(0);
    for &value in values {
        total = total.saturating_add(value);
        sums.push(total);
    }
    sums
}

impl<'a> CostModel<'a> {
    /// The inputs must have passed [`crate::validate`].
    pub fn new(
        model: &'a ModelProfile,
        nodes: &'a [NodeProfile],
        links: &'a LinkMatrix,
        workload: Workload,
    ) -> Self {
        let per_layer: Vec<u64> = (0..model.n_layers as usize)
            .map(|l| {
                u64::from(model.layer_kv_positions(l, workload.context_tokens))
                    .saturating_mul(model.kv_bytes_per_token_per_layer)
            })
            .collect();
        Self {
            model,
            nodes,
            links,
            workload,
            objective: Objective::Latency,
            prefix_weight_bytes: prefix_sums(&model.layer_weight_bytes),
            prefix_read_bytes: prefix_sums(&model.layer_read_bytes_per_token),
            prefix_flops: prefix_sums(&model.layer_flops_per_token),
            prefix_kv_sequence_bytes: prefix_sums(&per_layer),
        }
    }

    pub fn n_layers(&self) -> u32 {
        self.model.n_layers
    }

    /// A layout's cost so far followed by one more stage or hop: their sum for latency
    /// (one token passes through all of them), the larger for throughput (each works on its
    /// own group of sequences at once, so the slowest sets the pace).
    pub fn chain_s(&self, so_far_s: f64, next_s: f64) -> f64 {
        match self.objective {
            Objective::Latency => so_far_s + next_s,
            Objective::Throughput => so_far_s.max(next_s),
        }
    }

    /// One sequence's KV cache over blocks `[start, end)`.
    fn kv_sequence_bytes(&self, start: u32, end: u32) -> u64 {
        self.prefix_kv_sequence_bytes[end as usize] - self.prefix_kv_sequence_bytes[start as usize]
    }

    pub fn kv_cache_bytes(&self, start: u32, end: u32) -> u64 {
        self.kv_sequence_bytes(start, end).saturating_mul(u64::from(self.workload.sequences))
    }

    pub fn weight_bytes(&self, start: u32, end: u32) -> u64 {
        let blocks =
            self.prefix_weight_bytes[end as usize] - self.prefix_weight_bytes[start as usize];
        blocks.saturating_add(
            self.model
                .ends_weight_bytes(start == 0, end == self.n_layers()),
        )
    }

    /// Weights + KV cache of a stage holding `[start, end)`; first/last follow from the range.
    pub fn stage_memory_bytes(&self, start: u32, end: u32) -> u64 {
        self.weight_bytes(start, end)
            .saturating_add(self.kv_cache_bytes(start, end))
    }

    pub fn stage_fits(&self, node: usize, start: u32, end: u32) -> bool {
        self.stage_memory_bytes(start, end) <= self.nodes[node].memory_budget_bytes
    }

    pub fn stage_time(&self, node: usize, start: u32, end: u32) -> StageTime {
        let profile = &self.nodes[node];
        let last = end == self.n_layers();
        let mut read_bytes =
            (self.prefix_read_bytes[end as usize] - self.prefix_read_bytes[start as usize]) as f64;
        read_bytes += self.kv_sequence_bytes(start, end) as f64;
        let mut flops =
            (self.prefix_flops[end as usize] - self.prefix_flops[start as usize]) as f64;
        if last {
            read_bytes += self.model.head_bytes as f64;
            flops += self.model.head_flops_per_token as f64;
        }
        StageTime {
            read_s: read_bytes / profile.memory_bandwidth_bytes_per_s as f64,
            compute_s: flops / profile.matmul_flops_per_s as f64,
        }
    }

    pub fn stage_time_s(&self, node: usize, start: u32, end: u32) -> f64 {
        self.stage_time(node, start, end).total_s()
    }

    /// One hop from `from` to `to` carrying `payload_bytes`: half the RTT plus serialisation.
    pub fn hop_time_s(&self, from: usize, to: usize, payload_bytes: u64) -> f64 {
        let link = self.links.get(from, to);
        link.rtt_us as f64 * 0.5e-6 + payload_bytes as f64 / link.bandwidth_bytes_per_s as f64
    }

    /// The hop between consecutive stages: one token's activation row.
    pub fn activation_hop_s(&self, from: usize, to: usize) -> f64 {
        self.hop_time_s(from, to, self.model.activation_bytes_per_token)
    }

    /// The hop closing the loop: the sampled token id back to stage 0.
    pub fn token_hop_s(&self, from: usize, to: usize) -> f64 {
        self.hop_time_s(from, to, crate::limits::TOKEN_ID_BYTES)
    }

    /// Time of one block on `node` if it were a middle stage: how the heuristic ranks speed.
    pub fn mean_layer_time_s(&self, node: usize) -> f64 {
        self.stage_time_s(node, 0, self.n_layers().saturating_sub(1).max(1))
            / f64::from(self.n_layers().saturating_sub(1).max(1))
    }

    /// Memory of the smallest middle stage (the lightest block with its KV cache).
    pub fn lightest_layer_bytes(&self) -> u64 {
        (0..self.n_layers()).map(|l| self.stage_memory_bytes_of_block(l)).min().unwrap_or(0)
    }

    pub fn heaviest_layer_bytes(&self) -> u64 {
        (0..self.n_layers()).map(|l| self.stage_memory_bytes_of_block(l)).max().unwrap_or(0)
    }

    /// Block `l`'s weights and its KV cache for every sequence.
    fn stage_memory_bytes_of_block(&self, l: u32) -> u64 {
        self.model.layer_weight_bytes[l as usize].saturating_add(self.kv_cache_bytes(l, l + 1))
    }
}
