//! A worker's own model file (`worker join --model`): found by its header, checked tensor by
//! tensor against the coordinator's hashes, then read without fetching; remembered hashes
//! make a restart read nothing to check; another model, or the same header over other
//! weights, is refused with the reason.

use std::path::{Path, PathBuf};

use potluck_engine::profile::ModelProfile;
use potluck_engine::random_gguf::RandomGguf;
use potluck_engine::source::TensorSource;
use potluck_node::weights::local::{LocalCheck, LocalModels};
use potluck_node::weights::serve::WeightServer;
use sha2::{Digest, Sha256};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("potluck-local-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn write(path: &Path, model: RandomGguf) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    model.write(path).unwrap();
}

#[test]
fn the_workers_copy_is_checked_tensor_by_tensor_and_read_without_fetching() {
    let dir = temp_dir("check");
    let coordinator_file = dir.0.join("coordinator/model.gguf");
    write(&coordinator_file, RandomGguf::tiny_mixed(1));
    let server = WeightServer::open(&coordinator_file).unwrap();
    let profile = ModelProfile::from_path(&coordinator_file).unwrap().0;
    let layers = 1..3;
    let refs = server.slice_refs(&profile, layers.clone()).unwrap();

    // The worker's copy, in a models directory beside another model.
    let models = dir.0.join("worker-models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(&coordinator_file, models.join("b-copy.gguf")).unwrap();
    let mut tied = RandomGguf::tiny_mixed(1);
    tied.tied_embeddings = true;
    write(&models.join("a-other.gguf"), tied);
    let store = dir.0.join("tensor-hashes");
    let local = LocalModels::open(&models, Some(&store)).unwrap();
    assert_eq!(local.paths().count(), 2);
    match local.check(&server.model_hash(), &profile, layers.clone(), &refs) {
        LocalCheck::Verified { mut source, path, tensors_hashed } => {
            assert_eq!(path, models.join("b-copy.gguf"));
            assert_eq!(tensors_hashed, refs.len() as u64, "the first check hashes the slice");
            for tensor in &refs {
                let (_, _, bytes) = source.tensor(&tensor.name).unwrap().unwrap();
                assert_eq!(<[u8; 32]>::from(Sha256::digest(&bytes)), tensor.sha256, "{}", tensor.name);
            }
            assert!(source.tensor("blk.0.attn_q.weight").unwrap().is_none(), "only the slice's tensors");
        }
        LocalCheck::NotThisModel(why) => panic!("the copy was refused: {why}"),
    }

    // A restart: the hashes come from the store; no tensor is read to check.
    let restarted = LocalModels::open(&models, Some(&store)).unwrap();
    match restarted.check(&server.model_hash(), &profile, layers.clone(), &refs) {
        LocalCheck::Verified { tensors_hashed, .. } => assert_eq!(tensors_hashed, 0),
        LocalCheck::NotThisModel(why) => panic!("refused after a restart: {why}"),
    }

    // Another model only: refused, named.
    let other_only = LocalModels::open(&models.join("a-other.gguf"), None).unwrap();
    let LocalCheck::NotThisModel(why) = other_only.check(&server.model_hash(), &profile, layers.clone(), &refs) else {
        panic!("another model was accepted")
    };
    assert!(why.contains("a-other.gguf") && why.contains("not the coordinator's model"), "{why}");

    // The same header over other weights: caught by a tensor's hash, which is named.
    let reseeded = dir.0.join("reseeded/model.gguf");
    write(&reseeded, RandomGguf::tiny_mixed(2));
    let reseeded = LocalModels::open(&reseeded, None).unwrap();
    let LocalCheck::NotThisModel(why) = reseeded.check(&server.model_hash(), &profile, layers, &refs) else {
        panic!("other weights under the same header were accepted")
    };
    assert!(why.contains("not its weights") && why.contains("SHA-256"), "{why}");
}

#[test]
fn a_bad_model_argument_fails_before_joining_with_the_reason() {
    let dir = temp_dir("bad");
    let error = LocalModels::open(&dir.0.join("absent.gguf"), None).unwrap_err();
    assert!(format!("{error:#}").contains("cannot open the model"), "{error:#}");
    let not_gguf = dir.0.join("notes.gguf");
    std::fs::write(&not_gguf, b"this is not a model").unwrap();
    let error = LocalModels::open(&not_gguf, None).unwrap_err();
    assert!(format!("{error:#}").contains("notes.gguf"), "{error:#}");
}
