//! The architecture seam: one module per architecture family, each owning its block struct,
//! its tensor list and its forward body (as candle keeps one file per model and llama.cpp
//! one graph builder per architecture); the operations they share are in [`crate::ops`],
//! the loading helpers in [`crate::source`], the attention kernel in [`crate::attention`].
//!
//! Everything outside the engine uses [`ModelSlice`], never a family's own type: it loads a
//! layer range onto a [`Backend`], runs the split forward pass (`embed` → `forward_layers` →
//! `head`) and answers which tensors a layer range needs ([`slice_tensor_names`]: what the
//! weight server sends and the slice cache keeps).
//!
//! Adding a family: a module here, a [`Family`] variant (and its `general.architecture`
//! names in [`Family::from_architecture`]), and an arm in each `match` below.
//!
//! **Architecture Invariant:** a family module refuses a file whose profile asks for a
//! feature it does not implement (biases, Q/K norms, a sliding window, experts, another RoPE
//! layout) with [`EngineError::UnsupportedFeature`]; it never runs such a model without it.

pub mod gemma3;
pub mod llama;
mod moe;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::attention::attend_head;
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::gguf::GgufModel;
use crate::kv_cache::SequenceCache;
use crate::profile::{Family, ModelProfile};
use crate::ops::rms_norm;
use crate::quant::QMatrix;
use crate::source::{load_matrix, load_vector, GgufFileSource, TensorSource};
use crate::threads::ComputePool;

/// One contiguous layer range of a model, loaded onto a backend and ready to run.
pub struct ModelSlice {
    inner: Inner,
}

enum Inner {
    Llama(llama::LlamaSlice),
    Gemma3(gemma3::Gemma3Slice),
}

/// The GGUF tensor names a slice holding `layers` needs (what a worker is sent).
pub fn slice_tensor_names(profile: &ModelProfile, layers: Range<u32>) -> Vec<String> {
    match profile.family {
        Family::Llama => llama::slice_tensor_names(profile, layers),
        Family::Gemma3 => gemma3::slice_tensor_names(profile, layers),
    }
}

impl ModelSlice {
    /// Loads layers `layers` of the GGUF at `path` onto `backend` (plus the embedding if the
    /// range starts at 0 and the head if it ends at the last layer), reading only those
    /// tensors. `path` may be any part of a split GGUF ([`GgufModel::open`]).
    pub fn load(path: &Path, layers: Range<u32>, backend: Arc<Backend>) -> Result<Self> {
        let model = GgufModel::open(path)?;
        let profile = ModelProfile::from_model(&model)?;
        let mut source = GgufFileSource::new(&model)?;
        Self::from_source(profile, layers, &mut source, backend)
    }

    /// Loads layers `layers` from `source` (a GGUF file, or the slice cache a worker filled).
    pub fn from_source(
        profile: ModelProfile,
        layers: Range<u32>,
        source: &mut dyn TensorSource,
        backend: Arc<Backend>,
    ) -> Result<Self> {
        let inner = match profile.family {
            Family::Llama => Inner::Llama(llama::LlamaSlice::from_source(profile, layers, source, backend)?),
            Family::Gemma3 => Inner::Gemma3(gemma3::Gemma3Slice::from_source(profile, layers, source, backend)?),
        };
        Ok(Self { inner })
    }

    pub fn profile(&self) -> &ModelProfile {
        match &self.inner {
            Inner::Llama(s) => s.profile(),
            Inner::Gemma3(s) => s.profile(),
        }
    }

    pub fn layers(&self) -> Range<u32> {
        match &self.inner {
            Inner::Llama(s) => s.layers(),
            Inner::Gemma3(s) => s.layers(),
        }
    }

    /// True when this slice holds the token embedding (it takes token ids).
    pub fn is_first(&self) -> bool {
        match &self.inner {
            Inner::Llama(s) => s.is_first(),
            Inner::Gemma3(s) => s.is_first(),
        }
    }

    /// True when this slice holds the output norm and head (it produces logits).
    pub fn is_last(&self) -> bool {
        match &self.inner {
            Inner::Llama(s) => s.is_last(),
            Inner::Gemma3(s) => s.is_last(),
        }
    }

    /// Weight bytes this slice holds in memory.
    pub fn size_in_bytes(&self) -> usize {
        match &self.inner {
            Inner::Llama(s) => s.size_in_bytes(),
            Inner::Gemma3(s) => s.size_in_bytes(),
        }
    }

    /// A fresh KV cache for one sequence on this slice, holding at most `context_length`
    /// positions (clamped to the model's trained context).
    pub fn new_cache(&self, context_length: usize) -> SequenceCache {
        match &self.inner {
            Inner::Llama(s) => s.new_cache(context_length),
            Inner::Gemma3(s) => s.new_cache(context_length),
        }
    }

    /// Token ids → hidden rows (`tokens.len() × n_embd`). First stage only.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        match &self.inner {
            Inner::Llama(s) => s.embed(tokens),
            Inner::Gemma3(s) => s.embed(tokens),
        }
    }

    /// Runs this slice's layers over a step's rows, in place.
    ///
    /// `hidden` holds `sum(segments)` rows of `n_embd`; `segments[i]` consecutive rows belong
    /// to the sequence whose cache is `caches[i]`, at the positions following what that cache
    /// already holds. Every row's K and V are appended to its cache. Nothing is changed if an
    /// error is returned.
    pub fn forward_layers(&self, hidden: &mut [f32], segments: &[usize], caches: &mut [&mut SequenceCache]) -> Result<()> {
        match &self.inner {
            Inner::Llama(s) => s.forward_layers(hidden, segments, caches),
            Inner::Gemma3(s) => s.forward_layers(hidden, segments, caches),
        }
    }

    /// Hidden rows → logits (`n_rows × vocab_size`), after the output norm. Last stage only.
    pub fn head(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        match &self.inner {
            Inner::Llama(s) => s.head(hidden),
            Inner::Gemma3(s) => s.head(hidden),
        }
    }
}

/// A step's rows, checked: which sequence (segment) and which position each row is.
pub(crate) struct StepRows {
    pub n_rows: usize,
    pub row_seq: Vec<usize>,
    pub row_pos: Vec<usize>,
}

/// Checks a step against the slice (`n_blocks` layers from `layer_start`) and its caches,
/// then makes room in every cache: the rows of `segments[i]` go to `caches[i]` at the
/// positions after what it holds. Nothing changes when it returns an error.
pub(crate) fn step_rows(
    n_embd: usize,
    layer_start: u32,
    n_blocks: usize,
    hidden_len: usize,
    segments: &[usize],
    caches: &mut [&mut SequenceCache],
) -> Result<StepRows> {
    let n_rows: usize = segments.iter().sum();
    assert_eq!(segments.len(), caches.len(), "one cache per segment");
    assert_eq!(hidden_len, n_rows * n_embd, "hidden must hold n_rows × n_embd");
    // Validate everything before touching a cache.
    let mut row_seq = Vec::with_capacity(n_rows);
    let mut row_pos = Vec::with_capacity(n_rows);
    for (seq, (&n, cache)) in segments.iter().zip(caches.iter()).enumerate() {
        assert!(cache.layer_start() == layer_start && cache.n_layers() == n_blocks, "cache made for another slice");
        let start = cache.layer_len(0);
        if (1..cache.n_layers()).any(|l| cache.layer_len(l) != start) {
            panic!("cache layers disagree: a previous step was interrupted");
        }
        if start + n > cache.capacity_max() {
            return Err(EngineError::ContextLengthExceeded { position: start + n - 1, context_length: cache.capacity_max() });
        }
        for i in 0..n {
            row_seq.push(seq);
            row_pos.push(start + i);
        }
    }
    for (cache, &n) in caches.iter_mut().zip(segments) {
        let start = cache.layer_len(0);
        cache.reserve(start, n)?;
    }
    Ok(StepRows { n_rows, row_seq, row_pos })
}

/// Causal attention of every row over its own sequence's cache (the positions
/// [`SequenceCache::attention_span`] gives: all earlier ones, or a sliding window), grouped
/// query heads sharing their KV head; `q` holds `n_head × head_dim` values per row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    p: &ModelProfile,
    local_layer: usize,
    q: &[f32],
    row_seq: &[usize],
    row_pos: &[usize],
    caches: &[&mut SequenceCache],
    scale: f32,
    out: &mut [f32],
    pool: &ComputePool,
) {
    let head_dim = p.head_dim;
    let group = p.n_head / p.n_head_kv;
    let kv_width = p.n_head_kv * head_dim;
    // One chunk per (row, head): independent, so they spread over the pool.
    pool.for_each_chunk(out, head_dim, |chunk_idx, out_head| {
        let row = chunk_idx / p.n_head;
        let head = chunk_idx % p.n_head;
        let kv_head = head / group;
        let cache = &caches[row_seq[row]];
        let span = cache.attention_span(local_layer, row_pos[row]);
        let n_pos = span.len();
        let (keys, values) = cache.layer(local_layer, span);
        let q_head = &q[chunk_idx * head_dim..(chunk_idx + 1) * head_dim];
        attend_head(q_head, keys, values, kv_width, kv_head * head_dim, n_pos, scale, out_head);
    });
}

/// The ends of the model a slice may hold, the same in every family: the token embedding
/// (first stage) and the output norm and head (last stage; with a tied head, the embedding
/// itself, shared and not copied when one slice is both).
pub(crate) struct Ends {
    layers: Range<u32>,
    n_layers: u32,
    token_embd: Option<Arc<QMatrix>>,
    output_norm: Option<Vec<f32>>,
    output: Option<Arc<QMatrix>>,
}

impl Ends {
    /// Loads what a slice of `layers` holds of the ends.
    pub(crate) fn load(p: &ModelProfile, layers: &Range<u32>, source: &mut dyn TensorSource) -> Result<Self> {
        let first = layers.start == 0;
        let last = layers.end == p.n_layers;
        let token_embd = if first || (last && p.tied_embeddings) {
            Some(Arc::new(load_matrix(source, "token_embd.weight", p.vocab_size, p.n_embd)?))
        } else {
            None
        };
        let (output_norm, output) = if last {
            let norm = load_vector(source, "output_norm.weight", p.n_embd)?;
            let output = match &token_embd {
                Some(embd) if p.tied_embeddings => embd.clone(),
                _ => Arc::new(load_matrix(source, "output.weight", p.vocab_size, p.n_embd)?),
            };
            (Some(norm), Some(output))
        } else {
            (None, None)
        };
        // A tied last stage that is not also the first keeps the embedding only as its head.
        let token_embd = if first { token_embd } else { None };
        Ok(Self { layers: layers.clone(), n_layers: p.n_layers, token_embd, output_norm, output })
    }

    pub(crate) fn is_first(&self) -> bool {
        self.token_embd.is_some()
    }

    pub(crate) fn is_last(&self) -> bool {
        self.output.is_some()
    }

    /// Bytes held: the embedding, the head unless it is that same embedding, the norm.
    pub(crate) fn size_in_bytes(&self) -> usize {
        let embd = self.token_embd.as_ref().map_or(0, |m| m.size_in_bytes());
        let head = match (&self.output, &self.token_embd) {
            (Some(o), Some(e)) if Arc::ptr_eq(o, e) => 0,
            (Some(o), _) => o.size_in_bytes(),
            _ => 0,
        };
        embd + head + self.output_norm.as_ref().map_or(0, |n| n.len() * 4)
    }

    fn not_here(&self) -> EngineError {
        EngineError::BadLayerRange { start: self.layers.start, end: self.layers.end, n_layers: self.n_layers }
    }

    /// Token ids → hidden rows (`tokens.len() × n_embd`), each multiplied by `scale` in f32
    /// when given (Gemma's √n_embd). First stage only.
    pub(crate) fn embed(&self, tokens: &[u32], scale: Option<f32>) -> Result<Vec<f32>> {
        let embd = self.token_embd.as_ref().ok_or_else(|| self.not_here())?;
        let (vocab_size, n_embd) = (embd.n_out(), embd.n_in());
        let mut hidden = vec![0f32; tokens.len() * n_embd];
        for (row, &token) in hidden.chunks_exact_mut(n_embd).zip(tokens) {
            if token as usize >= vocab_size {
                return Err(EngineError::TokenOutOfRange(token));
            }
            embd.dequantize_row(token as usize, row);
            if let Some(scale) = scale {
                row.iter_mut().for_each(|x| *x *= scale);
            }
        }
        Ok(hidden)
    }

    /// Hidden rows → logits (`n_rows × vocab_size`) after the output norm, soft-capped as
    /// `c · tanh(logits / c)` when `softcap` is given (ggml_scale, ggml_tanh, ggml_scale).
    /// Last stage only.
    pub(crate) fn head(&self, hidden: &[f32], eps: f32, softcap: Option<f32>, pool: &ComputePool) -> Result<Vec<f32>> {
        let (Some(norm), Some(output)) = (&self.output_norm, &self.output) else {
            return Err(self.not_here());
        };
        let n_embd = norm.len();
        assert_eq!(hidden.len() % n_embd, 0, "hidden must hold whole rows");
        let n_rows = hidden.len() / n_embd;
        let mut normed = vec![0f32; hidden.len()];
        rms_norm(hidden, norm, eps, &mut normed);
        let mut logits = vec![0f32; n_rows * output.n_out()];
        output.matmul(&normed, n_rows, &mut logits, pool);
        if let Some(cap) = softcap {
            let inverse = 1.0 / cap;
            logits.iter_mut().for_each(|l| *l = (*l * inverse).tanh() * cap);
        }
        Ok(logits)
    }
}

/// Refuses a profile that asks for what a family module does not implement.
pub(crate) fn require_absent(profile: &ModelProfile, feature: &'static str, present: bool) -> Result<()> {
    if present {
        return Err(EngineError::UnsupportedFeature { architecture: profile.architecture.clone(), feature });
    }
    Ok(())
}
