//! A seeded writer of random-weight GGUF models: the one place where tests, benchmarks and
//! scale checks get a model of any llama-family shape without downloading one.
//!
//! The file is written by hand, not with candle's `gguf_file::write`, because that writer
//! needs every tensor quantized in memory at once: one FFN matrix of a 70B-shaped layer is
//! 28672×8192 = 235M weights (940 MB as f32). Here the header is built first (tensor offsets
//! follow from [`tensor_size_in_bytes`] alone), then each tensor is generated and quantized
//! a few whole rows at a time, so memory stays at a few MiB per thread whatever the model's
//! size.
//!
//! The layout follows the GGUF spec (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>)
//! as candle-core 0.11's `quantized::gguf_file::Content::read` reads it: magic `GGUF`,
//! version 3, u64 counts, the metadata key/values, the tensor infos (dimensions innermost
//! first, ggml type id, offset from the start of the data), padding to the alignment, then
//! each tensor's bytes padded to the alignment.
//!
//! **Presets:** [`ModelShape::preset`] names the shapes benchmarks and scale tests use
//! (`tiny`, `llama3-8b`, `llama3-70b`); the layer count is the caller's, so a "70B" file can
//! hold two real-sized layers. With a donor GGUF ([`TokenizerMetadata::from_gguf`], by default
//! the coordinator's SmolLM2 download, see [`default_donor_path`]) the `tokenizer.*` keys are
//! copied and the vocabulary takes the donor's size, so the file can be served on text.
//!
//! **Determinism:** the same [`RandomGguf`] gives a byte-identical file on every run,
//! whatever the thread count: every row of every tensor has its own random stream, seeded
//! from the model seed, the tensor's name and the row's index.
//!
//! **Memory:** the writer holds the header, one window of quantized rows and each thread's
//! f32 chunk; [`RandomGguf::buffer_bytes_max`] computes that bound from the same layout the
//! writer uses, and the tests hold it to a few MiB per thread for a full 80-layer 70B shape.
//!
//! **Errors:** every bad input (unknown preset or type name, a shape the engine would reject,
//! a donor that is not a GGUF or has no tokenizer, an unwritable path) is a
//! [`RandomGgufError`] naming what was wrong; it converts into [`crate::EngineError`]. A write
//! that fails leaves no file behind: the model is written to `<path>.partial` and renamed.
//!
//! Measured (`examples/random_gguf.rs`, dev profile, which builds the engine and candle at
//! opt-level 3; 2 threads on a 2-core VM shared with other builds, load ~4.5): a 2-layer
//! llama3-70b shape in Q4_0, no tokenizer (2.14 GB), was written in 23.5 s with a peak RSS of
//! 8.5 MB (`/usr/bin/time -v`); [`RandomGguf::buffer_bytes_max`] gave 4.6 MB for it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use thiserror::Error;

use crate::profile::tensor_size_in_bytes;
use crate::threads::ComputePool;

/// Alignment of the tensor data and of each tensor in it. 32 is GGUF's default
/// (`GGUF_DEFAULT_ALIGNMENT` in ggml, `DEFAULT_ALIGNMENT` in candle); it is also written as
/// `general.alignment` so no reader has to assume it.
pub const GGUF_ALIGNMENT_BYTES: u64 = 32;

/// The GGUF version written: v3 (u64 counts and lengths, as v2; v3 only adds big-endian
/// files, which this writer never produces).
const GGUF_VERSION: u32 = 3;

/// `GGUF` read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;

/// The f32 scratch each worker fills before quantizing: whole rows up to this many bytes
/// (always at least one row). Bounds the writer's memory to about this times the thread
/// count times `WINDOW_CHUNKS_PER_THREAD`, while keeping chunks large enough that the
/// per-chunk overhead (a candle tensor, a pool dispatch) is negligible.
pub const CHUNK_F32_BYTES_MAX: usize = 1 << 20;

/// Chunks handed to the pool per thread in one go, before the window is written out: more
/// than one so a thread that finishes early steals work instead of waiting for the slowest.
const WINDOW_CHUNKS_PER_THREAD: usize = 4;

/// The file's write buffer: large enough that the OS sees few large writes, small next to a
/// window.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Spread of the norm weights around 1: far enough from 1 that a norm that is skipped or
/// applied twice changes the logits, near enough that activations stay finite through
/// many layers.
const LAYER_NORM_SPREAD: f32 = 0.2;
const OUTPUT_NORM_SPREAD: f32 = 0.1;

/// The donor the example and tests take the tokenizer from: the coordinator's default model
/// (`coordinator/src/model_fetch.rs`, `DEFAULT_MODEL_FILE`), which `coordinator fetch-model`
/// puts in its cache.
pub const DEFAULT_DONOR_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The preset names [`ModelShape::preset`] knows (`_` works for `-` too).
pub const PRESET_NAMES: [&str; 5] = ["tiny", "llama3-8b", "llama3-70b", "qwen3-8b", "qwen2.5-72b"];

/// What can go wrong writing a random model. Nothing here panics on a bad shape, a bad name
/// or a bad tokenizer source.
#[derive(Debug, Error)]
pub enum RandomGgufError {
    #[error("cannot write the model file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("unknown model preset `{0}` (known: tiny, tiny-moe, llama3-8b, llama3-70b, qwen3-8b, qwen2.5-72b, mixtral-8x7b, qwen3-30b-a3b)")]
    UnknownPreset(String),
    #[error("unknown architecture `{0}` (known: llama, qwen2, qwen3, qwen3moe, phi3)")]
    UnknownArchitecture(String),
    #[error("unknown weight type `{0}` (known: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2k, q3k, q4k, q5k, q6k)")]
    UnknownDType(String),
    #[error("bad model shape: {0}")]
    BadShape(String),
    #[error("tensor `{tensor}`: a {dtype:?} row must hold a multiple of {block_size} values, this one holds {row_len}")]
    RowNotBlockAligned { tensor: String, dtype: GgmlDType, block_size: usize, row_len: usize },
    #[error("{0:?} is not a weight type (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K)")]
    UnsupportedDType(GgmlDType),
    #[error("{layers} per-layer type overrides for a model of {n_layers} layers")]
    TooManyLayerOverrides { layers: usize, n_layers: u32 },
    #[error("the tokenizer has {n_tokens} tokens but the shape's vocabulary is {vocab_size} (use RandomGguf::with_tokenizer)")]
    VocabMismatch { n_tokens: usize, vocab_size: usize },
    #[error("tokenizer donor {path}: {reason}")]
    TokenizerSource { path: PathBuf, reason: String },
    #[error("metadata `{key}`: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("quantizing `{tensor}` to {dtype:?}: {source}")]
    Quantize { tensor: String, dtype: GgmlDType, source: candle_core::Error },
}

pub type Result<T, E = RandomGgufError> = std::result::Result<T, E>;

/// A llama-family model's dimensions: what the GGUF header says and what sizes the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub n_layers: u32,
    /// Hidden size (`embedding_length`).
    pub n_embd: usize,
    /// FFN inner size (`feed_forward_length`).
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub vocab_size: usize,
    /// Trained context, in tokens.
    pub context_length: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f32,
    /// Per-head dimension when it is not `n_embd / n_head` (Qwen3 0.6B: 128 with hidden
    /// 1024 and 16 heads); written as `attention.key_length` / `value_length`.
    pub key_length: Option<usize>,
    /// A mixture of experts in every block instead of the dense FFN; `n_ff` is then each
    /// expert's width.
    pub experts: Option<ExpertShape>,
}

/// How many experts a mixture-of-experts block has and how many a token uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShape {
    pub count: usize,
    pub used: usize,
}

impl ModelShape {
    /// Llama 3 70B's layer shape (hidden 8192, FFN 28672, 64 query heads and 8 KV heads of
    /// 128, vocabulary 128256, RoPE base 500000), with `n_layers` layers instead of 80.
    pub fn llama3_70b(n_layers: u32) -> Self {
        Self {
            n_layers,
            n_embd: 8192,
            n_ff: 28672,
            n_head: 64,
            n_head_kv: 8,
            vocab_size: 128_256,
            context_length: 8192,
            rope_freq_base: 500_000.0,
            rms_norm_eps: 1e-5,
            key_length: None,
            experts: None,
        }
    }

    /// Llama 3 8B's layer shape (hidden 4096, FFN 14336, 32 query heads and 8 KV heads of
    /// 128, vocabulary 128256), with `n_layers` layers instead of 32.
    pub fn llama3_8b(n_layers: u32) -> Self {
        Self { n_embd: 4096, n_ff: 14336, n_head: 32, ..Self::llama3_70b(n_layers) }
    }

    /// Qwen3 8B's layer shape (hidden 4096, FFN 12288, 32 query heads and 8 KV heads of
    /// 128, vocabulary 151936, RoPE base 1000000, RMS epsilon 1e-6), with `n_layers` layers
    /// instead of 36.
    pub fn qwen3_8b(n_layers: u32) -> Self {
        Self {
            n_layers,
            n_embd: 4096,
            n_ff: 12288,
            n_head: 32,
            n_head_kv: 8,
            vocab_size: 151_936,
            context_length: 40_960,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            key_length: Some(128),
            experts: None,
        }
    }

    /// Qwen2.5 72B's layer shape (hidden 8192, FFN 29568, 64 query heads and 8 KV heads of
    /// 128, vocabulary 152064, RoPE base 1000000, RMS epsilon 1e-6), with `n_layers` layers
    /// instead of 80.
    pub fn qwen2_5_72b(n_layers: u32) -> Self {
        Self {
            n_layers,
            n_embd: 8192,
            n_ff: 29568,
            n_head: 64,
            n_head_kv: 8,
            vocab_size: 152_064,
            context_length: 32_768,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            key_length: None,
            experts: None,
        }
    }

    /// The tiny model of the engine's split-invariance tests: 4 layers, hidden 256, FFN 512,
    /// 4 heads and 2 KV heads of 64, vocabulary 320, context 256. Every dimension is a
    /// multiple of 256, so every quantization type fits.
    pub fn tiny() -> Self {
        Self {
            n_layers: 4,
            n_embd: 256,
            n_ff: 512,
            n_head: 4,
            n_head_kv: 2,
            vocab_size: 320,
            context_length: 256,
            rope_freq_base: 10_000.0,
            rms_norm_eps: 1e-5,
            key_length: None,
            experts: None,
        }
    }

    /// The tiny shape with a mixture of 8 experts (2 used per token) of width 256 in every
    /// block: the test model of the expert FFN (Mixtral's layout in miniature).
    pub fn tiny_moe() -> Self {
        Self { n_ff: 256, experts: Some(ExpertShape { count: 8, used: 2 }), ..Self::tiny() }
    }

    /// Mixtral 8x7B's layer shape (hidden 4096, 8 experts of FFN 14336 with 2 used per token,
    /// 32 query heads and 8 KV heads of 128, vocabulary 32000, RoPE base 1000000), with
    /// `n_layers` layers instead of 32.
    pub fn mixtral_8x7b(n_layers: u32) -> Self {
        Self {
            n_layers,
            n_embd: 4096,
            n_ff: 14336,
            n_head: 32,
            n_head_kv: 8,
            vocab_size: 32_000,
            context_length: 32_768,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-5,
            key_length: None,
            experts: Some(ExpertShape { count: 8, used: 2 }),
        }
    }

    /// Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of FFN 768 with 8 used per
    /// token, 32 query heads and 4 KV heads of 128, vocabulary 151936), with `n_layers`
    /// layers instead of 48.
    pub fn qwen3_30b_a3b(n_layers: u32) -> Self {
        Self {
            n_layers,
            n_embd: 2048,
            n_ff: 768,
            n_head: 32,
            n_head_kv: 4,
            vocab_size: 151_936,
            context_length: 40_960,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            key_length: Some(128),
            experts: Some(ExpertShape { count: 128, used: 8 }),
        }
    }

    /// The shape named `name` (one of [`PRESET_NAMES`]; `llama3_70b` spells `llama3-70b`
    /// too), with `n_layers` layers if given, else the real model's count (tiny: 4, 8B: 32,
    /// 70B: 80). Names come from command lines, so an unknown one is an error, not a panic.
    pub fn preset(name: &str, n_layers: Option<u32>) -> Result<Self> {
        let shape = match name.to_ascii_lowercase().replace('_', "-").as_str() {
            "tiny" => Self::tiny(),
            "llama3-8b" => Self::llama3_8b(32),
            "llama3-70b" => Self::llama3_70b(80),
            "qwen3-8b" => Self::qwen3_8b(36),
            "qwen2.5-72b" => Self::qwen2_5_72b(80),
            "tiny-moe" => Self::tiny_moe(),
            "mixtral-8x7b" => Self::mixtral_8x7b(32),
            "qwen3-30b-a3b" => Self::qwen3_30b_a3b(48),
            _ => return Err(RandomGgufError::UnknownPreset(name.into())),
        };
        Ok(Self { n_layers: n_layers.unwrap_or(shape.n_layers), ..shape })
    }

    pub fn head_dim(&self) -> usize {
        self.key_length.unwrap_or(self.n_embd / self.n_head.max(1))
    }

    /// Checks what the engine's loader would otherwise reject later, or what would make the
    /// tensor list meaningless.
    fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(RandomGgufError::BadShape(reason));
        if self.n_layers == 0 {
            return bad("no layers".into());
        }
        if self.n_embd == 0 || self.n_ff == 0 || self.vocab_size == 0 || self.context_length == 0 {
            return bad(format!(
                "zero dimension (n_embd {}, n_ff {}, vocab {}, context {})",
                self.n_embd, self.n_ff, self.vocab_size, self.context_length
            ));
        }
        if self.n_head == 0 || self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!("head counts {} / {} are not a grouped-query layout", self.n_head, self.n_head_kv));
        }
        if (self.key_length.is_none() && !self.n_embd.is_multiple_of(self.n_head)) || !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return bad(format!("n_embd {} does not split into {} heads of an even size", self.n_embd, self.n_head));
        }
        for (what, value) in [
            ("n_embd", self.n_embd),
            ("n_ff", self.n_ff),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if u32::try_from(value).is_err() {
                return bad(format!("{what} {value} does not fit the header's u32"));
            }
        }
        if let Some(ExpertShape { count, used }) = self.experts {
            if count == 0 || used == 0 || used > count {
                return bad(format!("{used} experts used per token of {count}"));
            }
        }
        if !(self.rope_freq_base > 0.0 && self.rms_norm_eps > 0.0) {
            return bad(format!("rope base {} and rms eps {} must be positive", self.rope_freq_base, self.rms_norm_eps));
        }
        Ok(())
    }
}

/// The model families the writer knows. The llama-style decoders share llama's tensor list
/// with their additions (see `dense_tensors`), a shape with experts putting a mixture of
/// experts in place of every FFN; Gemma 3 (extra norms) would be a further variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    /// Qwen2 / Qwen2.5: llama's tensors plus Q/K/V bias vectors (NEOX RoPE at run time).
    Qwen2,
    /// Qwen3: llama's tensors plus per-head Q and K RMSNorm weights.
    Qwen3,
    /// Phi-3: Q, K and V in one `attn_qkv` matrix, gate and up in one `ffn_up` of 2 × n_ff
    /// rows (gate first).
    Phi3,
    /// Qwen3-MoE: Qwen3's attention and a mixture of experts in every block (the shape must
    /// have [`ModelShape::experts`]).
    Qwen3Moe,
}

/// The names [`Architecture::from_name`] takes.
pub const ARCHITECTURE_NAMES: [&str; 5] = ["llama", "qwen2", "qwen3", "phi3", "qwen3moe"];

impl Architecture {
    /// The `general.architecture` value, which also prefixes the hyper-parameter keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
            Self::Qwen3Moe => "qwen3moe",
        }
    }

    /// The architecture named `name` (one of [`ARCHITECTURE_NAMES`]).
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "phi3" => Ok(Self::Phi3),
            "qwen3moe" => Ok(Self::Qwen3Moe),
            _ => Err(RandomGgufError::UnknownArchitecture(name.into())),
        }
    }

    /// Every tensor of the model, in file order.
    fn tensors(self, shape: &ModelShape, tied_embeddings: bool) -> Vec<TensorSpec> {
        dense_tensors(self, shape, tied_embeddings)
    }

    /// The architecture's hyper-parameter keys.
    fn metadata(self, shape: &ModelShape) -> Vec<(String, Value)> {
        dense_metadata(self, shape)
    }
}

/// Which tensor a type choice applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TensorRole {
    Embedding,
    Output,
    Norm,
    /// Attention Q/K/V/output and FFN gate/up of layer `layer_idx`.
    LayerMatrix { layer_idx: usize },
    /// `ffn_down` of layer `layer_idx`: llama.cpp's mixes often give it more bits.
    FfnDown { layer_idx: usize },
    /// `attn_v` of layer `layer_idx`: so does Q4_K_M.
    AttnV { layer_idx: usize },
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// Uniform in `[-scale, scale)`.
    Uniform { scale: f32 },
    /// Uniform in `[1 - spread, 1 + spread)`: an RMS-norm weight.
    AroundOne { spread: f32 },
    /// Uniform in `[low, high)`: LongRoPE's frequency divisors.
    Range { low: f32, high: f32 },
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    /// Candle order: rows first, the row (innermost, contiguous) dimension last.
    dims: Vec<usize>,
    role: TensorRole,
    init: Init,
}

/// llama.cpp's tensor names (`LLM_TENSOR_NAMES` in llama-arch.cpp) and the scales the
/// split-invariance test has always used: weights about `1/sqrt(n_in)` so a layer keeps the
/// hidden state's magnitude (Q and K twice that, so attention is not uniform), embedding
/// and head values of order 1 (so the next-token distribution is peaked). Qwen2 adds Q/K/V
/// biases of order 1/2 (its real K biases are large); Qwen3 per-head Q/K norm weights
/// around 1.
fn dense_tensors(architecture: Architecture, shape: &ModelShape, tied_embeddings: bool) -> Vec<TensorSpec> {
    let n_embd = shape.n_embd;
    let head_dim = shape.head_dim();
    let n_q = shape.n_head * head_dim;
    let n_kv = shape.n_head_kv * head_dim;
    let w = 1.0 / (n_embd as f32).sqrt();
    let w_down = 1.0 / (shape.n_ff as f32).sqrt();
    let matrix = |name: String, n_out: usize, n_in: usize, role: TensorRole, scale: f32| TensorSpec {
        name,
        dims: vec![n_out, n_in],
        role,
        init: Init::Uniform { scale },
    };
    let norm = |name: String, spread: f32| TensorSpec {
        name,
        dims: vec![n_embd],
        role: TensorRole::Norm,
        init: Init::AroundOne { spread },
    };
    let mut tensors = vec![matrix("token_embd.weight".into(), shape.vocab_size, n_embd, TensorRole::Embedding, 1.0)];
    for layer_idx in 0..shape.n_layers as usize {
        let blk = |part: &str| format!("blk.{layer_idx}.{part}.weight");
        let role = TensorRole::LayerMatrix { layer_idx };
        tensors.push(norm(blk("attn_norm"), LAYER_NORM_SPREAD));
        if architecture == Architecture::Phi3 {
            tensors.push(matrix(blk("attn_qkv"), n_q + 2 * n_kv, n_embd, role, 2.0 * w));
        } else {
            tensors.push(matrix(blk("attn_q"), n_q, n_embd, role, 2.0 * w));
            tensors.push(matrix(blk("attn_k"), n_kv, n_embd, role, 2.0 * w));
            tensors.push(matrix(blk("attn_v"), n_kv, n_embd, TensorRole::AttnV { layer_idx }, w));
        }
        if architecture == Architecture::Qwen2 {
            for (part, n) in [("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)] {
                let name = format!("blk.{layer_idx}.{part}.bias");
                tensors.push(TensorSpec { name, dims: vec![n], role: TensorRole::Norm, init: Init::Uniform { scale: 0.5 } });
            }
        }
        tensors.push(matrix(blk("attn_output"), n_embd, n_q, role, w));
        if matches!(architecture, Architecture::Qwen3 | Architecture::Qwen3Moe) {
            for part in ["attn_q_norm", "attn_k_norm"] {
                let init = Init::AroundOne { spread: LAYER_NORM_SPREAD };
                tensors.push(TensorSpec { name: blk(part), dims: vec![head_dim], role: TensorRole::Norm, init });
            }
        }
        tensors.push(norm(blk("ffn_norm"), LAYER_NORM_SPREAD));
        if let Some(ExpertShape { count, .. }) = shape.experts {
            // The router four times a layer's scale: logits a few units apart, so the chosen
            // experts are clear of near-ties (which a last-bit difference could flip). F32,
            // as llama.cpp's conversion and quantization keep it.
            let init = Init::Uniform { scale: 4.0 * w };
            tensors.push(TensorSpec { name: blk("ffn_gate_inp"), dims: vec![count, n_embd], role: TensorRole::Norm, init });
            let experts = |name: String, n_out: usize, n_in: usize, role: TensorRole, scale: f32| TensorSpec {
                name,
                dims: vec![count, n_out, n_in],
                role,
                init: Init::Uniform { scale },
            };
            tensors.push(experts(blk("ffn_gate_exps"), shape.n_ff, n_embd, role, w));
            tensors.push(experts(blk("ffn_up_exps"), shape.n_ff, n_embd, role, w));
            tensors.push(experts(blk("ffn_down_exps"), n_embd, shape.n_ff, TensorRole::FfnDown { layer_idx }, w_down));
            continue;
        }
        if architecture == Architecture::Phi3 {
            tensors.push(matrix(blk("ffn_up"), 2 * shape.n_ff, n_embd, role, w));
        } else {
            tensors.push(matrix(blk("ffn_gate"), shape.n_ff, n_embd, role, w));
            tensors.push(matrix(blk("ffn_up"), shape.n_ff, n_embd, role, w));
        }
        tensors.push(matrix(blk("ffn_down"), n_embd, shape.n_ff, TensorRole::FfnDown { layer_idx }, w_down));
    }
    tensors.push(norm("output_norm.weight".into(), OUTPUT_NORM_SPREAD));
    if !tied_embeddings {
        tensors.push(matrix("output.weight".into(), shape.vocab_size, n_embd, TensorRole::Output, 1.0));
    }
    tensors
}

/// The `{arch}.*` keys llama.cpp's `llm_load_hparams` and the engine's profile read.
fn dense_metadata(architecture: Architecture, shape: &ModelShape) -> Vec<(String, Value)> {
    // validate() has checked that every dimension fits a u32.
    let u32_of = |v: usize| Value::U32(v as u32);
    let mut keys = vec![
        ("block_count", Value::U32(shape.n_layers)),
        ("context_length", u32_of(shape.context_length)),
        ("embedding_length", u32_of(shape.n_embd)),
        ("feed_forward_length", u32_of(shape.n_ff)),
        ("attention.head_count", u32_of(shape.n_head)),
        ("attention.head_count_kv", u32_of(shape.n_head_kv)),
        ("rope.dimension_count", u32_of(shape.head_dim())),
        ("rope.freq_base", Value::F32(shape.rope_freq_base)),
        ("attention.layer_norm_rms_epsilon", Value::F32(shape.rms_norm_eps)),
        ("vocab_size", u32_of(shape.vocab_size)),
    ];
    if let Some(key_length) = shape.key_length {
        keys.push(("attention.key_length", u32_of(key_length)));
        keys.push(("attention.value_length", u32_of(key_length)));
    }
    if let Some(ExpertShape { count, used }) = shape.experts {
        keys.push(("expert_count", u32_of(count)));
        keys.push(("expert_used_count", u32_of(used)));
        if architecture == Architecture::Qwen3Moe {
            keys.push(("expert_feed_forward_length", u32_of(shape.n_ff)));
        }
    }
    let arch = architecture.gguf_name();
    keys.into_iter().map(|(key, value)| (format!("{arch}.{key}"), value)).collect()
}

/// Types of one layer's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerDTypes {
    /// Attention Q/K/output and FFN gate/up.
    pub matrices: GgmlDType,
    pub attn_v: GgmlDType,
    pub ffn_down: GgmlDType,
}

impl LayerDTypes {
    pub fn uniform(dtype: GgmlDType) -> Self {
        Self { matrices: dtype, attn_v: dtype, ffn_down: dtype }
    }
}

/// The type of every tensor: one default for the layers' matrices, with per-layer overrides,
/// and separate types for the embedding, the head and the norms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DTypeChoice {
    /// Layer matrices of every layer past the end of `layers`.
    pub default: GgmlDType,
    /// `layers[i]` gives layer i's types; may be shorter than the model.
    pub layers: Vec<LayerDTypes>,
    pub embedding: GgmlDType,
    pub output: GgmlDType,
    /// Norm weights. llama.cpp keeps them F32 in every quantization mix.
    pub norm: GgmlDType,
}

impl DTypeChoice {
    /// Every matrix in `dtype`, norms in F32.
    pub fn uniform(dtype: GgmlDType) -> Self {
        Self { default: dtype, layers: Vec::new(), embedding: dtype, output: dtype, norm: GgmlDType::F32 }
    }

    fn for_role(&self, role: TensorRole) -> GgmlDType {
        match role {
            TensorRole::Embedding => self.embedding,
            TensorRole::Output => self.output,
            TensorRole::Norm => self.norm,
            TensorRole::LayerMatrix { layer_idx } => self.layers.get(layer_idx).map_or(self.default, |l| l.matrices),
            TensorRole::FfnDown { layer_idx } => self.layers.get(layer_idx).map_or(self.default, |l| l.ffn_down),
            TensorRole::AttnV { layer_idx } => self.layers.get(layer_idx).map_or(self.default, |l| l.attn_v),
        }
    }

    /// llama.cpp's Q4_K_M mix for `n_layers` layers (`llama_tensor_get_type` in
    /// llama-quant.cpp): Q4_K everywhere, but Q6_K for the head and for `attn_v` and
    /// `ffn_down` of the layers `use_more_bits` picks (the first and last eighth, and every
    /// third layer between), norms F32. Its per-model refinements (e.g. a Q5_K `attn_v` for
    /// 70B models) are left out: the sizes stay within a few percent of a real Q4_K_M file,
    /// and every kernel a real one needs (Q4_K, Q6_K) is exercised.
    pub fn q4_k_m(n_layers: u32) -> Self {
        let n = n_layers as usize;
        let use_more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i >= n / 8 && (i - n / 8) % 3 == 2);
        let layers = (0..n)
            .map(|i| {
                let more = if use_more_bits(i) { GgmlDType::Q6K } else { GgmlDType::Q4K };
                LayerDTypes { matrices: GgmlDType::Q4K, attn_v: more, ffn_down: more }
            })
            .collect();
        Self { default: GgmlDType::Q4K, layers, embedding: GgmlDType::Q4K, output: GgmlDType::Q6K, norm: GgmlDType::F32 }
    }
}

/// The `tokenizer.*` metadata of an existing GGUF, copied verbatim into a random model so
/// that it can be run on text (the engine's slices themselves need no tokenizer).
#[derive(Debug, Clone)]
pub struct TokenizerMetadata {
    /// Sorted by key, so the written file does not depend on a hash map's order.
    entries: Vec<(String, Value)>,
    n_tokens: usize,
}

impl TokenizerMetadata {
    /// Reads only the header of the GGUF at `path` (the donor's tensors are never loaded).
    /// A file that is missing, is not a GGUF, or has no `tokenizer.ggml.tokens` is a
    /// [`RandomGgufError::TokenizerSource`] naming the file.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let source_error = |reason: String| RandomGgufError::TokenizerSource { path: path.to_owned(), reason };
        let mut file = std::fs::File::open(path).map_err(|e| source_error(e.to_string()))?;
        let content = Content::read(&mut file)
            .map_err(|e| source_error(format!("not a readable GGUF file: {}", without_backtrace(e))))?;
        Self::from_content(&content).map_err(source_error)
    }

    /// Every `tokenizer.*` key of `content`; the error says why there is no usable tokenizer.
    fn from_content(content: &Content) -> std::result::Result<Self, String> {
        let mut entries: Vec<(String, Value)> = content
            .metadata
            .iter()
            .filter(|(key, _)| key.starts_with("tokenizer."))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let n_tokens = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) if !tokens.is_empty() => tokens.len(),
            Some(_) => return Err("`tokenizer.ggml.tokens` is not a non-empty array".into()),
            None => return Err("no `tokenizer.ggml.tokens`".into()),
        };
        Ok(Self { entries, n_tokens })
    }

    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(key, _)| key.as_str())
    }
}

/// The weight type named `name` as command lines spell it (`q4_0`, `Q4_0`, `q4k`, `Q4_K`, `f32`…).
pub fn parse_dtype(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().replace('_', "").as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q40" => GgmlDType::Q4_0,
        "q41" => GgmlDType::Q4_1,
        "q50" => GgmlDType::Q5_0,
        "q51" => GgmlDType::Q5_1,
        "q80" => GgmlDType::Q8_0,
        "q2k" => GgmlDType::Q2K,
        "q3k" => GgmlDType::Q3K,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        _ => return Err(RandomGgufError::UnknownDType(name.into())),
    })
}

/// Where the default tokenizer donor ([`DEFAULT_DONOR_FILE`]) is, if it is there:
/// `$POTLUCK_MODEL`, else the coordinator's cache (`$POTLUCK_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/potluck`, else `~/.cache/potluck`) under `models/`. The same places
/// `coordinator fetch-model` and the engine's reference tests use; the engine does not
/// download anything itself.
pub fn default_donor_path() -> Option<PathBuf> {
    let env = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    let path = env("POTLUCK_MODEL").or_else(|| {
        let cache = env("POTLUCK_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|dir| dir.join("potluck")))
            .or_else(|| env("HOME").map(|home| home.join(".cache/potluck")))?;
        Some(cache.join("models").join(DEFAULT_DONOR_FILE))
    })?;
    path.is_file().then_some(path)
}

/// One tensor as it will be laid out in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    /// Candle order: rows first, the contiguous row dimension last.
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    /// From the start of the tensor data; a multiple of [`GGUF_ALIGNMENT_BYTES`].
    pub offset_bytes: u64,
    pub size_bytes: u64,
    init: Init,
}

/// What [`RandomGguf::write`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReport {
    pub path: PathBuf,
    /// The whole file, header and padding included.
    pub file_bytes: u64,
    /// The tensors' bytes alone, as [`crate::profile::ModelProfile::total_weight_bytes`]
    /// counts them.
    pub tensor_bytes: u64,
    pub n_tensors: usize,
    /// Count of tensors per type, e.g. {"F32": 9, "Q4_0": 9}.
    pub tensor_types: BTreeMap<String, usize>,
}

/// A random-weight model to write: its shape, architecture, seed and types.
#[derive(Debug, Clone)]
pub struct RandomGguf {
    pub shape: ModelShape,
    pub architecture: Architecture,
    pub seed: u64,
    /// No `output.weight`: the head reuses the token embedding.
    pub tied_embeddings: bool,
    pub dtypes: DTypeChoice,
    pub tokenizer: Option<TokenizerMetadata>,
    /// Further metadata written after the architecture's keys (a test's RoPE scaling type,
    /// sliding window…); a key given here twice, or also by the writer, is the caller's error.
    pub extra_metadata: Vec<(String, Value)>,
    /// Write LongRoPE's `rope_factors_short/long.weight` (see [`Self::with_rope_scaling`]).
    pub longrope_factors: bool,
}

impl RandomGguf {
    /// A llama model of `shape`, untied, every matrix in `dtype`, no tokenizer.
    pub fn new(shape: ModelShape, dtype: GgmlDType, seed: u64) -> Self {
        Self {
            shape,
            architecture: Architecture::Llama,
            seed,
            tied_embeddings: false,
            dtypes: DTypeChoice::uniform(dtype),
            tokenizer: None,
            extra_metadata: Vec::new(),
            longrope_factors: false,
        }
    }

    /// The tiny shape with a different block format in each of its 4 layers (Q4_1; Q4_K with
    /// a Q5_K `ffn_down`, as Q4_K_M files have; Q6_K; Q8_0), a Q8_0 embedding and a Q4_0 head:
    /// one file that runs every weight kernel the engine has.
    pub fn tiny_mixed(seed: u64) -> Self {
        let mut model = Self::new(ModelShape::tiny(), GgmlDType::Q8_0, seed);
        model.dtypes.layers = vec![
            LayerDTypes::uniform(GgmlDType::Q4_1),
            LayerDTypes { matrices: GgmlDType::Q4K, attn_v: GgmlDType::Q4K, ffn_down: GgmlDType::Q5K },
            LayerDTypes::uniform(GgmlDType::Q6K),
            LayerDTypes::uniform(GgmlDType::Q8_0),
        ];
        model.dtypes.embedding = GgmlDType::Q8_0;
        model.dtypes.output = GgmlDType::Q4_0;
        model
    }

    /// Adds RoPE scaling as `spec` says: `linear:FACTOR`, `yarn:FACTOR:ORIGINAL_CONTEXT`
    /// (the `rope.scaling.*` keys), or `longrope:ATTN_FACTOR:ORIGINAL_CONTEXT` (Phi-3's
    /// LongRoPE as its conversion writes it: `rope_factors_short/long` tensors of divisors in
    /// [1, 1.25) and [1, 8), the attention factor and the original context, no type key).
    pub fn with_rope_scaling(mut self, spec: &str) -> Result<Self> {
        let arch = self.architecture.gguf_name();
        let bad = |reason: &str| RandomGgufError::BadMetadata { key: format!("{arch}.rope.scaling"), reason: format!("`{spec}`: {reason}") };
        let parts: Vec<&str> = spec.split(':').collect();
        let number: f32 = parts.get(1).and_then(|f| f.parse().ok()).filter(|f: &f32| *f > 0.0).ok_or_else(|| bad("no positive factor"))?;
        let original = || -> Result<Value> {
            let tokens: u32 = parts.get(2).and_then(|c| c.parse().ok()).ok_or_else(|| bad("the original context is not a count of tokens"))?;
            Ok(Value::U32(tokens))
        };
        let key = |k: &str| format!("{arch}.rope.scaling.{k}");
        let keys = match (parts[0], parts.len()) {
            ("linear", 2) => vec![(key("type"), Value::String("linear".into())), (key("factor"), Value::F32(number))],
            ("yarn", 3) => vec![
                (key("type"), Value::String("yarn".into())),
                (key("factor"), Value::F32(number)),
                (key("original_context_length"), original()?),
            ],
            ("longrope", 3) => {
                self.longrope_factors = true;
                vec![(key("attn_factor"), Value::F32(number)), (key("original_context_length"), original()?)]
            }
            _ => return Err(bad("expected linear:FACTOR, yarn:FACTOR:ORIGINAL_CONTEXT or longrope:ATTN_FACTOR:ORIGINAL_CONTEXT")),
        };
        self.extra_metadata.extend(keys);
        Ok(self)
    }

    /// Adds a tokenizer and sets the vocabulary to its token count, so the embedding has a
    /// row per token.
    pub fn with_tokenizer(mut self, tokenizer: TokenizerMetadata) -> Self {
        self.shape.vocab_size = tokenizer.n_tokens();
        self.tokenizer = Some(tokenizer);
        self
    }

    /// Every tensor with its type, offset and size, after checking that the model can be
    /// written.
    pub fn plan(&self) -> Result<Vec<PlannedTensor>> {
        self.shape.validate()?;
        match (self.architecture, self.shape.experts) {
            (Architecture::Qwen3Moe, None) => {
                return Err(RandomGgufError::BadShape("a qwen3moe model needs experts (a preset such as tiny-moe)".into()))
            }
            (Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Phi3, Some(_)) => {
                return Err(RandomGgufError::BadShape(format!(
                    "{} has no mixture-of-experts form (experts go with llama or qwen3moe)",
                    self.architecture.gguf_name()
                )))
            }
            _ => {}
        }
        if self.dtypes.layers.len() > self.shape.n_layers as usize {
            return Err(RandomGgufError::TooManyLayerOverrides {
                layers: self.dtypes.layers.len(),
                n_layers: self.shape.n_layers,
            });
        }
        if let Some(tokenizer) = &self.tokenizer {
            if tokenizer.n_tokens() != self.shape.vocab_size {
                return Err(RandomGgufError::VocabMismatch {
                    n_tokens: tokenizer.n_tokens(),
                    vocab_size: self.shape.vocab_size,
                });
            }
        }
        let mut offset_bytes = 0u64;
        let mut planned = Vec::new();
        let mut specs = self.architecture.tensors(&self.shape, self.tied_embeddings);
        if self.longrope_factors {
            for (name, high) in [("rope_factors_long.weight", 8.0), ("rope_factors_short.weight", 1.25)] {
                let dims = vec![self.shape.head_dim() / 2];
                specs.push(TensorSpec { name: name.into(), dims, role: TensorRole::Norm, init: Init::Range { low: 1.0, high } });
            }
        }
        for spec in specs {
            let dtype = self.dtypes.for_role(spec.role);
            ggml_type_id(dtype)?;
            let row_len = *spec.dims.last().unwrap_or(&0);
            if !row_len.is_multiple_of(dtype.block_size()) {
                return Err(RandomGgufError::RowNotBlockAligned {
                    tensor: spec.name,
                    dtype,
                    block_size: dtype.block_size(),
                    row_len,
                });
            }
            let size_bytes = tensor_size_in_bytes(dtype, spec.dims.iter().product());
            planned.push(PlannedTensor { name: spec.name, dims: spec.dims, dtype, offset_bytes, size_bytes, init: spec.init });
            offset_bytes += align_up(size_bytes);
        }
        Ok(planned)
    }

    /// The size of the file [`Self::write`] would write, without writing it.
    pub fn file_bytes(&self) -> Result<u64> {
        let plan = self.plan()?;
        let header = self.header(&plan)?;
        Ok(align_up(header.len() as u64) + plan.last().map_or(0, |t| align_up(t.offset_bytes + t.size_bytes)))
    }

    /// Writes the model to `path` on the calling thread.
    pub fn write(&self, path: &Path) -> Result<WriteReport> {
        self.write_with_pool(path, &ComputePool::new(1))
    }

    /// Writes the model to `path`, generating and quantizing rows on `pool`'s threads. The
    /// bytes do not depend on the thread count. The file appears at `path` only once it is
    /// complete: it is written to `<path>.partial`, which is removed if anything fails.
    pub fn write_with_pool(&self, path: &Path, pool: &ComputePool) -> Result<WriteReport> {
        let plan = self.plan()?;
        let header = self.header(&plan)?;
        let mut partial = OsString::from(path.as_os_str());
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let written = self.write_file(&partial, path, &plan, &header, pool).and_then(|file_bytes| {
            std::fs::rename(&partial, path).map_err(|source| RandomGgufError::Write { path: path.to_owned(), source })?;
            Ok(file_bytes)
        });
        let file_bytes = match written {
            Ok(file_bytes) => file_bytes,
            Err(e) => {
                // Best effort: the error being returned says what went wrong.
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        let mut tensor_types = BTreeMap::new();
        for tensor in &plan {
            *tensor_types.entry(format!("{:?}", tensor.dtype)).or_insert(0) += 1;
        }
        Ok(WriteReport {
            path: path.to_owned(),
            file_bytes,
            tensor_bytes: plan.iter().map(|t| t.size_bytes).sum(),
            n_tensors: plan.len(),
            tensor_types,
        })
    }

    /// Writes header and tensors to `partial`; returns the file's size. Errors name `path`,
    /// the file the caller asked for.
    fn write_file(&self, partial: &Path, path: &Path, plan: &[PlannedTensor], header: &[u8], pool: &ComputePool) -> Result<u64> {
        let io_error = |source| RandomGgufError::Write { path: path.to_owned(), source };
        let file = std::fs::File::create(partial).map_err(io_error)?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
        out.write_all(header).map_err(io_error)?;
        let mut position = header.len() as u64;
        position += write_padding(&mut out, position).map_err(io_error)?;
        let data_start = position;
        for tensor in plan {
            debug_assert_eq!(position, data_start + tensor.offset_bytes, "{} misplaced", tensor.name);
            let tensor_seed = splitmix64(self.seed ^ fnv1a64(tensor.name.as_bytes()));
            write_tensor(&mut out, tensor, tensor_seed, pool).map_err(|e| match e {
                TensorWriteError::Io(source) => io_error(source),
                TensorWriteError::Quantize(e) => RandomGgufError::Quantize {
                    tensor: tensor.name.clone(),
                    dtype: tensor.dtype,
                    source: without_backtrace(e),
                },
            })?;
            position += tensor.size_bytes;
            position += write_padding(&mut out, position).map_err(io_error)?;
        }
        // Flush and sync here so that a full disk is this call's error, not a short file later.
        let file = out.into_inner().map_err(|e| io_error(e.into_error()))?;
        file.sync_all().map_err(io_error)?;
        Ok(position)
    }

    /// The most bytes [`Self::write_with_pool`] holds at once on a pool of `n_threads`: the
    /// header, the write buffer, the largest tensor's window of quantized rows, and per
    /// thread one chunk of f32 values plus its quantized copy. Computed from the layout the
    /// writer itself uses (`StreamLayout`), so it bounds the writer by construction; it
    /// does not grow with the layer count or with a tensor's size beyond one window.
    pub fn buffer_bytes_max(&self, n_threads: usize) -> Result<u64> {
        let plan = self.plan()?;
        let header = self.header(&plan)?;
        let per_tensor = plan
            .iter()
            .map(|t| StreamLayout::new(t, n_threads).buffer_bytes(n_threads))
            .max()
            .unwrap_or(0);
        Ok(header.len() as u64 + WRITE_BUFFER_BYTES as u64 + per_tensor)
    }

    /// Everything before the tensor data: magic, version, counts, metadata, tensor infos.
    fn header(&self, plan: &[PlannedTensor]) -> Result<Vec<u8>> {
        let arch = self.architecture.gguf_name();
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            // The seed stays out of the header: files that differ only in their weights have
            // the same header, as two quantizations' re-uploads can (the weight stream's tests
            // rely on it to show that tensor hashes, not the model hash, tell them apart).
            // Not "random phi3": llama.cpp gives a model whose name holds "phi3" Phi-3's own
            // special tokens (`</s>`…), which the donor's vocabulary lacks.
            ("general.name".into(), Value::String(if arch == "phi3" { "random Phi 3 layout".into() } else { format!("random {arch}") })),
            ("general.alignment".into(), Value::U32(GGUF_ALIGNMENT_BYTES as u32)),
        ];
        metadata.extend(self.architecture.metadata(&self.shape));
        metadata.extend(self.extra_metadata.iter().cloned());
        if let Some(tokenizer) = &self.tokenizer {
            metadata.extend(tokenizer.entries.iter().cloned());
        }
        let mut header = Vec::new();
        header.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in &metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value_type_id(value).to_le_bytes());
            put_value(&mut header, key, value)?;
        }
        for tensor in plan {
            put_string(&mut header, &tensor.name);
            header.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
            // GGUF lists dimensions innermost first (ggml's ne[0] is the row length).
            for &dim in tensor.dims.iter().rev() {
                header.extend_from_slice(&(dim as u64).to_le_bytes());
            }
            header.extend_from_slice(&ggml_type_id(tensor.dtype)?.to_le_bytes());
            header.extend_from_slice(&tensor.offset_bytes.to_le_bytes());
        }
        Ok(header)
    }
}

/// How one tensor is streamed: `rows_per_chunk` rows are generated and quantized by one
/// thread at a time, `rows_per_window` rows (a few chunks per thread) are quantized before
/// they are written out. Whole rows, because a quantization block never spans two rows
/// (plan() checked that a row is a whole number of blocks), so chunked quantization gives
/// the bytes of the whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamLayout {
    row_len: usize,
    n_rows: usize,
    row_bytes: usize,
    rows_per_chunk: usize,
    rows_per_window: usize,
}

impl StreamLayout {
    fn new(tensor: &PlannedTensor, n_threads: usize) -> Self {
        let row_len = *tensor.dims.last().unwrap_or(&1);
        let n_rows: usize = tensor.dims[..tensor.dims.len().saturating_sub(1)].iter().product();
        let row_bytes = tensor_size_in_bytes(tensor.dtype, row_len) as usize;
        let rows_per_chunk = (CHUNK_F32_BYTES_MAX / (row_len * 4).max(1)).clamp(1, n_rows.max(1));
        let rows_per_window = (rows_per_chunk * n_threads.max(1) * WINDOW_CHUNKS_PER_THREAD).min(n_rows.max(1));
        Self { row_len, n_rows, row_bytes, rows_per_chunk, rows_per_window }
    }

    /// The window buffer, plus per thread a chunk's f32 values and their quantized copy.
    fn buffer_bytes(&self, n_threads: usize) -> u64 {
        let window = self.rows_per_window * self.row_bytes;
        let chunk = self.rows_per_chunk * (self.row_len * 4 + self.row_bytes);
        (window + n_threads.max(1) * chunk) as u64
    }
}

/// Why one tensor could not be written; the caller adds the path or the tensor's name.
#[derive(Debug)]
enum TensorWriteError {
    Io(std::io::Error),
    Quantize(candle_core::Error),
}

/// Generates `tensor`'s rows, quantizes them a chunk at a time on `pool` and writes them out
/// a window at a time (see [`StreamLayout`]).
fn write_tensor(
    out: &mut impl Write,
    tensor: &PlannedTensor,
    tensor_seed: u64,
    pool: &ComputePool,
) -> std::result::Result<(), TensorWriteError> {
    let StreamLayout { row_len, n_rows, row_bytes, rows_per_chunk, rows_per_window } =
        StreamLayout::new(tensor, pool.n_threads());
    let mut window = vec![0u8; rows_per_window * row_bytes];
    // The pool's closure cannot return an error; the first one is kept here.
    let failure: Mutex<Option<candle_core::Error>> = Mutex::new(None);
    let mut first_row = 0;
    while first_row < n_rows {
        let rows = rows_per_window.min(n_rows - first_row);
        let bytes = &mut window[..rows * row_bytes];
        pool.for_each_chunk(bytes, rows_per_chunk * row_bytes, |chunk_idx, chunk| {
            let chunk_first_row = first_row + chunk_idx * rows_per_chunk;
            let chunk_rows = chunk.len() / row_bytes;
            if let Err(e) = quantize_rows(chunk, chunk_first_row, chunk_rows, row_len, tensor.dtype, tensor_seed, tensor.init) {
                failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
        });
        if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(TensorWriteError::Quantize(e));
        }
        out.write_all(bytes).map_err(TensorWriteError::Io)?;
        first_row += rows;
    }
    Ok(())
}

/// Fills rows `first_row..first_row + n_rows` with their random values and quantizes them
/// into `out`.
fn quantize_rows(
    out: &mut [u8],
    first_row: usize,
    n_rows: usize,
    row_len: usize,
    dtype: GgmlDType,
    tensor_seed: u64,
    init: Init,
) -> candle_core::Result<()> {
    let mut values = Vec::with_capacity(n_rows * row_len);
    for row in first_row..first_row + n_rows {
        let mut state = splitmix64(tensor_seed ^ splitmix64(row as u64)) | 1;
        values.extend((0..row_len).map(|_| {
            // xorshift64: fast and good enough for weights nobody will train.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0;
            match init {
                Init::Uniform { scale } => unit * scale,
                Init::AroundOne { spread } => 1.0 + unit * spread,
                Init::Range { low, high } => low + (unit + 1.0) * 0.5 * (high - low),
            }
        }));
    }
    let values = Tensor::from_vec(values, (n_rows, row_len), &Device::Cpu)?;
    let quantized = QTensor::quantize(&values, dtype)?;
    let data = quantized.data()?;
    if data.len() != out.len() {
        candle_core::bail!("quantized {n_rows} rows of {row_len} {dtype:?} into {} bytes, expected {}", data.len(), out.len());
    }
    out.copy_from_slice(&data);
    Ok(())
}

/// Candle's error without the backtrace it captures when `RUST_BACKTRACE` is set: its
/// `Display` prints the whole trace, which buries a one-line message such as "unknown magic".
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e,
    }
}

fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(GGUF_ALIGNMENT_BYTES) * GGUF_ALIGNMENT_BYTES
}

/// Zeros up to the next alignment boundary; returns how many.
fn write_padding(out: &mut impl Write, position: u64) -> std::io::Result<u64> {
    let padding = align_up(position) - position;
    out.write_all(&[0u8; GGUF_ALIGNMENT_BYTES as usize][..padding as usize])?;
    Ok(padding)
}

/// The type's ggml id (the engine's one table, [`crate::quant::dtype::ggml_dtype_id`]);
/// Q8_1 and Q8_K are ggml's intermediate types for dot products, never stored weights.
fn ggml_type_id(dtype: GgmlDType) -> Result<u32> {
    match dtype {
        GgmlDType::Q8_1 | GgmlDType::Q8K => Err(RandomGgufError::UnsupportedDType(dtype)),
        _ => Ok(crate::quant::dtype::ggml_dtype_id(dtype)),
    }
}

/// `gguf_type` in the GGUF spec.
pub(crate) fn value_type_id(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A GGUF string: u64 byte length, then UTF-8 without a terminator.
pub(crate) fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A value without its type id (the caller writes that). An array is its element type id,
/// its u64 length, then the elements, each itself without a type id.
pub(crate) fn put_value(buf: &mut Vec<u8>, key: &str, value: &Value) -> Result<()> {
    match value {
        Value::U8(v) => buf.push(*v),
        Value::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => buf.push(u8::from(*v)),
        Value::String(v) => put_string(buf, v),
        Value::Array(items) => {
            // An empty array's element type is arbitrary; candle writes U32 too.
            let element_type = items.first().map_or(4, value_type_id);
            if items.iter().any(|item| value_type_id(item) != element_type) {
                return Err(RandomGgufError::BadMetadata { key: key.into(), reason: "array of mixed types".into() });
            }
            buf.extend_from_slice(&element_type.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, key, item)?;
            }
        }
    }
    Ok(())
}

/// SplitMix64's finalizer (Steele, Lea, Flood 2014): turns nearby seeds (row 0, 1, 2…) into
/// unrelated xorshift states.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a: a stable hash of a tensor's name (std's hashers may change between releases).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ModelSlice;
    use crate::backend::Backend;
    use crate::profile::ModelProfile;
    use crate::tokenizer::Tokenizer;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("potluck-random-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    /// Deletes the file when the test ends, passed or failed.
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }


    /// Logits of `tokens` fed as one step through the whole model at `path`.
    fn forward(path: &Path, tokens: &[u32]) -> (Vec<f32>, usize) {
        let (profile, _) = ModelProfile::from_path(path).unwrap();
        let slice = ModelSlice::load(path, 0..profile.n_layers, Backend::cpu(1)).unwrap();
        let mut cache = slice.new_cache(64);
        let mut hidden = slice.embed(tokens).unwrap();
        slice.forward_layers(&mut hidden, &[tokens.len()], &mut [&mut cache]).unwrap();
        (slice.head(&hidden).unwrap(), profile.vocab_size)
    }

    /// GPT-2's byte-to-character table (`bytes_to_unicode`): printable bytes stand for
    /// themselves, the others for the characters from U+0100 on.
    fn gpt2_byte_chars() -> Vec<char> {
        let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let mut next = 0x100;
        (0..=255u32)
            .map(|b| {
                if printable(b) {
                    char::from_u32(b).unwrap()
                } else {
                    next += 1;
                    char::from_u32(next - 1).unwrap()
                }
            })
            .collect()
    }

    /// A donor GGUF (written by candle's own writer) with a small byte-level BPE tokenizer
    /// the engine can load, a chat template, and keys that must not be copied.
    fn write_donor(path: &Path) -> usize {
        let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        tokens.extend(gpt2_byte_chars().iter().map(char::to_string));
        tokens.extend(["he", "ll", "hell", "hello"].map(String::from));
        let n_tokens = tokens.len();
        let mut token_types = vec![Value::I32(3); 3];
        token_types.resize(n_tokens, Value::I32(1));
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("donor".into())),
            ("llama.block_count", Value::U32(30)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", strings(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(token_types)),
            ("tokenizer.ggml.merges", strings(["h e", "l l", "he ll", "hell o"].map(String::from).to_vec())),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ("tokenizer.chat_template", Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into())),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let x = QTensor::quantize(&Tensor::zeros((1, 32), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        let mut file = std::fs::File::create(path).unwrap();
        candle_core::quantized::gguf_file::write(&mut file, &metadata, &[("x", &x)]).unwrap();
        n_tokens
    }

    #[test]
    fn presets_have_the_real_layer_shapes() {
        let shape = ModelShape::preset("llama3-70b", Some(2)).unwrap();
        assert_eq!((shape.n_layers, shape.n_embd, shape.n_ff), (2, 8192, 28672));
        assert_eq!((shape.n_head, shape.n_head_kv, shape.head_dim()), (64, 8, 128));
        assert_eq!(shape, ModelShape::llama3_70b(2));
        assert_eq!(ModelShape::preset("llama3_70b", None).unwrap().n_layers, 80);
        let shape = ModelShape::preset("LLAMA3-8B", None).unwrap();
        assert_eq!((shape.n_layers, shape.n_embd, shape.n_ff, shape.n_head, shape.n_head_kv), (32, 4096, 14336, 32, 8));
        assert_eq!(ModelShape::preset("tiny", Some(1)).unwrap(), ModelShape { n_layers: 1, ..ModelShape::tiny() });
        for name in PRESET_NAMES {
            ModelShape::preset(name, None).unwrap().validate().unwrap();
        }
        assert_eq!(parse_dtype("Q4_K").unwrap(), GgmlDType::Q4K);
        assert_eq!(parse_dtype("q8_0").unwrap(), GgmlDType::Q8_0);
    }

    #[test]
    fn same_seed_same_bytes_whatever_the_threads() {
        let a = Removed(temp_path("det-a.gguf"));
        let b = Removed(temp_path("det-b.gguf"));
        let c = Removed(temp_path("det-c.gguf"));
        RandomGguf::tiny_mixed(7).write(&a.0).unwrap();
        RandomGguf::tiny_mixed(7).write_with_pool(&b.0, &ComputePool::new(2)).unwrap();
        RandomGguf::tiny_mixed(8).write(&c.0).unwrap();
        let bytes_a = std::fs::read(&a.0).unwrap();
        assert!(bytes_a == std::fs::read(&b.0).unwrap(), "one thread and two threads differ");
        assert!(bytes_a != std::fs::read(&c.0).unwrap(), "another seed gave the same file");
    }

    /// llama.cpp's `use_more_bits` for 8 layers picks layers 0 (first eighth), 7 (last
    /// eighth), 3 and 6 (every third between): those get Q6_K `attn_v` and `ffn_down`.
    #[test]
    fn the_q4_k_m_mix_is_llama_cpps_and_loads() {
        let path = Removed(temp_path("q4km.gguf"));
        let mut model = RandomGguf::new(ModelShape::preset("tiny", Some(8)).unwrap(), GgmlDType::Q4K, 3);
        model.dtypes = DTypeChoice::q4_k_m(8);
        model.write(&path.0).unwrap();
        let (_, content) = ModelProfile::from_path(&path.0).unwrap();
        let dtype = |name: &str| content.tensor_infos[name].ggml_dtype;
        for layer in 0..8 {
            let more = if [0, 3, 6, 7].contains(&layer) { GgmlDType::Q6K } else { GgmlDType::Q4K };
            assert_eq!(dtype(&format!("blk.{layer}.attn_v.weight")), more, "layer {layer}");
            assert_eq!(dtype(&format!("blk.{layer}.ffn_down.weight")), more, "layer {layer}");
            assert_eq!(dtype(&format!("blk.{layer}.attn_q.weight")), GgmlDType::Q4K);
            assert_eq!(dtype(&format!("blk.{layer}.ffn_up.weight")), GgmlDType::Q4K);
        }
        assert_eq!((dtype("token_embd.weight"), dtype("output.weight")), (GgmlDType::Q4K, GgmlDType::Q6K));
        assert_eq!(dtype("output_norm.weight"), GgmlDType::F32);
        let slice = crate::arch::ModelSlice::load(&path.0, 0..8, crate::backend::Backend::cpu(1)).unwrap();
        assert_eq!(slice.profile().n_layers, 8);
    }

    #[test]
    fn header_reads_back_as_the_shape() {
        let path = Removed(temp_path("header.gguf"));
        let model = RandomGguf::tiny_mixed(1);
        let report = model.write(&path.0).unwrap();
        assert_eq!(report.file_bytes, std::fs::metadata(&path.0).unwrap().len());
        assert_eq!(report.file_bytes, model.file_bytes().unwrap());
        let (profile, content) = ModelProfile::from_path(&path.0).unwrap();
        let shape = ModelShape::tiny();
        assert_eq!(profile.architecture, "llama");
        assert_eq!(profile.n_layers, shape.n_layers);
        assert_eq!((profile.n_embd, profile.n_ff), (shape.n_embd, shape.n_ff));
        assert_eq!((profile.n_head, profile.n_head_kv, profile.head_dim), (4, 2, 64));
        assert_eq!((profile.vocab_size, profile.context_length), (320, 256));
        assert_eq!(profile.rope_freq_base, 10_000.0);
        assert!(!profile.tied_embeddings);
        assert_eq!(profile.total_weight_bytes, report.tensor_bytes);
        // Embedding, 9 tensors per layer, output norm and head.
        assert_eq!(content.tensor_infos.len(), 1 + 9 * 4 + 2);
        assert_eq!(content.tensor_infos.len(), report.n_tensors);
        assert_eq!(report.tensor_types["F32"], 2 * 4 + 1);
        assert_eq!(content.metadata["llama.block_count"].to_u32().unwrap(), 4);
        assert_eq!(content.metadata["general.alignment"].to_u32().unwrap(), 32);
        let info = &content.tensor_infos["blk.1.ffn_down.weight"];
        assert_eq!((info.ggml_dtype, info.shape.dims()), (GgmlDType::Q5K, &[256usize, 512][..]));
        assert_eq!(content.tensor_infos["blk.1.ffn_up.weight"].ggml_dtype, GgmlDType::Q4K);
        assert_eq!(content.tensor_infos["blk.0.attn_k.weight"].ggml_dtype, GgmlDType::Q4_1);
        assert_eq!(content.tensor_infos["blk.0.attn_k.weight"].shape.dims(), &[128, 256]);
        assert_eq!(content.tensor_infos["blk.2.attn_q.weight"].ggml_dtype, GgmlDType::Q6K);
        assert_eq!(content.tensor_infos["token_embd.weight"].shape.dims(), &[320, 256]);
        assert_eq!(content.tensor_infos["output.weight"].ggml_dtype, GgmlDType::Q4_0);
        assert_eq!(content.tensor_infos["output_norm.weight"].shape.dims(), &[256]);
        assert_eq!(content.tensor_infos["output_norm.weight"].ggml_dtype, GgmlDType::F32);
        // The values are where the header says and in range.
        let mut file = std::fs::File::open(&path.0).unwrap();
        let norm = content.tensor(&mut file, "blk.0.attn_norm.weight", &Device::Cpu).unwrap();
        let norm: Vec<f32> = norm.dequantize(&Device::Cpu).unwrap().to_vec1().unwrap();
        assert!(norm.iter().all(|v| (0.8..1.2).contains(v)), "{norm:?}");
        let q = content.tensor(&mut file, "blk.3.attn_q.weight", &Device::Cpu).unwrap();
        let q: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
        let bound = 2.0 / 16.0 * 1.01;
        assert!(q.iter().flatten().all(|v| v.abs() <= bound));
        assert!(q.iter().flatten().any(|v| v.abs() > bound / 2.0), "values fill their range");
        // No `.partial` file is left next to it.
        let mut partial = path.0.clone().into_os_string();
        partial.push(".partial");
        assert!(!Path::new(&partial).exists());
    }

    #[test]
    fn tiny_model_runs_a_forward_pass() {
        let path = Removed(temp_path("forward.gguf"));
        let other = Removed(temp_path("forward-other-seed.gguf"));
        RandomGguf::tiny_mixed(1).write(&path.0).unwrap();
        RandomGguf::tiny_mixed(2).write(&other.0).unwrap();
        let prompt = [5, 17, 300, 42, 0];
        let (logits, vocab) = forward(&path.0, &prompt);
        assert_eq!(logits.len(), prompt.len() * vocab);
        assert!(logits.iter().all(|l| l.is_finite()));
        let last = &logits[(prompt.len() - 1) * vocab..];
        let spread = last.iter().cloned().fold(f32::MIN, f32::max) - last.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1e-3, "the logits are flat: the weights do not reach the output");
        assert_ne!(forward(&other.0, &prompt).0, logits, "another seed gave the same logits");
    }

    /// Bytes a Q4_0 matrix takes: 18-byte blocks (an f16 scale and 32 4-bit values) of 32.
    fn q4_0_bytes(n_out: u64, n_in: u64) -> u64 {
        n_out * n_in / 32 * 18
    }

    #[test]
    fn llama3_8b_q4_0_has_the_block_size_arithmetic() {
        // The full 8B shape, planned only: 1 layer, untied 128256-token embedding and head.
        let full = RandomGguf::new(ModelShape::llama3_8b(1), GgmlDType::Q4_0, 1);
        let (e, f, kv, v) = (4096u64, 14336u64, 1024u64, 128_256u64);
        let layer = q4_0_bytes(e, e) * 2 + q4_0_bytes(kv, e) * 2 + q4_0_bytes(f, e) * 3 + 2 * e * 4;
        let tensors = 2 * q4_0_bytes(v, e) + layer + e * 4;
        let plan = full.plan().unwrap();
        assert_eq!(plan.iter().map(|t| t.size_bytes).sum::<u64>(), tensors);
        assert!(plan.iter().all(|t| t.offset_bytes.is_multiple_of(GGUF_ALIGNMENT_BYTES)));

        // Written: the same layer with a small tied vocabulary (~120 MB).
        let mut small = RandomGguf::new(ModelShape { vocab_size: 256, ..ModelShape::llama3_8b(1) }, GgmlDType::Q4_0, 1);
        small.tied_embeddings = true;
        let path = Removed(temp_path("llama3-8b-1.gguf"));
        let report = small.write_with_pool(&path.0, &ComputePool::new(2)).unwrap();
        assert_eq!(report.tensor_bytes, q4_0_bytes(256, e) + layer + e * 4);
        assert_eq!(std::fs::metadata(&path.0).unwrap().len(), report.file_bytes);
        assert!(report.file_bytes - report.tensor_bytes < 64 * 1024, "header and padding only");
        let (profile, content) = ModelProfile::from_path(&path.0).unwrap();
        assert_eq!((profile.n_embd, profile.n_ff, profile.n_head, profile.n_head_kv), (4096, 14336, 32, 8));
        assert!(profile.tied_embeddings);
        assert_eq!(profile.layer_weight_bytes, vec![layer]);
        let gate = &content.tensor_infos["blk.0.ffn_gate.weight"];
        assert_eq!((gate.ggml_dtype, gate.shape.dims()), (GgmlDType::Q4_0, &[14336usize, 4096][..]));
    }

    /// The writer's memory does not grow with the model: a full 80-layer 70B shape (an FFN
    /// matrix of 235M weights, a 128256-token embedding of 1.05G) needs a few MiB per thread,
    /// and a tensor larger than one window reaches the file as several bounded writes.
    #[test]
    fn memory_stays_bounded_whatever_the_model_size() {
        const PER_THREAD_BYTES_MAX: u64 = 8 << 20;
        for dtype in [GgmlDType::F32, GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q6K] {
            let model = RandomGguf::new(ModelShape::llama3_70b(80), dtype, 1);
            let largest = model.plan().unwrap().iter().map(|t| t.size_bytes).max().unwrap();
            for n_threads in [1, 16] {
                let bound = model.buffer_bytes_max(n_threads).unwrap();
                let allowed = (WRITE_BUFFER_BYTES as u64) + (1 << 20) + n_threads as u64 * PER_THREAD_BYTES_MAX;
                assert!(bound <= allowed, "{dtype:?} on {n_threads} threads: {bound} bytes > {allowed}");
                assert!(bound * 10 < largest, "{dtype:?}: the bound {bound} is not small next to a tensor of {largest}");
            }
        }

        // The same layout drives the writes: a 4096×1024 Q8_0 matrix on one thread is 4
        // windows of 1024 rows, each written in one call and none larger.
        struct Sink(Vec<usize>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.push(buf.len());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let tensor = PlannedTensor {
            name: "t".into(),
            dims: vec![4096, 1024],
            dtype: GgmlDType::Q8_0,
            offset_bytes: 0,
            size_bytes: tensor_size_in_bytes(GgmlDType::Q8_0, 4096 * 1024),
            init: Init::Uniform { scale: 1.0 },
        };
        let pool = ComputePool::new(1);
        let layout = StreamLayout::new(&tensor, pool.n_threads());
        assert_eq!((layout.rows_per_chunk, layout.rows_per_window), (256, 1024));
        let mut sink = Sink(Vec::new());
        write_tensor(&mut sink, &tensor, 1, &pool).unwrap();
        assert_eq!(sink.0, vec![1024 * layout.row_bytes; 4]);
        assert_eq!(sink.0.iter().sum::<usize>() as u64, tensor.size_bytes);
    }

    #[test]
    fn a_donor_tokenizer_is_copied_and_the_file_is_servable() {
        let donor = Removed(temp_path("donor.gguf"));
        let n_tokens = write_donor(&donor.0);
        let tokenizer = TokenizerMetadata::from_gguf(&donor.0).unwrap();
        assert_eq!(tokenizer.n_tokens(), n_tokens);
        assert!(tokenizer.keys().all(|k| k.starts_with("tokenizer.")));
        assert_eq!(tokenizer.keys().count(), 9);

        let model = RandomGguf::new(ModelShape::preset("tiny", Some(2)).unwrap(), GgmlDType::Q4_0, 3).with_tokenizer(tokenizer);
        assert_eq!(model.shape.vocab_size, n_tokens, "the vocabulary is the donor's");
        let path = Removed(temp_path("with-tokenizer.gguf"));
        model.write(&path.0).unwrap();
        let (profile, content) = ModelProfile::from_path(&path.0).unwrap();
        assert_eq!(profile.vocab_size, n_tokens);
        assert_eq!(profile.n_layers, 2);
        let donor_content = Content::read(&mut std::fs::File::open(&donor.0).unwrap()).unwrap();
        for (key, value) in &donor_content.metadata {
            if key.starts_with("tokenizer.") {
                assert_eq!(format!("{:?}", content.metadata[key]), format!("{value:?}"), "{key} differs");
            }
        }
        // The donor's model keys are not copied: the shape's own are written.
        assert_eq!(content.metadata["llama.block_count"].to_u32().unwrap(), 2);
        assert_ne!(content.metadata["general.name"].to_string().unwrap(), "donor");

        // Servable: the engine's tokenizer loads from the file, and its ids run the model.
        let engine_tokenizer = Tokenizer::from_gguf(&content).unwrap();
        assert_eq!(engine_tokenizer.vocab_size(), n_tokens);
        let ids = engine_tokenizer.encode("hello world", false);
        assert_eq!(engine_tokenizer.decode(&ids, false), "hello world");
        let (logits, vocab) = forward(&path.0, &ids);
        assert_eq!(vocab, n_tokens);
        assert_eq!(logits.len(), ids.len() * n_tokens);
        assert!(logits.iter().all(|l| l.is_finite()));
    }

    #[test]
    fn errors_not_panics_for_bad_input() {
        let err = |model: RandomGguf| model.plan().unwrap_err().to_string();
        let q4k = RandomGguf::new(ModelShape { n_embd: 320, n_head: 5, n_head_kv: 5, ..ModelShape::tiny() }, GgmlDType::Q4K, 1);
        assert!(err(q4k).contains("multiple of 256"));
        assert!(err(RandomGguf::new(ModelShape { n_layers: 0, ..ModelShape::tiny() }, GgmlDType::Q8_0, 1)).contains("no layers"));
        assert!(err(RandomGguf::new(ModelShape { n_head_kv: 3, ..ModelShape::tiny() }, GgmlDType::Q8_0, 1)).contains("grouped-query"));
        assert!(err(RandomGguf::new(ModelShape::tiny(), GgmlDType::Q8K, 1)).contains("not a weight type"));
        let mut too_many = RandomGguf::new(ModelShape::tiny(), GgmlDType::Q8_0, 1);
        too_many.dtypes.layers = vec![LayerDTypes::uniform(GgmlDType::Q8_0); 5];
        assert!(err(too_many).contains("5 per-layer"));

        // Names from a command line.
        let preset = ModelShape::preset("llama4-400b", None).unwrap_err();
        assert!(matches!(&preset, RandomGgufError::UnknownPreset(name) if name == "llama4-400b"), "{preset}");
        assert!(preset.to_string().contains("llama3-70b"), "the message lists the known presets: {preset}");
        assert!(matches!(parse_dtype("q4_9"), Err(RandomGgufError::UnknownDType(_))));

        // Donors: missing, not a GGUF, a GGUF without a tokenizer. Each error names the file.
        let missing = temp_path("no-such-file.gguf");
        let e = TokenizerMetadata::from_gguf(&missing).unwrap_err();
        assert!(matches!(e, RandomGgufError::TokenizerSource { .. }) && e.to_string().contains("no-such-file.gguf"), "{e}");
        let not_gguf = Removed(temp_path("not-a-gguf.txt"));
        std::fs::write(&not_gguf.0, "this is a text file, not a model").unwrap();
        let e = TokenizerMetadata::from_gguf(&not_gguf.0).unwrap_err();
        assert!(e.to_string().contains("not-a-gguf.txt") && e.to_string().contains("not a readable GGUF"), "{e}");
        let no_tokenizer = Removed(temp_path("no-tokenizer.gguf"));
        RandomGguf::new(ModelShape { n_layers: 1, ..ModelShape::tiny() }, GgmlDType::Q8_0, 1).write(&no_tokenizer.0).unwrap();
        let e = TokenizerMetadata::from_gguf(&no_tokenizer.0).unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
        // A tokenizer whose size the shape was then changed from.
        let donor = Removed(temp_path("donor-for-mismatch.gguf"));
        write_donor(&donor.0);
        let mut model = RandomGguf::new(ModelShape::tiny(), GgmlDType::Q8_0, 1).with_tokenizer(TokenizerMetadata::from_gguf(&donor.0).unwrap());
        model.shape.vocab_size = 320;
        assert!(matches!(model.plan(), Err(RandomGgufError::VocabMismatch { .. })));

        // Unwritable paths: a directory, a missing parent. Errors name the path; no partial
        // file is left behind.
        let tiny = RandomGguf::new(ModelShape { n_layers: 1, ..ModelShape::tiny() }, GgmlDType::Q8_0, 1);
        let dir = temp_path("a-directory");
        std::fs::create_dir_all(&dir).unwrap();
        let e = tiny.write(&dir).unwrap_err();
        assert!(matches!(e, RandomGgufError::Write { .. }) && e.to_string().contains("a-directory"), "{e}");
        assert!(!dir.with_file_name("a-directory.partial").exists(), "the partial file was left");
        let _ = std::fs::remove_dir(&dir);
        let orphan = temp_path("no-such-dir").join("model.gguf");
        let e = tiny.write(&orphan).unwrap_err();
        assert!(e.to_string().contains("no-such-dir"), "{e}");
        // Every one of these converts into the engine's error.
        let engine: crate::EngineError = e.into();
        assert!(engine.to_string().contains("no-such-dir"), "{engine}");
    }
}
