//! The model profile: what a GGUF header says about a model, read without loading a tensor.
//!
//! The profile is what the shard planner and the coordinator reason with (per-layer weight
//! bytes, KV bytes per token, dimensions), and what an architecture module
//! ([`crate::arch`]) checks the tensors against when it loads a layer range. It also records
//! the features that set architectures apart (RoPE layout, biases, Q/K norms, sliding
//! windows, experts), so a module can refuse a file whose features it does not implement
//! instead of computing something else silently.
//!
//! A split GGUF ([`crate::gguf`]) has one profile: the first part's metadata and every
//! part's tensors.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};
use crate::gguf::GgufModel;

/// The architecture family: which module of [`crate::arch`] builds and runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// The decoders of [`crate::arch::llama`]: `llama`, `mistral`, `qwen2` (Q/K/V
    /// biases, NEOX RoPE), `qwen3` (per-head Q/K norms, NEOX RoPE), `phi3` (fused QKV and
    /// gate/up projections, NEOX RoPE, the query scaled before attention), and their
    /// mixture-of-experts forms: `llama`/`mistral` files with experts (Mixtral) and
    /// `qwen3moe` (Qwen3's attention, a routed expert FFN in every block).
    Llama,
    /// `gemma3`: [`crate::arch::gemma3`] (scaled embeddings, norms before and after attention
    /// and FFN, per-head Q/K norms, GELU-gated FFN, interleaved sliding-window layers).
    Gemma3,
}

/// The `general.architecture` values the engine runs.
pub const SUPPORTED_ARCHITECTURES: [&str; 7] = ["llama", "mistral", "qwen2", "qwen3", "qwen3moe", "phi3", "gemma3"];

/// Whether the engine runs a model of `architecture`, with or without mixture-of-experts
/// layers: experts run in the llama family's `llama`, `mistral` (Mixtral) and `qwen3moe`.
pub fn engine_runs(architecture: &str, experts: bool) -> bool {
    match Family::from_architecture(architecture) {
        Some(Family::Llama) => !experts || matches!(architecture, "llama" | "mistral" | "qwen3moe"),
        Some(Family::Gemma3) => !experts,
        None => false,
    }
}

impl Family {
    /// The family of a GGUF's `general.architecture`, if the engine runs it.
    pub fn from_architecture(architecture: &str) -> Option<Family> {
        match architecture {
            "llama" | "mistral" | "qwen2" | "qwen3" | "qwen3moe" | "phi3" => Some(Family::Llama),
            "gemma3" => Some(Family::Gemma3),
            _ => None,
        }
    }
}

/// Which dimensions RoPE rotates together (`llama_model_rope_type()` in llama.cpp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeType {
    /// Adjacent pairs (x[2i], x[2i+1]): `LLAMA_ROPE_TYPE_NORM` (llama, mistral).
    Adjacent,
    /// Halves (x[i], x[i + n_rot/2]): `LLAMA_ROPE_TYPE_NEOX` (Qwen2/3, Gemma, Phi-3).
    Neox,
}

/// A mixture-of-experts layout: `count` experts per layer, `used` of them per token, each
/// a SwiGLU FFN of width `n_ff` (`{arch}.expert_feed_forward_length`, else what llama.cpp
/// falls back to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Experts {
    pub count: u32,
    pub used: u32,
    #[serde(default)]
    pub n_ff: usize,
}

/// Size of one KV-cache element in bytes. The cache is kept in f16 (see kv_cache.rs).
pub const KV_ELEMENT_BYTES: u64 = 2;

/// Rope frequency scaling as llama.cpp applies it for llama-family models.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopeScaling {
    /// No scaling: theta_i = pos * base^(-2i/n_rot).
    None,
    /// `{arch}.rope.scaling.type = linear` (llama.cpp's default type when a file gives only a
    /// factor): positions divided by `factor`.
    Linear { factor: f32 },
    /// `{arch}.rope.scaling.type = yarn` (long-context Qwen2.5/Qwen3 files): the low
    /// frequencies interpolated by `factor`, the high ones kept, a ramp between them over the
    /// dimensions `original_context` (`rope.scaling.original_context_length`) decides, and the
    /// angles' cos/sin scaled by YaRN's `1 + 0.1·ln(factor)` (see [`crate::ops::Yarn`]).
    Yarn { factor: f32, original_context: u32 },
}

impl RopeScaling {
    /// What positions are multiplied by (ggml's `freq_scale`).
    pub fn freq_scale(&self) -> f32 {
        match self {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } | RopeScaling::Yarn { factor, .. } => 1.0 / factor,
        }
    }
}

/// Everything the engine, the planner and the coordinator need to know about a model,
/// read from the GGUF header alone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelProfile {
    pub architecture: String,
    pub family: Family,
    pub name: Option<String>,
    pub n_layers: u32,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates (`{arch}.rope.dimension_count`).
    pub n_rot: usize,
    pub rope_freq_base: f32,
    pub rope_scaling: RopeScaling,
    /// `{arch}.rope.scaling.attn_factor`: a factor on RoPE's cos/sin (1 in most files).
    #[serde(default = "one")]
    pub rope_attn_factor: f32,
    /// Llama-3 style per-dimension frequency factors (`rope_freqs.weight`) present in the file.
    pub has_rope_freqs: bool,
    /// LongRoPE (Phi-3 128k, Phi-3.5): per-dimension frequency factors for short and long
    /// contexts (`rope_factors_short/long.weight`), the long ones used when a sequence's
    /// context exceeds this original length (`rope.scaling.original_context_length`), as
    /// llama.cpp's `get_rope_factors` chooses by its per-sequence context.
    #[serde(default)]
    pub longrope_original_context: Option<u32>,
    pub rope_type: RopeType,
    /// Q/K/V (and output) projections carry bias vectors (`blk.N.attn_q.bias`: Qwen2).
    pub attention_bias: bool,
    /// Per-head RMSNorm on Q and K before RoPE (`blk.N.attn_q_norm.weight`: Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Q, K and V come from one matrix (`blk.N.attn_qkv.weight`, rows Q then K then V: Phi-3).
    #[serde(default)]
    pub fused_qkv: bool,
    /// The FFN's gate and up projections are one matrix (`ffn_up` of 2 × n_ff rows, gate
    /// first, no `ffn_gate`: Phi-3).
    #[serde(default)]
    pub fused_gate_up: bool,
    /// The query is multiplied by 1/√head_dim before attention, which then scales by 1
    /// (Phi-3's graph in llama.cpp; the same value, other roundings than scaling the scores).
    #[serde(default)]
    pub prescaled_query: bool,
    /// `{arch}.attention.sliding_window`: local layers attend to this many positions.
    pub sliding_window: Option<usize>,
    /// Per block, whether it is a local (sliding-window) layer; all false without a window.
    /// Gemma 3: five local layers, then one global (`attention.sliding_window_pattern`,
    /// default 6, as llama.cpp's `set_swa_pattern`).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers (`rope.freq_base_swa`; llama.cpp's default
    /// 10000 when the file has none); the global layers use `rope_freq_base`.
    #[serde(default)]
    pub rope_freq_base_swa: Option<f32>,
    /// `{arch}.final_logit_softcapping`: logits = c · tanh(logits / c), where a file sets it.
    #[serde(default)]
    pub final_logit_softcapping: Option<f32>,
    /// `{arch}.expert_count` / `{arch}.expert_used_count`, for mixture-of-experts models.
    pub experts: Option<Experts>,
    /// Bytes of each block's expert tensors (`*_exps`), in block order; zeros for a dense
    /// model. A token reads `used / count` of them: see [`Self::layer_bytes_read_per_token`].
    pub layer_expert_bytes: Vec<u64>,
    pub rms_norm_eps: f32,
    pub vocab_size: usize,
    /// The context length the model was trained for.
    pub context_length: usize,
    /// Weight bytes of each block, in block order.
    pub layer_weight_bytes: Vec<u64>,
    /// Bytes of `token_embd.weight` (held by the first stage, and by the last when tied).
    pub embedding_bytes: u64,
    /// Bytes of the output head (`output.weight`, or the embedding when tied) plus `output_norm`.
    pub head_bytes: u64,
    /// True when the GGUF has no `output.weight` and the head reuses the token embedding.
    pub tied_embeddings: bool,
    /// KV-cache bytes per token per layer: K and V, `n_head_kv * head_dim` values each.
    pub kv_bytes_per_token_per_layer: u64,
    /// Bytes of one activation row crossing a stage boundary (f32 hidden state).
    pub activation_bytes_per_token: u64,
    /// Count of tensors per quantization type, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}.
    pub tensor_types: BTreeMap<String, usize>,
    /// The file's total tensor bytes.
    pub total_weight_bytes: u64,
}

impl ModelProfile {
    /// Reads only the header of the GGUF at `path` (of every part, when `path` is one part of
    /// a split: see [`GgufModel::open`]). Also returns the first part's header, which carries
    /// the model's metadata (tokenizer, chat template); its `tensor_infos` are the first part's
    /// only, so tensors are read through a [`GgufModel`], never through it.
    pub fn from_path(path: &Path) -> Result<(Self, Content)> {
        let model = GgufModel::open(path)?;
        let profile = Self::from_model(&model)?;
        Ok((profile, model.into_first_header()))
    }

    /// The profile of an opened model: its metadata, and its tensors over every part.
    pub fn from_model(model: &GgufModel) -> Result<Self> {
        let md = Metadata(model.metadata());
        let architecture = md.string("general.architecture")?;
        let Some(family) = Family::from_architecture(&architecture) else {
            return Err(EngineError::UnsupportedArchitecture(architecture));
        };
        // llama.cpp's `llama_model_rope_type()`: convert_hf_to_gguf.py permutes llama's and
        // mistral's Q/K rows into adjacent pairs, not Qwen's.
        let rope_type = match architecture.as_str() {
            "qwen2" | "qwen3" | "qwen3moe" | "phi3" | "gemma3" => RopeType::Neox,
            _ => RopeType::Adjacent,
        };
        let key = |k: &str| format!("{architecture}.{k}");
        let n_layers = md.u32(&key("block_count"))?;
        let n_embd = md.u32(&key("embedding_length"))? as usize;
        let n_ff = md.u32(&key("feed_forward_length"))? as usize;
        let n_head = md.u32(&key("attention.head_count"))? as usize;
        let n_head_kv = md.u32_or(&key("attention.head_count_kv"), n_head as u32)? as usize;
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(EngineError::BadGguf(format!(
                "head counts {n_head} / {n_head_kv} are not a valid grouped-query layout"
            )));
        }
        let head_dim = md.u32_or(&key("attention.key_length"), (n_embd / n_head) as u32)? as usize;
        let n_rot = md.u32_or(&key("rope.dimension_count"), head_dim as u32)? as usize;
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(EngineError::BadGguf(format!(
                "rope dimension {n_rot} does not fit head dimension {head_dim}"
            )));
        }
        let rope_freq_base = md.f32_or(&key("rope.freq_base"), 10_000.0)?;
        // As llama.cpp's `load_hparams`: the factor (or the older `rope.scale_linear`), a type
        // that defaults to linear, and no scaling at all where the factor is absent, 0 or 1.
        let factor = match md.optional_f32(&key("rope.scaling.factor")) {
            Some(factor) => factor,
            None => md.f32_or(&key("rope.scale_linear"), 0.0)?,
        };
        let scales = factor > 0.0 && factor != 1.0;
        let rope_scaling = match md.optional_string(&key("rope.scaling.type")).unwrap_or("linear") {
            "none" => RopeScaling::None,
            "linear" if scales => RopeScaling::Linear { factor },
            "linear" => RopeScaling::None,
            "yarn" if factor > 1.0 => {
                let original_context = md.u32_or(&key("rope.scaling.original_context_length"), md.u32_or(&key("context_length"), 2048)?)?;
                RopeScaling::Yarn { factor, original_context }
            }
            // YaRN that does not stretch: llama.cpp's blend of two equal angles, which is the
            // unscaled rotation to within a rounding; run as unscaled.
            "yarn" => RopeScaling::None,
            other => {
                // LongRoPE and what else may come: another rotation than the engine computes.
                // Refused rather than run as if unscaled (only when it actually scales).
                if scales {
                    let feature = match other {
                        "longrope" => "LongRoPE scaling",
                        _ => "a RoPE scaling type other than linear or YaRN",
                    };
                    return Err(EngineError::UnsupportedFeature { architecture, feature });
                }
                RopeScaling::None
            }
        };
        // `rope.scaling.attn_factor` scales every cos/sin llama.cpp's RoPE makes.
        let rope_attn_factor = md.f32_or(&key("rope.scaling.attn_factor"), 1.0)?;
        let rms_norm_eps = md.f32_or(&key("attention.layer_norm_rms_epsilon"), 1e-5)?;
        let context_length = md.u32_or(&key("context_length"), 2048)? as usize;

        let tensor_bytes = |name: &str| -> Option<u64> { model.tensor(name).map(|t| t.bytes()) };
        let has_tensor = |name: &str| model.tensor(name).is_some();
        let embedding_info = model
            .tensor("token_embd.weight")
            .ok_or_else(|| EngineError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = embedding_info.dims[0];
        let embedding_bytes = tensor_bytes("token_embd.weight").unwrap_or(0);
        let tied_embeddings = !has_tensor("output.weight");
        let head_bytes = tensor_bytes("output.weight").unwrap_or(embedding_bytes)
            + tensor_bytes("output_norm.weight").unwrap_or(0);
        let mut layer_weight_bytes = vec![0u64; n_layers as usize];
        let mut layer_expert_bytes = vec![0u64; n_layers as usize];
        let mut tensor_types = BTreeMap::new();
        let mut total_weight_bytes = 0;
        for (name, tensor) in model.tensors() {
            let bytes = tensor.bytes();
            total_weight_bytes += bytes;
            *tensor_types.entry(format!("{:?}", tensor.dtype)).or_insert(0) += 1;
            if let Some(layer_idx) = block_index(name) {
                if let Some(slot) = layer_weight_bytes.get_mut(layer_idx) {
                    *slot += bytes;
                }
                if name.contains("_exps.") {
                    if let Some(slot) = layer_expert_bytes.get_mut(layer_idx) {
                        *slot += bytes;
                    }
                }
            }
        }
        // llama.cpp runs Phi-3 without its sliding window (its conversion does not record the
        // pattern; `llama_model_phi3::load_arch_hparams` turns it off), and so does the engine.
        let sliding_window = md
            .optional_u32(&key("attention.sliding_window"))
            .map(|w| w as usize)
            .filter(|&w| w > 0 && architecture != "phi3");
        if has_tensor("blk.0.ffn_gate.0.weight") {
            // Conversions from before December 2023 stored every expert as its own tensor;
            // llama.cpp no longer reads them either.
            let feature = "one tensor per expert (an old Mixtral conversion: convert it again)";
            return Err(EngineError::UnsupportedFeature { architecture: architecture.clone(), feature });
        }
        if has_tensor("blk.0.ffn_gate_up_exps.weight") {
            let feature = "merged gate/up expert tensors (ffn_gate_up_exps)";
            return Err(EngineError::UnsupportedFeature { architecture: architecture.clone(), feature });
        }
        let longrope_original_context = match (has_tensor("rope_factors_long.weight"), has_tensor("rope_factors_short.weight")) {
            (false, false) => None,
            (true, true) if !has_tensor("rope_freqs.weight") => {
                Some(md.u32_or(&key("rope.scaling.original_context_length"), md.u32_or(&key("context_length"), 2048)?)?)
            }
            _ => {
                let feature = "LongRoPE factors without both the short and the long set (or with rope_freqs)";
                return Err(EngineError::UnsupportedFeature { architecture: architecture.clone(), feature });
            }
        };
        let sliding_layers = match sliding_window {
            None => vec![false; n_layers as usize],
            Some(_) => {
                // Gemma 3's default: every sixth layer global. (llama.cpp also takes the
                // pattern as a per-layer array; such a file is refused rather than misread.)
                let pattern = match model.metadata().get(&key("attention.sliding_window_pattern")) {
                    None => 6,
                    Some(v) => value_to_u64(v).and_then(|v| u32::try_from(v).ok()).ok_or(EngineError::UnsupportedFeature {
                        architecture: architecture.clone(),
                        feature: "a per-layer sliding-window pattern",
                    })?,
                };
                (0..n_layers).map(|il| pattern == 0 || il % pattern < pattern - 1).collect()
            }
        };
        let rope_freq_base_swa = sliding_window.map(|_| md.f32_or(&key("rope.freq_base_swa"), 10_000.0)).transpose()?;
        let final_logit_softcapping =
            md.optional_f32(&key("final_logit_softcapping")).filter(|&c| c > 0.0);
        let experts = match (
            md.optional_u32(&key("expert_count")),
            md.optional_u32(&key("expert_used_count")),
        ) {
            (Some(count), Some(used)) if count > 0 => {
                if used == 0 || used > count {
                    return Err(EngineError::BadGguf(format!(
                        "{architecture}: {used} experts used per token of {count}"
                    )));
                }
                // llama.cpp's fallbacks: Mixtral's experts are `feed_forward_length` wide;
                // qwen3moe's, that width shared among the experts used.
                let fallback = if architecture == "qwen3moe" { n_ff as u32 / used } else { n_ff as u32 };
                let n_ff = md.u32_or(&key("expert_feed_forward_length"), fallback)? as usize;
                Some(Experts { count, used, n_ff })
            }
            _ => None,
        };
        Ok(Self {
            name: md.optional_string("general.name").map(str::to_owned),
            architecture: architecture.clone(),
            family,
            n_layers,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_freq_base,
            rope_scaling,
            rope_attn_factor,
            has_rope_freqs: has_tensor("rope_freqs.weight"),
            longrope_original_context,
            rope_type,
            attention_bias: has_tensor("blk.0.attn_q.bias"),
            qk_norm: has_tensor("blk.0.attn_q_norm.weight"),
            fused_qkv: has_tensor("blk.0.attn_qkv.weight"),
            fused_gate_up: architecture == "phi3" && !has_tensor("blk.0.ffn_gate.weight"),
            prescaled_query: architecture == "phi3",
            sliding_window,
            sliding_layers,
            rope_freq_base_swa,
            final_logit_softcapping,
            experts,
            layer_expert_bytes,
            rms_norm_eps,
            vocab_size,
            context_length,
            layer_weight_bytes,
            embedding_bytes,
            head_bytes,
            tied_embeddings,
            kv_bytes_per_token_per_layer: 2 * (n_head_kv * head_dim) as u64 * KV_ELEMENT_BYTES,
            activation_bytes_per_token: n_embd as u64 * 4,
            tensor_types,
            total_weight_bytes,
        })
    }

    /// Weight bytes one token reads in block `layer_idx`: all of a dense block; a
    /// mixture-of-experts block's shared tensors plus `used / count` of its experts. (Held
    /// bytes are [`Self::layer_weight_bytes`]: every expert stays in memory.)
    pub fn layer_bytes_read_per_token(&self, layer_idx: usize) -> u64 {
        let held = self.layer_weight_bytes[layer_idx];
        match self.experts {
            Some(Experts { count, used, .. }) => {
                let experts = self.layer_expert_bytes[layer_idx];
                held - experts + experts * used as u64 / count as u64
            }
            None => held,
        }
    }

    /// Per block, the most positions its KV cache holds however long the context: a
    /// sliding-window layer's window plus the cache's slack (`SequenceCache::reserve` drops
    /// old positions in runs), `None` for a layer that keeps every position. What the
    /// planner sizes a stage's KV cache with.
    pub fn layer_kv_positions_max(&self) -> Vec<Option<u32>> {
        self.sliding_layers
            .iter()
            .map(|&sliding| {
                let window = self.sliding_window.filter(|_| sliding)?;
                u32::try_from(window + crate::kv_cache::WINDOW_SLACK_POSITIONS).ok()
            })
            .collect()
    }

    /// Weight bytes a stage holding `layers` needs, with the embedding on the first stage and
    /// the head on the last (a tied head on a stage that also embeds shares the tensor).
    pub fn slice_weight_bytes(&self, layers: std::ops::Range<u32>) -> u64 {
        let start = layers.start.min(self.n_layers) as usize;
        let end = layers.end.min(self.n_layers) as usize;
        let mut bytes: u64 = self.layer_weight_bytes[start..end].iter().sum();
        let first = layers.start == 0;
        let last = layers.end >= self.n_layers;
        if first {
            bytes += self.embedding_bytes;
        }
        if last {
            bytes += self.head_bytes;
            if first && self.tied_embeddings {
                bytes -= self.embedding_bytes;
            }
        }
        bytes
    }
}

fn one() -> f32 {
    1.0
}

/// `blk.{i}.…` → Some(i).
pub fn block_index(tensor_name: &str) -> Option<usize> {
    tensor_name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Bytes a tensor of `elem_count` elements takes in `dtype`'s block format.
pub fn tensor_size_in_bytes(dtype: GgmlDType, elem_count: usize) -> u64 {
    (elem_count / dtype.block_size() * dtype.type_size()) as u64
}

/// Typed access to GGUF metadata with errors that name the missing key.
struct Metadata<'a>(&'a std::collections::HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0.get(key).ok_or_else(|| EngineError::MissingMetadata(key.to_owned()))
    }
    fn string(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| EngineError::BadGguf(format!("{key}: {e}")))
    }
    fn optional_string(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }
    fn u32(&self, key: &str) -> Result<u32> {
        value_to_u64(self.get(key)?)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| EngineError::BadGguf(format!("{key} is not a small unsigned integer")))
    }
    fn optional_u32(&self, key: &str) -> Option<u32> {
        self.0.get(key).and_then(value_to_u64).and_then(|v| u32::try_from(v).ok())
    }
    fn optional_f32(&self, key: &str) -> Option<f32> {
        match self.0.get(key)? {
            Value::F32(v) => Some(*v),
            Value::F64(v) => Some(*v as f32),
            _ => None,
        }
    }
    fn u32_or(&self, key: &str, default: u32) -> Result<u32> {
        if self.0.contains_key(key) {
            self.u32(key)
        } else {
            Ok(default)
        }
    }
    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.0.get(key) {
            None => Ok(default),
            Some(Value::F32(v)) => Ok(*v),
            Some(Value::F64(v)) => Ok(*v as f32),
            Some(other) => value_to_u64(other)
                .map(|v| v as f32)
                .ok_or_else(|| EngineError::BadGguf(format!("{key} is not a number"))),
        }
    }
}

/// Any GGUF integer value that is not negative, as a u64.
pub(crate) fn value_to_u64(value: &Value) -> Option<u64> {
    match value {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_index_parses_only_block_tensors() {
        assert_eq!(block_index("blk.12.attn_q.weight"), Some(12));
        assert_eq!(block_index("token_embd.weight"), None);
        assert_eq!(block_index("blk.x.attn_q.weight"), None);
    }
}
