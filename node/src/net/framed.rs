//! Protocol frames over any ordered byte stream: a QUIC stream in the cluster, an in-memory
//! duplex in tests. The reader buffers at most one frame (the decoder refuses a declared
//! length over its kind's limit before buffering the body), so a peer cannot make us hold
//! more than [`potluck_protocol::limits::DECODER_BUFFER_BYTES_MAX`].

use potluck_protocol::{encode_into, FrameDecoder, Message, ProtocolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read from the stream per call at most.
pub const READ_BYTES_PER_CALL_MAX: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer sent a bad frame: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the stream ended in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
}

/// Writes frames to `W`.
pub struct FrameWriter<W> {
    inner: W,
    buffer: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, buffer: Vec::new() }
    }

    /// Encodes (validating: we never send what a peer would refuse) and writes one frame.
    pub async fn send(&mut self, message: &Message) -> Result<(), FrameError> {
        self.buffer.clear();
        encode_into(message, &mut self.buffer)?;
        self.inner.write_all(&self.buffer).await?;
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads frames from `R`.
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, decoder: FrameDecoder::new(), scratch: vec![0; 64 * 1024] }
    }

    /// The next message; `Ok(None)` when the stream ended cleanly between frames.
    pub async fn recv(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            if let Some(message) = self.decoder.poll()? {
                return Ok(Some(message));
            }
            let want = self.decoder.bytes_needed().clamp(1, READ_BYTES_PER_CALL_MAX);
            if self.scratch.len() < want {
                self.scratch.resize(want, 0);
            }
            let n = self.inner.read(&mut self.scratch[..want]).await?;
            if n == 0 {
                let buffered = self.decoder.buffered_bytes();
                return if buffered == 0 { Ok(None) } else { Err(FrameError::Truncated(buffered)) };
            }
            self.decoder.push(&self.scratch[..n])?;
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_protocol::{LoadProgress, ReleaseSequence};

    #[tokio::test]
    async fn frames_cross_a_stream_in_order_and_a_clean_end_is_none() {
        let (a, b) = tokio::io::duplex(64);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b);
        let sent = vec![
            Message::LoadProgress(LoadProgress { bytes_done: 5, bytes_total: 10 }),
            Message::Ready,
            Message::ReleaseSequence(ReleaseSequence { sequence_id: 42 }),
        ];
        let task = tokio::spawn(async move {
            for m in &sent {
                writer.send(m).await.unwrap();
            }
            sent
        });
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(reader.recv().await.unwrap().unwrap());
        }
        let sent = task.await.unwrap(); // writer dropped: the stream ends
        assert_eq!(got, sent);
        assert!(reader.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_stream_cut_mid_frame_is_truncated_not_a_clean_end() {
        let bytes = potluck_protocol::encode(&Message::ReleaseSequence(ReleaseSequence { sequence_id: 7 })).unwrap();
        let cut = &bytes[..bytes.len() - 3];
        let mut reader = FrameReader::new(cut);
        assert!(matches!(reader.recv().await, Err(FrameError::Truncated(_))));
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let garbage: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut reader = FrameReader::new(garbage);
        assert!(matches!(reader.recv().await, Err(FrameError::Protocol(_))));
    }
}
