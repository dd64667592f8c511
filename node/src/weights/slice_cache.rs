//! The on-disk cache of the weight slices this worker has been sent.
//!
//! The coordinator streams a worker only its slice's GGUF tensors, in chunks that each carry
//! a SHA-256 (`WeightChunk`), and names every tensor's whole-data SHA-256 in the assignment
//! (`TensorRef`). This module keeps what arrived so that a restart with the same assignment
//! loads from disk instead of over the network:
//!
//! ```text
//! <root>/<model_hash as 64 hex digits>/<escaped tensor name>.bin    the tensor's raw bytes
//! <root>/<model_hash as 64 hex digits>/<escaped tensor name>.json   its manifest
//! <root>/<model_hash as 64 hex digits>/<escaped tensor name>.partial  a transfer in progress
//! ```
//!
//! **Trust:** [`SliceCache::has_verified`] and [`CachedSliceSource`] hash the whole `.bin`
//! against the assignment's SHA-256 every time, rather than trusting a "verified" marker. A
//! marker would say the bytes were right when written, not that they are right now (a disk
//! error, a half-synced file after a power cut, a user's stray edit); hashing costs about a
//! second per GB, far less than fetching the bytes again over a home network, and reading
//! the tensor for a load touches every byte anyway.
//!
//! **Nothing unverified becomes visible:** chunks are written to `.partial` only after their
//! own hash matches, and `.partial` is renamed to `.bin` only once every byte is present and
//! the whole tensor's hash matches, so a `.bin` is never a torn write.
//!
//! One [`TensorWriter`] per tensor at a time: two writers of one tensor share its `.partial`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use candle_core::quantized::GgmlDType;
use super::HASH_BUFFER_BYTES;
use potluck_engine::source::TensorSource;
use potluck_engine::quant::dtype::ggml_dtype_from_id;
use potluck_engine::EngineError;
use potluck_protocol::TensorRef;
use sha2::{Digest, Sha256};

// The largest tensor the cache accepts is the protocol's own bound (`TENSOR_BYTES_MAX`), so
// anything a coordinator may legally send fits, and a bad descriptor cannot make us reserve
// more disk.
use potluck_protocol::limits::TENSOR_BYTES_MAX;

/// The largest chunk [`TensorWriter::write_chunk`] accepts: the protocol's chunk bound.
pub const CHUNK_BYTES_MAX: u64 = potluck_protocol::limits::WEIGHT_CHUNK_BYTES_MAX as u64;

/// The longest escaped tensor name used as a file stem. ext4, APFS and NTFS allow 255 bytes
/// per name; this leaves room for the suffixes. GGUF names are at most 63 bytes
/// (`GGML_MAX_NAME` in ggml.h), so only a hostile name comes near it.
pub const FILE_STEM_BYTES_MAX: usize = 200;

/// The largest manifest we read: it holds a name, a dtype, a few dims and a hash, so
/// anything bigger is not ours, and we do not allocate for it.
pub const MANIFEST_BYTES_MAX: u64 = 16 * 1024;


/// Version of the manifest format, so a future layout is told apart from this one.
const MANIFEST_VERSION: u64 = 1;

/// What can go wrong with the slice cache. Every variant is an operating error (bad input
/// from the network or a damaged disk), returned to the caller, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum SliceCacheError {
    #[error("slice cache: cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("tensor name {name:?} cannot be cached: {reason}")]
    InvalidTensorName { name: String, reason: &'static str },
    #[error("tensor `{name}` is {bytes} bytes, more than the cache's limit of {max}")]
    TensorTooLarge { name: String, bytes: u64, max: u64 },
    #[error("tensor `{name}` has GGML type {dtype}, which this worker cannot load")]
    UnknownDType { name: String, dtype: u32 },
    #[error("tensor `{name}`: dims {dims:?} of type {dtype} do not make {bytes} bytes")]
    ShapeMismatch { name: String, dtype: u32, dims: Vec<u64>, bytes: u64 },
    #[error("chunk at offset {offset} of `{name}` is empty")]
    EmptyChunk { name: String, offset: u64 },
    #[error("chunk at offset {offset} of `{name}` is {len} bytes, more than the limit of {max}")]
    ChunkTooLarge { name: String, offset: u64, len: u64, max: u64 },
    #[error("chunk at offset {offset} ({len} bytes) lies outside `{name}` ({tensor_bytes} bytes)")]
    ChunkOutOfRange { name: String, offset: u64, len: u64, tensor_bytes: u64 },
    #[error("chunk at offset {offset} ({len} bytes) of `{name}` partly overlaps bytes already received")]
    ChunkOverlaps { name: String, offset: u64, len: u64 },
    /// The caller re-requests the chunk at `offset`; nothing of it was written.
    #[error("chunk at offset {offset} of `{name}` does not match its SHA-256; fetch it again")]
    ChunkHashMismatch { name: String, offset: u64 },
    #[error("tensor `{name}` is incomplete: {received} of {expected} bytes received")]
    Incomplete { name: String, received: u64, expected: u64 },
    /// Every chunk matched its own hash but the whole does not: the caller fetches the
    /// whole tensor again. Nothing was kept.
    #[error("tensor `{name}` does not match its SHA-256 once assembled; fetch it again")]
    TensorHashMismatch { name: String },
    #[error("tensor `{name}` is not in the cache, or its cached copy is damaged")]
    NotCached { name: String },
}

type Result<T, E = SliceCacheError> = std::result::Result<T, E>;

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SliceCacheError + 'a {
    move |source| SliceCacheError::Io { action, path: path.to_owned(), source }
}

/// The cache under one root directory. Cheap to clone: it is only the path.
#[derive(Debug, Clone)]
pub struct SliceCache {
    root: PathBuf,
}

/// What [`SliceCache::evict_to_budget`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvictionReport {
    pub removed_tensors: u64,
    pub removed_bytes: u64,
    /// Bytes of cached tensors (data and manifests) left after eviction.
    pub remaining_bytes: u64,
}

impl SliceCache {
    /// `~/.cache/potluck/slices` (or the platform's cache directory), if the OS names one.
    pub fn default_root() -> Option<PathBuf> {
        dirs::cache_dir().map(|dir| dir.join("potluck").join("slices"))
    }

    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: PathBuf) -> Result<Self> {
        fs::create_dir_all(&root).map_err(io_error("create", &root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn model_dir(&self, model_hash: &[u8; 32]) -> PathBuf {
        self.root.join(hex(model_hash))
    }

    fn paths(&self, model_hash: &[u8; 32], name: &str) -> Result<TensorPaths> {
        let stem = escape_tensor_name(name)?;
        let dir = self.model_dir(model_hash);
        Ok(TensorPaths {
            data: dir.join(format!("{stem}.bin")),
            manifest: dir.join(format!("{stem}.json")),
            partial: dir.join(format!("{stem}.partial")),
            dir,
        })
    }

    /// Whether the cache holds `tensor` of model `model_hash` with exactly the assigned bytes:
    /// its manifest matches the descriptor, and the data file has the right length and
    /// SHA-256 (hashed now, see the module docs). A damaged copy is `Ok(false)`: the caller
    /// fetches it again and the new copy replaces it. On a hit, the file's mtime is bumped so
    /// that eviction sees it as recently used.
    ///
    /// Errors are for names that cannot be cached and for I/O failures other than a missing
    /// file (a permission error should be seen, not turned into an endless re-fetch).
    pub fn has_verified(&self, model_hash: &[u8; 32], tensor: &TensorRef) -> Result<bool> {
        match self.read_verified(model_hash, tensor, false) {
            Ok(_) => Ok(true),
            Err(SliceCacheError::NotCached { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The tensor's bytes, checked as in [`Self::has_verified`] (`NotCached` if absent or
    /// damaged). With `keep == false` the bytes are hashed while streaming and not kept.
    fn read_verified(&self, model_hash: &[u8; 32], tensor: &TensorRef, keep: bool) -> Result<Vec<u8>> {
        check_descriptor(tensor)?;
        let paths = self.paths(model_hash, &tensor.name)?;
        let not_cached = || SliceCacheError::NotCached { name: tensor.name.clone() };
        match read_manifest(&paths.manifest)? {
            Some(manifest) if manifest == manifest_json(tensor) => {}
            _ => return Err(not_cached()),
        }
        let mut file = match File::open(&paths.data) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_cached()),
            Err(e) => return Err(io_error("open", &paths.data)(e)),
        };
        let len = file.metadata().map_err(io_error("stat", &paths.data))?.len();
        // Check the length before allocating for it or hashing it.
        if len != tensor.bytes {
            return Err(not_cached());
        }
        let mut kept = Vec::new();
        if keep {
            // `check_descriptor` bounded `bytes` by TENSOR_BYTES_MAX; on a 32-bit target it
            // may still not fit in memory.
            let capacity = usize::try_from(len)
                .map_err(|_| SliceCacheError::TensorTooLarge { name: tensor.name.clone(), bytes: len, max: usize::MAX as u64 })?;
            kept.reserve_exact(capacity);
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("read", &paths.data)(e)),
            };
            total += n as u64;
            // The file may grow under us; never read past what we checked.
            if total > tensor.bytes {
                return Err(not_cached());
            }
            hasher.update(&buffer[..n]);
            if keep {
                kept.extend_from_slice(&buffer[..n]);
            }
        }
        if total != tensor.bytes || hasher.finalize().as_slice() != tensor.sha256 {
            return Err(not_cached());
        }
        // Best effort: a failed touch only makes eviction's guess worse.
        let _ = file.set_modified(SystemTime::now());
        Ok(kept)
    }

    /// Starts receiving `tensor` of model `model_hash`. Any earlier partial transfer of it is
    /// discarded: chunks are not remembered across restarts, only whole tensors.
    pub fn begin(&self, model_hash: &[u8; 32], tensor: &TensorRef) -> Result<TensorWriter> {
        check_descriptor(tensor)?;
        let paths = self.paths(model_hash, &tensor.name)?;
        fs::create_dir_all(&paths.dir).map_err(io_error("create", &paths.dir))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&paths.partial)
            .map_err(io_error("create", &paths.partial))?;
        // Sets the logical size only (sparse where the filesystem allows); `finish` still
        // requires every byte to have been received.
        file.set_len(tensor.bytes).map_err(io_error("size", &paths.partial))?;
        Ok(TensorWriter {
            tensor: tensor.clone(),
            paths,
            file: Some(file),
            received: BTreeMap::new(),
            received_bytes: 0,
        })
    }

    /// Removes everything cached for `model_hash` (absent is fine).
    pub fn remove_model(&self, model_hash: &[u8; 32]) -> Result<()> {
        let dir = self.model_dir(model_hash);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_error("remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// Removes the least recently used cached tensors (by the data file's mtime, which
    /// [`Self::has_verified`] and loads bump) until the cache's complete tensors take at most
    /// `budget_bytes`. Tensors of the models in `protect` (the one being loaded or served)
    /// are counted but never removed, so the result may stay over budget. Only directories
    /// named like a model hash are looked at, so a mistaken root loses nothing else.
    /// Transfers in progress (`.partial`) are neither counted nor removed.
    pub fn evict_to_budget(&self, budget_bytes: u64, protect: &[[u8; 32]]) -> Result<EvictionReport> {
        let protected: Vec<String> = protect.iter().map(hex).collect();
        let mut entries: Vec<(SystemTime, u64, PathBuf, PathBuf)> = Vec::new();
        let mut total_bytes = 0u64;
        for model in fs::read_dir(&self.root).map_err(io_error("list", &self.root))? {
            let model = model.map_err(io_error("list", &self.root))?;
            let name = model.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) || !model.path().is_dir() {
                continue;
            }
            let is_protected = protected.iter().any(|p| p == name);
            let dir = model.path();
            for file in fs::read_dir(&dir).map_err(io_error("list", &dir))? {
                let data = file.map_err(io_error("list", &dir))?.path();
                if data.extension().and_then(|e| e.to_str()) != Some("bin") {
                    continue;
                }
                let manifest = data.with_extension("json");
                let meta = match fs::metadata(&data) {
                    Ok(meta) => meta,
                    // Removed by someone else since the listing.
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("stat", &data)(e)),
                };
                let size = meta.len() + fs::metadata(&manifest).map_or(0, |m| m.len());
                total_bytes += size;
                if !is_protected {
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    entries.push((mtime, size, data, manifest));
                }
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.cmp(&b.2)));
        let mut report = EvictionReport::default();
        for (_, size, data, manifest) in entries {
            if total_bytes <= budget_bytes {
                break;
            }
            // Data first: without it the tensor is not cached, whatever the manifest says.
            for path in [&data, &manifest] {
                match fs::remove_file(path) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(io_error("remove", path)(e)),
                    _ => {}
                }
            }
            total_bytes -= size;
            report.removed_tensors += 1;
            report.removed_bytes += size;
            if let Some(dir) = data.parent() {
                // Fails, harmlessly, while the model still has files.
                let _ = fs::remove_dir(dir);
            }
        }
        report.remaining_bytes = total_bytes;
        Ok(report)
    }
}

struct TensorPaths {
    dir: PathBuf,
    data: PathBuf,
    manifest: PathBuf,
    partial: PathBuf,
}

/// One tensor being received. Dropping it without [`Self::finish`] removes the partial file.
pub struct TensorWriter {
    tensor: TensorRef,
    paths: TensorPaths,
    /// `None` once finished.
    file: Option<File>,
    /// Received byte ranges, `start → end`, disjoint and coalesced, so the map holds at most
    /// one entry per gap and stays small however the chunks arrive.
    received: BTreeMap<u64, u64>,
    received_bytes: u64,
}

impl TensorWriter {
    pub fn tensor(&self) -> &TensorRef {
        &self.tensor
    }

    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    pub fn is_complete(&self) -> bool {
        self.received_bytes == self.tensor.bytes
    }

    /// The byte ranges not received yet, in order (what to re-request after a lost chunk).
    pub fn missing_ranges(&self) -> Vec<Range<u64>> {
        let mut missing = Vec::new();
        let mut at = 0;
        for (&start, &end) in &self.received {
            if start > at {
                missing.push(at..start);
            }
            at = end;
        }
        if at < self.tensor.bytes {
            missing.push(at..self.tensor.bytes);
        }
        missing
    }

    /// Writes one chunk after checking its SHA-256 and bounds. On `ChunkHashMismatch` nothing
    /// was written and the caller re-requests the chunk at that offset. A chunk wholly inside
    /// bytes already received is a retransmission and is ignored (the whole-tensor hash in
    /// `finish` still covers it); one that partly overlaps them is refused, since the sender
    /// and we disagree on the chunking.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8], sha256: &[u8; 32]) -> Result<()> {
        let name = &self.tensor.name;
        let len = data.len() as u64;
        if len == 0 {
            return Err(SliceCacheError::EmptyChunk { name: name.clone(), offset });
        }
        if len > CHUNK_BYTES_MAX {
            return Err(SliceCacheError::ChunkTooLarge { name: name.clone(), offset, len, max: CHUNK_BYTES_MAX });
        }
        let end = match offset.checked_add(len) {
            Some(end) if end <= self.tensor.bytes => end,
            _ => {
                return Err(SliceCacheError::ChunkOutOfRange { name: name.clone(), offset, len, tensor_bytes: self.tensor.bytes })
            }
        };
        if Sha256::digest(data).as_slice() != sha256 {
            return Err(SliceCacheError::ChunkHashMismatch { name: name.clone(), offset });
        }
        let before = self.received.range(..=offset).next_back().map(|(&s, &e)| (s, e));
        if let Some((_, before_end)) = before {
            if before_end >= end {
                return Ok(());
            }
            if before_end > offset {
                return Err(SliceCacheError::ChunkOverlaps { name: name.clone(), offset, len });
            }
        }
        if let Some((&after_start, _)) = self.received.range(offset + 1..).next() {
            if after_start < end {
                return Err(SliceCacheError::ChunkOverlaps { name: name.clone(), offset, len });
            }
        }
        let Some(file) = self.file.as_mut() else {
            // Unreachable through the API (`finish` consumes the writer); kept an error, not a panic.
            return Err(SliceCacheError::Incomplete { name: name.clone(), received: self.received_bytes, expected: self.tensor.bytes });
        };
        file.seek(SeekFrom::Start(offset)).map_err(io_error("seek", &self.paths.partial))?;
        file.write_all(data).map_err(io_error("write", &self.paths.partial))?;
        // Record the range only once its bytes are written, coalescing with its neighbours.
        let mut start = offset;
        let mut stop = end;
        if let Some((before_start, before_end)) = before {
            if before_end == offset {
                start = before_start;
                self.received.remove(&before_start);
            }
        }
        if let Some(after_end) = self.received.remove(&end) {
            stop = after_end;
        }
        self.received.insert(start, stop);
        self.received_bytes += len;
        Ok(())
    }

    /// Checks that every byte is present and that the whole matches the tensor's SHA-256,
    /// then makes it visible: manifest first, then the atomic rename of the data. On a hash
    /// mismatch the partial file is removed and the caller fetches the tensor again.
    pub fn finish(mut self) -> Result<()> {
        let name = self.tensor.name.clone();
        if !self.is_complete() {
            return Err(SliceCacheError::Incomplete { name, received: self.received_bytes, expected: self.tensor.bytes });
        }
        let Some(mut file) = self.file.take() else {
            return Err(SliceCacheError::Incomplete { name, received: self.received_bytes, expected: self.tensor.bytes });
        };
        let partial = self.paths.partial.clone();
        file.sync_all().map_err(io_error("sync", &partial))?;
        // Chunks may arrive in any order, so the whole is hashed from disk rather than on the
        // fly; this also catches a write the disk got wrong.
        file.seek(SeekFrom::Start(0)).map_err(io_error("seek", &partial))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buffer[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("read", &partial)(e)),
            }
        }
        drop(file);
        if hasher.finalize().as_slice() != self.tensor.sha256 {
            // `Drop` removes the partial file.
            return Err(SliceCacheError::TensorHashMismatch { name });
        }
        // The manifest goes in through its own temporary file and rename, so a reader never
        // sees half of one; it is useless without the matching data, which comes next.
        let manifest_tmp = self.paths.manifest.with_extension("json.tmp");
        let manifest = manifest_json(&self.tensor).to_string();
        write_synced(&manifest_tmp, manifest.as_bytes())?;
        fs::rename(&manifest_tmp, &self.paths.manifest).map_err(io_error("rename", &manifest_tmp))?;
        fs::rename(&partial, &self.paths.data).map_err(io_error("rename", &partial))?;
        // So the renames survive a power cut (POSIX: a rename is durable once its directory
        // is synced). Not possible on every platform, hence best effort.
        if let Ok(dir) = File::open(&self.paths.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for TensorWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.paths.partial.exists() {
            self.file = None;
            // Best effort: a leftover partial file is truncated by the next `begin`.
            let _ = fs::remove_file(&self.paths.partial);
        }
    }
}

/// A [`TensorSource`] over the cache, for `ModelSlice::from_source`: it serves the tensors of
/// one model's assignment, each hashed against its descriptor as it is read.
pub struct CachedSliceSource {
    cache: SliceCache,
    model_hash: [u8; 32],
    tensors: HashMap<String, TensorRef>,
}

impl CachedSliceSource {
    pub fn new(cache: SliceCache, model_hash: [u8; 32], tensors: &[TensorRef]) -> Self {
        let tensors = tensors.iter().map(|t| (t.name.clone(), t.clone())).collect();
        Self { cache, model_hash, tensors }
    }
}

impl TensorSource for CachedSliceSource {
    fn tensor(&mut self, name: &str) -> potluck_engine::error::Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>> {
        let Some(tensor) = self.tensors.get(name) else {
            return Ok(None);
        };
        let to_engine = |e: SliceCacheError| {
            let kind = match &e {
                SliceCacheError::Io { source, .. } => source.kind(),
                _ => ErrorKind::InvalidData,
            };
            EngineError::Io(std::io::Error::new(kind, e))
        };
        let (dtype, dims) = engine_shape(tensor).map_err(to_engine)?;
        let bytes = self.cache.read_verified(&self.model_hash, tensor, true).map_err(to_engine)?;
        Ok(Some((dtype, dims, bytes)))
    }
}

/// A tensor's type and dims as the engine takes them. The protocol carries GGUF's order
/// (innermost first); candle and the engine use outermost first (candle's gguf_file reverses
/// them the same way on read).
pub(crate) fn engine_shape(tensor: &TensorRef) -> Result<(GgmlDType, Vec<usize>)> {
    let dtype = ggml_dtype(tensor)?;
    let dims = tensor
        .dims
        .iter()
        .rev()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| shape_mismatch(tensor))?;
    Ok((dtype, dims))
}

fn ggml_dtype(tensor: &TensorRef) -> Result<GgmlDType> {
    ggml_dtype_from_id(tensor.dtype).ok_or_else(|| SliceCacheError::UnknownDType { name: tensor.name.clone(), dtype: tensor.dtype })
}

fn shape_mismatch(tensor: &TensorRef) -> SliceCacheError {
    SliceCacheError::ShapeMismatch { name: tensor.name.clone(), dtype: tensor.dtype, dims: tensor.dims.clone(), bytes: tensor.bytes }
}

/// Checks a descriptor before anything is allocated or written for it: a name we can store,
/// a size within bounds, a known type, and dims × type size = bytes.
fn check_descriptor(tensor: &TensorRef) -> Result<()> {
    escape_tensor_name(&tensor.name)?;
    if tensor.bytes > TENSOR_BYTES_MAX {
        return Err(SliceCacheError::TensorTooLarge { name: tensor.name.clone(), bytes: tensor.bytes, max: TENSOR_BYTES_MAX });
    }
    let dtype = ggml_dtype(tensor)?;
    let elements = tensor.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let block = dtype.block_size() as u64;
    let expected = elements
        .filter(|&n| !tensor.dims.is_empty() && n % block == 0)
        .and_then(|n| (n / block).checked_mul(dtype.type_size() as u64));
    if expected != Some(tensor.bytes) {
        return Err(shape_mismatch(tensor));
    }
    Ok(())
}

/// The file stem for a tensor name. Bytes outside `[a-z0-9._-]` are written `%XX`, so `/`,
/// `\`, NUL and the like cannot reach the filesystem, and upper case is escaped too so two
/// names never share a file on a case-insensitive filesystem (macOS, Windows). The mapping is
/// one-to-one. Names that are empty, start with `.` (hidden files, `.`, `..`) or contain `..`
/// are refused rather than escaped: no GGUF tensor is named so.
pub fn escape_tensor_name(name: &str) -> Result<String> {
    let refuse = |reason| Err(SliceCacheError::InvalidTensorName { name: name.to_owned(), reason });
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.starts_with('.') {
        return refuse("it starts with `.`");
    }
    if name.contains("..") {
        return refuse("it contains `..`");
    }
    if name.contains('\0') {
        return refuse("it contains NUL");
    }
    let mut stem = String::with_capacity(name.len());
    for byte in name.bytes() {
        match byte {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => stem.push(byte as char),
            _ => stem.push_str(&format!("%{byte:02X}")),
        }
        if stem.len() > FILE_STEM_BYTES_MAX {
            return refuse("it is too long once escaped for a file name");
        }
    }
    Ok(stem)
}

pub(crate) fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn manifest_json(tensor: &TensorRef) -> serde_json::Value {
    serde_json::json!({
        "version": MANIFEST_VERSION,
        "name": tensor.name,
        "dtype": tensor.dtype,
        "dims": tensor.dims,
        "bytes": tensor.bytes,
        "sha256": hex(&tensor.sha256),
    })
}

/// The manifest, or `None` if it is missing, too large or not JSON (all mean "not cached").
fn read_manifest(path: &Path) -> Result<Option<serde_json::Value>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open", path)(e)),
    };
    let mut text = Vec::new();
    file.take(MANIFEST_BYTES_MAX + 1).read_to_end(&mut text).map_err(io_error("read", path))?;
    if text.len() as u64 > MANIFEST_BYTES_MAX {
        return Ok(None);
    }
    Ok(serde_json::from_slice(&text).ok())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(io_error("create", path))?;
    file.write_all(bytes).map_err(io_error("write", path))?;
    file.sync_all().map_err(io_error("sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    use potluck_engine::kv_cache::SequenceCache;
    use potluck_engine::arch::{slice_tensor_names, ModelSlice};
    use potluck_engine::backend::Backend;
    use potluck_engine::gguf::GgufModel;
    use potluck_engine::profile::ModelProfile;
    use potluck_engine::quant::dtype::ggml_dtype_id;
    use potluck_engine::random_gguf::{LayerDTypes, ModelShape, RandomGguf};
    use potluck_engine::source::GgufFileSource;

    const MODEL: [u8; 32] = [7; 32];

    /// A fresh directory per test (tests run in parallel threads of one process).
    fn temp_root(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("potluck-slice-cache-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sha(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    /// Deterministic bytes, so failures reproduce.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    }

    /// An F32 vector tensor of `n_floats` elements and its data.
    fn f32_tensor(name: &str, n_floats: usize, seed: u64) -> (TensorRef, Vec<u8>) {
        let data = bytes(n_floats * 4, seed);
        let tensor = TensorRef { name: name.into(), dtype: 0, dims: vec![n_floats as u64], bytes: data.len() as u64, sha256: sha(&data) };
        (tensor, data)
    }

    fn put(cache: &SliceCache, model: &[u8; 32], tensor: &TensorRef, data: &[u8], chunk_bytes: usize) {
        let mut writer = cache.begin(model, tensor).unwrap();
        for (i, chunk) in data.chunks(chunk_bytes).enumerate() {
            writer.write_chunk((i * chunk_bytes) as u64, chunk, &sha(chunk)).unwrap();
        }
        writer.finish().unwrap();
    }

    /// What a `TensorSource` returns.
    type Loaded = potluck_engine::error::Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>>;

    fn read_back(cache: &SliceCache, model: [u8; 32], tensor: &TensorRef) -> Loaded {
        CachedSliceSource::new(cache.clone(), model, std::slice::from_ref(tensor)).tensor(&tensor.name)
    }

    #[test]
    fn shuffled_chunks_are_assembled_and_read_back() {
        let cache = SliceCache::open(temp_root("shuffled")).unwrap();
        let (tensor, data) = f32_tensor("blk.0.attn_norm.weight", 2500, 1);
        let chunk = 700;
        let mut order: Vec<usize> = (0..data.len().div_ceil(chunk)).collect();
        // A fixed permutation: odd indices backwards, then even ones.
        order.sort_by_key(|&i| (i % 2 == 0, std::cmp::Reverse(i)));
        let mut writer = cache.begin(&MODEL, &tensor).unwrap();
        for (n, &i) in order.iter().enumerate() {
            assert!(!writer.is_complete());
            let part = &data[i * chunk..((i + 1) * chunk).min(data.len())];
            writer.write_chunk((i * chunk) as u64, part, &sha(part)).unwrap();
            if n == 3 {
                // A retransmitted chunk is harmless.
                writer.write_chunk((i * chunk) as u64, part, &sha(part)).unwrap();
            }
        }
        assert!(writer.is_complete());
        assert!(writer.missing_ranges().is_empty());
        assert!(!cache.has_verified(&MODEL, &tensor).unwrap(), "not visible before finish");
        writer.finish().unwrap();
        assert!(cache.has_verified(&MODEL, &tensor).unwrap());
        let (dtype, dims, got) = read_back(&cache, MODEL, &tensor).unwrap().unwrap();
        assert_eq!((dtype, dims), (GgmlDType::F32, vec![2500]));
        assert_eq!(got, data);
        // Another model with the same tensor name is a different entry.
        assert!(!cache.has_verified(&[8; 32], &tensor).unwrap());
        let _ = fs::remove_dir_all(cache.root());
    }

    #[test]
    fn corrupt_chunk_is_rejected_by_offset_and_nothing_is_persisted() {
        let cache = SliceCache::open(temp_root("corrupt-chunk")).unwrap();
        let (tensor, data) = f32_tensor("output_norm.weight", 256, 2);
        let mut writer = cache.begin(&MODEL, &tensor).unwrap();
        writer.write_chunk(0, &data[..512], &sha(&data[..512])).unwrap();
        let mut bad = data[512..].to_vec();
        bad[10] ^= 1;
        match writer.write_chunk(512, &bad, &sha(&data[512..])) {
            Err(SliceCacheError::ChunkHashMismatch { offset: 512, .. }) => {}
            other => panic!("expected ChunkHashMismatch at 512, got {other:?}"),
        }
        assert_eq!(writer.missing_ranges(), vec![512..1024]);
        assert!(matches!(writer.finish(), Err(SliceCacheError::Incomplete { received: 512, expected: 1024, .. })));
        assert!(!cache.has_verified(&MODEL, &tensor).unwrap());

        // Re-requesting the chunk completes the tensor.
        let mut writer = cache.begin(&MODEL, &tensor).unwrap();
        writer.write_chunk(512, &data[512..], &sha(&data[512..])).unwrap();
        writer.write_chunk(0, &data[..512], &sha(&data[..512])).unwrap();
        writer.finish().unwrap();
        assert!(cache.has_verified(&MODEL, &tensor).unwrap());
        let _ = fs::remove_dir_all(cache.root());
    }

    #[test]
    fn chunks_that_match_but_assemble_wrong_are_not_kept() {
        let cache = SliceCache::open(temp_root("whole-mismatch")).unwrap();
        let (mut tensor, data) = f32_tensor("blk.1.ffn_norm.weight", 64, 3);
        tensor.sha256[0] ^= 1;
        let mut writer = cache.begin(&MODEL, &tensor).unwrap();
        writer.write_chunk(0, &data, &sha(&data)).unwrap();
        assert!(matches!(writer.finish(), Err(SliceCacheError::TensorHashMismatch { .. })));
        assert!(!cache.has_verified(&MODEL, &tensor).unwrap());
        let dir = cache.root().join(hex(&MODEL));
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "nothing left behind: {left:?}");
        let _ = fs::remove_dir_all(cache.root());
    }

    #[test]
    fn bad_chunks_and_descriptors_are_errors_not_panics() {
        let cache = SliceCache::open(temp_root("bad-chunks")).unwrap();
        let (tensor, data) = f32_tensor("token_embd.weight", 64, 4);
        let mut writer = cache.begin(&MODEL, &tensor).unwrap();
        assert!(matches!(writer.write_chunk(0, &[], &sha(&[])), Err(SliceCacheError::EmptyChunk { .. })));
        assert!(matches!(writer.write_chunk(250, &data[..10], &sha(&data[..10])), Err(SliceCacheError::ChunkOutOfRange { .. })));
        assert!(matches!(writer.write_chunk(u64::MAX, &data[..10], &sha(&data[..10])), Err(SliceCacheError::ChunkOutOfRange { .. })));
        writer.write_chunk(0, &data[..100], &sha(&data[..100])).unwrap();
        assert!(matches!(writer.write_chunk(50, &data[50..150], &sha(&data[50..150])), Err(SliceCacheError::ChunkOverlaps { .. })));
        drop(writer);

        let big = vec![0u8; CHUNK_BYTES_MAX as usize + 1];
        let (huge_tensor, _) = f32_tensor("x", 0, 0);
        let huge_tensor = TensorRef { dims: vec![big.len() as u64 * 2], bytes: big.len() as u64 * 8, ..huge_tensor };
        let mut writer = cache.begin(&MODEL, &huge_tensor).unwrap();
        assert!(matches!(writer.write_chunk(0, &big, &sha(&big)), Err(SliceCacheError::ChunkTooLarge { .. })));
        drop(writer);

        let too_big = TensorRef { dims: vec![TENSOR_BYTES_MAX], bytes: TENSOR_BYTES_MAX * 4, ..tensor.clone() };
        assert!(matches!(cache.begin(&MODEL, &too_big), Err(SliceCacheError::TensorTooLarge { .. })));
        let wrong_shape = TensorRef { dims: vec![65], ..tensor.clone() };
        assert!(matches!(cache.begin(&MODEL, &wrong_shape), Err(SliceCacheError::ShapeMismatch { .. })));
        let overflow = TensorRef { dims: vec![u64::MAX, 2], ..tensor.clone() };
        assert!(matches!(cache.begin(&MODEL, &overflow), Err(SliceCacheError::ShapeMismatch { .. })));
        let unknown = TensorRef { dtype: 99, ..tensor.clone() };
        assert!(matches!(cache.begin(&MODEL, &unknown), Err(SliceCacheError::UnknownDType { dtype: 99, .. })));
        let _ = fs::remove_dir_all(cache.root());
    }

    #[test]
    fn damaged_file_on_disk_is_detected_and_refetched() {
        let cache = SliceCache::open(temp_root("damaged")).unwrap();
        let (tensor, data) = f32_tensor("blk.2.attn_q.weight", 1024, 5);
        put(&cache, &MODEL, &tensor, &data, 1000);
        assert!(cache.has_verified(&MODEL, &tensor).unwrap());
        let path = cache.paths(&MODEL, &tensor.name).unwrap().data;

        // Truncated (a power cut, a full disk).
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(data.len() as u64 - 1).unwrap();
        drop(file);
        assert!(!cache.has_verified(&MODEL, &tensor).unwrap());
        assert!(read_back(&cache, MODEL, &tensor).is_err());

        // Right length, one bit flipped.
        put(&cache, &MODEL, &tensor, &data, 4096);
        let mut damaged = data.clone();
        damaged[777] ^= 0x10;
        fs::write(&path, &damaged).unwrap();
        assert!(!cache.has_verified(&MODEL, &tensor).unwrap());
        assert!(read_back(&cache, MODEL, &tensor).is_err());

        // Missing manifest.
        put(&cache, &MODEL, &tensor, &data, 4096);
        fs::remove_file(cache.paths(&MODEL, &tensor.name).unwrap().manifest).unwrap();
        assert!(!cache.has_verified(&MODEL, &tensor).unwrap());

        // Fetching it again repairs it.
        put(&cache, &MODEL, &tensor, &data, 333);
        assert!(cache.has_verified(&MODEL, &tensor).unwrap());
        assert_eq!(read_back(&cache, MODEL, &tensor).unwrap().unwrap().2, data);
        let _ = fs::remove_dir_all(cache.root());
    }

    #[test]
    fn names_cannot_escape_the_model_directory() {
        let root = temp_root("traversal");
        let cache = SliceCache::open(root.join("cache")).unwrap();
        for name in ["..", "../evil", "a/../../evil", ".hidden", "", "a\0b", "blk..0"] {
            let (tensor, _) = f32_tensor(name, 4, 6);
            assert!(
                matches!(cache.begin(&MODEL, &tensor), Err(SliceCacheError::InvalidTensorName { .. })),
                "{name:?} must be refused"
            );
            assert!(cache.has_verified(&MODEL, &tensor).is_err());
        }
        // Separators are escaped, so these stay inside the model directory as plain files.
        for name in ["a/b", "/etc/passwd", "a\\b", "C:evil"] {
            let stem = escape_tensor_name(name).unwrap();
            assert!(!stem.contains(['/', '\\', ':']), "{name:?} → {stem:?}");
            let (tensor, data) = f32_tensor(name, 4, 7);
            put(&cache, &MODEL, &tensor, &data, 16);
            assert!(cache.has_verified(&MODEL, &tensor).unwrap());
            assert_eq!(cache.paths(&MODEL, name).unwrap().data.parent().unwrap(), cache.root().join(hex(&MODEL)));
        }
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1, "nothing written beside the cache");
        assert_eq!(escape_tensor_name("blk.10.ffn_down.weight").unwrap(), "blk.10.ffn_down.weight");
        // Case is kept apart even on case-insensitive filesystems.
        assert_ne!(escape_tensor_name("A").unwrap().to_lowercase(), escape_tensor_name("a").unwrap());
        assert!(escape_tensor_name(&"x".repeat(FILE_STEM_BYTES_MAX + 1)).is_err());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn eviction_removes_least_recently_used_until_under_budget() {
        let cache = SliceCache::open(temp_root("evict")).unwrap();
        let other: [u8; 32] = [9; 32];
        let now = SystemTime::now();
        let mut tensors = Vec::new();
        for i in 0..4u64 {
            let (tensor, data) = f32_tensor(&format!("blk.{i}.attn_norm.weight"), 250, 10 + i);
            put(&cache, &MODEL, &tensor, &data, 512);
            // Oldest first: tensor 0 was used longest ago.
            let path = cache.paths(&MODEL, &tensor.name).unwrap().data;
            let age = std::time::Duration::from_secs(1000 - 100 * i);
            File::options().write(true).open(&path).unwrap().set_modified(now - age).unwrap();
            tensors.push(tensor);
        }
        let (protected, data) = f32_tensor("output.weight", 250, 20);
        put(&cache, &other, &protected, &data, 512);
        let path = cache.paths(&other, &protected.name).unwrap().data;
        File::options().write(true).open(&path).unwrap().set_modified(now - std::time::Duration::from_secs(5000)).unwrap();
        // Stray files that are not ours are left alone.
        fs::write(cache.root().join("notes.txt"), b"keep me").unwrap();

        let entry = |t: &TensorRef, m: &[u8; 32]| {
            let p = cache.paths(m, &t.name).unwrap();
            fs::metadata(&p.data).unwrap().len() + fs::metadata(&p.manifest).unwrap().len()
        };
        let total: u64 = tensors.iter().map(|t| entry(t, &MODEL)).sum::<u64>() + entry(&protected, &other);
        let budget = total - entry(&tensors[0], &MODEL) - 1;
        let report = cache.evict_to_budget(budget, &[other]).unwrap();
        assert_eq!(report.removed_tensors, 2, "{report:?}");
        assert!(report.remaining_bytes <= budget);
        assert!(!cache.has_verified(&MODEL, &tensors[0]).unwrap());
        assert!(!cache.has_verified(&MODEL, &tensors[1]).unwrap());
        assert!(cache.has_verified(&MODEL, &tensors[2]).unwrap());
        assert!(cache.has_verified(&MODEL, &tensors[3]).unwrap());
        assert!(cache.has_verified(&other, &protected).unwrap(), "protected model survives though oldest");
        assert!(cache.root().join("notes.txt").exists());

        // A budget of zero empties all but the protected model.
        let report = cache.evict_to_budget(0, &[other]).unwrap();
        assert_eq!(report.removed_tensors, 2);
        assert_eq!(report.remaining_bytes, entry(&protected, &other));
        assert!(!cache.root().join(hex(&MODEL)).exists(), "empty model directory removed");

        cache.remove_model(&other).unwrap();
        cache.remove_model(&other).unwrap();
        assert!(!cache.has_verified(&other, &protected).unwrap());
        let _ = fs::remove_dir_all(cache.root());
    }

    // A tiny llama GGUF from the engine's random-weight writer, trimmed to two layers of
    // two block formats (a K-quant among them) and an untied head.
    const N_LAYERS: u32 = 2;
    const VOCAB: usize = 320;

    fn write_tiny_gguf(path: &Path) {
        let shape = ModelShape { n_layers: N_LAYERS, ..ModelShape::tiny() };
        assert_eq!(shape.vocab_size, VOCAB);
        let mut model = RandomGguf::new(shape, GgmlDType::Q8_0, 1);
        model.dtypes.layers = vec![LayerDTypes::uniform(GgmlDType::Q4K), LayerDTypes::uniform(GgmlDType::Q8_0)];
        model.dtypes.output = GgmlDType::Q4_0;
        model.write(path).unwrap();
    }

    fn logits(slice: &ModelSlice) -> Vec<f32> {
        let mut cache: SequenceCache = slice.new_cache(64);
        let tokens = [5u32, 17, 300, 42, 7];
        let mut hidden = slice.embed(&tokens).unwrap();
        slice.forward_layers(&mut hidden, &[tokens.len()], &mut [&mut cache]).unwrap();
        slice.head(&hidden).unwrap()
    }

    #[test]
    fn slice_loaded_from_cache_gives_the_file_s_logits() {
        let root = temp_root("gguf");
        let path = root.join("tiny.gguf");
        write_tiny_gguf(&path);
        let model = GgufModel::open(&path).unwrap();
        let profile = ModelProfile::from_model(&model).unwrap();
        // What the coordinator would send: each tensor of the slice, with GGUF's dims order.
        let names = slice_tensor_names(&profile, 0..N_LAYERS);
        let mut file_source = GgufFileSource::new(&model).unwrap();
        let cache = SliceCache::open(root.join("cache")).unwrap();
        let model_hash = sha(&fs::read(&path).unwrap());
        let mut descriptors = Vec::new();
        for name in &names {
            let (dtype, dims, data) = file_source.tensor(name).unwrap().unwrap();
            let tensor = TensorRef {
                name: name.clone(),
                dtype: ggml_dtype_id(dtype),
                dims: dims.iter().rev().map(|&d| d as u64).collect(),
                bytes: data.len() as u64,
                sha256: sha(&data),
            };
            assert!(!cache.has_verified(&model_hash, &tensor).unwrap());
            put(&cache, &model_hash, &tensor, &data, 4096);
            descriptors.push(tensor);
        }
        assert!(descriptors.iter().all(|t| cache.has_verified(&model_hash, t).unwrap()));

        let backend = Backend::cpu(1);
        let from_file = ModelSlice::load(&path, 0..N_LAYERS, backend.clone()).unwrap();
        let mut source = CachedSliceSource::new(cache.clone(), model_hash, &descriptors);
        let from_cache = ModelSlice::from_source(profile, 0..N_LAYERS, &mut source, backend).unwrap();
        let expected = logits(&from_file);
        let got = logits(&from_cache);
        assert_eq!(expected.len(), VOCAB * 5);
        assert!(expected.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "logits differ");
        let _ = fs::remove_dir_all(&root);
    }
}
