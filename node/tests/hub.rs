//! Models by name, with the real download code: `hf:` against a local server that speaks the
//! hub's protocol (tests/e2e/fake_hf_hub.py: the file list, the resolve redirect with the LFS
//! sha256, range requests, gated repositories), and `ollama:` against a store laid out as
//! Ollama lays it out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use potluck_node::hub::{HubClient, HubModel, OllamaModel};

struct Server {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("potluck-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn serve(root: &Path) -> Server {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/fake_hf_hub.py");
    let (port_file, log) = (root.join(".port"), root.join(".log"));
    let child = Command::new("python3").arg(script).arg(root).arg(&port_file).arg(&log).spawn().expect("python3");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(port) = std::fs::read_to_string(&port_file) {
            return Server { child, endpoint: format!("http://127.0.0.1:{port}"), log };
        }
        assert!(Instant::now() < deadline, "the fake hub did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic bytes that are not all alike (so a cut or shifted download shows).
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(seed as u32 % 31) as u8 ^ seed).collect()
}

fn put(root: &Path, repo: &str, file: &str, data: &[u8]) {
    let path = root.join(repo).join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn client(endpoint: &str, cache: &Path, token: Option<&str>) -> HubClient {
    HubClient { endpoint: endpoint.to_string(), token: token.map(str::to_string), cache: cache.to_path_buf(), progress: false }
}

fn fetch(client: &HubClient, name: &str) -> anyhow::Result<PathBuf> {
    client.fetch(&HubModel::parse(name).unwrap())
}

#[test]
fn hub_downloads_resume_verify_and_are_cached() {
    let root = temp("root");
    let cache = temp("cache");
    let q4 = bytes(3 << 20, 1);
    let q8 = bytes(5 << 20, 2);
    put(&root, "org/tiny-GGUF", "tiny-Q4_K_M.gguf", &q4);
    put(&root, "org/tiny-GGUF", "tiny-Q8_0.gguf", &q8);
    put(&root, "org/tiny-GGUF", "README.md", b"# tiny");
    // The first download breaks off after 1 MiB, as a dropped connection would.
    std::fs::write(root.join(".cut-after"), (1 << 20).to_string()).unwrap();
    let hub = serve(&root);
    let c = client(&hub.endpoint, &cache, None);

    let error = fetch(&c, "org/tiny-GGUF").unwrap_err().to_string();
    assert!(error.contains("resume"), "{error}");
    let partial = cache.join("hub/org--tiny-GGUF/tiny-Q4_K_M.gguf.part");
    let have = std::fs::metadata(&partial).expect("the partial download is kept").len();
    assert!(have >= 1 << 20 && have < q4.len() as u64, "{have}");
    // Run again: it resumes with a range request and checks the whole file's sha256.
    let path = fetch(&c, "org/tiny-GGUF").unwrap();
    assert_eq!(path, cache.join("hub/org--tiny-GGUF/tiny-Q4_K_M.gguf"), "Q4_K_M is the default");
    assert_eq!(std::fs::read(&path).unwrap(), q4);
    assert!(!partial.exists());
    let log = std::fs::read_to_string(&hub.log).unwrap();
    assert!(log.contains(&format!("range=bytes={have}-")), "the second download asked for the rest only:\n{log}");
    assert!(log.lines().any(|l| l.starts_with("HEAD /org/tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf")), "{log}");

    // A named quantization, and a named file.
    assert_eq!(std::fs::read(fetch(&c, "org/tiny-GGUF:q8_0").unwrap()).unwrap(), q8);
    assert_eq!(fetch(&c, "org/tiny-GGUF/tiny-Q8_0.gguf").unwrap(), cache.join("hub/org--tiny-GGUF/tiny-Q8_0.gguf"));

    // Clear refusals.
    let missing = fetch(&c, "org/tiny-GGUF:Q2_K").unwrap_err().to_string();
    assert!(missing.contains("no Q2_K file") && missing.contains("tiny-Q8_0.gguf"), "{missing}");
    let nowhere = fetch(&c, "org/nope").unwrap_err().to_string();
    assert!(nowhere.contains("does not exist"), "{nowhere}");

    // A download whose bytes do not match the hub's sha256 is deleted, not cached.
    put(&root, "org/broken", "b.gguf", &bytes(4096, 3));
    put(&root, "org/broken", ".etag-b.gguf", "0".repeat(64).as_bytes());
    let corrupt = fetch(&c, "org/broken").unwrap_err().to_string();
    assert!(corrupt.contains("corrupt"), "{corrupt}");
    assert!(!cache.join("hub/org--broken/b.gguf").exists() && !cache.join("hub/org--broken/b.gguf.part").exists());

    // A gated repository: a token is needed, and the right one.
    put(&root, "org/gated", "g-Q4_0.gguf", &bytes(4096, 4));
    put(&root, "org/gated", ".gated", b"hf_secret");
    let refused = fetch(&c, "org/gated").unwrap_err().to_string();
    assert!(refused.contains("HF_TOKEN"), "{refused}");
    let wrong = fetch(&client(&hub.endpoint, &cache, Some("hf_wrong")), "org/gated").unwrap_err().to_string();
    assert!(wrong.contains("refused HF_TOKEN"), "{wrong}");
    assert!(fetch(&client(&hub.endpoint, &cache, Some("hf_secret")), "org/gated").is_ok());
    let log = std::fs::read_to_string(&hub.log).unwrap();
    assert!(log.lines().filter(|l| l.contains("/cdn/")).all(|l| l.ends_with("auth=no")), "the token never goes to the file store:\n{log}");

    // Offline: a cached model needs no hub.
    drop(hub);
    let offline = client("http://127.0.0.1:9", &cache, None);
    assert_eq!(std::fs::read(fetch(&offline, "org/tiny-GGUF:Q8_0").unwrap()).unwrap(), q8);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&cache);
}

/// An Ollama store as `ollama pull` leaves it: the manifest names the model layer's blob,
/// which is served where it lies.
#[test]
fn ollama_models_are_read_from_the_store_in_place() {
    let store = temp("ollama");
    let data = bytes(8192, 5);
    let hex = potluck_node::model::sha256_bytes(&data);
    std::fs::create_dir_all(store.join("blobs")).unwrap();
    let blob = store.join("blobs").join(format!("sha256-{hex}"));
    std::fs::write(&blob, &data).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": format!("sha256:{}", "1".repeat(64)), "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": format!("sha256:{}", "2".repeat(64)), "size": 10},
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": data.len()},
        ]
    });
    let dir = store.join("manifests/registry.ollama.ai/library/tiny");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("q8"), manifest.to_string()).unwrap();
    assert_eq!(OllamaModel::parse("tiny:q8").unwrap().locate(&store).unwrap(), blob);
    let missing = OllamaModel::parse("tiny").unwrap().locate(&store).unwrap_err().to_string();
    assert!(missing.contains("ollama pull tiny:latest") && missing.contains("its tags: q8"), "{missing}");
    std::fs::write(&blob, &data[..100]).unwrap();
    let short = OllamaModel::parse("tiny:q8").unwrap().locate(&store).unwrap_err().to_string();
    assert!(short.contains("manifest says 8192"), "{short}");
    let _ = std::fs::remove_dir_all(&store);
}
