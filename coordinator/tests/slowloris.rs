//! A client holding 1,100 connections open without finishing a request (slowloris) must not
//! make the API unreachable: the server raises its descriptor limit, serves others beside
//! them, and closes each after the header-read timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use potluck_coordinator::http::{connections_max, raise_descriptor_limit, HEADER_READ_TIMEOUT_MS};

/// What issue 18 measured locking the API out under `axum::serve`.
const HALF_OPEN_CONNECTIONS: usize = 1100;
/// Descriptors this test keeps for itself beside the held connections.
const CLIENT_DESCRIPTORS_RESERVED: u64 = 64;

fn model_path() -> PathBuf {
    let path = std::env::var_os("POTLUCK_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "model missing at {}: run `coordinator fetch-model` or set POTLUCK_MODEL", path.display());
    path
}

fn get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn half_open_connections_do_not_lock_others_out_and_are_closed_after_the_header_timeout() {
    // This client needs more than Linux's default 1,024 descriptors too. The server raises
    // its own limit the same way, to the same hard limit, so its cap is the one computed here.
    let limit = raise_descriptor_limit();
    let half_open = limit.map_or(HALF_OPEN_CONNECTIONS, |l| HALF_OPEN_CONNECTIONS.min(l.saturating_sub(CLIENT_DESCRIPTORS_RESERVED) as usize));
    let cap = connections_max(limit);
    let config = std::env::temp_dir().join(format!("potluck-slowloris-{}", std::process::id()));
    let mut server = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["serve", "--no-cluster", "--listen", "127.0.0.1:0", "--threads", "1", "--model"])
        .arg(model_path())
        .env("POTLUCK_CONFIG_DIR", &config)
        .env_remove("POTLUCK_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let address = loop {
        let line = lines.next().expect("the server printed its address").unwrap();
        if let Some(rest) = line.split(" on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let mut held = Vec::with_capacity(half_open);
    for i in 0..half_open {
        let mut stream = TcpStream::connect(&address).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
        held.push(stream);
    }
    let opened = Instant::now();

    if half_open < cap {
        // Others are served beside them, at once.
        let health = get(&address, "/health").expect("an answer while the connections are held");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let models = get(&address, "/v1/models").expect("an answer");
        assert!(models.starts_with("HTTP/1.1 200"), "{models}");
        assert!(opened.elapsed() < Duration::from_millis(HEADER_READ_TIMEOUT_MS), "the answers came before any timeout freed a slot");
    } else {
        // A low hard descriptor limit put the cap below them: a clear refusal, not a hang.
        let refused = get(&address, "/health").expect("an answer past the cap");
        assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("too_many_connections"), "{refused}");
    }

    // After the header-read timeout the server has closed them.
    let deadline = opened + Duration::from_millis(HEADER_READ_TIMEOUT_MS + 10_000);
    let mut closed = 0;
    for stream in &mut held {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        stream.set_read_timeout(Some(left)).unwrap();
        let mut buffer = [0u8; 1024];
        // EOF, a reset, or a 408 followed by EOF: closed by the server.
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(closed, half_open, "every half-open connection is closed after the header-read timeout");
    let health = get(&address, "/health").expect("still answering");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&config);
}
