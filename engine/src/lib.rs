//! # potluck-engine
//!
//! Runs a llama-family GGUF model's layers on one machine. It knows candle and GGUF and
//! nothing of the network: the coordinator and the workers drive it.
//!
//! * [`profile`] reads a GGUF header into a [`profile::ModelProfile`] (dimensions, per-layer
//!   weight bytes, KV bytes per token) without loading any tensor.
//! * [`model::LlamaSlice`] loads only the tensors of a layer range `[a, b)` (plus the token
//!   embedding on the first stage and the output norm + head on the last) and exposes the
//!   split forward pass: [`model::LlamaSlice::embed`], [`model::LlamaSlice::forward_layers`],
//!   [`model::LlamaSlice::head`].
//! * [`kv_cache::SequenceCache`] is the per-sequence KV cache, kept outside the weights so
//!   one loaded slice serves many sequences; a forward step takes rows of several sequences.
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
//! owned by a [`threads::ComputePool`] sized by the caller.

pub mod attention;
pub mod chat_template;
pub mod device;
pub mod error;
pub mod kv_cache;
pub mod model;
pub mod profile;
pub mod quant;
pub mod random_gguf;
pub mod sampler;
pub mod threads;
pub mod tokenizer;

pub use error::EngineError;
