//! Serving each worker its slice of the weights straight out of the coordinator's GGUF, so a
//! worker needs no model file of its own. A split GGUF (`-00001-of-0000N`, see
//! [`potluck_engine::gguf`]) is served as one model: each tensor is read from the part that
//! holds it.
//!
//! The worker opens a stream per fetch and sends one [`FetchTensors`] naming indices into its
//! assignment's tensors; [`WeightServer::serve_fetch`] answers with the tensors' bytes as
//! [`WeightChunk`]s, in the order asked, each chunk carrying its own SHA-256 so that a
//! corrupt chunk is caught on arrival. The receiving half is [`super::fetch`].
//!
//! **Identity:** [`WeightServer::model_hash`] is the SHA-256 of the file's length and its
//! header (metadata and tensor infos), so start-up does not hash gigabytes; for a split GGUF,
//! of every part's length and header in turn, so a one-file model's hash (which worker caches
//! and hash stores are keyed by) is what it always was. Two files with
//! equal headers but different weights (a fine-tune that kept every key) would share it; that
//! is safe, because every [`TensorRef`] also carries the SHA-256 of the tensor's own bytes and
//! the worker's cache checks a cached tensor against that, never against the model hash alone.
//!
//! **Memory:** a tensor is never held whole: it is read, hashed and sent one chunk at a time,
//! so serving a 1 GB embedding costs [`WEIGHT_CHUNK_BYTES`] of buffer (twice: the read and
//! the encoded frame).
//!
//! **Restarts:** with [`WeightServer::with_hash_store`], each tensor hash is also kept on disk
//! (`<store>/<model hash>.json`, with the file's length and modification time, and each later
//! part's for a split GGUF), so a coordinator that restarts on the same file hashes nothing
//! it already knows: hashing a 40 GB model at ~1 GB/s would otherwise delay the first worker
//! by most of a minute at every start. A model whose length or modification time changed, in
//! any part, starts from an empty store. A one-file model's store has the format it always
//! had (the later parts' list is left out when empty).
//!
//! The file is assumed not to change while it is served. A changed length (of any part a
//! fetch reads) is refused at the start of every fetch; changed bytes are caught by the
//! worker, whose whole-tensor hash then fails (it retries, then gives up naming the tensor).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use super::HASH_BUFFER_BYTES;
use potluck_engine::arch::slice_tensor_names;
use potluck_engine::gguf::GgufModel;
use potluck_engine::profile::ModelProfile;
use potluck_protocol::limits::{
    NAME_BYTES_MAX, TENSORS_PER_ASSIGNMENT_MAX, TENSOR_BYTES_MAX, TENSOR_DIMS_MAX,
    WEIGHT_CHUNK_BYTES_MAX,
};
use potluck_protocol::{Message, TensorRef, WeightChunk};
use crate::net::framed::{FrameReader, FrameWriter};
use potluck_engine::quant::dtype::ggml_dtype_id;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

/// Tensor bytes per [`WeightChunk`] on the wire. Half the protocol's limit: a corrupt chunk
/// costs at most 4 MiB to send again, a chunk occupies a home link (~100 Mbit/s) for well
/// under a second, and the per-chunk overhead (frame header, SHA-256) stays below 0.01 %.
pub const WEIGHT_CHUNK_BYTES: usize = 4 << 20;
const _: () =
    assert!(WEIGHT_CHUNK_BYTES > 0 && WEIGHT_CHUNK_BYTES <= WEIGHT_CHUNK_BYTES_MAX as usize);

/// How long [`WeightServer::serve_fetch`] waits for the worker's [`FetchTensors`]: the
/// worker sends it as soon as it has opened the stream, so a silent stream is a stuck peer.
///
/// [`FetchTensors`]: potluck_protocol::FetchTensors
pub const FETCH_REQUEST_TIMEOUT_MS: u64 = 10_000;

/// How long one chunk may take to be accepted by the stream. QUIC flow control holds a send
/// while the worker is busy writing earlier chunks to disk; 4 MiB over a slow Wi-Fi link
/// (~10 Mbit/s) takes about 3.5 s, so a minute means the worker has stopped reading.
pub const CHUNK_SEND_TIMEOUT_MS: u64 = 60_000;


/// A file's length and modification time: what says the file a stored hash describes is
/// still the file on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileIdentity {
    file_bytes: u64,
    /// Nanoseconds since the Unix epoch of the file's last modification.
    modified_unix_ns: u128,
}

fn file_identity(path: &Path) -> std::io::Result<FileIdentity> {
    let metadata = std::fs::metadata(path)?;
    let modified = metadata.modified()?.duration_since(std::time::UNIX_EPOCH).map_err(std::io::Error::other)?;
    Ok(FileIdentity { file_bytes: metadata.len(), modified_unix_ns: modified.as_nanos() })
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// One tensor as the GGUF header describes it.
#[derive(Debug, Clone)]
struct FileTensor {
    /// Index into [`WeightServer::parts`]: the file that holds the tensor (0 unless split).
    part: usize,
    /// GGML type id (`enum ggml_type`), as it goes on the wire.
    dtype: u32,
    /// GGUF's order, innermost first, as the protocol carries it (`TensorRef::dims`).
    dims: Vec<u64>,
    /// Absolute offset of the tensor's data in its part's file.
    offset: u64,
    bytes: u64,
    /// Whether the element count is a whole number of the type's blocks; if not, `bytes` is
    /// not the tensor's size and the tensor cannot be served.
    whole_blocks: bool,
}

/// One file of the served model (the only one unless the GGUF is split).
#[derive(Debug)]
struct ServedPart {
    path: PathBuf,
    /// The file's length when opened; a fetch refuses to serve from a file of another length.
    file_bytes: u64,
}

/// Serves slices of one GGUF model (one file, or every part of a split) to workers.
/// `Send + Sync`: connection tasks share it through an `Arc`.
#[derive(Debug)]
pub struct WeightServer {
    /// The model's path: its first part's, when split.
    path: PathBuf,
    /// Every file of the model, in `split.no` order.
    parts: Vec<ServedPart>,
    model_hash: [u8; 32],
    tensors: HashMap<String, FileTensor>,
    /// SHA-256 of each tensor's data, computed on first request: hashing a whole model at
    /// start-up would cost a second per GB before the API could answer.
    tensor_hashes: Mutex<HashMap<String, [u8; 32]>>,
    /// Where the hashes persist across restarts (see the module docs), if anywhere.
    hash_store: Option<PathBuf>,
    /// Tensors hashed by reading the file since this server opened (not found in memory or
    /// in the store): what a restart should keep at zero.
    tensors_hashed: AtomicU64,
    bytes_sent: AtomicU64,
    chunk_bytes: usize,
}

/// What the hash store keeps for one model.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StoredHashes {
    /// The (first) file's length.
    file_bytes: u64,
    /// Nanoseconds since the Unix epoch of the (first) file's last modification.
    modified_unix_ns: u128,
    /// The identity of a split GGUF's second and later parts, in order. Absent for one file:
    /// such a store is written and read exactly as before split GGUFs were served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    later_parts: Vec<FileIdentity>,
    /// Tensor name → SHA-256 as 64 hex digits.
    tensors: std::collections::BTreeMap<String, String>,
}

impl WeightServer {
    /// Reads the GGUF header of `path` (of every part, when `path` is one part of a split GGUF)
    /// and computes [`Self::model_hash`]. Blocking (reads the header, which holds the
    /// vocabulary: a few MB).
    pub fn open(path: &Path) -> Result<Self> {
        let context = || format!("cannot read the GGUF header of {}", path.display());
        let model = GgufModel::open(path).with_context(context)?;
        // Refused here as at load: a model the engine cannot profile is not served either.
        ModelProfile::from_model(&model).with_context(context)?;
        let mut hasher = Sha256::new();
        let mut parts = Vec::with_capacity(model.parts().len());
        for part in model.parts() {
            let path = part.path();
            let mut file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let file_bytes = file
                .metadata()
                .with_context(|| format!("cannot stat {}", path.display()))?
                .len();
            let header_bytes = part.header_bytes();
            if header_bytes > file_bytes {
                bail!("{} is truncated: its header claims {header_bytes} bytes, the file has {file_bytes}", path.display());
            }
            hasher.update(file_bytes.to_le_bytes());
            let hashed = std::io::copy(&mut (&mut file).take(header_bytes), &mut hasher)
                .with_context(|| format!("cannot read the header of {}", path.display()))?;
            if hashed != header_bytes {
                bail!("{} shrank while its header was read", path.display());
            }
            parts.push(ServedPart { path: path.to_owned(), file_bytes });
        }
        let model_hash: [u8; 32] = hasher.finalize().into();

        let mut tensors = HashMap::with_capacity(model.tensor_count());
        for (name, tensor) in model.tensors() {
            let part = &parts[tensor.part];
            let bytes = tensor.bytes();
            if tensor.offset.checked_add(bytes).is_none_or(|end| end > part.file_bytes) {
                bail!("{} is truncated: tensor `{name}` ({bytes} bytes) lies past its end", part.path.display());
            }
            let served = FileTensor {
                part: tensor.part,
                dtype: ggml_dtype_id(tensor.dtype),
                dims: tensor.dims.iter().rev().map(|&d| d as u64).collect(),
                offset: tensor.offset,
                bytes,
                whole_blocks: tensor.elem_count() % tensor.dtype.block_size() == 0,
            };
            tensors.insert(name.to_owned(), served);
        }
        Ok(Self {
            path: model.path().to_owned(),
            parts,
            model_hash,
            tensors,
            tensor_hashes: Mutex::new(HashMap::new()),
            hash_store: None,
            tensors_hashed: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            chunk_bytes: WEIGHT_CHUNK_BYTES,
        })
    }

    /// The same server sending chunks of `chunk_bytes` (clamped to
    /// 1..=`WEIGHT_CHUNK_BYTES_MAX`). Tests use small chunks so that tiny tensors still
    /// span several.
    pub fn with_chunk_bytes(mut self, chunk_bytes: usize) -> Self {
        self.chunk_bytes = chunk_bytes.clamp(1, WEIGHT_CHUNK_BYTES_MAX as usize);
        self
    }

    /// The same server keeping its tensor hashes in `dir` across restarts (created if
    /// missing): the hashes already stored for this file are loaded now. A store that cannot
    /// be read, or that belongs to another version of the file, is ignored (logged): hashing
    /// again is always correct, only slower.
    pub fn with_hash_store(mut self, dir: &Path) -> Self {
        let path = dir.join(format!("{}.json", super::slice_cache::hex(&self.model_hash)));
        if let Some(stored) = self.read_store(&path) {
            let mut loaded = HashMap::with_capacity(stored.tensors.len());
            for (name, digest) in stored.tensors {
                if let Some(hash) = parse_hex32(&digest).filter(|_| self.tensors.contains_key(&name)) {
                    loaded.insert(name, hash);
                }
            }
            tracing::info!(store = %path.display(), tensors = loaded.len(), "tensor hashes loaded from the previous run");
            *self.hashes() = loaded;
        }
        self.hash_store = Some(path);
        self
    }

    /// The store at `path` if it exists and describes this file as it is now.
    fn read_store(&self, path: &Path) -> Option<StoredHashes> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(store = %path.display(), error = %e, "cannot read the tensor-hash store; hashing again");
                return None;
            }
        };
        let stored: StoredHashes = serde_json::from_str(&text)
            .map_err(|e| tracing::warn!(store = %path.display(), error = %e, "the tensor-hash store is corrupt; hashing again"))
            .ok()?;
        let identity = self.identity().ok()?;
        let first = FileIdentity { file_bytes: stored.file_bytes, modified_unix_ns: stored.modified_unix_ns };
        (identity.first() == Some(&first) && identity[1..] == stored.later_parts[..]).then_some(stored)
    }

    /// Every part's length and modification time, in order: what the store is checked against.
    fn identity(&self) -> std::io::Result<Vec<FileIdentity>> {
        self.parts.iter().map(|part| file_identity(&part.path)).collect()
    }

    /// Writes every hash known so far to the store (a temporary file renamed into place, so
    /// a crash leaves the old store or the new one, never half of one).
    fn write_store(&self) {
        let Some(path) = &self.hash_store else { return };
        let Ok(mut identity) = self.identity() else { return };
        let FileIdentity { file_bytes, modified_unix_ns } = identity.remove(0);
        let tensors = self.hashes().iter().map(|(name, hash)| (name.clone(), super::slice_cache::hex(hash))).collect();
        let stored = StoredHashes { file_bytes, modified_unix_ns, later_parts: identity, tensors };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let partial = path.with_extension("json.partial");
            std::fs::write(&partial, serde_json::to_vec(&stored).map_err(std::io::Error::other)?)?;
            std::fs::rename(&partial, path)
        };
        if let Err(e) = write() {
            tracing::warn!(store = %path.display(), error = %e, "cannot write the tensor-hash store; the next start hashes again");
        }
    }

    /// Tensors hashed by reading the model file since this server opened.
    pub fn tensors_hashed(&self) -> u64 {
        self.tensors_hashed.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SHA-256 over the file's length (`u64`, little-endian) and its header bytes
    /// (everything before the tensor data): see the module docs.
    pub fn model_hash(&self) -> [u8; 32] {
        self.model_hash
    }

    /// The [`TensorRef`]s (with each tensor's SHA-256) a stage holding `layers` needs, in
    /// [`slice_tensor_names`]' order (embedding, blocks in order, head), which is the order
    /// the engine loads them. Hashing reads each tensor the first time it is asked for:
    /// blocking, so async callers use `spawn_blocking`.
    pub fn slice_refs(&self, profile: &ModelProfile, layers: Range<u32>) -> Result<Vec<TensorRef>> {
        if layers.start >= layers.end || layers.end > profile.n_layers {
            bail!(
                "layer range {}..{} is not within the model's {} layers",
                layers.start,
                layers.end,
                profile.n_layers
            );
        }
        let names = slice_tensor_names(profile, layers.clone());
        if names.len() > TENSORS_PER_ASSIGNMENT_MAX as usize {
            bail!(
                "layers {}..{} need {} tensors, more than an assignment may carry ({TENSORS_PER_ASSIGNMENT_MAX})",
                layers.start,
                layers.end,
                names.len()
            );
        }
        let hashed_before = self.tensors_hashed();
        let refs = names
            .into_iter()
            .map(|name| {
                let tensor = self.tensors.get(&name).ok_or_else(|| {
                    anyhow!(
                        "{} has no tensor `{name}`, which layers {}..{} need",
                        self.path.display(),
                        layers.start,
                        layers.end
                    )
                })?;
                check_servable(&name, tensor)?;
                let sha256 = self.tensor_sha256(&name, tensor)?;
                Ok(TensorRef {
                    name,
                    dtype: tensor.dtype,
                    dims: tensor.dims.clone(),
                    bytes: tensor.bytes,
                    sha256,
                })
            })
            .collect::<Result<Vec<_>>>();
        if self.tensors_hashed() != hashed_before {
            self.write_store();
        }
        refs
    }

    /// The tensor's SHA-256, memoised. Two callers may hash the same tensor at once; both get
    /// the same answer, and the lock is never held while reading.
    fn tensor_sha256(&self, name: &str, tensor: &FileTensor) -> Result<[u8; 32]> {
        if let Some(hash) = self.hashes().get(name) {
            return Ok(*hash);
        }
        let context = || format!("cannot read tensor `{name}` of {}", self.parts[tensor.part].path.display());
        let mut file = self.open_at(tensor).with_context(context)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
        let mut left = tensor.bytes;
        while left > 0 {
            let want = buffer
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            file.read_exact(&mut buffer[..want]).with_context(context)?;
            hasher.update(&buffer[..want]);
            left -= want as u64;
        }
        let hash: [u8; 32] = hasher.finalize().into();
        self.hashes().insert(name.to_owned(), hash);
        self.tensors_hashed.fetch_add(1, Ordering::Relaxed);
        Ok(hash)
    }

    /// The file holding `tensor` (its part's), positioned at the tensor's first byte.
    fn open_at(&self, tensor: &FileTensor) -> std::io::Result<File> {
        let mut file = File::open(&self.parts[tensor.part].path)?;
        file.seek(SeekFrom::Start(tensor.offset))?;
        Ok(file)
    }

    fn hashes(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 32]>> {
        // The map is only ever inserted into whole; a panic elsewhere cannot leave it torn.
        self.tensor_hashes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serves one fetch on a stream the worker opened: reads one `FetchTensors`, checks
    /// every index against `tensors` (the worker's assignment) before sending anything, then
    /// sends each requested tensor as [`WeightChunk`]s in the order asked, reading the file a
    /// chunk at a time. Returns the tensor bytes sent. The caller finishes the stream (that
    /// is how the worker knows the answer is complete).
    ///
    /// Errors: no request within [`FETCH_REQUEST_TIMEOUT_MS`], another message kind, an index
    /// outside `tensors` or named twice, a tensor that is not this file's (nothing is sent in
    /// those cases), the file changed length, a read failure, or a chunk the worker does not
    /// take within [`CHUNK_SEND_TIMEOUT_MS`].
    pub async fn serve_fetch<R, W>(
        &self,
        tensors: &[TensorRef],
        reader: &mut FrameReader<R>,
        writer: &mut FrameWriter<W>,
    ) -> Result<u64>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let request = match tokio::time::timeout(Duration::from_millis(FETCH_REQUEST_TIMEOUT_MS), reader.recv()).await {
            Err(_) => bail!("the worker sent no FetchTensors within {FETCH_REQUEST_TIMEOUT_MS} ms of opening a weight stream"),
            Ok(Err(e)) => return Err(e).context("cannot read the worker's FetchTensors"),
            Ok(Ok(None)) => bail!("the worker finished its weight stream without sending FetchTensors"),
            Ok(Ok(Some(Message::FetchTensors(request)))) => request,
            Ok(Ok(Some(other))) => bail!("the worker sent {:?} on a weight stream; only FetchTensors belongs there", other.kind()),
        };
        let plan = self.plan_fetch(tensors, &request.tensor_indices)?;

        // Every part this fetch reads, opened once and checked against its length at start-up.
        let mut needed: Vec<(usize, PathBuf, u64)> = plan
            .iter()
            .map(|step| (step.part, self.parts[step.part].path.clone(), self.parts[step.part].file_bytes))
            .collect();
        needed.sort_unstable_by_key(|(part, ..)| *part);
        needed.dedup_by_key(|(part, ..)| *part);
        let n_parts = self.parts.len();
        let mut files = tokio::task::spawn_blocking(move || -> Result<Vec<Option<File>>> {
            let mut files: Vec<Option<File>> = (0..n_parts).map(|_| None).collect();
            for (part, path, file_bytes) in needed {
                let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
                if len != file_bytes {
                    bail!(
                        "{} changed since the coordinator started ({file_bytes} bytes then, {len} now): restart the coordinator",
                        path.display()
                    );
                }
                files[part] = Some(file);
            }
            Ok(files)
        })
        .await
        .context("the file-opening task failed")??;

        let send_timeout = Duration::from_millis(CHUNK_SEND_TIMEOUT_MS);
        let mut sent = 0u64;
        for step in plan {
            let mut offset = 0u64;
            while offset < step.bytes {
                // At most `chunk_bytes`, so the cast back to usize cannot truncate.
                let len = (step.bytes - offset).min(self.chunk_bytes as u64) as usize;
                let at = step.file_offset + offset;
                let file = files[step.part].take().expect("every part the plan reads was opened above");
                let (returned, data, sha256) =
                    tokio::task::spawn_blocking(move || read_chunk(file, at, len))
                        .await
                        .context("the file-reading task failed")?
                        .with_context(|| {
                            format!(
                                "cannot read tensor `{}` of {}",
                                step.name,
                                self.parts[step.part].path.display()
                            )
                        })?;
                files[step.part] = Some(returned);
                let chunk = Message::WeightChunk(WeightChunk {
                    tensor_index: step.index,
                    offset,
                    data,
                    sha256,
                });
                tokio::time::timeout(send_timeout, writer.send(&chunk))
                    .await
                    .map_err(|_| {
                        anyhow!("the worker took no weight chunk for {CHUNK_SEND_TIMEOUT_MS} ms")
                    })?
                    .with_context(|| format!("cannot send tensor `{}` to the worker", step.name))?;
                self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                sent += len as u64;
                offset += len as u64;
            }
        }
        Ok(sent)
    }

    /// Checks a request against the assignment and the file before anything is sent.
    fn plan_fetch<'t>(
        &self,
        tensors: &'t [TensorRef],
        indices: &[u32],
    ) -> Result<Vec<FetchStep<'t>>> {
        let mut seen = HashSet::with_capacity(indices.len());
        indices
            .iter()
            .map(|&index| {
                let tensor = tensors.get(index as usize).ok_or_else(|| {
                    anyhow!(
                        "the worker asked for tensor {index}, but its assignment has {} tensors",
                        tensors.len()
                    )
                })?;
                if !seen.insert(index) {
                    bail!(
                        "the worker asked for tensor {index} (`{}`) twice in one fetch",
                        tensor.name
                    );
                }
                let Some(file_tensor) = self.tensors.get(&tensor.name) else {
                    bail!(
                        "the assignment's tensor `{}` is not in {}",
                        tensor.name,
                        self.path.display()
                    );
                };
                if file_tensor.bytes != tensor.bytes
                    || file_tensor.dtype != tensor.dtype
                    || file_tensor.dims != tensor.dims
                {
                    bail!(
                        "the assignment's tensor `{}` does not match the one in {}",
                        tensor.name,
                        self.path.display()
                    );
                }
                check_servable(&tensor.name, file_tensor)?;
                Ok(FetchStep {
                    index,
                    name: &tensor.name,
                    part: file_tensor.part,
                    file_offset: file_tensor.offset,
                    bytes: tensor.bytes,
                })
            })
            .collect()
    }

    /// Tensor bytes this server has sent so far, over every fetch (for `/metrics`, and for
    /// tests that check a restarted worker is sent nothing).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// One tensor's bytes, whole, read from the file that holds it: how a worker loads a
    /// slice from its own copy of the model ([`super::local`]) once [`Self::slice_refs`] has
    /// matched the coordinator's. Blocking. The engine takes each tensor whole to repack
    /// it, so this holds one tensor at a time, as loading from the slice cache does.
    pub fn read_tensor(&self, name: &str) -> Result<Vec<u8>> {
        let tensor = self.tensors.get(name).ok_or_else(|| anyhow!("{} has no tensor `{name}`", self.path.display()))?;
        let context = || format!("cannot read tensor `{name}` of {}", self.parts[tensor.part].path.display());
        let bytes = usize::try_from(tensor.bytes).with_context(context)?;
        let mut file = self.open_at(tensor).with_context(context)?;
        let mut data = vec![0u8; bytes];
        file.read_exact(&mut data).with_context(context)?;
        Ok(data)
    }
}

/// One tensor of a checked fetch.
struct FetchStep<'t> {
    index: u32,
    name: &'t str,
    /// Index into [`WeightServer::parts`]; `file_offset` is in that part's file.
    part: usize,
    file_offset: u64,
    bytes: u64,
}

/// Whether a tensor can travel in a [`TensorRef`] that the worker (and the protocol's checks)
/// will accept: a name and dims within the wire limits, a size within `TENSOR_BYTES_MAX`,
/// and whole blocks (otherwise its byte count is not its size).
fn check_servable(name: &str, tensor: &FileTensor) -> Result<()> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX as usize {
        bail!("tensor name {name:?} is empty or longer than the protocol's {NAME_BYTES_MAX} bytes");
    }
    if tensor.dims.is_empty() || tensor.dims.len() > TENSOR_DIMS_MAX as usize {
        bail!(
            "tensor `{name}` has {} dims; the protocol carries 1..={TENSOR_DIMS_MAX}",
            tensor.dims.len()
        );
    }
    if tensor.bytes > TENSOR_BYTES_MAX {
        bail!(
            "tensor `{name}` is {} bytes, more than the protocol's {TENSOR_BYTES_MAX}",
            tensor.bytes
        );
    }
    if !tensor.whole_blocks {
        bail!("tensor `{name}` is not a whole number of its type's blocks");
    }
    Ok(())
}

/// Reads `len` bytes at `offset` and hashes them; hands the file back for the next chunk
/// (it moves in and out of `spawn_blocking`).
fn read_chunk(
    mut file: File,
    offset: u64,
    len: usize,
) -> std::io::Result<(File, Vec<u8>, [u8; 32])> {
    let mut data = vec![0u8; len];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut data)?;
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    Ok((file, data, sha256))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: Vec<u64>, bytes: u64, whole_blocks: bool) -> FileTensor {
        FileTensor {
            part: 0,
            dtype: 0,
            dims,
            offset: 0,
            bytes,
            whole_blocks,
        }
    }

    #[test]
    fn only_tensors_the_protocol_can_carry_are_servable() {
        assert!(check_servable("blk.0.attn_q.weight", &tensor(vec![4, 4], 64, true)).is_ok());
        assert!(check_servable("", &tensor(vec![4], 16, true)).is_err());
        assert!(check_servable(
            &"x".repeat(NAME_BYTES_MAX as usize + 1),
            &tensor(vec![4], 16, true)
        )
        .is_err());
        assert!(check_servable("t", &tensor(vec![], 0, true)).is_err());
        assert!(
            check_servable("t", &tensor(vec![1; TENSOR_DIMS_MAX as usize + 1], 4, true)).is_err()
        );
        assert!(check_servable("t", &tensor(vec![1 << 40], TENSOR_BYTES_MAX + 1, true)).is_err());
        assert!(check_servable("t", &tensor(vec![33], 34, false)).is_err());
    }

    #[test]
    fn a_file_that_is_not_gguf_is_refused() {
        let dir = std::env::temp_dir().join(format!("potluck-weights-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-model.gguf");
        std::fs::write(&path, b"not a gguf").unwrap();
        let error = WeightServer::open(&path).unwrap_err();
        assert!(
            format!("{error:#}").contains("cannot read the GGUF header"),
            "{error:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // ---- Split GGUFs --------------------------------------------------------------------

    use candle_core::quantized::gguf_file::Content;
    use potluck_engine::gguf::write_split;
    use potluck_engine::random_gguf::RandomGguf;
    use potluck_protocol::FetchTensors;

    /// A fresh directory holding the tiny mixed-type model `whole.gguf`.
    fn tiny_model(test: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("potluck-weights-unit-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("whole.gguf");
        RandomGguf::tiny_mixed(1).write(&path).unwrap();
        (dir, path)
    }

    /// What the model hash was before split GGUFs: SHA-256(length as u64 LE ‖ header bytes),
    /// here over each of `paths` in turn.
    fn length_and_header_hash(paths: &[PathBuf]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for path in paths {
            let bytes = std::fs::read(path).unwrap();
            let header_bytes = Content::read(&mut File::open(path).unwrap()).unwrap().tensor_data_offset as usize;
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes[..header_bytes]);
        }
        hasher.finalize().into()
    }

    /// Serves one fetch of every tensor of `refs` over in-memory pipes; returns what the server
    /// said and each tensor's bytes as received (every chunk checked against its SHA-256).
    async fn fetch_all(server: &WeightServer, refs: &[TensorRef]) -> (Result<u64>, Vec<Vec<u8>>) {
        let (worker_send, server_receive) = tokio::io::duplex(1 << 16);
        let (server_send, worker_receive) = tokio::io::duplex(1 << 16);
        let serve = async {
            let mut reader = FrameReader::new(server_receive);
            let mut writer = FrameWriter::new(server_send);
            // Dropping the writer at the end finishes the stream, as the caller's finish does.
            server.serve_fetch(refs, &mut reader, &mut writer).await
        };
        let receive = async {
            let mut writer = FrameWriter::new(worker_send);
            let mut reader = FrameReader::new(worker_receive);
            let request = FetchTensors { tensor_indices: (0..refs.len() as u32).collect() };
            writer.send(&Message::FetchTensors(request)).await.unwrap();
            let mut received = vec![Vec::new(); refs.len()];
            while let Ok(Some(message)) = reader.recv().await {
                let Message::WeightChunk(chunk) = message else { panic!("{:?} on a weight stream", message.kind()) };
                let data = &mut received[chunk.tensor_index as usize];
                assert_eq!(chunk.offset, data.len() as u64, "chunks arrive in order");
                assert_eq!(<[u8; 32]>::from(Sha256::digest(&chunk.data)), chunk.sha256);
                data.extend_from_slice(&chunk.data);
            }
            received
        };
        tokio::join!(serve, receive)
    }

    #[test]
    fn a_single_file_s_model_hash_and_store_are_what_they_were() {
        let (dir, path) = tiny_model("single");
        let server = WeightServer::open(&path).unwrap();
        assert_eq!(server.model_hash(), length_and_header_hash(std::slice::from_ref(&path)));
        assert_eq!(server.parts.len(), 1);

        // The store keeps the keys it always had, so stores written before still match.
        let (profile, _) = ModelProfile::from_path(&path).unwrap();
        let server = server.with_hash_store(&dir.join("store"));
        server.slice_refs(&profile, 0..1).unwrap();
        let store = dir.join("store").join(format!("{}.json", super::super::slice_cache::hex(&server.model_hash())));
        let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&store).unwrap()).unwrap();
        let keys: Vec<&String> = stored.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["file_bytes", "modified_unix_ns", "tensors"]);
        let restarted = WeightServer::open(&path).unwrap().with_hash_store(&dir.join("store"));
        restarted.slice_refs(&profile, 0..1).unwrap();
        assert_eq!(restarted.tensors_hashed(), 0, "the store written is read back");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_split_model_is_served_as_the_whole_file() {
        let (dir, whole_path) = tiny_model("split");
        let parts = write_split(&whole_path, &dir.join("model"), 3).unwrap();
        let (profile, _) = ModelProfile::from_path(&whole_path).unwrap();
        let whole = WeightServer::open(&whole_path).unwrap();
        // Any part names the model; small chunks so that tensors span several.
        let split = WeightServer::open(&parts[1]).unwrap().with_chunk_bytes(1000);
        assert_eq!(split.path(), parts[0]);
        let mut parts_used: Vec<usize> = split.tensors.values().map(|t| t.part).collect();
        parts_used.sort_unstable();
        parts_used.dedup();
        assert_eq!(parts_used, [0, 1, 2], "every part holds tensors");

        // The hash covers every part's length and header, in order.
        assert_eq!(split.model_hash(), length_and_header_hash(&parts));
        assert_ne!(split.model_hash(), whole.model_hash());

        // The same refs as the unsplit file: names, types, dims, sizes and SHA-256s.
        let n = profile.n_layers;
        for layers in [0..1, 1..n - 1, n - 1..n, 0..n] {
            assert_eq!(
                split.slice_refs(&profile, layers.clone()).unwrap(),
                whole.slice_refs(&profile, layers.clone()).unwrap(),
                "layers {layers:?}"
            );
        }

        // Served from the right parts: every tensor's bytes are the unsplit file's.
        let refs = split.slice_refs(&profile, 0..n).unwrap();
        let (sent, received) = fetch_all(&split, &refs).await;
        assert_eq!(sent.unwrap(), refs.iter().map(|t| t.bytes).sum::<u64>());
        for (tensor, data) in refs.iter().zip(&received) {
            assert_eq!(<[u8; 32]>::from(Sha256::digest(data)), tensor.sha256, "`{}`", tensor.name);
        }

        // A part that changed length is refused before anything is sent.
        let mut last = std::fs::OpenOptions::new().append(true).open(&parts[2]).unwrap();
        std::io::Write::write_all(&mut last, &[0u8; 32]).unwrap();
        drop(last);
        let (sent, received) = fetch_all(&split, &refs).await;
        let error = format!("{:#}", sent.unwrap_err());
        assert!(error.contains("model-00003-of-00003.gguf changed since the coordinator started"), "{error}");
        assert!(received.iter().all(Vec::is_empty));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_split_model_s_hash_store_covers_every_part() {
        let (dir, whole_path) = tiny_model("split-store");
        let parts = write_split(&whole_path, &dir.join("model"), 3).unwrap();
        let (profile, _) = ModelProfile::from_path(&parts[0]).unwrap();
        let store = dir.join("store");
        let open = || WeightServer::open(&parts[0]).unwrap().with_hash_store(&store);

        let first = open();
        first.slice_refs(&profile, 0..profile.n_layers).unwrap();
        assert!(first.tensors_hashed() > 0);
        let stored = store.join(format!("{}.json", super::super::slice_cache::hex(&first.model_hash())));
        let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
        assert_eq!(stored["later_parts"].as_array().map(Vec::len), Some(2));

        let restarted = open();
        restarted.slice_refs(&profile, 0..profile.n_layers).unwrap();
        assert_eq!(restarted.tensors_hashed(), 0, "nothing hashed again");

        // The last part touched (same length, another modification time): hashed anew.
        let later = std::time::SystemTime::now() + Duration::from_secs(3600);
        File::options().write(true).open(&parts[2]).unwrap().set_modified(later).unwrap();
        let touched = open();
        touched.slice_refs(&profile, 0..profile.n_layers).unwrap();
        assert!(touched.tensors_hashed() > 0, "a changed part is not trusted to the store");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
