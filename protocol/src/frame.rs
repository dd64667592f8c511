//! Framing: a fixed 12-byte header, then the message's rkyv archive.
//!
//! ```text
//! offset  size  field
//!      0     4  magic      b"PLCK"
//!      4     2  version    u16 little-endian (PROTOCOL_VERSION)
//!      6     1  kind       u8  (Kind)
//!      7     1  flags      u8, no bits defined in version 1: must be 0
//!      8     4  body_len   u32 little-endian, bytes after the header
//!     12     …  body       rkyv archive of the kind's struct (empty for Ready, Shutdown)
//! ```
//!
//! Magic and version sit first and never move, so two nodes of any versions can tell each
//! other apart and report the mismatch. Checks run cheapest-first and before buffering:
//! magic, version, kind, flags, then the kind's length limit; only then is the body
//! buffered, checked by rkyv (`access`, never `access_unchecked`), deserialized and
//! validated against the limits.

use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::{self, Strategy};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::{Archive, Deserialize, Serialize};

use crate::limits::DECODER_BUFFER_BYTES_MAX;
use crate::message::{Kind, Message};
use crate::{ProtocolError, PROTOCOL_VERSION};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"PLCK";

/// Bytes in the fixed frame header.
pub const HEADER_BYTES: usize = 12;

/// Header flag bits this version defines (none). Unknown bits are refused rather than
/// ignored, so a later version can give them a meaning an older peer cannot misread.
pub const FLAGS_KNOWN: u8 = 0;

/// A parsed frame header. Fields are raw so that a receiver can report what a peer of
/// another version sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: u8,
    pub flags: u8,
    pub body_len: u32,
}

impl FrameHeader {
    /// Reads a header, checking only the magic, so that a version mismatch can be reported
    /// with the peer's version (see [`FrameHeader::check`]).
    pub fn parse(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, ProtocolError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { got: magic });
        }
        Ok(FrameHeader {
            version: u16::from_le_bytes([bytes[4], bytes[5]]),
            kind: bytes[6],
            flags: bytes[7],
            body_len: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        })
    }

    /// Checks version, kind, flags and the kind's frame length limit.
    pub fn check(&self) -> Result<Kind, ProtocolError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion { got: self.version, supported: PROTOCOL_VERSION });
        }
        let kind = Kind::from_u8(self.kind).ok_or(ProtocolError::UnknownKind { kind: self.kind })?;
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(ProtocolError::UnknownFlags { flags: self.flags });
        }
        let max = u64::from(kind.frame_bytes_max());
        if self.frame_len() > max {
            return Err(ProtocolError::FrameTooLarge { len: self.frame_len(), max });
        }
        Ok(kind)
    }

    /// Header plus body, in bytes.
    pub fn frame_len(&self) -> u64 {
        HEADER_BYTES as u64 + u64::from(self.body_len)
    }

    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&self.version.to_le_bytes());
        bytes[6] = self.kind;
        bytes[7] = self.flags;
        bytes[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        bytes
    }
}

/// Encodes one message as one frame. Refuses (with the error a receiver would give) a
/// message that breaks the protocol's limits, so we never send what a peer must refuse.
pub fn encode(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    encode_into(message, &mut out)?;
    Ok(out)
}

/// Appends one frame to `out` (reuse one buffer per stream to avoid an allocation per
/// step). On error `out` is left as it was.
pub fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    message.validate()?;
    write_frame(message, out)
}

/// The frame of `message` **without** the checks [`encode`] makes, as a broken or hostile
/// peer would send it: for tests of the receiving side only (feature `unchecked`).
#[cfg(feature = "unchecked")]
pub fn encode_unchecked(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    write_frame(message, &mut out)?;
    Ok(out)
}

fn write_frame(message: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let kind = message.kind();
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    // The archive is written straight after the header: rkyv's pointers are relative and
    // the `unaligned` format needs no padding, so the body is position-independent.
    let written = match message {
        Message::Hello(m) => serialize(m, out),
        Message::Welcome(m) => serialize(m, out),
        Message::Refused(m) => serialize(m, out),
        Message::Assignment(m) => serialize(m, out),
        Message::LoadProgress(m) => serialize(m, out),
        Message::Heartbeat(m) => serialize(m, out),
        Message::ReleaseSequence(m) => serialize(m, out),
        Message::WeightChunk(m) => serialize(m, out),
        Message::SequenceStart(m) => serialize(m, out),
        Message::StepTokens(m) => serialize(m, out),
        Message::Activations(m) => serialize(m, out),
        Message::SampledTokens(m) => serialize(m, out),
        Message::FetchTensors(m) => serialize(m, out),
        Message::Ready | Message::Shutdown => Ok(()),
    };
    let frame_len = (out.len() - start) as u64;
    let max = u64::from(kind.frame_bytes_max());
    let result = written.and_then(|()| {
        // Unreachable for a validated message (limits.rs asserts the worst cases fit, and
        // tests encode them); checked anyway rather than sending a frame peers refuse.
        if frame_len > max {
            return Err(ProtocolError::FrameTooLarge { len: frame_len, max });
        }
        Ok(())
    });
    if let Err(error) = result {
        out.truncate(start);
        return Err(error);
    }
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        kind: kind as u8,
        flags: 0,
        body_len: (frame_len - HEADER_BYTES as u64) as u32, // ≤ frame_bytes_max: fits u32.
    };
    out[start..start + HEADER_BYTES].copy_from_slice(&header.to_bytes());
    Ok(())
}

fn serialize<'w, T>(value: &T, out: &'w mut Vec<u8>) -> Result<(), ProtocolError>
where
    T: for<'a> Serialize<HighSerializer<&'w mut Vec<u8>, ArenaHandle<'a>, rancor::Error>>,
{
    rkyv::api::high::to_bytes_in::<&'w mut Vec<u8>, rancor::Error>(value, out)
        .map(|_| ())
        .map_err(|error| ProtocolError::Encode(error.to_string()))
}

/// Decodes exactly one frame: `bytes` must hold one whole frame and nothing else.
pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
    let Some(header_bytes) = bytes.first_chunk::<HEADER_BYTES>() else {
        return Err(ProtocolError::Truncated { needed: HEADER_BYTES as u64, got: bytes.len() as u64 });
    };
    let header = FrameHeader::parse(header_bytes)?;
    let kind = header.check()?;
    let got = bytes.len() as u64;
    if got < header.frame_len() {
        return Err(ProtocolError::Truncated { needed: header.frame_len(), got });
    }
    if got > header.frame_len() {
        return Err(ProtocolError::TrailingBytes { extra: got - header.frame_len() });
    }
    decode_body(kind, &bytes[HEADER_BYTES..])
}

/// Decodes and validates the body of a frame whose header has passed
/// [`FrameHeader::check`].
pub fn decode_body(kind: Kind, body: &[u8]) -> Result<Message, ProtocolError> {
    let message = match kind {
        Kind::Ready | Kind::Shutdown => {
            if !body.is_empty() {
                return Err(ProtocolError::Malformed(format!("{kind:?} has no body, got {} bytes", body.len())));
            }
            if kind == Kind::Ready {
                Message::Ready
            } else {
                Message::Shutdown
            }
        }
        Kind::Hello => Message::Hello(archived(body)?),
        Kind::Welcome => Message::Welcome(archived(body)?),
        Kind::Refused => Message::Refused(archived(body)?),
        Kind::Assignment => Message::Assignment(archived(body)?),
        Kind::LoadProgress => Message::LoadProgress(archived(body)?),
        Kind::Heartbeat => Message::Heartbeat(archived(body)?),
        Kind::ReleaseSequence => Message::ReleaseSequence(archived(body)?),
        Kind::WeightChunk => Message::WeightChunk(archived(body)?),
        Kind::SequenceStart => Message::SequenceStart(archived(body)?),
        Kind::StepTokens => Message::StepTokens(archived(body)?),
        Kind::Activations => Message::Activations(archived(body)?),
        Kind::SampledTokens => Message::SampledTokens(archived(body)?),
        Kind::FetchTensors => Message::FetchTensors(archived(body)?),
    };
    message.validate()?;
    Ok(message)
}

/// Checked access (bytecheck validates every offset, length, UTF-8 string, enum tag and
/// bool before anything is read), then deserialization. What it allocates is bounded by the
/// body, which the header check has bounded by the kind's limit.
fn archived<T>(body: &[u8]) -> Result<T, ProtocolError>
where
    T: Archive,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>> + Deserialize<T, Strategy<Pool, rancor::Error>>,
{
    let archived = rkyv::access::<T::Archived, rancor::Error>(body)
        .map_err(|error| ProtocolError::Malformed(error.to_string()))?;
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|error| ProtocolError::Malformed(error.to_string()))
}

/// Incremental decoder for a byte stream (a QUIC stream): [`push`](Self::push) what was
/// read, then [`poll`](Self::poll) until it returns `Ok(None)`.
///
/// A declared length over the kind's limit is refused as soon as the header is complete,
/// before any room is reserved for the body. After an error the stream has lost its
/// framing: the decoder keeps returning that error, and the caller closes the stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes pushed; `buffer[consumed..]` are not yet returned as frames.
    buffer: Vec<u8>,
    consumed: usize,
    /// The checked header of the frame in progress.
    header: Option<(FrameHeader, Kind)>,
    failed: Option<ProtocolError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream. Refuses to hold more than
    /// [`DECODER_BUFFER_BYTES_MAX`] unreturned bytes: a caller that polls after each push
    /// holds at most one partial frame plus one read.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.consumed > 0 {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        let buffered = (self.buffer.len() + bytes.len()) as u64;
        if buffered > u64::from(DECODER_BUFFER_BYTES_MAX) {
            return Err(self.fail(ProtocolError::DecoderBacklog { buffered, max: u64::from(DECODER_BUFFER_BYTES_MAX) }));
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn poll(&mut self) -> Result<Option<Message>, ProtocolError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.poll_frame() {
            Ok(message) => Ok(message),
            Err(error) => Err(self.fail(error)),
        }
    }

    fn poll_frame(&mut self) -> Result<Option<Message>, ProtocolError> {
        let available = &self.buffer[self.consumed..];
        let (header, kind) = match self.header {
            Some(checked) => checked,
            None => {
                let Some(header_bytes) = available.first_chunk::<HEADER_BYTES>() else {
                    return Ok(None);
                };
                let header = FrameHeader::parse(header_bytes)?;
                let kind = header.check()?;
                self.header = Some((header, kind));
                // Checked above: at most the kind's limit.
                let frame_len = header.frame_len() as usize;
                self.buffer.reserve(frame_len.saturating_sub(available.len()));
                (header, kind)
            }
        };
        let frame_len = header.frame_len() as usize;
        let available = &self.buffer[self.consumed..];
        if available.len() < frame_len {
            return Ok(None);
        }
        let message = decode_body(kind, &available[HEADER_BYTES..frame_len])?;
        self.header = None;
        self.consumed += frame_len;
        if self.consumed == self.buffer.len() {
            self.buffer.clear();
            self.consumed = 0;
        }
        Ok(Some(message))
    }

    /// Bytes still missing before [`poll`](Self::poll) can return the frame in progress
    /// (a hint for `read_exact`-style callers); 0 when a frame is ready.
    pub fn bytes_needed(&self) -> usize {
        let available = self.buffer.len() - self.consumed;
        let target = match self.header {
            Some((header, _)) => header.frame_len() as usize,
            None => HEADER_BYTES,
        };
        target.saturating_sub(available)
    }

    /// Bytes pushed but not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.consumed
    }

    fn fail(&mut self, error: ProtocolError) -> ProtocolError {
        self.failed = Some(error.clone());
        self.buffer = Vec::new();
        self.consumed = 0;
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Heartbeat, Segment, StageStats, StepTokens};

    /// The exact bytes of two frames. If this fails, the wire format changed (an rkyv
    /// upgrade, a format feature, a field): that needs a `PROTOCOL_VERSION` bump and new
    /// golden bytes here and in docs/protocol.md.
    #[test]
    fn wire_format_is_pinned() {
        let heartbeat = Message::Heartbeat(Heartbeat {
            now_ms: 1,
            stats: StageStats { steps: 2, rows: 3, busy_us: 4, kv_bytes: 5, next_hop_rtt_us: 6, resident_bytes: 7, peak_resident_bytes: 8 },
        });
        #[rustfmt::skip]
        let expected = [
            b'P', b'L', b'C', b'K', 5, 0, 7, 0, 64, 0, 0, 0,   // header: magic, v5, Heartbeat, flags, 64-byte body
            1, 0, 0, 0, 0, 0, 0, 0,                            // now_ms
            2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,    // steps, rows
            4, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0,    // busy_us, kv_bytes
            6, 0, 0, 0, 0, 0, 0, 0,                            // next_hop_rtt_us
            7, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0,    // resident_bytes, peak_resident_bytes
        ];
        assert_eq!(encode(&heartbeat).unwrap(), expected);

        let step = Message::StepTokens(StepTokens {
            step: 7,
            segments: vec![Segment { sequence_id: 9, first_position: 3, n_rows: 2, sample: true, allowed: None, draft: Vec::new() }],
            tokens: vec![100, 101],
        });
        #[rustfmt::skip]
        let expected = [
            b'P', b'L', b'C', b'K', 5, 0, 12, 0, 70, 0, 0, 0,  // header: StepTokens, 70-byte body
            9, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1, // segment: sequence_id, first_position, n_rows, sample,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,             //   allowed: None (tag 0, then the Some's 12 bytes),
            0xe2, 0xff, 0xff, 0xff, 0, 0, 0, 0,                //   draft: empty (relative offset -30, length 0)
            100, 0, 0, 0, 101, 0, 0, 0,                        // tokens
            7, 0, 0, 0, 0, 0, 0, 0,                            // root: step,
            0xca, 0xff, 0xff, 0xff, 1, 0, 0, 0,                //   segments: relative offset -54, length 1
            0xe8, 0xff, 0xff, 0xff, 2, 0, 0, 0,                //   tokens: relative offset -24, length 2
        ];
        assert_eq!(encode(&step).unwrap(), expected);
    }

    #[test]
    fn header_round_trips() {
        let header = FrameHeader { version: 0xBEEF, kind: 200, flags: 0x80, body_len: 0xDEAD_BEEF };
        assert_eq!(FrameHeader::parse(&header.to_bytes()), Ok(header));
        assert_eq!(header.frame_len(), 0xDEAD_BEEF + HEADER_BYTES as u64);
    }

    #[test]
    fn bodiless_kinds_are_the_header_alone() {
        assert_eq!(encode(&Message::Ready).unwrap().len(), HEADER_BYTES);
        assert_eq!(encode(&Message::Shutdown).unwrap().len(), HEADER_BYTES);
    }

    #[test]
    fn decoder_reports_the_bytes_it_still_needs() {
        let frame = encode(&Message::Heartbeat(Heartbeat {
            now_ms: 1,
            stats: StageStats { steps: 0, rows: 0, busy_us: 0, kv_bytes: 0, next_hop_rtt_us: 0, resident_bytes: 0, peak_resident_bytes: 0 },
        }))
        .unwrap();
        let mut decoder = FrameDecoder::new();
        assert_eq!(decoder.bytes_needed(), HEADER_BYTES);
        decoder.push(&frame[..5]).unwrap();
        assert_eq!(decoder.bytes_needed(), HEADER_BYTES - 5);
        decoder.push(&frame[5..20]).unwrap();
        assert_eq!(decoder.poll(), Ok(None));
        assert_eq!(decoder.bytes_needed(), frame.len() - 20);
        decoder.push(&frame[20..]).unwrap();
        assert!(matches!(decoder.poll(), Ok(Some(Message::Heartbeat(_)))));
        assert_eq!((decoder.bytes_needed(), decoder.buffered_bytes()), (HEADER_BYTES, 0));
    }
}
