//! Serving each worker its slice of the weights straight out of the coordinator's GGUF, so a
//! worker needs no model file of its own.
//!
//! The worker opens a stream per fetch and sends one [`FetchTensors`] naming indices into its
//! assignment's tensors; [`WeightServer::serve_fetch`] answers with the tensors' bytes as
//! [`WeightChunk`]s, in the order asked, each chunk carrying its own SHA-256 so that a
//! corrupt chunk is caught on arrival. The receiving half is [`super::fetch`].
//!
//! **Identity:** [`WeightServer::model_hash`] is the SHA-256 of the file's length and its
//! header (metadata and tensor infos), so start-up does not hash gigabytes. Two files with
//! equal headers but different weights (a fine-tune that kept every key) would share it; that
//! is safe, because every [`TensorRef`] also carries the SHA-256 of the tensor's own bytes and
//! the worker's cache checks a cached tensor against that, never against the model hash alone.
//!
//! **Memory:** a tensor is never held whole: it is read, hashed and sent one chunk at a time,
//! so serving a 1 GB embedding costs [`WEIGHT_CHUNK_BYTES`] of buffer (twice: the read and
//! the encoded frame).
//!
//! **Restarts:** with [`WeightServer::with_hash_store`], each tensor hash is also kept on disk
//! (`<store>/<model hash>.json`, with the file's length and modification time), so a
//! coordinator that restarts on the same file hashes nothing it already knows: hashing a
//! 40 GB model at ~1 GB/s would otherwise delay the first worker by most of a minute at every
//! start. A file whose length or modification time changed starts from an empty store.
//!
//! The file is assumed not to change while it is served. A changed length is refused at the
//! start of every fetch; changed bytes are caught by the worker, whose whole-tensor hash then
//! fails (it retries, then gives up naming the tensor).

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
use potluck_engine::profile::{tensor_size_in_bytes, ModelProfile};
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


/// A file's length and modification time (ns since the Unix epoch): what says the file a
/// stored hash describes is still the file on disk.
fn file_identity(path: &Path) -> std::io::Result<(u64, u128)> {
    let metadata = std::fs::metadata(path)?;
    let modified = metadata.modified()?.duration_since(std::time::UNIX_EPOCH).map_err(std::io::Error::other)?;
    Ok((metadata.len(), modified.as_nanos()))
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
    /// GGML type id (`enum ggml_type`), as it goes on the wire.
    dtype: u32,
    /// GGUF's order, innermost first, as the protocol carries it (`TensorRef::dims`).
    dims: Vec<u64>,
    /// Absolute offset of the tensor's data in the file.
    offset: u64,
    bytes: u64,
    /// Whether the element count is a whole number of the type's blocks; if not, `bytes` is
    /// not the tensor's size and the tensor cannot be served.
    whole_blocks: bool,
}

/// Serves slices of one GGUF file to workers. `Send + Sync`: connection tasks share it
/// through an `Arc`.
#[derive(Debug)]
pub struct WeightServer {
    path: PathBuf,
    /// The file's length when opened; a fetch refuses to serve from a file of another length.
    file_bytes: u64,
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

/// What the hash store keeps for one model file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StoredHashes {
    file_bytes: u64,
    /// Nanoseconds since the Unix epoch of the file's last modification.
    modified_unix_ns: u128,
    /// Tensor name → SHA-256 as 64 hex digits.
    tensors: std::collections::BTreeMap<String, String>,
}

impl WeightServer {
    /// Reads the GGUF header of `path` and computes [`Self::model_hash`]. Blocking (reads the
    /// header, which holds the vocabulary: a few MB).
    pub fn open(path: &Path) -> Result<Self> {
        let (_, content) = ModelProfile::from_path(path)
            .with_context(|| format!("cannot read the GGUF header of {}", path.display()))?;
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_bytes = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        let header_bytes = content.tensor_data_offset;
        if header_bytes > file_bytes {
            bail!("{} is truncated: its header claims {header_bytes} bytes, the file has {file_bytes}", path.display());
        }
        let mut hasher = Sha256::new();
        hasher.update(file_bytes.to_le_bytes());
        let hashed = std::io::copy(&mut (&mut file).take(header_bytes), &mut hasher)
            .with_context(|| format!("cannot read the header of {}", path.display()))?;
        if hashed != header_bytes {
            bail!("{} shrank while its header was read", path.display());
        }
        let model_hash: [u8; 32] = hasher.finalize().into();

        let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let elements = info.shape.elem_count();
            let bytes = tensor_size_in_bytes(info.ggml_dtype, elements);
            let offset = header_bytes
                .checked_add(info.offset)
                .filter(|start| {
                    start
                        .checked_add(bytes)
                        .is_some_and(|end| end <= file_bytes)
                })
                .ok_or_else(|| {
                    anyhow!(
                        "{} is truncated: tensor `{name}` ({bytes} bytes) lies past its end",
                        path.display()
                    )
                })?;
            let tensor = FileTensor {
                dtype: ggml_dtype_id(info.ggml_dtype),
                dims: info.shape.dims().iter().rev().map(|&d| d as u64).collect(),
                offset,
                bytes,
                whole_blocks: elements % info.ggml_dtype.block_size() == 0,
            };
            tensors.insert(name.clone(), tensor);
        }
        Ok(Self {
            path: path.to_owned(),
            file_bytes,
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
        let (file_bytes, modified) = file_identity(&self.path).ok()?;
        (stored.file_bytes == file_bytes && stored.modified_unix_ns == modified).then_some(stored)
    }

    /// Writes every hash known so far to the store (a temporary file renamed into place, so
    /// a crash leaves the old store or the new one, never half of one).
    fn write_store(&self) {
        let Some(path) = &self.hash_store else { return };
        let Ok((file_bytes, modified_unix_ns)) = file_identity(&self.path) else { return };
        let tensors = self.hashes().iter().map(|(name, hash)| (name.clone(), super::slice_cache::hex(hash))).collect();
        let stored = StoredHashes { file_bytes, modified_unix_ns, tensors };
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
        let context = || format!("cannot read tensor `{name}` of {}", self.path.display());
        let mut file = File::open(&self.path).with_context(context)?;
        file.seek(SeekFrom::Start(tensor.offset))
            .with_context(context)?;
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

        let path = self.path.clone();
        let mut file = tokio::task::spawn_blocking(move || -> Result<(File, u64)> {
            let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
            Ok((file, len))
        })
        .await
        .context("the file-opening task failed")?
        .and_then(|(file, len)| {
            if len == self.file_bytes {
                Ok(file)
            } else {
                Err(anyhow!(
                    "{} changed since the coordinator started ({} bytes then, {len} now): restart the coordinator",
                    self.path.display(),
                    self.file_bytes
                ))
            }
        })?;

        let send_timeout = Duration::from_millis(CHUNK_SEND_TIMEOUT_MS);
        let mut sent = 0u64;
        for step in plan {
            let mut offset = 0u64;
            while offset < step.bytes {
                // At most `chunk_bytes`, so the cast back to usize cannot truncate.
                let len = (step.bytes - offset).min(self.chunk_bytes as u64) as usize;
                let at = step.file_offset + offset;
                let (returned, data, sha256) =
                    tokio::task::spawn_blocking(move || read_chunk(file, at, len))
                        .await
                        .context("the file-reading task failed")?
                        .with_context(|| {
                            format!(
                                "cannot read tensor `{}` of {}",
                                step.name,
                                self.path.display()
                            )
                        })?;
                file = returned;
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
}

/// One tensor of a checked fetch.
struct FetchStep<'t> {
    index: u32,
    name: &'t str,
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
}
