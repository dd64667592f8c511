//! The per-sequence KV cache of one slice.
//!
//! It lives outside the weights so that one loaded [`crate::model::LlamaSlice`] serves many
//! sequences at once: the caller owns one `SequenceCache` per sequence and passes the caches
//! of a step's rows to `forward_layers`. It holds only the layers of the slice it was made
//! for, so a stage's KV memory is proportional to its share of the layers.
//!
//! Layout per layer: `k` and `v` are `[position][kv_head][head_dim]` f16, grown in chunks as
//! the sequence gets longer (so a short chat does not reserve the whole context).
//! f16 as in llama.cpp's default cache: half the memory of f32, and the same rounding, which
//! the attention kernel relies on to agree with llama.cpp (see attention.rs).

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{EngineError, Result};

/// Positions the cache grows by at a time: reallocations stay rare without reserving the
/// whole context for a short request.
const GROW_POSITIONS: usize = 256;

#[derive(Debug)]
pub struct SequenceCache {
    /// First layer of the slice this cache belongs to.
    layer_start: u32,
    /// Values per position per layer for K (and for V): n_head_kv * head_dim.
    kv_width: usize,
    /// Hard bound: the model's context length (or a smaller one set by the caller).
    capacity_max: usize,
    layers: Vec<LayerCache>,
}

#[derive(Debug, Default)]
struct LayerCache {
    k: Vec<f16>,
    v: Vec<f16>,
}

impl SequenceCache {
    pub(crate) fn new(layer_start: u32, n_layers: usize, kv_width: usize, capacity_max: usize) -> Self {
        Self {
            layer_start,
            kv_width,
            capacity_max,
            layers: (0..n_layers).map(|_| LayerCache::default()).collect(),
        }
    }

    /// Number of positions stored (in the slice's last layer; all layers agree after a
    /// complete `forward_layers` over the slice).
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.k.len() / self.kv_width)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions stored for one layer (local index within the slice).
    pub(crate) fn layer_len(&self, local_layer: usize) -> usize {
        self.layers[local_layer].k.len() / self.kv_width
    }

    /// The most positions this cache accepts.
    pub fn capacity_max(&self) -> usize {
        self.capacity_max
    }

    /// Bytes currently held (what the stage's KV budget is charged).
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * std::mem::size_of::<f16>())
            .sum()
    }

    /// Forgets every position from `len` on (used to replay or to roll back a step).
    pub fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.k.truncate(len * self.kv_width);
            layer.v.truncate(len * self.kv_width);
        }
    }

    pub(crate) fn layer_start(&self) -> u32 {
        self.layer_start
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Makes room for `n_new` more positions after `start` (the current length of the layers
    /// about to run), or reports the context overflow.
    pub(crate) fn reserve(&mut self, start: usize, n_new: usize) -> Result<()> {
        let needed = start + n_new;
        if needed > self.capacity_max {
            return Err(EngineError::ContextLengthExceeded {
                position: needed - 1,
                context_length: self.capacity_max,
            });
        }
        let want = needed.div_ceil(GROW_POSITIONS) * GROW_POSITIONS;
        let want = want.min(self.capacity_max) * self.kv_width;
        for layer in &mut self.layers {
            if layer.k.capacity() < want {
                layer.k.reserve_exact(want - layer.k.len());
                layer.v.reserve_exact(want - layer.v.len());
            }
        }
        Ok(())
    }

    /// Appends one position's K and V for a layer (local index within the slice). Positions
    /// are appended in order.
    pub(crate) fn push(&mut self, local_layer: usize, k: &[f32], v: &[f32]) {
        let layer = &mut self.layers[local_layer];
        let start = layer.k.len();
        layer.k.resize(start + k.len(), f16::ZERO);
        layer.v.resize(start + v.len(), f16::ZERO);
        // Round to nearest even, as ggml's f32 → f16 copy into the cache.
        layer.k[start..].convert_from_f32_slice(k);
        layer.v[start..].convert_from_f32_slice(v);
    }

    /// K and V of `local_layer` for positions `0..n_positions`.
    pub(crate) fn layer(&self, local_layer: usize, n_positions: usize) -> (&[f16], &[f16]) {
        let layer = &self.layers[local_layer];
        let n = n_positions * self.kv_width;
        (&layer.k[..n], &layer.v[..n])
    }
}
