//! [`Message`], the value on the wire, and [`Kind`], its one-byte tag in the frame header.

use crate::control::Heartbeat;
use crate::control::{Assignment, FetchTensors, Hello, LoadProgress, Refused, ReleaseSequence, Welcome};
use crate::data::{Activations, SampledTokens, SequenceStart, StepTokens, WeightChunk};
use crate::limits::{ACTIVATIONS_FRAME_BYTES_MAX, CONTROL_FRAME_BYTES_MAX, WEIGHT_CHUNK_FRAME_BYTES_MAX};
use crate::ProtocolError;

/// Every message potluck nodes exchange. One frame carries one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refused),
    Assignment(Assignment),
    LoadProgress(LoadProgress),
    /// The worker has loaded and verified its whole slice and accepts steps. No body.
    Ready,
    Heartbeat(Heartbeat),
    ReleaseSequence(ReleaseSequence),
    /// The coordinator ends the worker's membership; the worker drains and exits. No body.
    Shutdown,
    WeightChunk(WeightChunk),
    SequenceStart(SequenceStart),
    StepTokens(StepTokens),
    Activations(Activations),
    SampledTokens(SampledTokens),
    FetchTensors(FetchTensors),
}

/// The message kind byte of the frame header. The numbers are part of the wire format:
/// never reuse or renumber one; a new kind takes a new number (and a version bump, since an
/// older peer would refuse it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Refused = 3,
    Assignment = 4,
    LoadProgress = 5,
    Ready = 6,
    Heartbeat = 7,
    ReleaseSequence = 8,
    Shutdown = 9,
    WeightChunk = 10,
    SequenceStart = 11,
    StepTokens = 12,
    Activations = 13,
    SampledTokens = 14,
    FetchTensors = 15,
}

impl Kind {
    /// Every kind, in wire-number order.
    pub const ALL: [Kind; 15] = [
        Kind::Hello,
        Kind::Welcome,
        Kind::Refused,
        Kind::Assignment,
        Kind::LoadProgress,
        Kind::Ready,
        Kind::Heartbeat,
        Kind::ReleaseSequence,
        Kind::Shutdown,
        Kind::WeightChunk,
        Kind::SequenceStart,
        Kind::StepTokens,
        Kind::Activations,
        Kind::SampledTokens,
        Kind::FetchTensors,
    ];

    /// The kind's name, as logs and errors show it.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::Welcome => "Welcome",
            Kind::Refused => "Refused",
            Kind::Assignment => "Assignment",
            Kind::LoadProgress => "LoadProgress",
            Kind::Ready => "Ready",
            Kind::Heartbeat => "Heartbeat",
            Kind::ReleaseSequence => "ReleaseSequence",
            Kind::Shutdown => "Shutdown",
            Kind::WeightChunk => "WeightChunk",
            Kind::SequenceStart => "SequenceStart",
            Kind::StepTokens => "StepTokens",
            Kind::Activations => "Activations",
            Kind::SampledTokens => "SampledTokens",
            Kind::FetchTensors => "FetchTensors",
        }
    }

    pub fn from_u8(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| *kind as u8 == byte)
    }

    /// The largest frame (header included) of this kind. A declared length over it is
    /// refused before the body is buffered, so a control stream never holds more than
    /// [`CONTROL_FRAME_BYTES_MAX`] of a peer's bytes however large the data limit is.
    pub const fn frame_bytes_max(self) -> u32 {
        match self {
            Kind::Activations => ACTIVATIONS_FRAME_BYTES_MAX,
            Kind::WeightChunk => WEIGHT_CHUNK_FRAME_BYTES_MAX,
            _ => CONTROL_FRAME_BYTES_MAX,
        }
    }

    /// Kinds whose frame is the header alone.
    pub const fn has_body(self) -> bool {
        !matches!(self, Kind::Ready | Kind::Shutdown)
    }
}

impl Message {
    /// Frees sequence `sequence_id`'s KV cache and sampler on every stage it reaches.
    pub fn release(sequence_id: u64) -> Message {
        Message::ReleaseSequence(crate::ReleaseSequence { sequence_id })
    }

    /// A step's first message, for stage 0: each segment's token ids, in segment order.
    pub fn step_tokens(step: u64, segments: Vec<crate::Segment>, tokens: Vec<u32>) -> Message {
        Message::StepTokens(crate::StepTokens { step, segments, tokens })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Refused(_) => Kind::Refused,
            Message::Assignment(_) => Kind::Assignment,
            Message::LoadProgress(_) => Kind::LoadProgress,
            Message::Ready => Kind::Ready,
            Message::Heartbeat(_) => Kind::Heartbeat,
            Message::ReleaseSequence(_) => Kind::ReleaseSequence,
            Message::Shutdown => Kind::Shutdown,
            Message::WeightChunk(_) => Kind::WeightChunk,
            Message::SequenceStart(_) => Kind::SequenceStart,
            Message::StepTokens(_) => Kind::StepTokens,
            Message::Activations(_) => Kind::Activations,
            Message::SampledTokens(_) => Kind::SampledTokens,
            Message::FetchTensors(_) => Kind::FetchTensors,
        }
    }

    /// Checks every rule beyond the archive's structure: named limits, shape × dtype =
    /// payload length, ranges. `encode` runs it so we never send what a peer would refuse;
    /// `decode` runs it on everything received.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            Message::Hello(m) => m.validate(),
            Message::Welcome(m) => m.validate(),
            Message::Refused(m) => m.validate(),
            Message::Assignment(m) => m.validate(),
            Message::LoadProgress(m) => m.validate(),
            Message::WeightChunk(m) => m.validate(),
            Message::SequenceStart(m) => m.validate(),
            Message::StepTokens(m) => m.validate(),
            Message::Activations(m) => m.validate(),
            Message::SampledTokens(m) => m.validate(),
            Message::FetchTensors(m) => m.validate(),
            Message::Ready | Message::Shutdown | Message::Heartbeat(_) | Message::ReleaseSequence(_) => Ok(()),
        }
    }
}
