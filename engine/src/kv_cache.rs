//! The per-sequence KV cache of one slice: the interface every backend's cache keeps.
//!
//! It lives outside the weights so that one loaded [`crate::arch::ModelSlice`] serves many
//! sequences at once: the caller owns one `SequenceCache` per sequence (made by the slice,
//! on the slice's backend: [`crate::arch::ModelSlice::new_cache`]) and passes the caches of a
//! step's rows to `forward_layers`. It holds only the layers of the slice it was made for,
//! so a stage's KV memory is proportional to its share of the layers.
//!
//! What the next capabilities need from it, defined here once:
//! * **Roll back** — [`SequenceCache::truncate`] forgets every position from `len` on
//!   (speculative decoding drops the rejected draft tokens; a replay starts over).
//! * **Share a prefix** — [`SequenceCache::fork_prefix`] starts a new sequence from the first
//!   `len` positions of this one without recomputing them (prefix caching, `n > 1`). Today
//!   the prefix is copied; block-level sharing can replace the copy behind the same call.
//! * **Windows** — a layer with a sliding window ([`LayerCacheSpec::window`], Gemma 3's local
//!   layers, Mistral's SWA) attends to its last `window` positions only, and its memory is
//!   bounded by that: positions older than the window are dropped as the sequence grows
//!   ([`SequenceCache::attention_span`] says which positions a row at `position` sees).
//!   Such a layer cannot be rolled back past what it has dropped.
//! * **Per-layer widths** — each layer has its own K/V width (models with per-layer KV heads).
//!
//! Layout per layer: `k` and `v` are `[position][kv_head][head_dim]` f16, grown in chunks as
//! the sequence gets longer (so a short chat does not reserve the whole context).
//! f16 as in llama.cpp's default cache: half the memory of f32, and the same rounding, which
//! the attention kernel relies on to agree with llama.cpp (see attention.rs).

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{EngineError, Result};

/// Positions the cache grows by at a time: reallocations stay rare without reserving the
/// whole context for a short request.
const GROW_POSITIONS: usize = 256;

/// Positions a sliding-window layer may hold beyond its window (see `reserve`): what a memory
/// plan adds to the window.
pub const WINDOW_SLACK_POSITIONS: usize = 2 * GROW_POSITIONS;

/// What one layer's cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerCacheSpec {
    /// Values per position for K (and for V): `n_head_kv * head_dim` of that layer.
    pub kv_width: usize,
    /// A sliding-window layer attends to its last `window` positions only; `None`: all.
    pub window: Option<usize>,
}

#[derive(Debug)]
pub struct SequenceCache {
    /// First layer of the slice this cache belongs to.
    layer_start: u32,
    /// Hard bound: the model's context length (or a smaller one set by the caller).
    capacity_max: usize,
    layers: Vec<LayerCache>,
}

#[derive(Debug)]
struct LayerCache {
    spec: LayerCacheSpec,
    /// The position of the first one held (> 0 once a windowed layer dropped old ones).
    first_position: usize,
    k: Vec<f16>,
    v: Vec<f16>,
}

impl LayerCache {
    fn held(&self) -> usize {
        self.k.len() / self.spec.kv_width
    }

    /// Positions stored so far (the absolute position after the last one).
    fn end_position(&self) -> usize {
        self.first_position + self.held()
    }
}

impl SequenceCache {
    pub(crate) fn new(layer_start: u32, layers: &[LayerCacheSpec], capacity_max: usize) -> Self {
        Self {
            layer_start,
            capacity_max,
            layers: layers
                .iter()
                .map(|&spec| {
                    assert!(spec.kv_width > 0 && spec.window != Some(0), "a layer cache holds something");
                    LayerCache { spec, first_position: 0, k: Vec::new(), v: Vec::new() }
                })
                .collect(),
        }
    }

    /// Number of positions stored (in the slice's last layer; all layers agree after a
    /// complete `forward_layers` over the slice).
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, LayerCache::end_position)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions stored for one layer (local index within the slice).
    pub(crate) fn layer_len(&self, local_layer: usize) -> usize {
        self.layers[local_layer].end_position()
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

    /// Forgets every position from `len` on. A windowed layer that has already dropped a
    /// position it would need again cannot go back that far: the error says so and nothing
    /// is changed.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if let Some(layer) = self.layers.iter().find(|l| len < l.end_position() && len < l.first_position) {
            return Err(EngineError::CacheRollback { len, first_held: layer.first_position });
        }
        for layer in &mut self.layers {
            let keep = len.saturating_sub(layer.first_position).min(layer.held()) * layer.spec.kv_width;
            layer.k.truncate(keep);
            layer.v.truncate(keep);
        }
        Ok(())
    }

    /// A new sequence's cache that starts with this one's first `len` positions, so its
    /// prompt's shared prefix is not computed again.
    pub fn fork_prefix(&self, len: usize) -> Result<SequenceCache> {
        if len > self.len() {
            return Err(EngineError::CacheRollback { len, first_held: self.len() });
        }
        let mut fork = SequenceCache {
            layer_start: self.layer_start,
            capacity_max: self.capacity_max,
            layers: self
                .layers
                .iter()
                .map(|l| LayerCache { spec: l.spec, first_position: l.first_position, k: l.k.clone(), v: l.v.clone() })
                .collect(),
        };
        fork.truncate(len)?;
        Ok(fork)
    }

    /// The positions a row at `position` attends to in `local_layer`: all earlier ones and
    /// itself, or the last `window` of them in a sliding-window layer.
    pub fn attention_span(&self, local_layer: usize, position: usize) -> Range<usize> {
        let start = match self.layers[local_layer].spec.window {
            Some(window) => (position + 1).saturating_sub(window),
            None => 0,
        };
        start..position + 1
    }

    pub(crate) fn layer_start(&self) -> u32 {
        self.layer_start
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Makes room for `n_new` more positions after `start` (the current length of the layers
    /// about to run), or reports the context overflow. A windowed layer first drops the
    /// positions no row of this step can see any more, in runs of [`GROW_POSITIONS`], so
    /// its memory stays within `window + GROW_POSITIONS` positions.
    pub(crate) fn reserve(&mut self, start: usize, n_new: usize) -> Result<()> {
        let needed = start + n_new;
        if needed > self.capacity_max {
            return Err(EngineError::ContextLengthExceeded {
                position: needed - 1,
                context_length: self.capacity_max,
            });
        }
        for layer in &mut self.layers {
            let width = layer.spec.kv_width;
            if let Some(window) = layer.spec.window {
                // The step's first row (at `start`) sees positions from start + 1 - window on.
                let oldest_needed = (start + 1).saturating_sub(window);
                let droppable = oldest_needed.saturating_sub(layer.first_position);
                if droppable >= GROW_POSITIONS {
                    layer.k.drain(..droppable * width);
                    layer.v.drain(..droppable * width);
                    layer.first_position += droppable;
                }
            }
            let held_after = needed - layer.first_position;
            let want = held_after.div_ceil(GROW_POSITIONS) * GROW_POSITIONS;
            let want = want.min(self.capacity_max) * width;
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

    /// K and V of `local_layer` for the absolute positions `span` (see
    /// [`Self::attention_span`]), which the layer must hold.
    pub(crate) fn layer(&self, local_layer: usize, span: Range<usize>) -> (&[f16], &[f16]) {
        let layer = &self.layers[local_layer];
        let width = layer.spec.kv_width;
        assert!(span.start >= layer.first_position, "positions before {} were dropped", layer.first_position);
        let (from, to) = ((span.start - layer.first_position) * width, (span.end - layer.first_position) * width);
        (&layer.k[from..to], &layer.v[from..to])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDTH: usize = 4;

    fn cache(window: Option<usize>, capacity: usize) -> SequenceCache {
        SequenceCache::new(0, &[LayerCacheSpec { kv_width: WIDTH, window }], capacity)
    }

    /// Appends positions `from..to`, each filled with its own position number.
    fn append(cache: &mut SequenceCache, from: usize, to: usize) {
        cache.reserve(from, to - from).unwrap();
        for position in from..to {
            let row = [position as f32; WIDTH];
            cache.push(0, &row, &row);
        }
    }

    fn positions_seen(cache: &SequenceCache, position: usize) -> Vec<usize> {
        let span = cache.attention_span(0, position);
        let (k, _) = cache.layer(0, span);
        k.chunks_exact(WIDTH).map(|row| row[0].to_f32() as usize).collect()
    }

    #[test]
    fn truncate_rolls_back_and_the_sequence_goes_on_from_there() {
        let mut c = cache(None, 64);
        append(&mut c, 0, 10);
        c.truncate(6).unwrap();
        assert_eq!(c.len(), 6);
        append(&mut c, 6, 8);
        assert_eq!(positions_seen(&c, 7), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_fork_holds_the_prefix_and_leaves_the_original_alone() {
        let mut c = cache(None, 64);
        append(&mut c, 0, 10);
        let mut fork = c.fork_prefix(4).unwrap();
        assert_eq!((c.len(), fork.len()), (10, 4));
        append(&mut fork, 4, 5);
        assert_eq!(positions_seen(&fork, 4), vec![0, 1, 2, 3, 4]);
        assert_eq!(positions_seen(&c, 9), (0..10).collect::<Vec<_>>());
        assert!(c.fork_prefix(11).is_err(), "cannot fork past what is held");
    }

    #[test]
    fn a_windowed_layer_sees_its_window_and_its_memory_stays_bounded() {
        let window = 8;
        let mut c = cache(Some(window), 4096);
        for step in 0..2000 {
            append(&mut c, step, step + 1);
            let seen = positions_seen(&c, step);
            let first = (step + 1).saturating_sub(window);
            assert_eq!(seen, (first..=step).collect::<Vec<_>>(), "step {step}");
        }
        let held_max = (window + 2 * GROW_POSITIONS) * WIDTH * 2 * std::mem::size_of::<f16>();
        assert!(c.size_in_bytes() <= held_max, "{} > {held_max}", c.size_in_bytes());
        assert_eq!(c.len(), 2000);
        // Rolling back within the window works; past what was dropped is refused, unchanged.
        c.truncate(1998).unwrap();
        assert!(matches!(c.truncate(10), Err(EngineError::CacheRollback { len: 10, .. })));
        assert_eq!(c.len(), 1998);
    }

    #[test]
    fn overflowing_the_context_is_an_error_not_a_panic() {
        let mut c = cache(None, 4);
        append(&mut c, 0, 4);
        assert!(matches!(c.reserve(4, 1), Err(EngineError::ContextLengthExceeded { position: 4, context_length: 4 })));
    }
}
