//! # potluck-engine
//!
//! Runs a GGUF model's layers on one machine. It knows candle and GGUF and nothing of the
//! network: the coordinator and the workers drive it.
//!
//! * [`gguf`] opens a model's GGUF, one file or every part of a split (`-00001-of-0000N`), as
//!   one model: every reader of a model file goes through [`gguf::GgufModel`].
//! * [`profile`] reads a GGUF header into a [`profile::ModelProfile`] (dimensions, per-layer
//!   weight bytes, KV bytes per token) without loading any tensor.
//! * [`arch::ModelSlice`] loads only the tensors of a layer range `[a, b)` (plus the token
//!   embedding on the first stage and the output norm + head on the last) onto a
//!   [`backend::Backend`] and exposes the split forward pass: [`arch::ModelSlice::embed`],
//!   [`arch::ModelSlice::forward_layers`], [`arch::ModelSlice::head`]. Each architecture
//!   family is one module of [`arch`] (llama today); [`ops`] holds what they share, [`source`]
//!   where tensors come from.
//! * [`backend`] is the compute-backend seam (the CPU today): a slice's weights and KV caches
//!   live on its backend, rows cross to the host only at a stage's boundaries.
//! * [`kv_cache::SequenceCache`] is the per-sequence KV cache, kept outside the weights so
//!   one loaded slice serves many sequences; a forward step takes rows of several sequences.
//!   It rolls back (`truncate`), forks a prefix, and bounds sliding-window layers.
//! * [`quant`] holds the quantized matrix type and its SIMD kernels (weights stay in their
//!   GGUF block format in memory).
//! * [`tokenizer`], [`chat_template`] and [`sampler`] turn text into token ids and back.
//! * [`attention`] is the attention kernel over the f16 KV cache.
//! * [`random_gguf`] writes seeded random-weight GGUFs of any llama shape (tiny to 70B-sized
//!   layers) in bounded memory, for tests, benchmarks and scale checks.
//! * [`device`] measures this machine (free memory, bandwidth, quantized-matmul speed) for
//!   the shard planner; `worker bench` prints it.
//!
//! **Invariant:** nothing here opens a socket or spawns an async task; compute threads are
//! owned by a [`backend::Backend`] (a [`threads::ComputePool`] sized by the caller).

pub mod arch;
pub mod attention;
pub mod backend;
pub mod chat_template;
pub mod device;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod ops;
pub mod profile;
pub mod quant;
pub mod random_gguf;
pub mod sampler;
pub mod source;
pub mod threads;
pub mod tokenizer;

pub use error::EngineError;
