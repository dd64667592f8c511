//! Gemma 3 (`general.architecture` = `gemma3`): its block, its tensor list and its forward
//! pass over one slice of a model, as llama.cpp's `models/gemma3.cpp` builds it:
//!
//! * the token embedding scaled by √n_embd;
//! * RMSNorm before attention and FFN (`attn_norm`, `ffn_norm`) and again on their outputs
//!   before the residual add (`post_attention_norm`, `post_ffw_norm`); the GGUF converter has
//!   already folded Gemma's `1 + w` into the weights, so each is a plain RMSNorm;
//! * per-head RMSNorm of Q and K, then NEOX RoPE, then Q scaled by 1/√head_dim (by
//!   1/√(n_embd/n_head) for the 62-layer 27B, as llama.cpp decides by layer count) and
//!   attention with no further scale;
//! * local layers (five of every six by default) attend to the last `sliding_window`
//!   positions and rotate with their own RoPE base (`rope_freq_base_swa`, 10000 when the
//!   file has none), unscaled; the global ones use the model's base and RoPE scaling;
//! * a GELU-gated FFN (ggml's f16-table GELU); the head is tied to the embedding unless the
//!   file has `output.weight`; logits soft-capped only where the file sets
//!   `final_logit_softcapping` (Gemma 2 did, Gemma 3 files do not).
//!
//! The KV cache of a local layer keeps its window only ([`LayerCacheSpec::window`]), so a
//! long context costs the global layers alone.

use std::ops::Range;
use std::sync::Arc;

use super::{Ends, StepRows};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::kv_cache::{LayerCacheSpec, SequenceCache};
use crate::ops::{add_in_place, apply_rope_neox, geglu, rms_norm, rms_norm_in_place, rope_table, rope_table_with, Yarn};
use crate::profile::ModelProfile;
use crate::quant::QMatrix;
use crate::source::{load_matrix, load_vector, TensorSource};

/// The GGUF tensor names a slice holding `layers` needs (what a worker is sent).
pub(crate) fn slice_tensor_names(profile: &ModelProfile, layers: Range<u32>) -> Vec<String> {
    let mut names = Vec::new();
    if layers.start == 0 {
        names.push("token_embd.weight".to_owned());
    }
    for layer_idx in layers.clone() {
        for role in BLOCK_TENSORS {
            names.push(format!("blk.{layer_idx}.{role}.weight"));
        }
    }
    if layers.end == profile.n_layers {
        names.push("output_norm.weight".to_owned());
        names.push(if profile.tied_embeddings { "token_embd.weight" } else { "output.weight" }.to_owned());
    }
    names.dedup();
    names
}

const BLOCK_TENSORS: [&str; 13] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_q_norm",
    "attn_k_norm",
    "attn_output",
    "post_attention_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "post_ffw_norm",
];

struct Block {
    attn_norm: Vec<f32>,
    attn_q: QMatrix,
    attn_k: QMatrix,
    attn_v: QMatrix,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    attn_output: QMatrix,
    post_attention_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    ffn_gate: QMatrix,
    ffn_up: QMatrix,
    ffn_down: QMatrix,
    post_ffw_norm: Vec<f32>,
    /// A local layer: attends to the sliding window, rotates with the local RoPE base.
    sliding: bool,
}

impl Block {
    fn size_in_bytes(&self) -> usize {
        let matrices = [&self.attn_q, &self.attn_k, &self.attn_v, &self.attn_output, &self.ffn_gate, &self.ffn_up, &self.ffn_down];
        let vectors = [
            &self.attn_norm,
            &self.q_norm,
            &self.k_norm,
            &self.post_attention_norm,
            &self.ffn_norm,
            &self.post_ffw_norm,
        ];
        matrices.iter().map(|m| m.size_in_bytes()).sum::<usize>() + vectors.iter().map(|v| v.len() * 4).sum::<usize>()
    }
}

/// One contiguous layer range of a Gemma 3 model, loaded on its backend.
pub(crate) struct Gemma3Slice {
    backend: Arc<Backend>,
    profile: ModelProfile,
    layers: Range<u32>,
    ends: Ends,
    blocks: Vec<Block>,
    /// Q is multiplied by this before attention (which then scales by 1).
    attention_scale: f32,
}

impl Gemma3Slice {
    pub(crate) fn from_source(
        profile: ModelProfile,
        layers: Range<u32>,
        source: &mut dyn TensorSource,
        backend: Arc<Backend>,
    ) -> Result<Self> {
        use super::require_absent;
        require_absent(&profile, "bias vectors on its attention projections", profile.attention_bias)?;
        require_absent(&profile, "mixture-of-experts layers", profile.experts.is_some())?;
        require_absent(&profile, "per-dimension RoPE frequency factors", profile.has_rope_freqs || profile.longrope_original_context.is_some())?;
        require_absent(&profile, "YaRN RoPE scaling", matches!(profile.rope_scaling, crate::profile::RopeScaling::Yarn { .. }))?;
        if layers.start >= layers.end || layers.end > profile.n_layers {
            return Err(EngineError::BadLayerRange { start: layers.start, end: layers.end, n_layers: profile.n_layers });
        }
        let p = &profile;
        let q_width = p.n_head * p.head_dim;
        let kv_width = p.n_head_kv * p.head_dim;
        let ends = Ends::load(p, &layers, source)?;
        let mut blocks = Vec::with_capacity((layers.end - layers.start) as usize);
        for i in layers.clone() {
            let name = |role: &str| format!("blk.{i}.{role}.weight");
            blocks.push(Block {
                attn_norm: load_vector(source, &name("attn_norm"), p.n_embd)?,
                attn_q: load_matrix(source, &name("attn_q"), q_width, p.n_embd)?,
                attn_k: load_matrix(source, &name("attn_k"), kv_width, p.n_embd)?,
                attn_v: load_matrix(source, &name("attn_v"), kv_width, p.n_embd)?,
                q_norm: load_vector(source, &name("attn_q_norm"), p.head_dim)?,
                k_norm: load_vector(source, &name("attn_k_norm"), p.head_dim)?,
                attn_output: load_matrix(source, &name("attn_output"), p.n_embd, q_width)?,
                post_attention_norm: load_vector(source, &name("post_attention_norm"), p.n_embd)?,
                ffn_norm: load_vector(source, &name("ffn_norm"), p.n_embd)?,
                ffn_gate: load_matrix(source, &name("ffn_gate"), p.n_ff, p.n_embd)?,
                ffn_up: load_matrix(source, &name("ffn_up"), p.n_ff, p.n_embd)?,
                ffn_down: load_matrix(source, &name("ffn_down"), p.n_embd, p.n_ff)?,
                post_ffw_norm: load_vector(source, &name("post_ffw_norm"), p.n_embd)?,
                sliding: p.sliding_layers.get(i as usize).copied().unwrap_or(false),
            });
        }
        // llama.cpp (after gemma_pytorch's config): the 27B scales by the model width per
        // head, the others by the head dimension. GGUF does not carry `query_pre_attn_scalar`.
        const GEMMA3_27B_LAYERS: u32 = 62;
        let attention_scale = if p.n_layers == GEMMA3_27B_LAYERS {
            1.0 / ((p.n_embd / p.n_head) as f32).sqrt()
        } else {
            1.0 / (p.head_dim as f32).sqrt()
        };
        Ok(Self { backend, profile, layers, ends, blocks, attention_scale })
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

    pub(crate) fn size_in_bytes(&self) -> usize {
        self.blocks.iter().map(Block::size_in_bytes).sum::<usize>() + self.ends.size_in_bytes()
    }

    /// A fresh KV cache: local layers keep their window, global ones the whole context.
    pub(crate) fn new_cache(&self, context_length: usize) -> SequenceCache {
        let p = &self.profile;
        let kv_width = p.n_head_kv * p.head_dim;
        let specs: Vec<LayerCacheSpec> = self
            .blocks
            .iter()
            .map(|b| LayerCacheSpec { kv_width, window: if b.sliding { p.sliding_window } else { None } })
            .collect();
        SequenceCache::new(self.layers.start, &specs, context_length.min(p.context_length).max(1))
    }

    /// Token ids → hidden rows, scaled by √n_embd (`ggml_scale` in f32). First stage only.
    pub(crate) fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.ends.embed(tokens, Some((self.profile.n_embd as f32).sqrt()))
    }

    /// Runs this slice's layers over a step's rows, in place (see
    /// [`super::ModelSlice::forward_layers`]).
    pub(crate) fn forward_layers(&self, hidden: &mut [f32], segments: &[usize], caches: &mut [&mut SequenceCache]) -> Result<()> {
        let p = &self.profile;
        let pool = self.backend.pool();
        let StepRows { n_rows, row_seq, row_pos } =
            super::step_rows(p.n_embd, self.layers.start, self.blocks.len(), hidden.len(), segments, caches)?;
        if n_rows == 0 {
            return Ok(());
        }
        pool.run(|| {
            let global_rope = rope_table(p, None, &row_pos);
            let local_base = p.rope_freq_base_swa.unwrap_or(p.rope_freq_base);
            let local_rope = rope_table_with(local_base, 1.0, p.n_rot, None, Yarn::off(p.rope_attn_factor), &row_pos);
            let q_width = p.n_head * p.head_dim;
            let kv_width = p.n_head_kv * p.head_dim;
            let mut normed = vec![0f32; n_rows * p.n_embd];
            let mut q = vec![0f32; n_rows * q_width];
            let mut k = vec![0f32; n_rows * kv_width];
            let mut v = vec![0f32; n_rows * kv_width];
            let mut attn = vec![0f32; n_rows * q_width];
            let mut proj = vec![0f32; n_rows * p.n_embd];
            let mut gate = vec![0f32; n_rows * p.n_ff];
            let mut up = vec![0f32; n_rows * p.n_ff];

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
                rms_norm_in_place(&mut q, &block.q_norm, p.rms_norm_eps);
                rms_norm_in_place(&mut k, &block.k_norm, p.rms_norm_eps);
                let rope = if block.sliding { &local_rope } else { &global_rope };
                for row in 0..n_rows {
                    let cos_sin = &rope[row * p.n_rot..(row + 1) * p.n_rot];
                    for head in q[row * q_width..(row + 1) * q_width].chunks_exact_mut(p.head_dim) {
                        apply_rope_neox(head, cos_sin);
                    }
                    for head in k[row * kv_width..(row + 1) * kv_width].chunks_exact_mut(p.head_dim) {
                        apply_rope_neox(head, cos_sin);
                    }
                    caches[row_seq[row]].push(
                        local_layer,
                        &k[row * kv_width..(row + 1) * kv_width],
                        &v[row * kv_width..(row + 1) * kv_width],
                    );
                }
                q.iter_mut().for_each(|x| *x *= self.attention_scale);
                super::attention(p, local_layer, &q, &row_seq, &row_pos, caches, 1.0, &mut attn, pool);
                block.attn_output.matmul(&attn, n_rows, &mut proj, pool);
                rms_norm(&proj, &block.post_attention_norm, p.rms_norm_eps, &mut normed);
                add_in_place(hidden, &normed);

                // Feed-forward (GELU-gated).
                rms_norm(hidden, &block.ffn_norm, p.rms_norm_eps, &mut normed);
                QMatrix::matmul_shared_input(&[&block.ffn_gate, &block.ffn_up], &normed, n_rows, &mut [&mut gate, &mut up], pool);
                geglu(&mut gate, &up);
                block.ffn_down.matmul(&gate, n_rows, &mut proj, pool);
                rms_norm(&proj, &block.post_ffw_norm, p.rms_norm_eps, &mut normed);
                add_in_place(hidden, &normed);
            }
        });
        Ok(())
    }

    /// Hidden rows → logits (`n_rows × vocab_size`), after the output norm (and soft-capping
    /// where the file sets it). Last stage only.
    pub(crate) fn head(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let p = &self.profile;
        self.ends.head(hidden, p.rms_norm_eps, p.final_logit_softcapping, self.backend.pool())
    }
}
