//! The llama-style decoders (`general.architecture` = `llama`, `mistral`, `qwen2`, `qwen3`,
//! `phi3`, and with a mixture of experts `llama`/`mistral` (Mixtral) and `qwen3moe`): their
//! block, their tensor list and their forward pass over one slice of a model (a contiguous
//! layer range). The expert FFN itself is [`super::moe`].
//!
//! Covers Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 and Qwen3 GGUFs: RMSNorm, grouped-query
//! attention with RoPE as llama.cpp applies it (llama/mistral `LLAMA_ROPE_TYPE_NORM`:
//! adjacent pairs, because convert_hf_to_gguf.py permutes their Q/K rows; qwen2/qwen3
//! `LLAMA_ROPE_TYPE_NEOX`: the two halves; see `llama_model_rope_type()` in llama.cpp),
//! SwiGLU feed-forward, tied or separate output head. What sets the Qwens apart, as
//! llama.cpp's `models/qwen2.cpp` and `models/qwen3.cpp` build it: bias vectors added to the
//! Q/K/V projections wherever a file has them (Qwen2's always; llama.cpp's llama graph adds
//! them too), and Qwen3's per-head RMSNorm of Q and K (weights of `head_dim`, the model's
//! epsilon) between the projection and RoPE.
//!
//! The pass is split so that stages on different machines can each run their part:
//! `embed` (first stage) → `forward_layers` (every stage, its own layers) → `head` (last
//! stage); callers outside the engine reach them through [`super::ModelSlice`]. The KV cache is not in here: callers pass one
//! [`SequenceCache`] per sequence, so one slice serves many sequences, and one step may carry
//! rows (tokens) of several sequences at once.
//!
//! It runs on a [`Backend`] (the CPU today: plain f32 rows with the kernels in
//! [`crate::quant`]); every intermediate buffer is sized by the step, not by the context.

use std::ops::Range;
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::kv_cache::{LayerCacheSpec, SequenceCache};
use crate::ops::{add_in_place, apply_rope, apply_rope_neox, rms_norm, rms_norm_in_place, rope_table, swiglu};
use crate::profile::{ModelProfile, RopeType};
use crate::quant::QMatrix;
use crate::source::{load_matrix, load_split_matrix, load_vector, TensorSource};
use super::moe::{self, ExpertFfn};
use super::{Ends, StepRows};

/// The GGUF tensor names a slice holding `layers` needs (what a worker is sent).
pub(crate) fn slice_tensor_names(profile: &ModelProfile, layers: Range<u32>) -> Vec<String> {
    let mut names = Vec::new();
    if layers.start == 0 {
        names.push("token_embd.weight".to_owned());
    }
    for layer_idx in layers.clone() {
        for role in BLOCK_TENSORS {
            // Phi-3's fused projections stand for the separate ones; experts for the FFN.
            let role = match role {
                "ffn_gate" | "ffn_up" | "ffn_down" if profile.experts.is_some() => continue,
                "attn_q" if profile.fused_qkv => "attn_qkv",
                "attn_k" | "attn_v" if profile.fused_qkv => continue,
                "ffn_gate" if profile.fused_gate_up => continue,
                role => role,
            };
            names.push(format!("blk.{layer_idx}.{role}.weight"));
        }
        if profile.attention_bias {
            names.extend(QKV.iter().map(|role| format!("blk.{layer_idx}.{role}.bias")));
        }
        if profile.qk_norm {
            names.extend(QK_NORMS.iter().map(|role| format!("blk.{layer_idx}.{role}.weight")));
        }
        if profile.experts.is_some() {
            names.extend(moe::tensor_names(layer_idx));
        }
    }
    if layers.end == profile.n_layers {
        names.push("output_norm.weight".to_owned());
        names.push(if profile.tied_embeddings { "token_embd.weight" } else { "output.weight" }.to_owned());
        if profile.has_rope_freqs {
            names.push("rope_freqs.weight".to_owned());
        }
    }
    if profile.has_rope_freqs && !names.iter().any(|n| n == "rope_freqs.weight") {
        names.push("rope_freqs.weight".to_owned());
    }
    if profile.longrope_original_context.is_some() {
        names.extend(LONGROPE.iter().map(|name| name.to_string()));
    }
    names.dedup();
    names
}

const BLOCK_TENSORS: [&str; 9] = [
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
];

/// LongRoPE's factor sets, short then long (every slice rotates, so every slice has them).
const LONGROPE: [&str; 2] = ["rope_factors_short.weight", "rope_factors_long.weight"];

/// The projections that carry bias vectors in Qwen2 files.
const QKV: [&str; 3] = ["attn_q", "attn_k", "attn_v"];
/// Qwen3's per-head norms of Q and K.
const QK_NORMS: [&str; 2] = ["attn_q_norm", "attn_k_norm"];

/// Whether the architecture runs per-head Q/K norms (llama.cpp's graph for it applies them;
/// the others would ignore such tensors, so a file that has them anyway is refused).
fn wants_qk_norm(architecture: &str) -> bool {
    matches!(architecture, "qwen3" | "qwen3moe")
}

/// Whether the architecture's graph in llama.cpp routes its FFN through experts when the file
/// has them (qwen3moe always does; Mixtral's GGUFs say `llama`).
fn runs_experts(architecture: &str) -> bool {
    matches!(architecture, "llama" | "mistral" | "qwen3moe")
}

struct Block {
    attn_norm: Vec<f32>,
    /// Added to the Q, K and V projections (Qwen2), when the file has them.
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head RMSNorm weights of Q and K, `head_dim` each (Qwen3).
    qk_norm: Option<[Vec<f32>; 2]>,
    attn_q: QMatrix,
    attn_k: QMatrix,
    attn_v: QMatrix,
    attn_output: QMatrix,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

/// A block's feed-forward: one SwiGLU FFN, or a routed mixture of them.
enum Ffn {
    Dense { gate: QMatrix, up: QMatrix, down: QMatrix },
    Experts(ExpertFfn),
}

impl Ffn {
    fn size_in_bytes(&self) -> usize {
        match self {
            Ffn::Dense { gate, up, down } => gate.size_in_bytes() + up.size_in_bytes() + down.size_in_bytes(),
            Ffn::Experts(experts) => experts.size_in_bytes(),
        }
    }
}

/// One contiguous layer range of a llama-family model, loaded on its backend.
pub(crate) struct LlamaSlice {
    backend: Arc<Backend>,
    profile: ModelProfile,
    layers: Range<u32>,
    ends: Ends,
    blocks: Vec<Block>,
    /// Per rotated pair, the divisor llama.cpp calls `freq_factors`.
    rope_factors: RopeFactors,
}

/// Which per-pair RoPE divisors a model has.
enum RopeFactors {
    None,
    /// Llama 3's `rope_freqs`, for every sequence.
    Fixed(Vec<f32>),
    /// LongRoPE: `long` for a sequence whose context exceeds `original_context`, else `short`.
    LongShort { short: Vec<f32>, long: Vec<f32>, original_context: usize },
}

impl LlamaSlice {
    pub(crate) fn from_source(
        profile: ModelProfile,
        layers: Range<u32>,
        source: &mut dyn TensorSource,
        backend: Arc<Backend>,
    ) -> Result<Self> {
        use super::require_absent;
        let qk_norm = wants_qk_norm(&profile.architecture);
        require_absent(&profile, "per-head Q/K norm tensors its architecture does not apply", profile.qk_norm && !qk_norm)?;
        require_absent(&profile, "a sliding attention window", profile.sliding_window.is_some())?;
        require_absent(&profile, "mixture-of-experts layers", profile.experts.is_some() && !runs_experts(&profile.architecture))?;
        if profile.architecture == "qwen3moe" && profile.experts.is_none() {
            return Err(EngineError::MissingMetadata("qwen3moe.expert_count".into()));
        }
        if layers.start >= layers.end || layers.end > profile.n_layers {
            return Err(EngineError::BadLayerRange {
                start: layers.start,
                end: layers.end,
                n_layers: profile.n_layers,
            });
        }
        let p = &profile;
        let q_width = p.n_head * p.head_dim;
        let kv_width = p.n_head_kv * p.head_dim;
        let ends = Ends::load(p, &layers, source)?;
        let mut blocks = Vec::with_capacity((layers.end - layers.start) as usize);
        for i in layers.clone() {
            let name = |role: &str| format!("blk.{i}.{role}.weight");
            let qkv_bias = if p.attention_bias {
                let mut bias = |role: &str, len: usize| load_vector(source, &format!("blk.{i}.{role}.bias"), len);
                Some([bias("attn_q", q_width)?, bias("attn_k", kv_width)?, bias("attn_v", kv_width)?])
            } else {
                None
            };
            let qk_norm = if qk_norm {
                Some([load_vector(source, &name("attn_q_norm"), p.head_dim)?, load_vector(source, &name("attn_k_norm"), p.head_dim)?])
            } else {
                None
            };
            // A fused matrix's rows are the separate ones', one after the other; each output
            // row is its own dot product, so splitting the rows changes no value.
            let [attn_q, attn_k, attn_v] = if p.fused_qkv {
                load_split_matrix(source, &name("attn_qkv"), [q_width, kv_width, kv_width], p.n_embd)?
            } else {
                [
                    load_matrix(source, &name("attn_q"), q_width, p.n_embd)?,
                    load_matrix(source, &name("attn_k"), kv_width, p.n_embd)?,
                    load_matrix(source, &name("attn_v"), kv_width, p.n_embd)?,
                ]
            };
            let ffn = if let Some(experts) = p.experts {
                Ffn::Experts(ExpertFfn::load(p, experts, i, source)?)
            } else {
                let [gate, up] = if p.fused_gate_up {
                    load_split_matrix(source, &name("ffn_up"), [p.n_ff, p.n_ff], p.n_embd)?
                } else {
                    [load_matrix(source, &name("ffn_gate"), p.n_ff, p.n_embd)?, load_matrix(source, &name("ffn_up"), p.n_ff, p.n_embd)?]
                };
                Ffn::Dense { gate, up, down: load_matrix(source, &name("ffn_down"), p.n_embd, p.n_ff)? }
            };
            blocks.push(Block {
                qkv_bias,
                qk_norm,
                attn_norm: load_vector(source, &name("attn_norm"), p.n_embd)?,
                attn_q,
                attn_k,
                attn_v,
                attn_output: load_matrix(source, &name("attn_output"), p.n_embd, q_width)?,
                ffn_norm: load_vector(source, &name("ffn_norm"), p.n_embd)?,
                ffn,
            });
        }
        let rope_factors = match (p.has_rope_freqs, p.longrope_original_context) {
            (true, _) => RopeFactors::Fixed(load_vector(source, "rope_freqs.weight", p.n_rot / 2)?),
            (false, Some(original_context)) => RopeFactors::LongShort {
                short: load_vector(source, LONGROPE[0], p.n_rot / 2)?,
                long: load_vector(source, LONGROPE[1], p.n_rot / 2)?,
                original_context: original_context as usize,
            },
            (false, None) => RopeFactors::None,
        };
        Ok(Self { backend, profile, layers, ends, blocks, rope_factors })
    }

    pub(crate) fn profile(&self) -> &ModelProfile {
        &self.profile
    }

    pub(crate) fn layers(&self) -> Range<u32> {
        self.layers.clone()
    }

    pub(crate) fn is_first(&self) -> bool {
        self.ends.is_first()
    }

    pub(crate) fn is_last(&self) -> bool {
        self.ends.is_last()
    }

    /// Weight bytes this slice holds in memory.
    pub(crate) fn size_in_bytes(&self) -> usize {
        let matrices: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.attn_q, &b.attn_k, &b.attn_v, &b.attn_output].iter().map(|m| m.size_in_bytes()).sum::<usize>()
                    + b.ffn.size_in_bytes()
                    + (b.attn_norm.len() + b.ffn_norm.len()) * 4
                    + b.qkv_bias.iter().flatten().chain(b.qk_norm.iter().flatten()).map(|v| v.len() * 4).sum::<usize>()
            })
            .sum();
        matrices + self.ends.size_in_bytes()
    }

    /// A fresh KV cache for one sequence on this slice, holding at most `context_length`
    /// positions (clamped to the model's trained context).
    pub(crate) fn new_cache(&self, context_length: usize) -> SequenceCache {
        let p = &self.profile;
        // Every llama layer has the same K/V width and attends to the whole context.
        let spec = LayerCacheSpec { kv_width: p.n_head_kv * p.head_dim, window: None };
        SequenceCache::new(self.layers.start, &vec![spec; self.blocks.len()], context_length.min(p.context_length).max(1))
    }

    /// Token ids → hidden rows (`tokens.len() × n_embd`). First stage only.
    pub(crate) fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.ends.embed(tokens, None)
    }

    /// Runs this slice's layers over a step's rows, in place.
    ///
    /// `hidden` holds `sum(segments)` rows of `n_embd`; `segments[i]` consecutive rows belong
    /// to the sequence whose cache is `caches[i]`, at the positions following what that cache
    /// already holds. Every row's K and V are appended to its cache. Nothing is changed if an
    /// error is returned.
    pub(crate) fn forward_layers(
        &self,
        hidden: &mut [f32],
        segments: &[usize],
        caches: &mut [&mut SequenceCache],
    ) -> Result<()> {
        let p = &self.profile;
        let pool = self.backend.pool();
        let StepRows { n_rows, row_seq, row_pos } =
            super::step_rows(p.n_embd, self.layers.start, self.blocks.len(), hidden.len(), segments, caches)?;
        if n_rows == 0 {
            return Ok(());
        }

        // The whole step runs on a pool thread (see `ComputePool::run`).
        pool.run(|| {
            let rope = match &self.rope_factors {
                RopeFactors::None => rope_table(p, None, &row_pos),
                RopeFactors::Fixed(factors) => rope_table(p, Some(factors), &row_pos),
                RopeFactors::LongShort { short, long, original_context } => {
                    // Per row: its sequence's context decides (a cache's capacity is the
                    // context it was made for, fixed for its life, as llama.cpp's n_ctx_seq).
                    let mut table = Vec::with_capacity(n_rows * p.n_rot);
                    for (&pos, &seq) in row_pos.iter().zip(&row_seq) {
                        let long_context = caches[seq].capacity_max() > *original_context;
                        table.extend(rope_table(p, Some(if long_context { long } else { short }), &[pos]));
                    }
                    table
                }
            };
            let q_width = p.n_head * p.head_dim;
            let kv_width = p.n_head_kv * p.head_dim;
            let mut normed = vec![0f32; n_rows * p.n_embd];
            let mut q = vec![0f32; n_rows * q_width];
            let mut k = vec![0f32; n_rows * kv_width];
            let mut v = vec![0f32; n_rows * kv_width];
            let mut attn = vec![0f32; n_rows * q_width];
            let mut proj = vec![0f32; n_rows * p.n_embd];
            // The dense FFN's intermediates (a mixture of experts sizes its own).
            let n_ff = if p.experts.is_some() { 0 } else { p.n_ff };
            let mut gate = vec![0f32; n_rows * n_ff];
            let mut up = vec![0f32; n_rows * n_ff];

            for (local_layer, block) in self.blocks.iter().enumerate() {
                // Attention.
                rms_norm(hidden, &block.attn_norm, p.rms_norm_eps, &mut normed);
                QMatrix::matmul_shared_input(
                    &[&block.attn_q, &block.attn_k, &block.attn_v],
                    &normed,
                    n_rows,
                    &mut [&mut q, &mut k, &mut v],
                    pool,
                );
                if let Some([bq, bk, bv]) = &block.qkv_bias {
                    for (x, bias) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                        for row in x.chunks_exact_mut(bias.len()) {
                            add_in_place(row, bias);
                        }
                    }
                }
                if let Some([q_norm, k_norm]) = &block.qk_norm {
                    // Each head's row normed over its `head_dim` values.
                    rms_norm_in_place(&mut q, q_norm, p.rms_norm_eps);
                    rms_norm_in_place(&mut k, k_norm, p.rms_norm_eps);
                }
                let rotate = match p.rope_type {
                    RopeType::Adjacent => apply_rope,
                    RopeType::Neox => apply_rope_neox,
                };
                for row in 0..n_rows {
                    let cos_sin = &rope[row * p.n_rot..(row + 1) * p.n_rot];
                    for head in q[row * q_width..(row + 1) * q_width].chunks_exact_mut(p.head_dim) {
                        rotate(head, cos_sin);
                    }
                    for head in k[row * kv_width..(row + 1) * kv_width].chunks_exact_mut(p.head_dim) {
                        rotate(head, cos_sin);
                    }
                    caches[row_seq[row]].push(
                        local_layer,
                        &k[row * kv_width..(row + 1) * kv_width],
                        &v[row * kv_width..(row + 1) * kv_width],
                    );
                }
                let scale = 1.0 / (p.head_dim as f32).sqrt();
                let scale = if p.prescaled_query {
                    // Phi-3: llama.cpp scales the rotated query, then attends with scale 1.
                    q.iter_mut().for_each(|x| *x *= scale);
                    1.0
                } else {
                    scale
                };
                super::attention(p, local_layer, &q, &row_seq, &row_pos, caches, scale, &mut attn, pool);
                block.attn_output.matmul(&attn, n_rows, &mut proj, pool);
                add_in_place(hidden, &proj);

                // Feed-forward (SwiGLU, or a mixture of SwiGLU experts).
                rms_norm(hidden, &block.ffn_norm, p.rms_norm_eps, &mut normed);
                match &block.ffn {
                    Ffn::Dense { gate: w_gate, up: w_up, down: w_down } => {
                        QMatrix::matmul_shared_input(&[w_gate, w_up], &normed, n_rows, &mut [&mut gate, &mut up], pool);
                        swiglu(&mut gate, &up);
                        w_down.matmul(&gate, n_rows, &mut proj, pool);
                    }
                    Ffn::Experts(experts) => experts.forward(&normed, n_rows, &mut proj, pool),
                }
                add_in_place(hidden, &proj);
            }
        });
        Ok(())
    }

    /// Hidden rows → logits (`n_rows × vocab_size`), after the output norm. Last stage only.
    pub(crate) fn head(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        self.ends.head(hidden, self.profile.rms_norm_eps, None, self.backend.pool())
    }
}

