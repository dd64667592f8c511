//! The worker's half of the weight stream against a scripted coordinator that speaks the
//! protocol but misbehaves on cue: it ends a stream early, sends a chunk outside its tensor,
//! damages a chunk, names a tensor nobody asked for, or sends the wrong kind of message. The
//! real coordinator's half is tested with this one in `coordinator/tests/weights_stream.rs`;
//! these are the failures a correct coordinator never produces. In-memory duplex pipes stand
//! in for QUIC streams.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use potluck_protocol::{Message, TensorRef, WeightChunk};
use potluck_node::net::framed::{FrameReader, FrameWriter};
use potluck_node::weights::slice_cache::SliceCache;
use potluck_node::weights::fetch::{fetch_slice, FetchReport, FETCH_ATTEMPTS_MAX};
use sha2::{Digest, Sha256};
use tokio::io::{duplex, DuplexStream};

const MODEL: [u8; 32] = [7; 32];
const CHUNK_BYTES: usize = 1024;
const PIPE_BYTES: usize = 4096;
/// f32 element counts of the test tensors: 4, 12 and 2 chunks.
const TENSOR_ELEMENTS: [usize; 3] = [1024, 3072, 512];
const GGML_F32: u32 = 0;

#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Honest,
    /// Finishes the stream after this many chunks.
    EndAfter(usize),
    /// The first chunk claims an offset just past its tensor's end (its hash still matches).
    ChunkOutOfRange,
    /// The second chunk's data is damaged; its SHA-256 is the original's.
    DamageSecondChunk,
    /// A chunk of a tensor index nobody asked for comes first.
    UnaskedTensor,
    /// `Ready` comes first.
    WrongKind,
}

/// The test's coordinator: plays `script` one behaviour per stream, then is honest.
struct Coordinator {
    data: Vec<Vec<u8>>,
    script: Mutex<VecDeque<Behaviour>>,
    requests: Mutex<Vec<Vec<u32>>>,
    opened: AtomicU32,
}

impl Coordinator {
    fn new(data: Vec<Vec<u8>>, script: &[Behaviour]) -> Arc<Self> {
        Arc::new(Self {
            data,
            script: Mutex::new(script.iter().copied().collect()),
            requests: Mutex::new(Vec::new()),
            opened: AtomicU32::new(0),
        })
    }

    fn requests(&self) -> Vec<Vec<u32>> {
        self.requests.lock().unwrap().clone()
    }

    async fn open(
        self: Arc<Self>,
    ) -> Result<(FrameWriter<DuplexStream>, FrameReader<DuplexStream>)> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        let (worker_send, coordinator_receive) = duplex(PIPE_BYTES);
        let (coordinator_send, worker_receive) = duplex(PIPE_BYTES);
        tokio::spawn(async move {
            let mut reader = FrameReader::new(coordinator_receive);
            let mut writer = FrameWriter::new(coordinator_send);
            let Ok(Some(Message::FetchTensors(request))) = reader.recv().await else {
                panic!("the worker must open with FetchTensors");
            };
            self.requests
                .lock()
                .unwrap()
                .push(request.tensor_indices.clone());
            let behaviour = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Behaviour::Honest);
            let mut messages = Vec::new();
            for &index in &request.tensor_indices {
                let data = &self.data[index as usize];
                for (i, piece) in data.chunks(CHUNK_BYTES).enumerate() {
                    messages.push(Message::WeightChunk(WeightChunk {
                        tensor_index: index,
                        offset: (i * CHUNK_BYTES) as u64,
                        data: piece.to_vec(),
                        sha256: Sha256::digest(piece).into(),
                    }));
                }
            }
            match behaviour {
                Behaviour::Honest => {}
                Behaviour::EndAfter(n) => messages.truncate(n),
                Behaviour::ChunkOutOfRange => {
                    let first = chunk_mut(&mut messages[0]);
                    first.offset = self.data[first.tensor_index as usize].len() as u64;
                }
                Behaviour::DamageSecondChunk => chunk_mut(&mut messages[1]).data[0] ^= 0x40,
                Behaviour::UnaskedTensor => {
                    let mut stray = chunk_mut(&mut messages[0]).clone();
                    stray.tensor_index = 999;
                    messages.insert(0, Message::WeightChunk(stray));
                }
                Behaviour::WrongKind => messages.insert(0, Message::Ready),
            }
            for message in &messages {
                // The worker stops reading a stream it has given up on.
                if writer.send(message).await.is_err() {
                    break;
                }
            }
        });
        Ok((
            FrameWriter::new(worker_send),
            FrameReader::new(worker_receive),
        ))
    }
}

fn chunk_mut(message: &mut Message) -> &mut WeightChunk {
    match message {
        Message::WeightChunk(chunk) => chunk,
        other => unreachable!("the script only edits chunks, not {:?}", other.kind()),
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self(std::env::temp_dir().join(format!(
            "potluck-worker-weights-{tag}-{}-{nanos}",
            std::process::id()
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tensors() -> (Vec<TensorRef>, Vec<Vec<u8>>) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    TENSOR_ELEMENTS
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let data: Vec<u8> = (0..n)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32).to_le_bytes()
                })
                .collect();
            let tensor = TensorRef {
                name: format!("blk.{i}.attn_norm.weight"),
                dtype: GGML_F32,
                dims: vec![n as u64],
                bytes: data.len() as u64,
                sha256: Sha256::digest(&data).into(),
            };
            (tensor, data)
        })
        .unzip()
}

/// Fetches `refs` from `coordinator` into `cache`; returns the result and the progress calls.
async fn fetch(
    cache: &SliceCache,
    refs: &[TensorRef],
    coordinator: &Arc<Coordinator>,
) -> (Result<FetchReport>, Vec<(u64, u64)>) {
    let mut calls = Vec::new();
    let result = fetch_slice(
        cache,
        MODEL,
        refs,
        || coordinator.clone().open(),
        &mut |done, total| calls.push((done, total)),
    )
    .await;
    (result, calls)
}

fn verified(cache: &SliceCache, refs: &[TensorRef]) -> Vec<bool> {
    refs.iter()
        .map(|t| cache.has_verified(&MODEL, t).unwrap())
        .collect()
}

/// One run with `script`: every tensor must end verified; returns the report and requests.
async fn recovers_from(tag: &str, script: &[Behaviour]) -> (FetchReport, Vec<Vec<u32>>) {
    let dir = TempDir::new(tag);
    let cache = SliceCache::open(dir.0.clone()).unwrap();
    let (refs, data) = tensors();
    let coordinator = Coordinator::new(data, script);
    let (report, progress) = fetch(&cache, &refs, &coordinator).await;
    let report = report.unwrap();
    assert_eq!(verified(&cache, &refs), [true; 3]);
    assert_eq!(
        progress.last(),
        Some(&(report.bytes_total, report.bytes_total))
    );
    assert!(progress.iter().all(|&(done, total)| done <= total));
    (report, coordinator.requests())
}

#[tokio::test]
async fn only_tensors_missing_from_the_cache_are_asked_for() {
    let dir = TempDir::new("missing");
    let cache = SliceCache::open(dir.0.clone()).unwrap();
    let (refs, data) = tensors();
    let mut writer = cache.begin(&MODEL, &refs[1]).unwrap();
    writer
        .write_chunk(0, &data[1], &Sha256::digest(&data[1]).into())
        .unwrap();
    writer.finish().unwrap();

    let coordinator = Coordinator::new(data, &[]);
    let (report, progress) = fetch(&cache, &refs, &coordinator).await;
    let report = report.unwrap();
    let bytes = |i: usize| refs[i].bytes;
    assert_eq!(coordinator.requests(), vec![vec![0, 2]]);
    assert_eq!(
        report,
        FetchReport {
            bytes_total: bytes(0) + bytes(1) + bytes(2),
            bytes_from_cache: bytes(1),
            bytes_fetched: bytes(0) + bytes(2),
            chunks_refetched: 0,
            tensors_refetched: 0,
        }
    );
    assert_eq!(verified(&cache, &refs), [true; 3]);
    let total = report.bytes_total;
    assert_eq!(progress[0], (0, total));
    assert!(
        progress.contains(&(bytes(1), total)),
        "cached bytes count as done at once: {progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{progress:?}"
    );
    assert_eq!(progress.last(), Some(&(total, total)));
}

#[tokio::test]
async fn a_stream_that_ends_early_is_retried_for_what_it_did_not_complete() {
    // Tensor 0 (4 chunks) completes, tensor 1 gets 1 of its 12, tensor 2 nothing.
    let (report, requests) = recovers_from("ends-early", &[Behaviour::EndAfter(5)]).await;
    assert_eq!(requests, vec![vec![0, 1, 2], vec![1, 2]]);
    assert_eq!(report.tensors_refetched, 2);
    assert_eq!(report.chunks_refetched, 0);
}

#[tokio::test]
async fn a_chunk_outside_its_tensor_is_fetched_again() {
    let (report, requests) = recovers_from("out-of-range", &[Behaviour::ChunkOutOfRange]).await;
    assert_eq!(
        requests,
        vec![vec![0, 1, 2], vec![0]],
        "the tensors after it are kept"
    );
    assert_eq!((report.chunks_refetched, report.tensors_refetched), (1, 1));
}

#[tokio::test]
async fn a_damaged_chunk_is_fetched_again() {
    let (report, requests) = recovers_from("damaged", &[Behaviour::DamageSecondChunk]).await;
    assert_eq!(requests, vec![vec![0, 1, 2], vec![0]]);
    assert_eq!((report.chunks_refetched, report.tensors_refetched), (1, 1));
    assert_eq!(
        report.bytes_fetched,
        report.bytes_total + 4 * CHUNK_BYTES as u64
    );
}

#[tokio::test]
async fn a_chunk_of_a_tensor_not_asked_for_abandons_the_stream() {
    let (report, requests) = recovers_from("unasked", &[Behaviour::UnaskedTensor]).await;
    assert_eq!(requests, vec![vec![0, 1, 2], vec![0, 1, 2]]);
    assert_eq!(report.tensors_refetched, 3);
}

#[tokio::test]
async fn another_kind_of_message_abandons_the_stream() {
    let (_, requests) =
        recovers_from("wrong-kind", &[Behaviour::WrongKind, Behaviour::WrongKind]).await;
    assert_eq!(
        requests.len(),
        3,
        "the last of {FETCH_ATTEMPTS_MAX} attempts succeeds"
    );
}

#[tokio::test]
async fn a_tensor_damaged_every_time_fails_naming_it_and_the_rest_are_kept() {
    let dir = TempDir::new("always-damaged");
    let cache = SliceCache::open(dir.0.clone()).unwrap();
    let (refs, data) = tensors();
    let script = [Behaviour::DamageSecondChunk; FETCH_ATTEMPTS_MAX as usize];
    let coordinator = Coordinator::new(data, &script);
    let error = format!(
        "{:#}",
        fetch(&cache, &refs, &coordinator).await.0.unwrap_err()
    );
    assert!(
        error.contains(&refs[0].name) && error.contains("SHA-256"),
        "{error}"
    );
    assert_eq!(
        coordinator.requests(),
        vec![vec![0, 1, 2], vec![0], vec![0]]
    );
    assert_eq!(verified(&cache, &refs), [false, true, true]);
}

#[tokio::test]
async fn an_unreachable_coordinator_fails_after_the_attempt_limit() {
    let dir = TempDir::new("unreachable");
    let cache = SliceCache::open(dir.0.clone()).unwrap();
    let (refs, _) = tensors();
    let attempts = AtomicU32::new(0);
    let result = fetch_slice(
        &cache,
        MODEL,
        &refs,
        || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<(FrameWriter<DuplexStream>, FrameReader<DuplexStream>), _>(anyhow!(
                    "connection lost"
                ))
            }
        },
        &mut |_, _| {},
    )
    .await;
    let error = format!("{:#}", result.unwrap_err());
    assert!(
        error.contains("connection lost") && error.contains(&refs[0].name),
        "{error}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), FETCH_ATTEMPTS_MAX);
}

#[tokio::test]
async fn a_bad_assignment_fails_before_any_stream_and_an_empty_one_needs_none() {
    let dir = TempDir::new("bad-assignment");
    let cache = SliceCache::open(dir.0.clone()).unwrap();
    let (mut refs, data) = tensors();
    let coordinator = Coordinator::new(data, &[]);
    refs[1].name = "../../escape".into();
    assert!(fetch(&cache, &refs, &coordinator).await.0.is_err());
    refs[1].name = "blk.1.attn_norm.weight".into();
    refs[2].dims = vec![3];
    assert!(
        fetch(&cache, &refs, &coordinator).await.0.is_err(),
        "dims × type size must make the bytes"
    );
    assert_eq!(coordinator.opened.load(Ordering::SeqCst), 0);

    let (report, progress) = fetch(&cache, &[], &coordinator).await;
    assert_eq!(report.unwrap(), FetchReport::default());
    assert_eq!(progress, vec![(0, 0)]);
    assert_eq!(coordinator.opened.load(Ordering::SeqCst), 0);
}
