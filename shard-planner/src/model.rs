//! What the planner needs to know about a model: per-layer costs, not tensors.

use serde::{Deserialize, Serialize};

/// The model as the cost model sees it. Built from a GGUF header by the CLI (through the
/// engine's profile) or from an architecture by [`crate::specs`].
///
/// Byte counts are for the weights as stored (quantized); `head_bytes` follows the engine's
/// convention: when the embedding is tied, the head is a copy of it that the last stage holds,
/// and a single stage holding both keeps only one copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelProfile {
    /// Shown in the plan's table, e.g. `llama-3.1-70b-q4_k_m`.
    pub name: String,
    pub n_layers: u32,
    /// Weight bytes each block holds in memory, in block order.
    pub layer_weight_bytes: Vec<u64>,
    /// Weight bytes each block reads per decoded token. Equal to `layer_weight_bytes` for a
    /// dense model; a mixture of experts reads only its active experts.
    pub layer_read_bytes_per_token: Vec<u64>,
    /// Floating-point operations each block does per decoded token (2 × active parameters).
    pub layer_flops_per_token: Vec<u64>,
    /// `token_embd.weight`, held by the first stage. Decode reads one row of it: negligible.
    pub embedding_bytes: u64,
    /// Output norm + output matrix, held and read in full per token by the last stage.
    pub head_bytes: u64,
    /// FLOPs of the output matrix per token (2 × vocab × hidden).
    pub head_flops_per_token: u64,
    /// The head reuses the embedding (see the struct's doc for what that does to memory).
    pub tied_embeddings: bool,
    /// KV-cache bytes one token occupies in one layer (K and V, all KV heads).
    pub kv_bytes_per_token_per_layer: u64,
    /// Bytes of one token's hidden state crossing a stage boundary.
    pub activation_bytes_per_token: u64,
    /// Per block, the most positions its KV cache holds however long the context: a
    /// sliding-window layer's window (plus its cache's slack), `None` for a layer that keeps
    /// every position. Empty: every layer keeps every position.
    #[serde(default)]
    pub layer_kv_positions_max: Vec<Option<u32>>,
}

impl ModelProfile {
    /// A dense model (every weight read for every token) whose layers' FLOPs are 2 × their
    /// parameters: the shape the CLI builds from a GGUF header.
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        name: impl Into<String>,
        layer_weight_bytes: Vec<u64>,
        layer_flops_per_token: u64,
        embedding_bytes: u64,
        head_bytes: u64,
        head_flops_per_token: u64,
        tied_embeddings: bool,
        kv_bytes_per_token_per_layer: u64,
        activation_bytes_per_token: u64,
    ) -> Self {
        let n_layers = layer_weight_bytes.len() as u32;
        Self {
            name: name.into(),
            n_layers,
            layer_read_bytes_per_token: layer_weight_bytes.clone(),
            layer_flops_per_token: vec![layer_flops_per_token; n_layers as usize],
            layer_weight_bytes,
            embedding_bytes,
            head_bytes,
            head_flops_per_token,
            tied_embeddings,
            kv_bytes_per_token_per_layer,
            activation_bytes_per_token,
            layer_kv_positions_max: Vec::new(),
        }
    }

    /// Positions block `layer_idx` caches per sequence at a context of `context_tokens`.
    pub fn layer_kv_positions(&self, layer_idx: usize, context_tokens: u32) -> u32 {
        match self.layer_kv_positions_max.get(layer_idx).copied().flatten() {
            Some(max) => max.min(context_tokens),
            None => context_tokens,
        }
    }

    /// Weight bytes of all blocks.
    pub fn layers_weight_bytes(&self) -> u64 {
        self.layer_weight_bytes.iter().sum()
    }

    /// Weight bytes a stage holding `[start, end)` keeps in memory: its blocks, the embedding
    /// if it is first, the head if it is last (one copy when tied and both). Mirrors
    /// `potluck_engine::profile::ModelProfile::slice_weight_bytes`.
    pub fn slice_weight_bytes(&self, start: u32, end: u32) -> u64 {
        let blocks: u64 = self.layer_weight_bytes[start as usize..end as usize]
            .iter()
            .sum();
        blocks + self.ends_weight_bytes(start == 0, end == self.n_layers)
    }

    /// Embedding and head bytes a stage holds for being first and/or last.
    pub(crate) fn ends_weight_bytes(&self, first: bool, last: bool) -> u64 {
        match (first, last) {
            (true, true) if self.tied_embeddings => self.head_bytes,
            _ => {
                (if first { self.embedding_bytes } else { 0 })
                    + (if last { self.head_bytes } else { 0 })
            }
        }
    }

    /// The least memory any plan needs: every block, its KV cache, and the ends held once.
    pub fn weight_bytes_min(&self) -> u64 {
        self.layers_weight_bytes() + self.ends_weight_bytes(true, true)
    }
}

/// FLOPs per token of one dense llama-style block: Q, K, V, O projections and the three FFN
/// matrices, 2 FLOPs (multiply + add) per weight. Attention over the cache (∝ context) is left
/// out: at home-cluster contexts it is a few percent of the matmuls, and its memory traffic,
/// which dominates, is in the cost model's KV read term.
pub fn dense_layer_flops_per_token(
    n_embd: u64,
    n_ff: u64,
    n_head: u64,
    n_head_kv: u64,
    head_dim: u64,
) -> u64 {
    let attention = n_embd * head_dim * (2 * n_head + 2 * n_head_kv);
    let ffn = 3 * n_embd * n_ff;
    2 * (attention + ffn)
}

/// FLOPs per token of the output matrix.
pub fn head_flops_per_token(n_embd: u64, vocab_size: u64) -> u64 {
    2 * n_embd * vocab_size
}
