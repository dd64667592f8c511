//! End-to-end: a real `coordinator serve` process on a loopback port chosen by the OS, driven
//! by the official `openai` Python client (tests/e2e/openai_client_test.py), plus the API key.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A coordinator process that is killed when the test ends, pass or fail.
struct Server {
    child: Child,
    base_url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model_path() -> PathBuf {
    let path = std::env::var_os("POTLUCK_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "model missing at {}: run `coordinator fetch-model` or set POTLUCK_MODEL", path.display());
    path
}

static NEXT_SERVER: AtomicUsize = AtomicUsize::new(0);

fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cluster-listen", "127.0.0.1:0", "--threads", "1", "--model"])
        .arg(model_path())
        .args(extra)
        // One config directory per server: the tests run at once, and each node's key and
        // token are its own.
        .env("POTLUCK_CONFIG_DIR", std::env::temp_dir().join(format!("potluck-openai-e2e-{}-{}", std::process::id(), NEXT_SERVER.fetch_add(1, Ordering::Relaxed))))
        .env_remove("POTLUCK_API_KEY")
        .env_remove("POTLUCK_TOKEN")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the coordinator");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let base_url = loop {
        let line = lines.next().expect("the coordinator exited before serving").unwrap();
        if let Some(rest) = line.split(" on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, base_url }
}

fn run_client(server: &Server, api_key: Option<&str>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/openai_client_test.py");
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/smollm2-q4_1-llamacpp.json");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(&server.base_url).arg(reference);
    if let Some(key) = api_key {
        cmd.arg(key);
    }
    let status = cmd.status().expect("running python3 (install it and `pip install openai`)");
    assert!(status.success(), "the openai client checks failed (see above)");
}

#[test]
fn openai_client_against_a_real_coordinator() {
    let server = start(&[]);
    run_client(&server, None);
}

#[test]
fn api_key_is_required_when_set() {
    let server = start(&["--api-key", "sesame"]);
    let status_of = |auth: Option<&str>| {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", "import sys,urllib.request as u\nr=u.Request(sys.argv[1]+'/v1/models')\nif len(sys.argv)>2: r.add_header('Authorization','Bearer '+sys.argv[2])\ntry: print(u.urlopen(r).status)\nexcept Exception as e: print(e.code)"]);
        cmd.arg(&server.base_url);
        if let Some(a) = auth {
            cmd.arg(a);
        }
        String::from_utf8(cmd.output().unwrap().stdout).unwrap().trim().to_owned()
    };
    assert_eq!(status_of(None), "401");
    assert_eq!(status_of(Some("wrong")), "401");
    assert_eq!(status_of(Some("sesame")), "200");
    // The whole client suite also passes with the key.
    run_client(&server, Some("sesame"));
}

/// schemathesis (from PyPI) generates requests from /openapi.json: no response may be a server
/// error (5xx) or break the documented schema. Bounded: a fixed seed, few examples per
/// operation, and a 128-token context so no generated request can run long enough to hit the
/// request timeout while other tests share the two cores (a 512-token context once did).
#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let server = start(&["--ctx-size", "128"]);
    let status = Command::new("schemathesis")
        .args(["run", &format!("{}/openapi.json", server.base_url)])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--max-examples", "8", "--seed", "20261125", "--request-timeout", "120"])
        .env("SCHEMATHESIS_HOOKS", "")
        .status()
        .expect("running schemathesis (`pip install schemathesis`)");
    assert!(status.success(), "schemathesis found a failure (see above)");
}
