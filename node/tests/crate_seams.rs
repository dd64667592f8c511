//! ARCHITECTURE.md's dependency invariants, checked against `cargo metadata` so the document
//! cannot drift from the workspace: which crate may depend on which (dev-dependencies
//! included, since a test-only edge still couples the crates' builds).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Each workspace package's direct dependencies, of every kind (normal, dev, build).
fn workspace_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cannot run cargo metadata");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata printed no JSON");
    let mut out = BTreeMap::new();
    for package in metadata["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("name").to_string();
        let deps = package["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .map(|d| d["name"].as_str().expect("dependency name").to_string())
            .collect();
        out.insert(name, deps);
    }
    out
}

fn assert_lacks(deps: &BTreeMap<String, BTreeSet<String>>, package: &str, forbidden: &[&str]) {
    let have = deps.get(package).unwrap_or_else(|| panic!("{package} is not in the workspace"));
    for name in forbidden {
        assert!(!have.contains(*name), "{package} depends on {name}, which ARCHITECTURE.md forbids");
    }
}

#[test]
fn the_binaries_share_the_node_crate_and_not_each_other() {
    let deps = workspace_dependencies();
    assert_lacks(&deps, "potluck-coordinator", &["potluck-worker"]);
    assert_lacks(&deps, "potluck-worker", &["potluck-coordinator"]);
    assert_lacks(&deps, "potluck-node", &["potluck-worker", "potluck-coordinator"]);
    for binary in ["potluck-coordinator", "potluck-worker"] {
        assert!(deps[binary].contains("potluck-node"), "{binary} should be built on potluck-node");
    }
}

#[test]
fn the_engine_has_no_network_and_the_planner_no_workspace_crate() {
    let deps = workspace_dependencies();
    assert_lacks(&deps, "potluck-engine", &["tokio", "quinn", "libp2p", "axum", "potluck-node", "potluck-protocol"]);
    assert_lacks(&deps, "potluck-protocol", &["tokio", "quinn", "candle-core"]);
    let planner = &deps["potluck-shard-planner"];
    let workspace_crates: Vec<_> = planner.iter().filter(|d| d.starts_with("potluck-")).collect();
    assert!(workspace_crates.is_empty(), "the shard planner depends on {workspace_crates:?}");
    assert_lacks(&deps, "potluck-shard-planner", &["tokio", "candle-core", "rand"]);
}
