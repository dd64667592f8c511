//! # potluck-protocol
//!
//! The only crate that knows the wire format between potluck nodes: the versioned
//! handshake, the control messages, the data frames (step tokens, activations, sampled
//! tokens, weight chunks) and their framing. See `docs/protocol.md` for the layout.
//!
//! **API Boundary:** bytes in, [`Message`]s out, and back. [`encode`] / [`encode_into`]
//! write one frame; [`decode`] reads exactly one; [`FrameDecoder`] cuts a byte stream (a
//! QUIC stream) into frames as its bytes arrive.
//!
//! **Architecture Invariant:** no I/O, no clock, no async runtime, no crypto. The drivers in
//! `worker` and `coordinator` own sockets and time; this crate is tested without them.
//!
//! **Architecture Invariant:** nothing a peer sends can panic or make a node allocate past
//! a named limit ([`limits`]): the header's length is checked against the kind's limit
//! before the body is buffered, the body is checked by rkyv (`access`, never
//! `access_unchecked`), and every message is validated (lengths, ranges, shape × dtype =
//! payload length) before it is returned. Integers on the wire are fixed-width, little-endian.

mod check;
pub mod close;
pub mod control;
pub mod data;
mod error;
pub mod frame;
pub mod limits;
mod message;

pub use control::{
    Assignment, FetchTensors, DeviceSummary, Heartbeat, Hello, LoadProgress, RefusalCode, Refused, ReleaseSequence, StageStats,
    TensorRef, Welcome, JOIN_CHALLENGE_LABEL,
};
pub use data::{
    AllowedTokens, LogitBiasEntry,
    payload_to_rows, rows_to_payload, Activations, Dtype, PrefixReuse, PromptLogprob, SampledToken, SampledTokens, SamplingWire, Segment,
    SequenceStart, StepTokens, TokenLogprob, WeightChunk,
};
pub use error::ProtocolError;
#[cfg(feature = "unchecked")]
pub use frame::encode_unchecked;
pub use frame::{decode, decode_body, encode, encode_into, FrameDecoder, FrameHeader, HEADER_BYTES, MAGIC};
pub use message::{Kind, Message};

/// Version of the node-to-node protocol, carried in every frame header and in [`Hello`].
/// Bumped on any incompatible change to the wire format (a field, a kind, a limit); peers
/// with a different version are refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 5;
