//! Fetching this worker's slice of the weights from the coordinator into the [`SliceCache`].
//!
//! The assignment names every tensor of the slice with its SHA-256 ([`TensorRef`]). Tensors
//! the cache already holds, verified against that hash, are not fetched at all; the rest are
//! asked for with one `FetchTensors` on a fresh stream, and the coordinator answers with their
//! [`WeightChunk`]s in the order asked, then finishes the stream (its half is the
//! coordinator's `weights` module).
//!
//! **Retries are per tensor.** A chunk whose SHA-256 does not match its data, a chunk that
//! does not fit its tensor, a tensor whose assembled hash fails, or a tensor the stream never
//! completed, is asked for again on a new stream, up to [`FETCH_ATTEMPTS_MAX`] times, with a
//! warning naming it. `FetchTensors` names whole tensors, so a bad chunk costs its tensor a
//! re-send; the rest of the stream is kept (the good tensors after it are still written).
//! Disk errors are not retried: fetching again would not fix them.
//!
//! **Nothing unverified becomes visible:** the cache writes a chunk only after its own hash
//! matches and makes a tensor visible only after the whole hash matches.
//!
//! File writes and hashing run on tokio's blocking pool (`spawn_blocking`), one chunk at a
//! time, so a slow disk never stalls the runtime's other tasks (heartbeats among them);
//! meanwhile QUIC flow control holds the coordinator back.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use potluck_protocol::limits::TENSORS_PER_ASSIGNMENT_MAX;
use potluck_protocol::{FetchTensors, Message, TensorRef, WeightChunk};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::net::framed::{FrameReader, FrameWriter};
use crate::weights::slice_cache::{SliceCache, SliceCacheError, TensorWriter};

/// Attempts per tensor at most before the fetch gives up. One retry covers a chunk damaged
/// in flight; a tensor that fails three times points at the coordinator's file or a broken
/// link, which more attempts would not fix.
pub const FETCH_ATTEMPTS_MAX: u32 = 3;

/// How long we wait on the coordinator: for a weight stream to open, and for each next frame
/// on it. A chunk is at most 8 MiB, about 7 s on a slow (10 Mbit/s) link, and the coordinator
/// hashes tensors before it streams them; a minute of silence means it is stuck.
pub const PEER_WAIT_TIMEOUT_MS: u64 = 60_000;

/// Tensors named in warnings per attempt at most: a broken stream fails every tensor it had
/// not delivered, and a thousand identical lines would bury the first, telling one.
const FAILURE_WARNINGS_MAX: usize = 8;

/// What [`fetch_slice`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FetchReport {
    /// Bytes of every tensor of the assignment.
    pub bytes_total: u64,
    /// Bytes found verified in the cache, not fetched.
    pub bytes_from_cache: u64,
    /// Tensor bytes received over the network, including any received again on a retry.
    pub bytes_fetched: u64,
    /// Chunks that failed their own check (SHA-256 or bounds); each sent its tensor round
    /// again.
    pub chunks_refetched: u64,
    /// Tensor fetches retried for any reason (a bad chunk, the assembled hash, a stream that
    /// broke or ended early).
    pub tensors_refetched: u64,
}

/// Makes sure every tensor in `tensors` (the assignment's, in its order: `WeightChunk`
/// indices refer to it) is verified in `cache` under `model_hash`. Tensors already verified
/// there are not fetched; the rest are requested with one `FetchTensors` per stream opened
/// with `open_stream` (a fresh bidirectional stream to the coordinator per attempt). See the
/// module docs for retries. `progress` is called with `(bytes_done, bytes_total)` as bytes
/// land; cached bytes count as done as soon as they are verified. `bytes_done` falls back
/// when a tensor has to be fetched again.
///
/// Errors: an invalid assignment (too many tensors, a descriptor the cache refuses), a disk
/// error, or a tensor still not verified after [`FETCH_ATTEMPTS_MAX`] attempts (the error
/// names it and why).
pub async fn fetch_slice<W, R, F, Fut>(
    cache: &SliceCache,
    model_hash: [u8; 32],
    tensors: &[TensorRef],
    mut open_stream: F,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<FetchReport>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(FrameWriter<W>, FrameReader<R>)>>,
{
    if tensors.len() > TENSORS_PER_ASSIGNMENT_MAX as usize {
        bail!(
            "the assignment has {} tensors, more than the protocol's {TENSORS_PER_ASSIGNMENT_MAX}",
            tensors.len()
        );
    }
    let bytes_total = tensors
        .iter()
        .try_fold(0u64, |sum, t| sum.checked_add(t.bytes))
        .ok_or_else(|| anyhow!("the assignment's tensor sizes overflow"))?;
    let mut fetch = Fetch {
        cache,
        model_hash,
        tensors,
        report: FetchReport {
            bytes_total,
            ..FetchReport::default()
        },
        bytes_verified: 0,
        progress,
    };
    (fetch.progress)(0, bytes_total);

    // Hashing what is cached reads it all (a second per GB): off the runtime, a tensor at a
    // time so that progress moves.
    let mut pending = Vec::new();
    for (index, tensor) in tensors.iter().enumerate() {
        let (cache, tensor_owned) = (cache.clone(), tensor.clone());
        let verified =
            tokio::task::spawn_blocking(move || cache.has_verified(&model_hash, &tensor_owned))
                .await
                .context("the cache-checking task failed")?
                .with_context(|| {
                    format!("cannot check tensor `{}` in the slice cache", tensor.name)
                })?;
        if verified {
            fetch.report.bytes_from_cache += tensor.bytes;
            fetch.bytes_verified += tensor.bytes;
            (fetch.progress)(fetch.bytes_verified, bytes_total);
        } else {
            // Below TENSORS_PER_ASSIGNMENT_MAX, checked above.
            pending.push(index as u32);
        }
    }

    let mut failures = Vec::new();
    for attempt in 1..=FETCH_ATTEMPTS_MAX {
        if pending.is_empty() {
            break;
        }
        failures = fetch.round(&pending, &mut open_stream).await?;
        pending = failures.iter().map(|(index, _)| *index).collect();
        let again = attempt < FETCH_ATTEMPTS_MAX;
        if again {
            fetch.report.tensors_refetched += failures.len() as u64;
        }
        for (index, reason) in failures.iter().take(FAILURE_WARNINGS_MAX) {
            let name = &tensors[*index as usize].name;
            if again {
                tracing::warn!(tensor = %name, attempt, "fetching tensor `{name}` again: {reason}");
            } else {
                tracing::warn!(tensor = %name, attempt, "giving up on tensor `{name}`: {reason}");
            }
        }
        if failures.len() > FAILURE_WARNINGS_MAX {
            let more = failures.len() - FAILURE_WARNINGS_MAX;
            tracing::warn!(
                attempt,
                "and {more} more tensors of the slice (the first is named above)"
            );
        }
    }
    if let Some((index, reason)) = failures.first() {
        bail!(
            "{} tensor(s) of the slice could not be fetched in {FETCH_ATTEMPTS_MAX} attempts; the first, `{}`: {reason}",
            failures.len(),
            tensors[*index as usize].name
        );
    }
    Ok(fetch.report)
}

/// One `fetch_slice` in progress.
struct Fetch<'a> {
    cache: &'a SliceCache,
    model_hash: [u8; 32],
    tensors: &'a [TensorRef],
    report: FetchReport,
    /// Bytes of tensors verified so far (from the cache or fetched): the progress floor.
    bytes_verified: u64,
    progress: &'a mut (dyn FnMut(u64, u64) + Send),
}

/// Where one requested tensor stands within a round.
enum Slot {
    /// Asked for; no chunk of it yet.
    Waiting,
    /// Its chunks are arriving (it is the round's current writer).
    Receiving,
    /// Verified and in the cache.
    Done,
    /// Must be asked for again, and why. Chunks of it still on the wire are skipped.
    Failed(String),
}

/// Why a round's stream stopped early: the stream's fault (the tensors it did not complete
/// are retried), or ours (the whole fetch fails).
enum StreamEnd {
    Broken(String),
    Fatal(anyhow::Error),
}

impl Fetch<'_> {
    /// Asks for `pending` on one fresh stream and takes in what comes back. Returns the
    /// tensors that must be asked for again, each with the reason; `Err` only for errors a
    /// retry would not fix.
    async fn round<W, R, F, Fut>(
        &mut self,
        pending: &[u32],
        open_stream: &mut F,
    ) -> Result<Vec<(u32, String)>>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(FrameWriter<W>, FrameReader<R>)>>,
    {
        let mut slots: HashMap<u32, Slot> = pending
            .iter()
            .map(|&index| (index, Slot::Waiting))
            .collect();
        let mut current: Option<(u32, TensorWriter)> = None;
        let ended = self
            .stream(pending, open_stream, &mut slots, &mut current)
            .await;
        let (unsent, partial) = match ended {
            Ok(()) => (
                "the coordinator finished the stream without sending it".to_owned(),
                "the stream ended".to_owned(),
            ),
            Err(StreamEnd::Fatal(error)) => return Err(error),
            Err(StreamEnd::Broken(reason)) => (reason.clone(), reason),
        };
        if let Some((index, writer)) = current.take() {
            let reason = format!(
                "{partial} after {} of its {} bytes",
                writer.received_bytes(),
                writer.tensor().bytes
            );
            slots.insert(index, Slot::Failed(reason));
        }
        let mut failures: Vec<(u32, String)> = pending
            .iter()
            .filter_map(|index| match slots.remove(index) {
                Some(Slot::Done) => None,
                Some(Slot::Failed(reason)) => Some((*index, reason)),
                Some(Slot::Waiting | Slot::Receiving) | None => Some((*index, unsent.clone())),
            })
            .collect();
        failures.sort_by_key(|(index, _)| *index);
        Ok(failures)
    }

    /// Runs one stream to its end, updating `slots`; `current` is the tensor being received.
    async fn stream<W, R, F, Fut>(
        &mut self,
        pending: &[u32],
        open_stream: &mut F,
        slots: &mut HashMap<u32, Slot>,
        current: &mut Option<(u32, TensorWriter)>,
    ) -> Result<(), StreamEnd>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(FrameWriter<W>, FrameReader<R>)>>,
    {
        let wait = Duration::from_millis(PEER_WAIT_TIMEOUT_MS);
        let timed_out = || {
            StreamEnd::Broken(format!(
                "the coordinator was silent for {PEER_WAIT_TIMEOUT_MS} ms"
            ))
        };
        let (mut writer, mut reader) = match tokio::time::timeout(wait, open_stream()).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                return Err(StreamEnd::Broken(format!(
                    "cannot open a weight stream: {e:#}"
                )))
            }
            Ok(Ok(stream)) => stream,
        };
        let request = Message::FetchTensors(FetchTensors {
            tensor_indices: pending.to_vec(),
        });
        writer
            .send(&request)
            .await
            .map_err(|e| StreamEnd::Broken(format!("cannot send FetchTensors: {e}")))?;
        // We send nothing more; finishing our half tells the coordinator so.
        writer.get_mut().shutdown().await.map_err(|e| {
            StreamEnd::Broken(format!("cannot finish the request half of the stream: {e}"))
        })?;

        // A well-behaved coordinator sends exactly the requested bytes; more is refused, so a
        // broken one cannot keep us reading forever.
        let budget: u64 = pending
            .iter()
            .map(|&index| self.tensors[index as usize].bytes)
            .sum();
        let mut received = 0u64;
        loop {
            let chunk = match tokio::time::timeout(wait, reader.recv()).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => {
                    return Err(StreamEnd::Broken(format!("the weight stream failed: {e}")))
                }
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(Message::WeightChunk(chunk)))) => chunk,
                Ok(Ok(Some(other))) => {
                    return Err(StreamEnd::Broken(format!(
                        "the coordinator sent {:?} on a weight stream",
                        other.kind()
                    )))
                }
            };
            let index = chunk.tensor_index;
            received += chunk.data.len() as u64;
            self.report.bytes_fetched += chunk.data.len() as u64;
            if received > budget {
                return Err(StreamEnd::Broken(format!(
                    "the coordinator sent more than the {budget} bytes asked for"
                )));
            }
            match slots.get(&index) {
                None => {
                    return Err(StreamEnd::Broken(format!(
                        "the coordinator sent a chunk of tensor {index}, which was not asked for"
                    )))
                }
                // Already verified (a duplicate), or being skipped until the next round.
                Some(Slot::Done | Slot::Failed(_)) => continue,
                Some(Slot::Receiving) => {}
                Some(Slot::Waiting) => {
                    // Tensors come whole and in order, so the previous one is over; had it
                    // been complete it would already be finished.
                    if let Some((previous, writer)) = current.take() {
                        let reason = format!(
                            "the coordinator moved on to another tensor after {} of its {} bytes",
                            writer.received_bytes(),
                            writer.tensor().bytes
                        );
                        slots.insert(previous, Slot::Failed(reason));
                    }
                    let tensor = &self.tensors[index as usize];
                    let writer = self
                        .cache
                        .begin(&self.model_hash, tensor)
                        .with_context(|| {
                            format!(
                                "cannot start writing tensor `{}` to the slice cache",
                                tensor.name
                            )
                        })
                        .map_err(StreamEnd::Fatal)?;
                    *current = Some((index, writer));
                    slots.insert(index, Slot::Receiving);
                }
            }
            self.write(chunk, slots, current)
                .await
                .map_err(StreamEnd::Fatal)?;
        }
    }

    /// Writes one chunk of the current tensor and finishes the tensor once complete. Bad
    /// chunks and a failed whole-tensor hash mark the tensor failed; disk errors are `Err`.
    async fn write(
        &mut self,
        chunk: WeightChunk,
        slots: &mut HashMap<u32, Slot>,
        current: &mut Option<(u32, TensorWriter)>,
    ) -> Result<()> {
        let Some((index, mut writer)) = current.take() else {
            // `stream` makes the chunk's tensor current before calling us.
            bail!("internal error: a weight chunk with no tensor being written");
        };
        let name = writer.tensor().name.clone();
        let WeightChunk {
            offset,
            data,
            sha256,
            ..
        } = chunk;
        let (writer, written) = tokio::task::spawn_blocking(move || {
            let written = writer.write_chunk(offset, &data, &sha256);
            (writer, written)
        })
        .await
        .context("the cache-writing task failed")?;
        match written {
            Ok(()) => {}
            Err(e) if is_bad_chunk(&e) => {
                self.report.chunks_refetched += 1;
                slots.insert(index, Slot::Failed(e.to_string()));
                self.show_progress(0);
                return Ok(());
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot write tensor `{name}` to the slice cache"))
            }
        }
        if !writer.is_complete() {
            self.show_progress(writer.received_bytes());
            *current = Some((index, writer));
            return Ok(());
        }
        let bytes = writer.tensor().bytes;
        // Hashes the whole tensor from disk: blocking.
        let finished = tokio::task::spawn_blocking(move || writer.finish())
            .await
            .context("the cache-writing task failed")?;
        match finished {
            Ok(()) => {
                self.bytes_verified += bytes;
                slots.insert(index, Slot::Done);
            }
            Err(e @ SliceCacheError::TensorHashMismatch { .. }) => {
                slots.insert(index, Slot::Failed(e.to_string()));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot store tensor `{name}` in the slice cache"))
            }
        }
        self.show_progress(0);
        Ok(())
    }

    fn show_progress(&mut self, current_bytes: u64) {
        let done = (self.bytes_verified + current_bytes).min(self.report.bytes_total);
        (self.progress)(done, self.report.bytes_total);
    }
}

/// Whether a chunk was refused for what the peer sent (fetching it again may fix it), as
/// opposed to our disk or our own descriptor (it would not).
fn is_bad_chunk(error: &SliceCacheError) -> bool {
    matches!(
        error,
        SliceCacheError::ChunkHashMismatch { .. }
            | SliceCacheError::ChunkOutOfRange { .. }
            | SliceCacheError::ChunkOverlaps { .. }
            | SliceCacheError::EmptyChunk { .. }
            | SliceCacheError::ChunkTooLarge { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_peer_s_mistakes_are_retried() {
        let name = || "blk.0.attn_q.weight".to_owned();
        assert!(is_bad_chunk(&SliceCacheError::ChunkHashMismatch {
            name: name(),
            offset: 0
        }));
        assert!(is_bad_chunk(&SliceCacheError::ChunkOutOfRange {
            name: name(),
            offset: 9,
            len: 4,
            tensor_bytes: 8
        }));
        assert!(is_bad_chunk(&SliceCacheError::ChunkOverlaps {
            name: name(),
            offset: 2,
            len: 4
        }));
        assert!(is_bad_chunk(&SliceCacheError::EmptyChunk {
            name: name(),
            offset: 0
        }));
        assert!(is_bad_chunk(&SliceCacheError::ChunkTooLarge {
            name: name(),
            offset: 0,
            len: 9,
            max: 8
        }));
        let disk = SliceCacheError::Io {
            action: "write",
            path: "x".into(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "full"),
        };
        assert!(!is_bad_chunk(&disk));
        assert!(!is_bad_chunk(&SliceCacheError::UnknownDType {
            name: name(),
            dtype: 99
        }));
        assert!(!is_bad_chunk(&SliceCacheError::TensorHashMismatch {
            name: name()
        }));
    }
}
