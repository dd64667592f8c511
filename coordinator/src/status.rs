//! `coordinator status`: the cluster as `/health` describes it (a [`ClusterSnapshot`], read
//! back with the type that wrote it), as tables in a terminal.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::snapshot::ClusterSnapshot;

/// How long `status` waits for the coordinator.
pub const STATUS_TIMEOUT_MS: u64 = 5_000;
/// A `/health` answer larger than this is not a coordinator's.
pub const HEALTH_BYTES_MAX: u64 = 4 << 20;

/// GETs `/health` from the coordinator at `url` (`http://HOST:PORT` or `HOST:PORT`).
pub fn fetch_health(url: &str) -> Result<ClusterSnapshot> {
    let authority = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
    if authority.contains('/') || url.starts_with("https://") {
        bail!("give the coordinator as http://HOST:PORT (got {url:?})");
    }
    let address = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .with_context(|| format!("cannot resolve {authority:?} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("{authority:?} resolves to no address"))?;
    let timeout = Duration::from_millis(STATUS_TIMEOUT_MS);
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("no coordinator answers at {address} (is `coordinator serve` running there?)"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET /health HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(HEALTH_BYTES_MAX).read_to_end(&mut response).context("reading /health")?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| anyhow!("{address} did not answer HTTP"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{address} answered /health with {:?}", head.lines().next().unwrap_or(""));
    }
    serde_json::from_str(body)
        .with_context(|| format!("{address}'s /health is not a cluster snapshot (is it a potluck coordinator?)"))
}

/// The cluster picture: model, plan, stages, nodes.
pub fn render(health: &ClusterSnapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "model      {}", health.model);
    let cluster = &health.cluster;
    if !cluster.node_id.is_empty() {
        let _ = writeln!(out, "cluster    {} (node {})", cluster.listen, cluster.node_id);
        let _ = writeln!(out, "join with  {}", cluster.join_command);
    } else {
        let _ = writeln!(out, "cluster    off (--no-cluster)");
    }
    if let Some(tps) = cluster.predicted_tokens_per_s {
        let _ = writeln!(out, "predicted  {tps:.1} tokens/s for one sequence at full context");
    }
    let _ = writeln!(out, "\nstages (pipeline order)");
    let _ = writeln!(out, "  {:<3} {:<20} {:<9} {:>12} {:>9}", "#", "node", "layers", "predicted ms", "hop ms");
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
    for (i, stage) in health.stages.iter().enumerate() {
        let layers = format!("{}..{}", stage.layers[0], stage.layers[1]);
        let _ = writeln!(
            out,
            "  {:<3} {:<20} {:<9} {:>12} {:>9}",
            i,
            stage.name,
            layers,
            ms(stage.predicted_ms),
            ms(stage.predicted_hop_ms)
        );
    }
    let nodes = &health.nodes;
    let _ = writeln!(out, "\nworkers ({})", nodes.len());
    if !nodes.is_empty() {
        let _ = writeln!(
            out,
            "  {:<20} {:<14} {:<22} {:>10} {:>10} {:>10} {:>10} {:>12}",
            "name", "state", "address", "budget", "holds", "last seen", "steps", "ms per step"
        );
    }
    for node in nodes {
        let per_step = if node.steps == 0 {
            "-".to_string()
        } else {
            format!("{:.2}", node.busy_us as f64 / node.steps as f64 / 1000.0)
        };
        let _ = writeln!(
            out,
            "  {:<20} {:<14} {:<22} {:>10} {:>10} {:>10} {:>10} {:>12}",
            node.name,
            node.state,
            node.address,
            format!("{:.0} MiB", node.memory_budget_bytes as f64 / (1u64 << 20) as f64),
            node.resident_bytes.map_or_else(|| "-".to_string(), |b| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)),
            format!("{:.1} s", node.last_seen_age_ms as f64 / 1000.0),
            node.steps,
            per_step
        );
    }
    if let Some(plan) = &cluster.plan {
        let _ = writeln!(out, "\nplan\n{plan}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_stages_nodes_and_the_plan() {
        let health = json!({
            "status": "ok", "model": "SmolLM2",
            "stages": [
                {"node_id": "a", "name": "laptop", "layers": [0, 17], "predicted_ms": 4.06, "predicted_hop_ms": 0.29},
                {"node_id": "b", "name": "desktop", "layers": [17, 30], "predicted_ms": 5.08, "predicted_hop_ms": null}
            ],
            "nodes": [{"node_id": "a", "name": "laptop", "state": "ready", "address": "10.0.0.2:5000",
                       "memory_budget_bytes": 125829120u64, "last_seen_age_ms": 400, "steps": 200, "busy_us": 664000}],
            "cluster": {"node_id": "c", "listen": "0.0.0.0:7070", "join_command": "worker join --token t --coordinator 10.0.0.1:7070",
                        "predicted_tokens_per_s": 103.0, "weight_bytes_sent": 0, "plan": "2 stages"}
        });
        let health: ClusterSnapshot = serde_json::from_value(health).expect("the fixture reads as a snapshot");
        let text = render(&health);
        for needle in ["laptop", "0..17", "17..30", "4.06", "0.29", "ready", "120 MiB", "3.32", "worker join --token t", "103.0 tokens/s", "2 stages"] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn a_non_http_url_is_refused_with_the_expected_form() {
        let e = fetch_health("https://example.com/x").unwrap_err().to_string();
        assert!(e.contains("http://HOST:PORT"), "{e}");
    }
}
