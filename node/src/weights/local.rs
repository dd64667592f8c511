//! A worker's own copy of the model (`worker join --model PATH`): its slice is read from that
//! file instead of crossing the LAN, once the file is shown to hold the coordinator's bytes.
//!
//! **Which file:** PATH, or the GGUFs of the directory PATH ([`local_model_files`]); the one
//! whose model hash (its length and header, [`WeightServer::model_hash`]) equals the
//! assignment's.
//!
//! **The same bytes, tensor by tensor:** a header says little about the weights (a
//! fine-tune may keep every key), so every tensor of the slice must have the assignment's
//! type, dims, size and SHA-256 — the check a slice fetched over the network passes. The
//! local file is read through the same [`WeightServer`] the coordinator serves from, so both
//! sides describe a tensor with one piece of code.
//!
//! **Not hashed at every start:** the hashes persist in the worker's hash store, keyed by the
//! file's length and modification time, exactly as the coordinator's do: a restart on the
//! same file reads no tensor to check it (hashing runs at about 1 GB/s, so a 14 GB slice of a
//! 70B model would otherwise cost a quarter of a minute at every start). The trust this
//! takes: a file whose bytes change keeps neither its modification time nor (for a copy
//! over it) its store entry, which is how every edit, copy and download lands.
//!
//! **Otherwise:** a file that is not the coordinator's model is named with the reason, and the
//! slice comes over QUIC as without `--model`; nothing is loaded from a file that failed.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::quantized::GgmlDType;
use potluck_engine::profile::ModelProfile;
use potluck_engine::source::TensorSource;
use potluck_engine::EngineError;
use potluck_protocol::TensorRef;

use super::serve::WeightServer;
use super::slice_cache::{engine_shape, hex};
use crate::model::local_model_files;

/// The GGUF files this worker offers, opened (their headers read) once at start-up so that a
/// bad `--model` is reported before joining.
#[derive(Debug)]
pub struct LocalModels {
    servers: Vec<Arc<WeightServer>>,
}

/// What [`LocalModels::check`] found for one assignment.
pub enum LocalCheck {
    /// Every tensor of the slice is in this file with the coordinator's bytes.
    Verified {
        source: LocalSliceSource,
        path: PathBuf,
        /// Tensors read to hash them now (zero when the hash store knew them all).
        tensors_hashed: u64,
    },
    /// No offered file holds the coordinator's model: why, file by file.
    NotThisModel(String),
}

impl LocalModels {
    /// Opens PATH (a GGUF file or a directory of them). With `hash_store`, tensor hashes
    /// persist there across restarts. Errors: PATH missing, a directory without GGUFs, a file
    /// that is not a readable GGUF (each names the file).
    pub fn open(path: &Path, hash_store: Option<&Path>) -> Result<Self> {
        let mut servers = Vec::new();
        for file in local_model_files(path)? {
            let server = WeightServer::open(&file)
                .with_context(|| format!("--model {}: cannot use {}", path.display(), file.display()))?;
            let server = match hash_store {
                Some(store) => server.with_hash_store(store),
                None => server,
            };
            servers.push(Arc::new(server));
        }
        Ok(Self { servers })
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.servers.iter().map(|s| s.path())
    }

    /// Finds the file holding the coordinator's model and checks every tensor of the slice
    /// (`refs`, the assignment's, for `layers` of `profile`) against it. Blocking: the first
    /// check of a file hashes the slice's tensors.
    pub fn check(&self, model_hash: &[u8; 32], profile: &ModelProfile, layers: Range<u32>, refs: &[TensorRef]) -> LocalCheck {
        let Some(server) = self.servers.iter().find(|s| s.model_hash() == *model_hash) else {
            let files: Vec<String> = self.paths().map(|p| p.display().to_string()).collect();
            return LocalCheck::NotThisModel(format!(
                "{} {} not the coordinator's model (a different header or length: another model, quantization or version)",
                files.join(", "),
                if files.len() == 1 { "is" } else { "are" }
            ));
        };
        let hashed_before = server.tensors_hashed();
        let local = match server.slice_refs(profile, layers) {
            Ok(local) => local,
            Err(e) => return LocalCheck::NotThisModel(format!("{}: {e:#}", server.path().display())),
        };
        if let Some(difference) = first_difference(&local, refs) {
            return LocalCheck::NotThisModel(format!(
                "{} has the coordinator's header but not its weights: {difference} (a fine-tune that kept the header, or a file changed on disk)",
                server.path().display()
            ));
        }
        LocalCheck::Verified {
            source: LocalSliceSource { server: server.clone(), tensors: refs.iter().map(|t| (t.name.clone(), t.clone())).collect() },
            path: server.path().to_path_buf(),
            tensors_hashed: server.tensors_hashed() - hashed_before,
        }
    }
}

/// The first tensor that differs between the local file's description and the
/// coordinator's, in words.
fn first_difference(local: &[TensorRef], theirs: &[TensorRef]) -> Option<String> {
    if local.len() != theirs.len() {
        return Some(format!("the slice has {} tensors here, {} on the coordinator", local.len(), theirs.len()));
    }
    local.iter().zip(theirs).find(|(a, b)| a != b).map(|(a, b)| {
        if a.name != b.name {
            format!("tensor `{}` here where the coordinator has `{}`", a.name, b.name)
        } else if (a.dtype, &a.dims, a.bytes) != (b.dtype, &b.dims, b.bytes) {
            format!("tensor `{}` is type {} {:?} here, type {} {:?} on the coordinator", a.name, a.dtype, a.dims, b.dtype, b.dims)
        } else {
            format!("tensor `{}` has SHA-256 {} here, {} on the coordinator", a.name, &hex(&a.sha256)[..12], &hex(&b.sha256)[..12])
        }
    })
}

/// A verified slice read straight from the worker's model file.
pub struct LocalSliceSource {
    server: Arc<WeightServer>,
    tensors: HashMap<String, TensorRef>,
}

impl TensorSource for LocalSliceSource {
    fn tensor(&mut self, name: &str) -> potluck_engine::error::Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>> {
        let Some(tensor) = self.tensors.get(name) else {
            return Ok(None);
        };
        let (dtype, dims) = engine_shape(tensor).map_err(|e| EngineError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let bytes = self
            .server
            .read_tensor(name)
            .map_err(|e| EngineError::Io(std::io::Error::other(format!("{e:#}"))))?;
        Ok(Some((dtype, dims, bytes)))
    }
}
