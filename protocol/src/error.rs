//! Why a frame or a message was refused.
//!
//! Every variant is an *operating* error: a peer's bytes (or a message our own code built)
//! broke a rule of the wire format. None of them is a panic: a node drops the connection
//! that sent the frame and carries on.

/// A frame or message that breaks the wire format. Lengths and counts are `u64` so that the
/// error can report what a peer *declared*, however large.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The header declares a frame longer than its kind may be; refused before any byte of
    /// the body is buffered.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes for its kind")]
    FrameTooLarge { len: u64, max: u64 },

    /// A [`crate::FrameDecoder`] was pushed more unreturned bytes than
    /// [`crate::limits::DECODER_BUFFER_BYTES_MAX`] (its caller stopped polling).
    #[error("decoder holds {buffered} unreturned bytes, over the limit of {max}")]
    DecoderBacklog { buffered: u64, max: u64 },

    /// `decode` was handed fewer bytes than the header (or the header's body length) needs.
    #[error("truncated frame: {needed} bytes needed, {got} present")]
    Truncated { needed: u64, got: u64 },

    /// `decode` was handed more bytes than one frame.
    #[error("{extra} bytes after the end of the frame")]
    TrailingBytes { extra: u64 },

    /// The first four bytes are not [`crate::frame::MAGIC`]: not a potluck peer, or a stream
    /// that lost its framing.
    #[error("bad magic bytes {got:02x?}")]
    BadMagic { got: [u8; 4] },

    /// The peer speaks another version of the protocol (header version, or the version a
    /// `Hello` claims).
    #[error("unsupported protocol version {got} (this node speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },

    /// The header's message kind is not one this version knows.
    #[error("unknown message kind {kind}")]
    UnknownKind { kind: u8 },

    /// The header sets flag bits this version does not define.
    #[error("unknown header flags {flags:#04x}")]
    UnknownFlags { flags: u8 },

    /// The body failed rkyv's checked access (bad offsets, bad UTF-8, bad enum tag, …), or a
    /// kind without a body carries one.
    #[error("malformed message body: {0}")]
    Malformed(String),

    /// A string or list is longer than its named limit.
    #[error("{field} has length {len}, over the limit of {max}")]
    TooLong { field: &'static str, len: u64, max: u64 },

    /// A step carries more rows than [`crate::limits::ACTIVATION_ROWS_MAX`].
    #[error("step carries {rows} rows, over the limit of {max}")]
    TooManyRows { rows: u64, max: u64 },

    /// An activation frame's hidden size is over [`crate::limits::HIDDEN_DIM_MAX`].
    #[error("hidden size {hidden} is over the limit of {max}")]
    HiddenTooLarge { hidden: u64, max: u64 },

    /// A weight chunk is over [`crate::limits::WEIGHT_CHUNK_BYTES_MAX`].
    #[error("weight chunk of {len} bytes is over the limit of {max}")]
    ChunkTooLarge { len: u64, max: u64 },

    /// rows × hidden × dtype size differs from the payload length.
    #[error("payload is {actual} bytes but the shape and dtype need {expected}")]
    PayloadSizeMismatch { expected: u64, actual: u64 },

    /// A step's token list is not one token per row of its segments.
    #[error("segments declare {expected} rows but {actual} tokens are present")]
    RowCountMismatch { expected: u64, actual: u64 },

    /// The same sequence appears twice in one step or one token batch.
    #[error("sequence {sequence_id} appears more than once")]
    DuplicateSequence { sequence_id: u64 },

    /// A field's value is outside its meaningful range (NaN speed, empty layer range, …).
    #[error("invalid {field}: {reason}")]
    InvalidValue { field: &'static str, reason: &'static str },

    /// rkyv could not serialize the message (only an allocation failure can cause this).
    #[error("could not encode message: {0}")]
    Encode(String),
}
