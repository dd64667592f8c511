//! `coordinator serve` refuses, before loading anything, to open its API to the network
//! without a key: a clear error and a failing exit, not a server anyone can use.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn an_open_listen_address_without_an_api_key_is_refused() {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        // A model path that does not exist: the refusal must come before any loading.
        .args(["serve", "--no-cluster", "--listen", "0.0.0.0:0", "--model", "/nonexistent/model.gguf"])
        .env_remove("POTLUCK_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it served: {stderr}");
    for needle in ["--api-key", "--allow-open", "0.0.0.0:0"] {
        assert!(stderr.contains(needle), "the refusal should name {needle}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "refused only after {:?}", started.elapsed());
}
