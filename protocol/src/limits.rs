//! Every length the wire format allows, named, with its unit last, and the relations between
//! them checked at compile time.
//!
//! Why limits: a frame's length is declared by a peer. Without a ceiling one bad (or
//! hostile) header makes a node allocate gigabytes (mini-redis's one flaw). Each limit below
//! bounds the worst-case memory one stream can make a node hold, and each is checked before
//! anything is allocated for the thing it bounds. Changing one is a wire-format change
//! (peers refuse what exceeds *their* limits): bump [`crate::PROTOCOL_VERSION`].
//!
//! Counts and byte lengths are `u32` (what rkyv stores for lengths on the wire), tensor
//! sizes `u64`.

use core::mem::size_of;

use crate::control::{ArchivedAssignment, ArchivedHello, ArchivedRefused, ArchivedTensorRef};
use crate::data::{
    ArchivedActivations, ArchivedAllowedTokens, ArchivedPromptLogprob, ArchivedSampledToken, ArchivedSampledTokens, ArchivedSegment, ArchivedSequenceStart,
    ArchivedStepTokens, ArchivedTokenLogprob, ArchivedWeightChunk,
};
use crate::frame::HEADER_BYTES;

const KIB: u32 = 1024;
const MIB: u32 = 1024 * KIB;

/// Ceiling on any frame, header included: the largest legal activation frame (f32, every
/// row, the widest hidden size) plus room for its segments.
pub const FRAME_BYTES_MAX: u32 = 33 * MIB;

/// Largest [`crate::Activations`] frame.
pub const ACTIVATIONS_FRAME_BYTES_MAX: u32 = FRAME_BYTES_MAX;

/// Largest [`crate::WeightChunk::data`]. Small enough that a corrupt chunk is cheap to
/// re-fetch and a chunk never holds a data stream for long; large enough that per-chunk
/// overhead (header, SHA-256) is negligible.
pub const WEIGHT_CHUNK_BYTES_MAX: u32 = 8 * MIB;

/// Largest [`crate::WeightChunk`] frame: the data plus a little for its fixed fields.
pub const WEIGHT_CHUNK_FRAME_BYTES_MAX: u32 = WEIGHT_CHUNK_BYTES_MAX + 64 * KIB;

/// Largest frame of every other kind (handshake, assignment, heartbeat, step tokens,
/// sampled tokens, …). Bounds what a control stream can make a node buffer.
pub const CONTROL_FRAME_BYTES_MAX: u32 = 2 * MIB;

/// Most unreturned bytes a [`crate::FrameDecoder`] holds: one largest frame in progress
/// plus one read's worth that may already hold the next frame's start.
pub const DECODER_BUFFER_BYTES_MAX: u32 = 2 * FRAME_BYTES_MAX;

/// Most rows (tokens) in one step. At least the coordinator's `STEP_ROWS_MAX` (512).
pub const ACTIVATION_ROWS_MAX: u32 = 512;

/// Widest hidden state (`n_embd`) a frame may carry: 16384 is Llama 3.1 405B's.
pub const HIDDEN_DIM_MAX: u32 = 16384;

/// Most segments (sequences) in one step.
pub const SEGMENTS_MAX: u32 = 512;

/// Most sampled tokens in one [`crate::SampledTokens`]: one per segment.
pub const SAMPLED_TOKENS_MAX: u32 = SEGMENTS_MAX;

/// Positions within a sequence are below this (16 Mi tokens: beyond any context window,
/// and far from overflowing `u32` when a segment's rows are added).
pub const SEQUENCE_POSITIONS_MAX: u32 = 1 << 24;

/// Most alternatives reported with a sampled token (OpenAI's `top_logprobs` maximum).
pub const TOP_LOGPROBS_MAX: u32 = 20;

/// Longest prompt whose every token's log-probability a sequence may ask for (the prompt
/// travels in its [`crate::SequenceStart`]).
pub const PROMPT_LOGPROBS_TOKENS_MAX: u32 = 64 * 1024;

/// Largest penalty window, and so the most history tokens a [`crate::SequenceStart`] carries.
pub const PENALTY_WINDOW_TOKENS_MAX: u32 = 64 * 1024;

/// Most tokens one request may bias (`SamplingWire::logit_bias`). OpenAI documents no bound;
/// 1024 is far above what applications send (a few banned or favoured tokens, a few hundred
/// for a vocabulary restriction) and keeps a `SequenceStart` under 8 KiB of biases.
pub const LOGIT_BIAS_TOKENS_MAX: u32 = 1024;

/// Largest magnitude of a finite logit bias: OpenAI's documented range (the engine's
/// `sampler::LOGIT_BIAS_MAX`; the node crate's tests hold the two equal).
pub const LOGIT_BIAS_ABS_MAX: f32 = 100.0;

/// Largest vocabulary a token mask ([`crate::AllowedTokens`]) covers: Gemma 3's 262,144 is
/// the largest in common use. One mask is then 32 KiB.
pub const TOKEN_MASK_VOCAB_MAX: u32 = 256 * KIB;

/// Most segments of one step that carry a token mask: the coordinator's
/// `ACTIVE_SEQUENCES_MAX` (16). Bounds the masks in a step to 512 KiB, which the frame
/// limits below make room for.
pub const MASKED_SEGMENTS_MAX: u32 = 16;

/// Most proposed tokens one segment carries (speculative decoding): beyond 16 the chance
/// that all are accepted is small for any proposer, and each costs a row on every stage.
pub const DRAFT_TOKENS_MAX: u32 = 16;

/// Longest node id, node name, backend name or tensor name, in bytes (GGUF tensor names
/// are at most 63 bytes in ggml).
pub const NAME_BYTES_MAX: u32 = 256;

/// Longest `host:port` address (a 253-byte DNS name fits).
pub const ADDRESS_BYTES_MAX: u32 = 512;

/// Longest human-readable refusal reason.
pub const REASON_BYTES_MAX: u32 = 1024;

/// Most tensors in one assignment (Llama 3.1 405B has 1138 in all).
pub const TENSORS_PER_ASSIGNMENT_MAX: u32 = 4096;

/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const TENSOR_DIMS_MAX: u32 = 4;

/// Largest single tensor a worker may be asked to hold (64 GiB).
pub const TENSOR_BYTES_MAX: u64 = 1 << 36;

/// Most blocks in a model: the shard planner's own bound (`potluck_shard_planner::limits::
/// LAYERS_MAX`; neither crate may depend on the other, so `potluck-node`, which depends on
/// both, asserts at compile time that they agree).
pub const LAYERS_MAX: u32 = 512;

/// Bytes of the model profile (JSON) in an [`crate::Assignment`] at most.
pub const MODEL_PROFILE_BYTES_MAX: u32 = 256 * KIB;

/// Range of the heartbeat interval a coordinator may ask for.
pub const HEARTBEAT_INTERVAL_MS_MIN: u32 = 10;
pub const HEARTBEAT_INTERVAL_MS_MAX: u32 = 60_000;

// ---- Relations between the limits ------------------------------------------------------
//
// Archive sizes below are exact for rkyv's `unaligned` format (no padding): a struct's
// inline size plus, for each string or vector, its out-of-line bytes. The tests encode the
// largest legal message of each kind to confirm it.

const HEADER: u64 = HEADER_BYTES as u64;

const fn archived<T>() -> u64 {
    size_of::<T>() as u64
}

const fn widen(value: u32) -> u64 {
    value as u64
}

/// Largest activation payload: every row, the widest hidden size, f32.
pub const ACTIVATION_PAYLOAD_BYTES_MAX: u64 = widen(ACTIVATION_ROWS_MAX) * widen(HIDDEN_DIM_MAX) * 4;

/// Largest set of drafts in one step's segments: a draft row is a row of the step, so at most
/// every row's id.
pub const DRAFTS_BYTES_MAX: u64 = widen(ACTIVATION_ROWS_MAX) * 4;

/// Largest set of token masks in one step's segments.
pub const TOKEN_MASKS_BYTES_MAX: u64 =
    widen(MASKED_SEGMENTS_MAX) * (archived::<ArchivedAllowedTokens>() + widen(TOKEN_MASK_VOCAB_MAX) / 8);

const _: () = assert!(
    HEADER
        + archived::<ArchivedActivations>()
        + widen(SEGMENTS_MAX) * archived::<ArchivedSegment>()
        + TOKEN_MASKS_BYTES_MAX
        + DRAFTS_BYTES_MAX
        + ACTIVATION_PAYLOAD_BYTES_MAX
        <= widen(ACTIVATIONS_FRAME_BYTES_MAX),
    "the largest legal activation frame must fit its frame limit"
);
const _: () = assert!(
    HEADER + archived::<ArchivedWeightChunk>() + widen(WEIGHT_CHUNK_BYTES_MAX) <= widen(WEIGHT_CHUNK_FRAME_BYTES_MAX),
    "the largest weight chunk must fit its frame limit"
);
const _: () = assert!(
    HEADER
        + archived::<ArchivedAssignment>()
        + widen(ADDRESS_BYTES_MAX)
        + widen(TENSORS_PER_ASSIGNMENT_MAX)
            * (archived::<ArchivedTensorRef>() + widen(NAME_BYTES_MAX) + widen(TENSOR_DIMS_MAX) * 8)
        <= widen(CONTROL_FRAME_BYTES_MAX),
    "the largest assignment must fit a control frame"
);
const _: () = assert!(
    HEADER + archived::<ArchivedHello>() + 3 * widen(NAME_BYTES_MAX) <= widen(CONTROL_FRAME_BYTES_MAX),
    "the largest hello must fit a control frame"
);
const _: () = assert!(
    HEADER + archived::<ArchivedRefused>() + widen(REASON_BYTES_MAX) <= widen(CONTROL_FRAME_BYTES_MAX),
    "the largest refusal must fit a control frame"
);
const _: () = assert!(
    HEADER + archived::<ArchivedSequenceStart>() + widen(PENALTY_WINDOW_TOKENS_MAX) * 4
        + widen(PROMPT_LOGPROBS_TOKENS_MAX) * 4
        <= widen(CONTROL_FRAME_BYTES_MAX),
    "the largest sequence start must fit a control frame"
);
const _: () = assert!(
    HEADER
        + archived::<ArchivedStepTokens>()
        + widen(SEGMENTS_MAX) * archived::<ArchivedSegment>()
        + TOKEN_MASKS_BYTES_MAX
        + DRAFTS_BYTES_MAX
        + widen(ACTIVATION_ROWS_MAX) * 4
        <= widen(CONTROL_FRAME_BYTES_MAX),
    "the largest step-tokens frame must fit a control frame"
);
const _: () = assert!(
    HEADER
        + archived::<ArchivedSampledTokens>()
        + widen(SAMPLED_TOKENS_MAX)
            * (archived::<ArchivedSampledToken>() + widen(TOP_LOGPROBS_MAX) * archived::<ArchivedTokenLogprob>())
        + widen(ACTIVATION_ROWS_MAX)
            * (archived::<ArchivedPromptLogprob>() + widen(TOP_LOGPROBS_MAX) * archived::<ArchivedTokenLogprob>())
        <= widen(CONTROL_FRAME_BYTES_MAX),
    "the largest sampled-tokens frame must fit a control frame"
);
const _: () = assert!(
    ACTIVATIONS_FRAME_BYTES_MAX <= FRAME_BYTES_MAX
        && WEIGHT_CHUNK_FRAME_BYTES_MAX <= FRAME_BYTES_MAX
        && CONTROL_FRAME_BYTES_MAX <= FRAME_BYTES_MAX,
    "FRAME_BYTES_MAX is the ceiling of every kind's limit"
);
const _: () = assert!(
    DECODER_BUFFER_BYTES_MAX >= 2 * FRAME_BYTES_MAX,
    "a decoder must hold a whole largest frame plus the start of the next"
);
const _: () = assert!(SEGMENTS_MAX <= ACTIVATION_ROWS_MAX, "every segment has at least one row");
const _: () = assert!(SAMPLED_TOKENS_MAX >= SEGMENTS_MAX, "every segment of a step may sample");
const _: () = assert!(ACTIVATION_ROWS_MAX <= SEQUENCE_POSITIONS_MAX, "a step's rows fit one sequence");
const _: () = assert!(widen(WEIGHT_CHUNK_BYTES_MAX) <= TENSOR_BYTES_MAX, "a chunk fits a tensor");
const _: () = assert!(HEARTBEAT_INTERVAL_MS_MIN < HEARTBEAT_INTERVAL_MS_MAX, "a non-empty heartbeat range");

#[cfg(test)]
mod tests {
    use super::*;

    /// rkyv's `unaligned` format is in force (no padding): the archive sizes the asserts
    /// above add up are the packed field sizes.
    #[test]
    fn archives_are_packed() {
        // sequence_id, first_position, n_rows, sample; allowed: Option tag, vocab, words (offset, length);
        // draft: (offset, length).
        assert_eq!(archived::<ArchivedSegment>(), 8 + 4 + 4 + 1 + (1 + 4 + 4 + 4) + (4 + 4));
        assert_eq!(archived::<ArchivedTokenLogprob>(), 4 + 4);
        assert_eq!(archived::<ArchivedActivations>(), 8 + 8 + 1 + 4 + 8);
    }
}
