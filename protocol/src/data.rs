//! Data messages: what a step carries from stage to stage, the sampled tokens coming back,
//! the sampling parameters travelling with a sequence, and the weights streamed to a worker.
//!
//! A step flows coordinator → stage 0 ([`StepTokens`]) → stage 1 … ([`Activations`]) → the
//! last stage, which runs the head, samples and sends [`SampledTokens`] to the coordinator.
//! Each stage validates a whole frame before touching any KV cache.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rkyv::{Archive, Deserialize, Serialize};

use crate::check::check_len;
use crate::limits::{
    ACTIVATION_ROWS_MAX, DRAFT_TOKENS_MAX, HIDDEN_DIM_MAX, LOGIT_BIAS_ABS_MAX, MASKED_SEGMENTS_MAX, TOKEN_MASK_VOCAB_MAX, LOGIT_BIAS_TOKENS_MAX, PENALTY_WINDOW_TOKENS_MAX, PROMPT_LOGPROBS_TOKENS_MAX, SAMPLED_TOKENS_MAX, SEGMENTS_MAX,
    SEQUENCE_POSITIONS_MAX, TENSORS_PER_ASSIGNMENT_MAX, TENSOR_BYTES_MAX, TOP_LOGPROBS_MAX, WEIGHT_CHUNK_BYTES_MAX,
};
use crate::ProtocolError;

/// A piece of one tensor of the worker's [`crate::Assignment`], streamed on a data stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WeightChunk {
    /// Index into [`crate::Assignment::tensors`] (checked against the assignment by the
    /// receiver, which holds it); below [`TENSORS_PER_ASSIGNMENT_MAX`].
    pub tensor_index: u32,
    /// Byte offset of `data` within the tensor; `offset + data.len() <= TENSOR_BYTES_MAX`.
    pub offset: u64,
    /// 1..=[`WEIGHT_CHUNK_BYTES_MAX`] bytes.
    pub data: Vec<u8>,
    /// SHA-256 of `data`, so a corrupt chunk is re-fetched alone.
    pub sha256: [u8; 32],
}

/// Sampling parameters as they travel (the engine's `SamplingParams`, fixed-width).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SamplingWire {
    /// 0 means greedy; finite, ≥ 0.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    /// In [0, 1]; 1 means no nucleus cut.
    pub top_p: f32,
    /// In [0, 1]; 0 means no min-p cut.
    pub min_p: f32,
    /// Finite, > 0; 1 means off.
    pub repetition_penalty: f32,
    /// Finite.
    pub frequency_penalty: f32,
    /// Finite.
    pub presence_penalty: f32,
    /// Window of recent tokens the penalties consider; at most [`PENALTY_WINDOW_TOKENS_MAX`].
    pub penalty_last_n: u32,
    /// Seed of the draw. Always concrete on the wire: the coordinator picks one when the
    /// request has none, so a retried or re-routed sequence draws the same tokens.
    pub seed: u64,
    /// Added to these tokens' logits before the penalties (OpenAI's `logit_bias`); at most
    /// [`LOGIT_BIAS_TOKENS_MAX`], each finite within ±100 or −∞ (a ban). The sampling stage
    /// checks the tokens against its vocabulary.
    pub logit_bias: Vec<LogitBiasEntry>,
}

/// One token's logit bias.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct LogitBiasEntry {
    pub token: u32,
    pub bias: f32,
}

/// A new sequence, sent to the last stage (the one that samples) before its first step.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SequenceStart {
    pub sequence_id: u64,
    pub sampling: SamplingWire,
    /// Report the sampled token's log-probability.
    pub logprobs: bool,
    /// With `logprobs`, also report this many alternatives; at most [`TOP_LOGPROBS_MAX`].
    pub top_logprobs: u32,
    /// The sequence's tokens so far (the prompt's last `penalty_last_n`), which the
    /// penalties look at; the last stage appends each token it samples. At most
    /// [`PENALTY_WINDOW_TOKENS_MAX`].
    pub history: Vec<u32>,
    /// The prompt, when the sequence asks for the log-probability of each prompt token
    /// (completions with `echo`): the last stage then reports, for every prompt row it
    /// computes, the log-probability of the prompt's next token ([`PromptLogprob`]), with
    /// `top_logprobs` alternatives. Empty otherwise; at most [`PROMPT_LOGPROBS_TOKENS_MAX`].
    pub prompt: Vec<u32>,
    /// Prefix caching: the new sequence's cache starts as a copy of this held sequence's
    /// first positions (the same tokens, computed for an earlier request), so its first
    /// step starts at `positions`. Every stage holds the source: the coordinator names only
    /// sequences it kept on this pipeline.
    pub prefix: Option<PrefixReuse>,
}

/// Where a new sequence's cached prefix comes from.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct PrefixReuse {
    /// A sequence held on every stage, not the new one.
    pub sequence_id: u64,
    /// Positions copied: at least 1, below [`SEQUENCE_POSITIONS_MAX`].
    pub positions: u32,
}

/// One sequence's rows within a step: rows `first_position .. first_position + n_rows` of
/// that sequence, consecutive in the step's payload.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Segment {
    pub sequence_id: u64,
    /// Position of the segment's first row in its sequence (what RoPE and the KV cache use).
    pub first_position: u32,
    /// At least 1; `first_position + n_rows <= SEQUENCE_POSITIONS_MAX`.
    pub n_rows: u32,
    /// The segment's last row completes the sequence's input: the last stage samples a
    /// token from it. False for every chunk of a chunked prefill but the last.
    pub sample: bool,
    /// The tokens the sequence may draw from this segment's last row (a grammar's or JSON
    /// schema's mask, computed by the coordinator, which follows the grammar as tokens come
    /// back); the sampling stage sets every other logit to −∞ before its sampler runs.
    /// Only on a sampling segment; at most [`MASKED_SEGMENTS_MAX`] per step.
    pub allowed: Option<AllowedTokens>,
    /// Speculative decoding: the segment's last `draft.len()` rows are proposed tokens (these
    /// ids), not yet part of the sequence. The last stage runs the head over them and the row
    /// before, keeps the longest prefix its sampler draws itself ([`SampledToken::accepted`])
    /// and the token after it; every stage may be asked to roll its cache back over the rest
    /// by the sequence's next step. Only on a sampling segment, shorter than `n_rows`, at
    /// most [`DRAFT_TOKENS_MAX`].
    pub draft: Vec<u32>,
}

/// A set of token ids as a bitmap: bit `t % 64` of `words[t / 64]` allows token `t`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AllowedTokens {
    /// The vocabulary the mask covers (the model's); 1..=[`TOKEN_MASK_VOCAB_MAX`].
    pub vocab: u32,
    /// `vocab.div_ceil(64)` words; no bit at or past `vocab` set, at least one bit set.
    pub words: Vec<u64>,
}

impl AllowedTokens {
    pub fn is_allowed(&self, token: u32) -> bool {
        token < self.vocab && self.words.get(token as usize / 64).is_some_and(|w| w & (1u64 << (token % 64)) != 0)
    }

    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        if self.vocab == 0 || self.vocab > TOKEN_MASK_VOCAB_MAX {
            return Err(ProtocolError::InvalidValue { field: "allowed.vocab", reason: "not in 1..=TOKEN_MASK_VOCAB_MAX" });
        }
        if self.words.len() != self.vocab.div_ceil(64) as usize {
            return Err(ProtocolError::InvalidValue { field: "allowed.words", reason: "not vocab.div_ceil(64) words" });
        }
        let tail = self.vocab % 64;
        if tail != 0 && self.words.last().is_some_and(|w| w >> tail != 0) {
            return Err(ProtocolError::InvalidValue { field: "allowed.words", reason: "a bit past the vocabulary is set" });
        }
        if self.words.iter().all(|&w| w == 0) {
            return Err(ProtocolError::InvalidValue { field: "allowed.words", reason: "the mask allows no token" });
        }
        Ok(())
    }
}

/// Element type of an activation payload. f16 halves the bytes per hop and is the default;
/// f32 is for models whose hidden states overflow f16 (beyond ±65504) or for bit-exact
/// comparison with a single-machine run.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    #[default]
    F16,
    F32,
}

impl Dtype {
    /// Bytes per element on the wire.
    pub const fn size_bytes(self) -> u32 {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }
}

/// The input of a step for stage 0: one token id per row.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StepTokens {
    /// The coordinator's step counter; echoed in [`SampledTokens::step`].
    pub step: u64,
    /// 1..=[`SEGMENTS_MAX`] segments, distinct sequences, at most [`ACTIVATION_ROWS_MAX`]
    /// rows in all.
    pub segments: Vec<Segment>,
    /// One token id per row, segment after segment.
    pub tokens: Vec<u32>,
}

/// The hidden states of a step, from one stage to the next.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Activations {
    pub step: u64,
    /// As in [`StepTokens::segments`]; the rows of the payload are theirs, in order.
    pub segments: Vec<Segment>,
    pub dtype: Dtype,
    /// Elements per row (the model's `n_embd`); 1..=[`HIDDEN_DIM_MAX`].
    pub hidden: u32,
    /// rows × hidden elements of `dtype`, little-endian, row-major;
    /// `payload.len() == rows × hidden × dtype.size_bytes()`.
    pub payload: Vec<u8>,
}

/// A log-probability reported with a sampled token.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// The token one sequence drew in a step.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub sequence_id: u64,
    pub token: u32,
    /// Log-probability of `token` under the raw logits, when the sequence asked for it.
    pub logprob: Option<f32>,
    /// The most likely alternatives, when asked for; at most [`TOP_LOGPROBS_MAX`].
    pub top: Vec<TokenLogprob>,
    /// Of the segment's draft, how many tokens were accepted (they come before `token`); at
    /// most the draft's length (0 without one).
    pub accepted: u32,
}

/// The log-probability of one prompt token given the tokens before it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub sequence_id: u64,
    /// Position of `token` in its sequence: at least 1 (the first token has no context)
    /// and below [`SEQUENCE_POSITIONS_MAX`].
    pub position: u32,
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens at that position; at most [`TOP_LOGPROBS_MAX`].
    pub top: Vec<TokenLogprob>,
}

/// What the last stage sends back to the coordinator after a step.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SampledTokens {
    pub step: u64,
    /// One per sampling segment of the step, distinct sequences; at most
    /// [`SAMPLED_TOKENS_MAX`].
    pub tokens: Vec<SampledToken>,
    /// Prompt log-probabilities for the step's rows of sequences that asked for them (one
    /// per row whose next token is a prompt token); at most [`ACTIVATION_ROWS_MAX`].
    pub prompt: Vec<PromptLogprob>,
}

impl WeightChunk {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        if self.tensor_index >= TENSORS_PER_ASSIGNMENT_MAX {
            return Err(ProtocolError::InvalidValue {
                field: "tensor_index",
                reason: "not below TENSORS_PER_ASSIGNMENT_MAX",
            });
        }
        if self.data.is_empty() {
            return Err(ProtocolError::InvalidValue { field: "data", reason: "a chunk carries at least one byte" });
        }
        if self.data.len() as u64 > u64::from(WEIGHT_CHUNK_BYTES_MAX) {
            return Err(ProtocolError::ChunkTooLarge {
                len: self.data.len() as u64,
                max: u64::from(WEIGHT_CHUNK_BYTES_MAX),
            });
        }
        match self.offset.checked_add(self.data.len() as u64) {
            Some(end) if end <= TENSOR_BYTES_MAX => Ok(()),
            _ => Err(ProtocolError::InvalidValue { field: "offset", reason: "chunk ends past TENSOR_BYTES_MAX" }),
        }
    }
}

impl SamplingWire {
    fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |field, reason| Err(ProtocolError::InvalidValue { field, reason });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid("temperature", "must be finite and non-negative");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return invalid("top_p", "must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid("min_p", "must be in [0, 1]");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return invalid("repetition_penalty", "must be finite and positive");
        }
        if !self.frequency_penalty.is_finite() {
            return invalid("frequency_penalty", "must be finite");
        }
        if !self.presence_penalty.is_finite() {
            return invalid("presence_penalty", "must be finite");
        }
        check_len("penalty_last_n", self.penalty_last_n as usize, PENALTY_WINDOW_TOKENS_MAX)?;
        check_len("logit_bias", self.logit_bias.len(), LOGIT_BIAS_TOKENS_MAX)?;
        if self.logit_bias.iter().any(|e| !(e.bias == f32::NEG_INFINITY || (e.bias.is_finite() && e.bias.abs() <= LOGIT_BIAS_ABS_MAX))) {
            return invalid("logit_bias", "each bias must be within [-100, 100] or -inf");
        }
        Ok(())
    }
}

impl SequenceStart {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        self.sampling.validate()?;
        check_len("top_logprobs", self.top_logprobs as usize, TOP_LOGPROBS_MAX)?;
        check_len("history", self.history.len(), PENALTY_WINDOW_TOKENS_MAX)?;
        check_len("prompt", self.prompt.len(), PROMPT_LOGPROBS_TOKENS_MAX)?;
        if let Some(prefix) = &self.prefix {
            if prefix.sequence_id == self.sequence_id {
                return Err(ProtocolError::InvalidValue { field: "prefix.sequence_id", reason: "a sequence cannot start from itself" });
            }
            if prefix.positions == 0 || prefix.positions >= SEQUENCE_POSITIONS_MAX {
                return Err(ProtocolError::InvalidValue { field: "prefix.positions", reason: "not in 1..SEQUENCE_POSITIONS_MAX" });
            }
        }
        Ok(())
    }
}

/// Checks a step's segments and returns its row count.
fn validate_segments(segments: &[Segment]) -> Result<u64, ProtocolError> {
    if segments.is_empty() {
        return Err(ProtocolError::InvalidValue { field: "segments", reason: "a step carries at least one segment" });
    }
    check_len("segments", segments.len(), SEGMENTS_MAX)?;
    let mut rows: u64 = 0;
    let mut masked = 0usize;
    for segment in segments {
        if let Some(allowed) = &segment.allowed {
            if !segment.sample {
                return Err(ProtocolError::InvalidValue { field: "allowed", reason: "a mask on a segment that does not sample" });
            }
            allowed.validate()?;
            masked += 1;
        }
        if segment.n_rows == 0 {
            return Err(ProtocolError::InvalidValue { field: "n_rows", reason: "a segment has at least one row" });
        }
        if !segment.draft.is_empty() {
            check_len("draft", segment.draft.len(), DRAFT_TOKENS_MAX)?;
            if !segment.sample || segment.draft.len() >= segment.n_rows as usize {
                return Err(ProtocolError::InvalidValue {
                    field: "draft",
                    reason: "a draft ends a sampling segment and leaves it at least one row of its own",
                });
            }
        }
        let end = u64::from(segment.first_position) + u64::from(segment.n_rows);
        if end > u64::from(SEQUENCE_POSITIONS_MAX) {
            return Err(ProtocolError::InvalidValue {
                field: "first_position",
                reason: "segment ends past SEQUENCE_POSITIONS_MAX",
            });
        }
        rows += u64::from(segment.n_rows); // ≤ SEGMENTS_MAX × u32::MAX: cannot overflow u64.
    }
    check_len("masked segments", masked, MASKED_SEGMENTS_MAX)?;
    if rows > u64::from(ACTIVATION_ROWS_MAX) {
        return Err(ProtocolError::TooManyRows { rows, max: u64::from(ACTIVATION_ROWS_MAX) });
    }
    check_distinct(segments.iter().map(|s| s.sequence_id))?;
    Ok(rows)
}

/// Sequence ids must be distinct (at most [`SEGMENTS_MAX`] of them, so sorting is cheap).
fn check_distinct(ids: impl Iterator<Item = u64>) -> Result<(), ProtocolError> {
    let mut ids: Vec<u64> = ids.collect();
    ids.sort_unstable();
    match ids.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(ProtocolError::DuplicateSequence { sequence_id: pair[0] }),
        None => Ok(()),
    }
}

impl StepTokens {
    /// Rows in the step (the sum of the segments' rows).
    pub fn n_rows(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.n_rows)).sum()
    }

    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        let rows = validate_segments(&self.segments)?;
        if self.tokens.len() as u64 != rows {
            return Err(ProtocolError::RowCountMismatch { expected: rows, actual: self.tokens.len() as u64 });
        }
        Ok(())
    }
}

impl Activations {
    /// Builds a frame from f32 rows (`rows.len() == n_rows × hidden`), converting them to
    /// `dtype`; fails where the receiver would refuse the frame.
    pub fn from_rows(
        step: u64,
        segments: Vec<Segment>,
        hidden: u32,
        dtype: Dtype,
        rows: &[f32],
    ) -> Result<Self, ProtocolError> {
        let activations = Self { step, segments, dtype, hidden, payload: rows_to_payload(rows, dtype) };
        activations.validate()?;
        Ok(activations)
    }

    /// Rows in the step (the sum of the segments' rows).
    pub fn n_rows(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.n_rows)).sum()
    }

    /// The payload as f32 rows, row-major (`n_rows × hidden` values).
    pub fn rows(&self) -> Result<Vec<f32>, ProtocolError> {
        self.validate()?;
        payload_to_rows(&self.payload, self.dtype)
    }

    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        let rows = validate_segments(&self.segments)?;
        if self.hidden == 0 {
            return Err(ProtocolError::InvalidValue { field: "hidden", reason: "must be at least 1" });
        }
        if self.hidden > HIDDEN_DIM_MAX {
            return Err(ProtocolError::HiddenTooLarge {
                hidden: u64::from(self.hidden),
                max: u64::from(HIDDEN_DIM_MAX),
            });
        }
        // ≤ ACTIVATION_ROWS_MAX × HIDDEN_DIM_MAX × 4: no overflow.
        let expected = rows * u64::from(self.hidden) * u64::from(self.dtype.size_bytes());
        if self.payload.len() as u64 != expected {
            return Err(ProtocolError::PayloadSizeMismatch { expected, actual: self.payload.len() as u64 });
        }
        Ok(())
    }
}

impl SampledTokens {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        check_len("tokens", self.tokens.len(), SAMPLED_TOKENS_MAX)?;
        for token in &self.tokens {
            check_len("top", token.top.len(), TOP_LOGPROBS_MAX)?;
        }
        check_len("prompt", self.prompt.len(), ACTIVATION_ROWS_MAX)?;
        for entry in &self.prompt {
            check_len("top", entry.top.len(), TOP_LOGPROBS_MAX)?;
            if entry.position == 0 || entry.position >= SEQUENCE_POSITIONS_MAX {
                return Err(ProtocolError::InvalidValue {
                    field: "position",
                    reason: "a prompt log-probability is for a position in 1..SEQUENCE_POSITIONS_MAX",
                });
            }
        }
        check_distinct(self.tokens.iter().map(|t| t.sequence_id))
    }
}

/// Elements converted per stack buffer in [`rows_to_payload`] / [`payload_to_rows`].
const CONVERT_CHUNK_ELEMENTS: usize = 1024;

/// f32 rows → payload bytes of `dtype` (little-endian). Conversion to f16 rounds to nearest
/// even; values beyond ±65504 become ±infinity (choose [`Dtype::F32`] for such models).
pub fn rows_to_payload(rows: &[f32], dtype: Dtype) -> Vec<u8> {
    let mut payload = Vec::with_capacity(rows.len() * dtype.size_bytes() as usize);
    match dtype {
        Dtype::F32 => rows.iter().for_each(|v| payload.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => {
            let mut halves = [f16::ZERO; CONVERT_CHUNK_ELEMENTS];
            for chunk in rows.chunks(CONVERT_CHUNK_ELEMENTS) {
                let halves = &mut halves[..chunk.len()];
                halves.convert_from_f32_slice(chunk); // F16C where the CPU has it.
                halves.iter().for_each(|h| payload.extend_from_slice(&h.to_le_bytes()));
            }
        }
    }
    payload
}

/// Payload bytes of `dtype` → f32 values; the length must be a whole number of elements.
pub fn payload_to_rows(payload: &[u8], dtype: Dtype) -> Result<Vec<f32>, ProtocolError> {
    let size = dtype.size_bytes() as usize;
    if !payload.len().is_multiple_of(size) {
        let expected = (payload.len() / size * size) as u64;
        return Err(ProtocolError::PayloadSizeMismatch { expected, actual: payload.len() as u64 });
    }
    let mut rows = Vec::with_capacity(payload.len() / size);
    match dtype {
        Dtype::F32 => rows.extend(payload.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        Dtype::F16 => {
            let mut halves = [f16::ZERO; CONVERT_CHUNK_ELEMENTS];
            let mut floats = [0.0f32; CONVERT_CHUNK_ELEMENTS];
            for chunk in payload.chunks(CONVERT_CHUNK_ELEMENTS * 2) {
                let n = chunk.len() / 2;
                for (h, b) in halves[..n].iter_mut().zip(chunk.chunks_exact(2)) {
                    *h = f16::from_le_bytes([b[0], b[1]]);
                }
                halves[..n].convert_to_f32_slice(&mut floats[..n]);
                rows.extend_from_slice(&floats[..n]);
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_payload_is_little_endian_half_floats() {
        assert_eq!(rows_to_payload(&[1.0, -2.0], Dtype::F16), [0x00, 0x3C, 0x00, 0xC0]);
        assert_eq!(rows_to_payload(&[1.0], Dtype::F32), [0x00, 0x00, 0x80, 0x3F]);
    }

    #[test]
    fn f16_saturates_to_infinity_beyond_its_range() {
        let back = payload_to_rows(&rows_to_payload(&[70000.0, -70000.0], Dtype::F16), Dtype::F16).unwrap();
        assert_eq!(back, [f32::INFINITY, f32::NEG_INFINITY]);
    }

    #[test]
    fn conversion_crosses_its_chunk_boundary() {
        let rows: Vec<f32> = (0..CONVERT_CHUNK_ELEMENTS as u32 * 2 + 3).map(|i| (i % 2048) as f32).collect();
        assert_eq!(payload_to_rows(&rows_to_payload(&rows, Dtype::F16), Dtype::F16).unwrap(), rows);
    }

    #[test]
    fn a_partial_element_is_refused() {
        assert_eq!(
            payload_to_rows(&[0, 0, 0], Dtype::F16),
            Err(ProtocolError::PayloadSizeMismatch { expected: 2, actual: 3 })
        );
    }
}
