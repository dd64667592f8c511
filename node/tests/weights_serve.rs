//! Both halves of the weight stream end to end: the coordinator's `WeightServer` serving a
//! tiny random llama GGUF (the engine's `random_gguf` writer), the worker's `fetch_slice` receiving it
//! into a `SliceCache`. In-memory duplex pipes stand in for QUIC streams (the QUIC transport
//! has tests of its own): what crosses them are the real frames.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::Result;
use potluck_node::weights::serve::WeightServer;
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_engine::random_gguf::{LayerDTypes, ModelShape, RandomGguf};
use candle_core::quantized::GgmlDType;
use potluck_protocol::{FetchTensors, Message, TensorRef};
use potluck_node::net::framed::{FrameReader, FrameWriter};
use potluck_node::weights::slice_cache::{CachedSliceSource, SliceCache};
use potluck_node::weights::fetch::{fetch_slice, FetchReport, FETCH_ATTEMPTS_MAX};
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

const N_LAYERS: u32 = 3;
const N_EMBD: usize = 256;
const VOCAB: usize = 320;

/// Small chunks, so that every tensor but the norms spans several.
const CHUNK_BYTES: usize = 16 * 1024;
/// Bytes a duplex pipe buffers: less than a chunk frame, so the sender really waits on the
/// receiver as it would on QUIC flow control.
const PIPE_BYTES: usize = 8 * 1024;

// ---- A tiny llama GGUF ----------------------------------------------------------------------
//
// Written by the engine's one random-weight GGUF writer: three layers of different block
// formats (Q8_0, Q4_0, F16) so the stream carries each, and a tied embedding (no
// `output.weight`: the last stage needs the embedding too). `seed` varies the weights, not
// the header; `tied` changes the header.

fn write_tiny_gguf(path: &Path, seed: u64, tied: bool) {
    let shape = ModelShape { n_layers: N_LAYERS, ..ModelShape::tiny() };
    assert_eq!((shape.n_embd, shape.vocab_size), (N_EMBD, VOCAB));
    let mut model = RandomGguf::new(shape, GgmlDType::Q8_0, seed);
    model.tied_embeddings = tied;
    model.dtypes.layers =
        [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::F16].into_iter().map(LayerDTypes::uniform).collect();
    model.write(path).unwrap();
}

// ---- Harness ---------------------------------------------------------------------------------

/// A model file and a server for it in a temporary directory, removed on drop.
struct Fixture {
    root: PathBuf,
    path: PathBuf,
    profile: ModelProfile,
    server: Arc<WeightServer>,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let root = std::env::temp_dir().join(format!(
            "potluck-weights-stream-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&root).unwrap();
        let path = root.join("tiny.gguf");
        write_tiny_gguf(&path, 1, true);
        let (profile, _) = ModelProfile::from_path(&path).unwrap();
        let server = Arc::new(
            WeightServer::open(&path)
                .unwrap()
                .with_chunk_bytes(CHUNK_BYTES),
        );
        Self {
            root,
            path,
            profile,
            server,
        }
    }

    fn cache(&self, name: &str) -> SliceCache {
        SliceCache::open(self.root.join(name)).unwrap()
    }

    fn refs(&self, layers: std::ops::Range<u32>) -> Arc<Vec<TensorRef>> {
        Arc::new(self.server.slice_refs(&self.profile, layers).unwrap())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

type Stream = (FrameWriter<DuplexStream>, FrameReader<DuplexStream>);

/// What the coordinator does with each weight stream a worker opens: serve one fetch, then
/// finish the stream. With `corrupt` set, a relay between the server and the worker flips a
/// byte in the data of the first chunk that passes (keeping its SHA-256), once.
async fn open_served_stream(
    server: Arc<WeightServer>,
    refs: Arc<Vec<TensorRef>>,
    corrupt: Option<Arc<AtomicBool>>,
    opened: Arc<AtomicU32>,
) -> Result<Stream> {
    opened.fetch_add(1, Ordering::SeqCst);
    let (worker_send, server_receive) = duplex(PIPE_BYTES);
    let (server_send, worker_receive) = duplex(PIPE_BYTES);
    let server_send = match corrupt {
        None => server_send,
        Some(flag) => {
            let (relay_send, relay_receive) = duplex(PIPE_BYTES);
            tokio::spawn(async move {
                let mut from_server = FrameReader::new(relay_receive);
                let mut to_worker = FrameWriter::new(server_send);
                while let Ok(Some(mut message)) = from_server.recv().await {
                    if let Message::WeightChunk(chunk) = &mut message {
                        if flag.swap(false, Ordering::SeqCst) {
                            let middle = chunk.data.len() / 2;
                            chunk.data[middle] ^= 0x01;
                        }
                    }
                    if to_worker.send(&message).await.is_err() {
                        break;
                    }
                }
            });
            relay_send
        }
    };
    tokio::spawn(async move {
        let mut reader = FrameReader::new(server_receive);
        let mut writer = FrameWriter::new(server_send);
        let served = server.serve_fetch(&refs, &mut reader, &mut writer).await;
        // Finishing the stream is the caller's job: dropping our end does it here.
        let _ = writer.get_mut().shutdown().await;
        served
    });
    Ok((
        FrameWriter::new(worker_send),
        FrameReader::new(worker_receive),
    ))
}

/// Runs `fetch_slice` against the fixture's server; returns the report, the progress calls
/// and how many streams were opened.
async fn fetch(
    fixture: &Fixture,
    cache: &SliceCache,
    refs: &Arc<Vec<TensorRef>>,
    corrupt: Option<Arc<AtomicBool>>,
) -> (Result<FetchReport>, Vec<(u64, u64)>, u32) {
    let opened = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    let report = fetch_slice(
        cache,
        fixture.server.model_hash(),
        refs,
        || {
            open_served_stream(
                fixture.server.clone(),
                refs.clone(),
                corrupt.clone(),
                opened.clone(),
            )
        },
        &mut |done, total| calls.push((done, total)),
    )
    .await;
    (report, calls, opened.load(Ordering::SeqCst))
}

fn all_verified(fixture: &Fixture, cache: &SliceCache, refs: &[TensorRef]) -> bool {
    refs.iter()
        .all(|t| cache.has_verified(&fixture.server.model_hash(), t).unwrap())
}

fn assert_same_bits(expected: &[f32], got: &[f32], what: &str) {
    assert_eq!(expected.len(), got.len(), "{what}: lengths differ");
    assert!(
        expected
            .iter()
            .zip(got)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: values differ"
    );
}

// ---- Tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn every_stage_s_slice_arrives_verified_and_runs_bit_identical_to_the_file() {
    let fixture = Fixture::new("identical");
    let stages = [0..1, 1..2, 2..N_LAYERS];
    let mut from_file = Vec::new();
    let mut from_cache = Vec::new();
    for (i, layers) in stages.iter().enumerate() {
        let refs = fixture.refs(layers.clone());
        let cache = fixture.cache(&format!("cache-{i}"));
        let sent_before = fixture.server.bytes_sent();
        let (report, progress, opened) = fetch(&fixture, &cache, &refs, None).await;
        let report = report.unwrap();
        let total: u64 = refs.iter().map(|t| t.bytes).sum();
        assert_eq!(
            report,
            FetchReport {
                bytes_total: total,
                bytes_from_cache: 0,
                bytes_fetched: total,
                chunks_refetched: 0,
                tensors_refetched: 0
            }
        );
        assert_eq!(opened, 1, "one stream carries the whole slice");
        assert_eq!(fixture.server.bytes_sent() - sent_before, total);
        assert!(all_verified(&fixture, &cache, &refs));
        assert_eq!(progress.first(), Some(&(0, total)));
        assert_eq!(progress.last(), Some(&(total, total)));
        assert!(
            progress.windows(2).all(|w| w[0].0 <= w[1].0),
            "progress only moves forward here: {progress:?}"
        );
        if layers.end == N_LAYERS {
            assert!(
                refs.iter().any(|t| t.name == "token_embd.weight"),
                "a tied head is sent the embedding"
            );
        }

        from_file.push(ModelSlice::load(&fixture.path, layers.clone(), Backend::cpu(1)).unwrap());
        let mut source = CachedSliceSource::new(cache, fixture.server.model_hash(), &refs);
        from_cache.push(
            ModelSlice::from_source(fixture.profile.clone(), layers.clone(), &mut source, Backend::cpu(1)).unwrap(),
        );
    }

    let tokens = [5u32, 17, 300, 42, 7];
    let mut hidden_file = from_file[0].embed(&tokens).unwrap();
    let mut hidden_cache = from_cache[0].embed(&tokens).unwrap();
    assert_same_bits(&hidden_file, &hidden_cache, "embedding");
    for (stage, (file_slice, cache_slice)) in from_file.iter().zip(&from_cache).enumerate() {
        let mut file_kv = file_slice.new_cache(64);
        let mut cache_kv = cache_slice.new_cache(64);
        file_slice
            .forward_layers(
                &mut hidden_file,
                &[tokens.len()],
                &mut [&mut file_kv],
            )
            .unwrap();
        cache_slice
            .forward_layers(
                &mut hidden_cache,
                &[tokens.len()],
                &mut [&mut cache_kv],
            )
            .unwrap();
        assert_same_bits(
            &hidden_file,
            &hidden_cache,
            &format!("stage {stage}'s output"),
        );
    }
    let logits_file = from_file[2].head(&hidden_file).unwrap();
    let logits_cache = from_cache[2].head(&hidden_cache).unwrap();
    assert_eq!(logits_file.len(), VOCAB * tokens.len());
    assert!(
        logits_file.iter().all(|x| x.is_finite()),
        "the tiny model computes something real"
    );
    assert_same_bits(&logits_file, &logits_cache, "logits");
}

#[tokio::test]
async fn a_second_fetch_of_the_same_slice_sends_nothing() {
    let fixture = Fixture::new("restart");
    let refs = fixture.refs(0..2);
    let cache = fixture.cache("cache");
    let total: u64 = refs.iter().map(|t| t.bytes).sum();
    fetch(&fixture, &cache, &refs, None).await.0.unwrap();
    let sent = fixture.server.bytes_sent();
    assert_eq!(sent, total);

    // A restarted worker: same cache directory, same assignment.
    let cache = SliceCache::open(cache.root().to_path_buf()).unwrap();
    let (report, progress, opened) = fetch(&fixture, &cache, &refs, None).await;
    let report = report.unwrap();
    assert_eq!(report.bytes_fetched, 0);
    assert_eq!(report.bytes_from_cache, total);
    assert_eq!(opened, 0, "no stream is opened when everything is cached");
    assert_eq!(
        fixture.server.bytes_sent(),
        sent,
        "the server sent nothing more"
    );
    assert_eq!(progress.last(), Some(&(total, total)));

    // A damaged cached tensor is the only one fetched again.
    let damaged = &refs[3];
    let bin = std::fs::read_dir(cache.root())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join(format!("{}.bin", damaged.name));
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&bin, bytes).unwrap();
    let report = fetch(&fixture, &cache, &refs, None).await.0.unwrap();
    assert_eq!(report.bytes_fetched, damaged.bytes);
    assert_eq!(report.bytes_from_cache, total - damaged.bytes);
    assert_eq!(fixture.server.bytes_sent(), sent + damaged.bytes);
    assert!(all_verified(&fixture, &cache, &refs));
}

#[tokio::test]
async fn a_corrupt_chunk_is_detected_and_fetched_again() {
    let fixture = Fixture::new("corrupt");
    let refs = fixture.refs(0..N_LAYERS);
    let cache = fixture.cache("cache");
    let total: u64 = refs.iter().map(|t| t.bytes).sum();
    let flag = Arc::new(AtomicBool::new(true));
    let (report, _, opened) = fetch(&fixture, &cache, &refs, Some(flag.clone())).await;
    let report = report.unwrap();
    assert!(
        !flag.load(Ordering::SeqCst),
        "the relay did corrupt a chunk"
    );
    assert!(report.chunks_refetched >= 1, "{report:?}");
    assert_eq!(report.tensors_refetched, 1, "{report:?}");
    assert_eq!(opened, 2, "one stream, then one for the damaged tensor");
    // The damaged tensor (the first, whose first chunk was hit) crossed twice.
    assert_eq!(report.bytes_fetched, total + refs[0].bytes);
    assert!(all_verified(&fixture, &cache, &refs));
}

#[tokio::test]
async fn a_tensor_that_never_verifies_fails_after_the_attempt_limit_naming_it() {
    let fixture = Fixture::new("never");
    let mut refs = (*fixture.refs(1..2)).clone();
    refs[2].sha256[0] ^= 1;
    let bad_name = refs[2].name.clone();
    let refs = Arc::new(refs);
    let cache = fixture.cache("cache");
    let (report, _, opened) = fetch(&fixture, &cache, &refs, None).await;
    let error = format!("{:#}", report.unwrap_err());
    assert!(
        error.contains(&bad_name) && error.contains("SHA-256"),
        "{error}"
    );
    assert_eq!(opened, FETCH_ATTEMPTS_MAX);
    assert!(!cache
        .has_verified(&fixture.server.model_hash(), &refs[2])
        .unwrap());
    let others: Vec<_> = refs
        .iter()
        .filter(|t| t.name != bad_name)
        .cloned()
        .collect();
    assert!(
        all_verified(&fixture, &cache, &others),
        "the good tensors are kept"
    );
}

#[tokio::test]
async fn a_request_the_assignment_does_not_cover_gets_an_error_and_no_chunk() {
    let fixture = Fixture::new("out-of-range");
    let refs = fixture.refs(0..1);
    let cases = [
        (
            Message::FetchTensors(FetchTensors {
                tensor_indices: vec![0, refs.len() as u32],
            }),
            "asked for tensor",
        ),
        (
            Message::FetchTensors(FetchTensors {
                tensor_indices: vec![1, 2, 1],
            }),
            "twice",
        ),
        (Message::Ready, "only FetchTensors"),
    ];
    for (request, expected) in cases {
        let (worker_send, server_receive) = duplex(PIPE_BYTES);
        let (server_send, worker_receive) = duplex(PIPE_BYTES);
        let mut request_writer = FrameWriter::new(worker_send);
        request_writer.send(&request).await.unwrap();
        let mut reader = FrameReader::new(server_receive);
        let mut writer = FrameWriter::new(server_send);
        let error = fixture
            .server
            .serve_fetch(&refs, &mut reader, &mut writer)
            .await
            .unwrap_err();
        assert!(format!("{error:#}").contains(expected), "{error:#}");
        drop(writer);
        let mut worker_reader = FrameReader::new(worker_receive);
        assert!(
            worker_reader.recv().await.unwrap().is_none(),
            "no chunk was sent"
        );
        assert_eq!(fixture.server.bytes_sent(), 0);
    }

    // A worker that finishes its half without asking is an error too, not a hang.
    let (worker_send, server_receive) = duplex(PIPE_BYTES);
    drop(worker_send);
    let (server_send, _worker_receive) = duplex(PIPE_BYTES);
    let error = fixture
        .server
        .serve_fetch(
            &refs,
            &mut FrameReader::new(server_receive),
            &mut FrameWriter::new(server_send),
        )
        .await
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("without sending FetchTensors"),
        "{error:#}"
    );
}

#[test]
fn model_hash_covers_the_header_and_tensor_hashes_cover_the_weights() {
    let fixture = Fixture::new("hash");
    let again = WeightServer::open(&fixture.path).unwrap();
    assert_eq!(
        again.model_hash(),
        fixture.server.model_hash(),
        "stable across opens"
    );

    // Same header, other weights: the model hash cannot tell them apart (it reads no
    // weights), but every tensor's own hash does, so a cache never serves the wrong bytes.
    let other = fixture.root.join("other.gguf");
    write_tiny_gguf(&other, 2, true);
    let other_server = WeightServer::open(&other).unwrap();
    assert_eq!(other_server.model_hash(), fixture.server.model_hash());
    let ours = fixture.server.slice_refs(&fixture.profile, 0..1).unwrap();
    let theirs = other_server.slice_refs(&fixture.profile, 0..1).unwrap();
    assert!(ours
        .iter()
        .zip(&theirs)
        .all(|(a, b)| a.name == b.name && a.sha256 != b.sha256));

    // Another header (here: one tensor more, an untied head) is another model.
    let changed = fixture.root.join("changed.gguf");
    write_tiny_gguf(&changed, 1, false);
    assert_ne!(
        WeightServer::open(&changed).unwrap().model_hash(),
        fixture.server.model_hash()
    );

    // Refs follow the engine's load order and GGUF's dims order, and are memoised.
    assert_eq!(ours[0].name, "token_embd.weight");
    assert_eq!(ours[0].dims, vec![N_EMBD as u64, VOCAB as u64]);
    assert_eq!(
        fixture.server.slice_refs(&fixture.profile, 0..1).unwrap(),
        ours
    );
    assert!(fixture.server.slice_refs(&fixture.profile, 2..2).is_err());
    assert!(fixture
        .server
        .slice_refs(&fixture.profile, 0..N_LAYERS + 1)
        .is_err());
}

#[test]
fn the_server_is_shared_across_tasks_and_the_fetch_can_be_spawned() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<WeightServer>();
    let fixture = Fixture::new("send");
    let refs = fixture.refs(0..1);
    let cache = fixture.cache("cache");
    let server = fixture.server.clone();
    let opened = Arc::new(AtomicU32::new(0));
    let mut progress = |_: u64, _: u64| {};
    let future = fetch_slice(
        &cache,
        server.model_hash(),
        &refs,
        || open_served_stream(server.clone(), refs.clone(), None, opened.clone()),
        &mut progress,
    );
    send(&future);
}

/// A coordinator restarting on the same file hashes nothing it already knows: the hashes of
/// the first run come back from the store, and the refs are the same. A file that changed
/// (here: rewritten with other weights, so its modification time moved) is hashed again.
#[test]
fn a_restart_hashes_nothing_it_already_knows() {
    let fixture = Fixture::new("hash-store");
    let store = fixture.root.join("tensor-hashes");
    let first = WeightServer::open(&fixture.path).unwrap().with_hash_store(&store);
    let refs = first.slice_refs(&fixture.profile, 0..N_LAYERS).unwrap();
    // The tied embedding is sent twice (embedding and head) but hashed once.
    let distinct = refs.iter().map(|t| &t.name).collect::<std::collections::HashSet<_>>().len() as u64;
    assert_eq!(first.tensors_hashed(), distinct, "a first run hashes every tensor it sends");

    let restarted = WeightServer::open(&fixture.path).unwrap().with_hash_store(&store);
    assert_eq!(restarted.slice_refs(&fixture.profile, 0..N_LAYERS).unwrap(), refs);
    assert_eq!(restarted.tensors_hashed(), 0, "a restart on the same file hashes nothing");

    // Other weights under the same header: same model hash, so the same store file, but the
    // file's identity changed and every hash is computed again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_tiny_gguf(&fixture.path, 2, true);
    let changed = WeightServer::open(&fixture.path).unwrap().with_hash_store(&store);
    assert_eq!(changed.model_hash(), first.model_hash());
    let changed_refs = changed.slice_refs(&fixture.profile, 0..N_LAYERS).unwrap();
    assert_eq!(changed.tensors_hashed(), distinct);
    assert!(changed_refs.iter().zip(&refs).all(|(a, b)| a.sha256 != b.sha256), "new weights, new hashes");

    // A corrupt store is ignored, not trusted.
    let file = std::fs::read_dir(&store).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&file, b"{ not json").unwrap();
    let after_corruption = WeightServer::open(&fixture.path).unwrap().with_hash_store(&store);
    assert_eq!(after_corruption.slice_refs(&fixture.profile, 0..N_LAYERS).unwrap(), changed_refs);
    assert_eq!(after_corruption.tensors_hashed(), distinct);
}
