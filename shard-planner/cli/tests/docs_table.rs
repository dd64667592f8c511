//! Runs the `shard-planner` commands docs/planner.md shows and checks the figures it prints
//! are the ones the doc quotes, so the doc stays true as the cost model changes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shard_planner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shard-planner"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("the shard-planner binary runs")
}

/// The tokens/s column of the summary row that starts with `label`.
fn tokens_per_s(stdout: &str, label: &str) -> String {
    let row = stdout
        .lines()
        .find(|line| line.starts_with(label) && line.trim_end().ends_with("yes"))
        .unwrap_or_else(|| panic!("no fitting {label:?} row in:\n{stdout}"));
    row.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn the_docs_table_is_what_simulate_prints() {
    let doc = std::fs::read_to_string(repo_root().join("docs/planner.md")).unwrap();
    let scenarios: [(&str, &[&str]); 6] = [
        ("home-ethernet", &[]),
        ("home-wifi", &[]),
        ("home-ethernet", &["--context", "8192", "--sequences", "4"]),
        ("home-wifi", &["--context", "8192", "--sequences", "4"]),
        (
            "home-ethernet",
            &[
                "--context",
                "8192",
                "--sequences",
                "4",
                "--first",
                "macbook-pro",
            ],
        ),
        (
            "home-wifi",
            &[
                "--context",
                "8192",
                "--sequences",
                "4",
                "--first",
                "macbook-pro",
            ],
        ),
    ];
    for (cluster, extra) in scenarios {
        let file = format!("examples/clusters/{cluster}.toml");
        let mut args = vec![
            "simulate",
            "--cluster",
            &file,
            "--model",
            "llama-3.1-70b-q4_k_m",
        ];
        args.extend_from_slice(extra);
        let output = shard_planner(&args);
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let ours = tokens_per_s(&stdout, "potluck");
        let baseline = tokens_per_s(&stdout, "memory-proportional");
        // The command itself is in the doc, and so are both figures.
        let command = format!("shard-planner {}", args.join(" "));
        let spaced = doc
            .lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>().join(" ") == command);
        assert!(spaced, "docs/planner.md lacks the command `{command}`");
        assert!(
            doc.contains(&format!("**{ours} tok/s**")),
            "docs/planner.md lacks {ours} tok/s for {args:?}:\n{stdout}"
        );
        assert!(
            doc.contains(&format!("{baseline} tok/s")),
            "docs/planner.md lacks {baseline} tok/s for {args:?}"
        );
    }
}

#[test]
fn an_infeasible_cluster_exits_with_the_missing_memory() {
    // 44.15 GiB of weights + 80 layers × 32768 positions × 8 sequences × 4 KiB (f16) of KV
    // cache = 124.15 GiB, against the 91 GiB the five nodes offer.
    let output = shard_planner(&[
        "plan",
        "--cluster",
        "examples/clusters/home-ethernet.toml",
        "--model",
        "qwen2.5-72b-q4_k_m",
        "--context",
        "32768",
        "--sequences",
        "8",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("33.15 GiB missing"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn a_json_plan_feeds_a_replan() {
    let dir = std::env::temp_dir().join(format!("shard-planner-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let previous = dir.join("plan.json");
    let output = shard_planner(&[
        "plan",
        "--json",
        "--cluster",
        "examples/clusters/home-ethernet.toml",
        "--model",
        "llama-3.1-8b-q4_k_m",
    ]);
    assert!(output.status.success());
    std::fs::write(&previous, &output.stdout).unwrap();
    let output = shard_planner(&[
        "plan",
        "--cluster",
        "examples/clusters/home-wifi.toml",
        "--model",
        "llama-3.1-8b-q4_k_m",
        "--previous",
        previous.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("re-plan: kept the previous plan, moving 0 B"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn models_lists_the_built_in_specs() {
    let output = shard_planner(&["models"]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    for id in [
        "llama-3.1-70b-q4_k_m",
        "llama-3.1-8b-q4_k_m",
        "qwen2.5-72b-q4_k_m",
        "mixtral-8x7b-q4_k_m",
    ] {
        let line = stdout.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("{id} missing: {stdout}"));
        // Every built-in model is one the engine runs, Mixtral's experts included.
        assert!(line.trim_end().ends_with("runs"), "{line}");
    }
}

/// A reader that stops early (`shard-planner simulate … | head -1`) closes the pipe; the
/// program exits quietly instead of panicking with "failed printing to stdout".
#[test]
fn a_closed_pipe_is_not_a_crash() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_shard-planner"))
        .args(["simulate", "--cluster", "examples/clusters/home-ethernet.toml", "--model", "llama-3.1-70b-q4_k_m"])
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the program has written anything (it is still reading its cluster
    // file), so its output meets a closed pipe.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "exit {:?}: {stderr}", output.status);
}
