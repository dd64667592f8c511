//! The node's long-lived identity: an ed25519 key pair whose public half, as a libp2p
//! [`PeerId`], is the node id used everywhere (the protocol's `Hello::node_id`, membership,
//! logs, the dashboard).
//!
//! What it defends: the node id is not a name a node claims but a key it proves it holds.
//! Every QUIC handshake ([`super::tls`]) carries a certificate signed by this key, so a
//! machine on the LAN cannot take over another node's id (and with it its membership, its
//! layer range or the coordinator's role) without stealing the key file. The key survives
//! restarts so a restarted worker is recognised as the same node.
//!
//! The key file holds the key pair in libp2p's protobuf encoding (the format libp2p tools
//! read and write), readable by its owner only (mode 0600 on unix).

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use libp2p_identity::{KeyType, Keypair, PeerId};

/// Environment variable that moves every key file (and other per-node state) out of the
/// OS config directory; tests and several nodes on one machine use it.
pub const CONFIG_DIR_ENV: &str = "POTLUCK_CONFIG_DIR";

/// A key file is about 70 bytes; anything much larger is not one of ours, and we refuse it
/// before reading it into memory.
pub const KEY_FILE_BYTES_MAX: u64 = 4096;

/// The node's key pair (always ed25519). Cloning copies the secret key; keep clones to what
/// needs them (the TLS configs).
#[derive(Clone)]
pub struct NodeIdentity {
    keypair: Keypair,
}

impl std::fmt::Debug for NodeIdentity {
    /// Only the public node id: the secret key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("NodeIdentity")
            .field(&self.node_id())
            .finish()
    }
}

impl NodeIdentity {
    /// A fresh random identity (from the OS's CSPRNG), not saved anywhere.
    pub fn generate() -> Self {
        Self {
            keypair: Keypair::generate_ed25519(),
        }
    }

    /// Loads the key file, or creates it (parent dirs created, file mode 0600 on unix) when
    /// absent. A corrupt or unreadable file is an error naming the path, never silently
    /// replaced: a new key would be a new node id, and the cluster would see a stranger.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        match Self::load(path) {
            Ok(identity) => Ok(identity),
            Err(LoadError::Absent) => Self::create(path),
            Err(LoadError::Other(e)) => Err(e),
        }
    }

    /// `$POTLUCK_CONFIG_DIR/<role>.key` if that variable is set (and not empty), else
    /// `<OS config dir>/potluck/<role>.key` (e.g. `~/.config/potluck/worker.key`); `None`
    /// when the OS has no config directory and the variable is unset.
    pub fn default_path(role: &str) -> Option<PathBuf> {
        let file = format!("{role}.key");
        match std::env::var_os(CONFIG_DIR_ENV) {
            Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir).join(file)),
            _ => dirs::config_dir().map(|dir| dir.join("potluck").join(file)),
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The peer id in base58: the node id used everywhere (protocol `Hello::node_id`, logs).
    pub fn node_id(&self) -> String {
        self.peer_id().to_base58()
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    fn load(path: &Path) -> Result<Self, LoadError> {
        let mut file = match fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(LoadError::Absent),
            Err(e) => {
                return Err(LoadError::Other(anyhow::Error::new(e).context(format!(
                    "cannot read the node key file {}",
                    path.display()
                ))))
            }
        };
        let result = (|| -> anyhow::Result<Self> {
            let len = file.metadata()?.len();
            if len > KEY_FILE_BYTES_MAX {
                bail!("it is {len} bytes, more than a key file ever is ({KEY_FILE_BYTES_MAX})");
            }
            warn_if_readable_by_others(path, &file);
            let mut bytes = Vec::with_capacity(len as usize);
            file.read_to_end(&mut bytes)?;
            let keypair = Keypair::from_protobuf_encoding(&bytes)
                .context("it does not hold a libp2p key pair")?;
            if keypair.key_type() != KeyType::Ed25519 {
                bail!(
                    "it holds a {:?} key; potluck node keys are ed25519",
                    keypair.key_type()
                );
            }
            Ok(Self { keypair })
        })();
        result.map_err(|e| {
            LoadError::Other(e.context(format!(
                "the node key file {} is unusable (move it away to give this node a new identity, \
                 which the cluster will see as a different node)",
                path.display()
            )))
        })
    }

    /// Writes a new key with [`create_private_file`]: if another process created `path`
    /// meanwhile, its key wins and we load that one, so two processes never run with
    /// different ids for one file.
    fn create(path: &Path) -> anyhow::Result<Self> {
        let identity = Self::generate();
        let bytes = identity
            .keypair
            .to_protobuf_encoding()
            .context("encoding the new node key")?;
        let created = create_private_file(path, &bytes)
            .with_context(|| format!("cannot create the node key file {}", path.display()))?;
        if !created {
            return Self::load(path).map_err(|e| match e {
                LoadError::Absent => {
                    anyhow::anyhow!("the node key file {} vanished while loading", path.display())
                }
                LoadError::Other(e) => e,
            });
        }
        tracing::info!(path = %path.display(), "created a new node identity");
        Ok(identity)
    }
}

/// Creates the secret file `path` holding `bytes`, readable by its owner only (parent
/// directories created, 0700 on unix), so that every other process sees either no file or
/// the whole one, never a half-written secret. Returns `Ok(false)`, writing nothing, when
/// `path` already exists, including when another process created it in the same instant
/// (two nodes started together with one config directory): the caller then reads that one.
///
/// The bytes go to a private temporary file beside `path` first, which is then hard-linked
/// into place (a link never replaces an existing file).
pub fn create_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        create_private_dirs(dir)?;
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}-{n}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    // A leftover of a process that crashed here with our pid (pid 1 in every container
    // start) would otherwise block creation forever.
    let _ = fs::remove_file(&temporary);
    write_private(&temporary, bytes)?;
    let outcome = match fs::hard_link(&temporary, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        // A file system without hard links: an atomic rename still never leaves a
        // half-written file behind (it could replace one created in the same instant).
        Err(_) => fs::rename(&temporary, path).map(|()| true),
    };
    let _ = fs::remove_file(&temporary);
    outcome
}

enum LoadError {
    Absent,
    Other(anyhow::Error),
}

/// Creates `dir` and its missing parents, readable by the owner only on unix (the key files
/// in it are secrets).
fn create_private_dirs(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `path` (which must not exist) with mode 0600 on unix from the start, so the key
/// is never readable by others, not even for an instant.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// A key file others can read is a key others may have copied: say so, but go on (the
/// owner may have reasons, e.g. a shared single-user container).
fn warn_if_readable_by_others(path: &Path, file: &fs::File) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = file.metadata() {
            let mode = metadata.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "the node key file is accessible to other users; `chmod 600` it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, file);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "potluck-identity-{name}-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn load_or_create_creates_then_reloads_the_same_node_id() {
        let dir = TempDir::new("reload");
        let path = dir.0.join("nested").join("deeper").join("worker.key");
        let created = NodeIdentity::load_or_create(&path).unwrap();
        assert!(path.exists());
        let loaded = NodeIdentity::load_or_create(&path).unwrap();
        assert_eq!(created.node_id(), loaded.node_id());
        assert_eq!(created.peer_id(), loaded.peer_id());
        assert_eq!(created.node_id(), created.peer_id().to_base58());
        // No temporary file is left beside the key.
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    /// Nodes started together with one config directory (a test harness, a service manager
    /// starting two roles) race to create the same files: every one of them must end up with
    /// the same key and the same join token, and none may read a half-written file.
    #[test]
    fn nodes_started_together_share_one_key_and_one_token() {
        use crate::net::token::JoinToken;
        for round in 0..20 {
            let dir = TempDir::new(&format!("race-{round}"));
            let key = dir.0.join("coordinator.key");
            let token = dir.0.join("join-token");
            // Each thread waits for all the others before it starts, then races to create
            // the file; a thread that fails panics, and its join fails the test.
            fn race<T: Send>(create: impl Fn() -> T + Sync) -> Vec<T> {
                let start = std::sync::Barrier::new(6);
                std::thread::scope(|scope| {
                    let handles: Vec<_> = (0..6)
                        .map(|_| {
                            scope.spawn(|| {
                                start.wait();
                                create()
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                })
            }
            let tokens = race(|| JoinToken::load_or_create(&token).unwrap().as_str().to_owned());
            let ids = race(|| NodeIdentity::load_or_create(&key).unwrap().node_id());
            let results: Vec<(String, String)> = ids.into_iter().zip(tokens).collect();
            assert!(results.windows(2).all(|w| w[0] == w[1]), "round {round}: {results:?}");
            let entries: Vec<_> = fs::read_dir(&dir.0).unwrap().collect();
            assert_eq!(entries.len(), 2, "only the key and the token remain");
            assert_eq!(
                JoinToken::load_or_create(&token).unwrap().as_str(),
                results[0].1,
                "a restart keeps the token"
            );
        }
    }

    #[test]
    fn generated_identities_differ() {
        assert_ne!(
            NodeIdentity::generate().node_id(),
            NodeIdentity::generate().node_id()
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("mode");
        let path = dir.0.join("potluck").join("coordinator.key");
        NodeIdentity::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {:o}", mode & 0o777);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o077, 0, "directory mode {:o}", dir_mode & 0o777);
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_naming_the_path_and_is_kept() {
        let dir = TempDir::new("corrupt");
        let path = dir.0.join("worker.key");
        fs::write(&path, b"not a key at all").unwrap();
        let error = NodeIdentity::load_or_create(&path).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("unusable"), "{message}");
        assert_eq!(
            fs::read(&path).unwrap(),
            b"not a key at all",
            "the file must not be replaced"
        );
    }

    #[test]
    fn an_oversized_key_file_is_refused_before_reading() {
        let dir = TempDir::new("huge");
        let path = dir.0.join("worker.key");
        fs::write(&path, vec![0u8; KEY_FILE_BYTES_MAX as usize + 1]).unwrap();
        let message = format!("{:#}", NodeIdentity::load_or_create(&path).unwrap_err());
        assert!(
            message.contains(&path.display().to_string()) && message.contains("more than"),
            "{message}"
        );
    }

    #[test]
    fn an_unreadable_key_path_is_an_error_naming_the_path() {
        let dir = TempDir::new("dir");
        // A directory where the file should be: opening succeeds on unix, reading fails.
        let path = dir.0.join("worker.key");
        fs::create_dir(&path).unwrap();
        let message = format!("{:#}", NodeIdentity::load_or_create(&path).unwrap_err());
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn default_path_ends_in_the_role_key() {
        // Only the shape: the environment is shared with other tests, so it is not changed.
        if let Some(path) = NodeIdentity::default_path("worker") {
            assert!(path.ends_with("worker.key"), "{}", path.display());
        }
    }

    #[test]
    fn debug_shows_the_node_id_only() {
        let identity = NodeIdentity::generate();
        assert_eq!(
            format!("{identity:?}"),
            format!("NodeIdentity({:?})", identity.node_id())
        );
    }
}
