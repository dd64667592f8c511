//! Errors the engine returns. Expected conditions (a bad file, a request past the context)
//! are variants; programmer errors are assertions.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot read model file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a usable GGUF file: {0}")]
    BadGguf(String),
    /// The parts of a split GGUF do not make one model (see [`crate::gguf`]).
    #[error("not a usable split GGUF: {0}")]
    BadSplitGguf(String),
    #[error("GGUF metadata key `{0}` is missing")]
    MissingMetadata(String),
    #[error("unsupported model architecture `{0}` (supported: llama, mistral, qwen2, qwen3, qwen3moe, phi3, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("this `{architecture}` model uses {feature}, which the engine does not implement yet")]
    UnsupportedFeature { architecture: String, feature: &'static str },
    #[error("unsupported tensor type {dtype} for {tensor} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): requantize the model to one of these (e.g. Q4_K_M) with llama.cpp's llama-quantize")]
    UnsupportedTensorType { tensor: String, dtype: String },
    #[error("tensor `{0}` is missing from the GGUF file")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    BadTensorShape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("layer range {start}..{end} is not within the model's {n_layers} layers")]
    BadLayerRange { start: u32, end: u32, n_layers: u32 },
    #[error("context length exceeded: position {position} is past the context of {context_length} tokens")]
    ContextLengthExceeded { position: usize, context_length: usize },
    #[error("cannot roll the KV cache back to position {len}: it holds positions from {first_held} on only")]
    CacheRollback { len: usize, first_held: usize },
    #[error("token id {0} is outside the vocabulary")]
    TokenOutOfRange(u32),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("cannot use a {dtype} matrix of {n_out}×{n_in}: {reason}")]
    BadQuantizedMatrix { dtype: String, n_out: usize, n_in: usize, reason: String },
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("random model: {0}")]
    RandomGguf(#[from] crate::random_gguf::RandomGgufError),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
