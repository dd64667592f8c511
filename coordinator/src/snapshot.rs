//! [`ClusterSnapshot`]: the one picture of the cluster that everything shows — `/health`'s
//! body, every `/events` message the dashboard draws, the figures behind `/metrics`, and
//! what `coordinator status` reads back and prints as tables.
//!
//! Its JSON shape is the `ClusterSnapshot` schema of `openapi.json` (schemathesis checks the
//! server against it; a unit test below checks that the two name the same fields). Every
//! part reads with `#[serde(default)]`, so `coordinator status` can read the `/health` of a
//! coordinator that has a field more or less than itself.
//!
//! **API Boundary:** this module holds data and the one function that gathers it
//! ([`ClusterSnapshot::capture`]); it knows nothing of HTTP. The cluster driver fills the
//! [`ClusterInfo`], [`NodeView`] and [`StageView`] parts as membership and plans change
//! (`cluster::ClusterStatus`); the measured figures are added when a snapshot is taken.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterView, COORDINATOR_NODE};
use crate::state::AppState;

/// `/health`, `/events`, `/metrics` and `coordinator status`: the cluster and the service now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSnapshot {
    /// Always `"ok"` from a serving coordinator.
    pub status: String,
    /// The served model's name (as `/v1/models` reports it).
    pub model: String,
    pub n_layers: u32,
    pub uptime_s: u64,
    /// The pipeline in force, in order (one stage — this machine — with no workers).
    pub stages: Vec<StageView>,
    /// Workers known to the coordinator, gone ones included for a while.
    pub nodes: Vec<NodeView>,
    pub cluster: ClusterInfo,
    pub live: LiveFigures,
    /// Newest first, at most [`crate::dashboard::RECENT_REQUESTS_MAX`].
    pub recent_requests: Vec<RequestRecord>,
}

/// The cluster endpoint and the plan in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterInfo {
    /// This coordinator's node id; empty with `--no-cluster`.
    pub node_id: String,
    pub listen: String,
    /// The `worker join` line with the token left out (see where it is set).
    pub join_command: String,
    /// The plan's own explanation, when one is in force.
    pub plan: Option<String>,
    pub predicted_tokens_per_s: Option<f64>,
    /// Bytes of weights the coordinator has streamed to workers.
    pub weight_bytes_sent: u64,
    /// The coordinator process's resident memory now and at its peak (filled in when a
    /// snapshot is taken; `None` where the system does not say).
    pub coordinator_resident_bytes: Option<u64>,
    pub coordinator_peak_resident_bytes: Option<u64>,
}

/// One worker as membership knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeView {
    pub node_id: String,
    pub name: String,
    /// `joining`, `loading N%`, `ready`, or `gone (reason)`.
    pub state: String,
    /// Its control connection's address, and its data endpoint (where stages send to it).
    pub address: String,
    pub data_address: String,
    pub memory_budget_bytes: u64,
    /// Its weights and KV cache together (filled in when a snapshot is taken).
    pub memory_used_bytes: u64,
    pub last_seen_age_ms: u64,
    /// The stage's counters from its latest heartbeat (0 before one arrives): steps run and
    /// microseconds computing, so Δbusy_us / Δsteps is its measured time per step.
    pub steps: u64,
    pub busy_us: u64,
    /// Its measured time per step between its last two heartbeats that saw steps run.
    pub step_ms: Option<f64>,
    /// Its compute backend and threads, as its Hello said.
    pub backend: String,
    pub threads: u32,
    /// Its KV cache now (from its latest heartbeat), and its weights in the plan.
    pub kv_bytes: u64,
    pub weight_bytes: u64,
    /// The layers the plan in force gives it, if any.
    pub layers: Option<[u32; 2]>,
    /// QUIC's round-trip estimate of its link to the next node, once it has sent on it.
    pub hop_rtt_us: Option<u64>,
    /// What the worker process really holds, now and at its peak (VmRSS, VmHWM; from its
    /// latest heartbeat; `None` before one or where its system does not say): shown beside
    /// its budget and its planned weights and KV cache.
    pub resident_bytes: Option<u64>,
    pub peak_resident_bytes: Option<u64>,
}

/// One stage of the pipeline in force: what the plan predicted and what was measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageView {
    pub node_id: String,
    pub name: String,
    pub layers: [u32; 2],
    /// The plan's predicted time of this stage per token, and of the hop out of it.
    pub predicted_ms: Option<f64>,
    pub predicted_hop_ms: Option<f64>,
    /// Measured time per step (filled in when a snapshot is taken): the worker's between its
    /// last heartbeats that ran steps, or the coordinator's own over the live window.
    pub measured_ms: Option<f64>,
    /// QUIC's round trip of the hop out of the stage, to the next one or back here (filled
    /// in when a snapshot is taken).
    pub hop_rtt_ms: Option<f64>,
    /// What the plan puts in its memory: weights (and KV cache at full context), and the
    /// node's budget.
    pub weight_bytes: Option<u64>,
    pub memory_budget_bytes: Option<u64>,
}

/// The generation service's figures now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LiveFigures {
    /// Generated tokens per second over the last few seconds, to one decimal.
    pub tokens_per_s: f64,
    pub generated_tokens_total: u64,
    /// `queued + active`.
    pub requests_in_flight: u64,
    pub queued: u64,
    pub active: u64,
    pub requests_finished_total: u64,
    pub requests_failed_total: u64,
    /// Speculative decoding: draft tokens proposed and accepted since start (their ratio is
    /// the acceptance rate; accepted tokens each saved a trip through the pipeline).
    pub draft_tokens_proposed_total: u64,
    pub draft_tokens_accepted_total: u64,
    /// Prompt tokens taken from kept caches (prefix caching) since start.
    pub prompt_tokens_cached_total: u64,
}

/// One finished (or failed) request, as the dashboard lists it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestRecord {
    pub id: String,
    /// `"chat"` or `"completion"`.
    pub endpoint: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub duration_ms: u64,
    /// Completion tokens over the whole request time (prefill included).
    pub tokens_per_s: f64,
    /// `"stop"`, `"length"`, `"error"`, or `"cancelled"` (the client went away).
    pub finish_reason: String,
    pub finished_unix_ms: u64,
}

impl RequestRecord {
    pub fn new(
        id: &str,
        endpoint: &str,
        started: Instant,
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: &str,
    ) -> Self {
        let elapsed = started.elapsed();
        let finished_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            id: id.to_owned(),
            endpoint: endpoint.to_owned(),
            prompt_tokens,
            completion_tokens,
            duration_ms: elapsed.as_millis() as u64,
            tokens_per_s: if elapsed.as_secs_f64() > 0.0 { completion_tokens as f64 / elapsed.as_secs_f64() } else { 0.0 },
            finish_reason: finish_reason.to_owned(),
            finished_unix_ms,
        }
    }
}

impl ClusterSnapshot {
    /// Gathers the picture now: the cluster's shared view, the service's counters, and the
    /// dashboard's live rates (taking a rate sample; see `dashboard::Dashboard::rates`).
    pub fn capture(state: &AppState) -> Self {
        let ClusterView { mut info, mut nodes, mut stages } = state.cluster.snapshot();
        let resident = potluck_node::resident::resident();
        info.coordinator_resident_bytes = resident.map(|r| r.now_bytes);
        info.coordinator_peak_resident_bytes = resident.map(|r| r.peak_bytes);
        let stats = state.service.stats();
        let rates = state.dashboard.rates(state);
        let local_rtt_us = stats.local_hop_rtt_us.load(Relaxed);
        for stage in &mut stages {
            let node = nodes.iter().find(|n| n.node_id == stage.node_id);
            let (measured_ms, hop_rtt_us) = if stage.node_id == COORDINATOR_NODE {
                (rates.local_step_ms, (local_rtt_us > 0).then_some(local_rtt_us))
            } else {
                (node.and_then(|n| n.step_ms), node.and_then(|n| n.hop_rtt_us))
            };
            stage.measured_ms = measured_ms;
            stage.hop_rtt_ms = hop_rtt_us.map(|us| us as f64 / 1000.0);
        }
        for node in &mut nodes {
            node.memory_used_bytes = node.weight_bytes + node.kv_bytes;
        }
        let queued = stats.queued.load(Relaxed);
        let active = stats.active.load(Relaxed);
        Self {
            status: "ok".into(),
            model: state.model_id.clone(),
            n_layers: state.profile.n_layers,
            uptime_s: crate::state::unix_now().saturating_sub(state.started_unix),
            stages,
            nodes,
            cluster: info,
            live: LiveFigures {
                tokens_per_s: rates.tokens_per_s_rounded(),
                generated_tokens_total: stats.tokens_generated.load(Relaxed),
                requests_in_flight: queued + active,
                queued,
                active,
                requests_finished_total: stats.requests_finished.load(Relaxed),
                requests_failed_total: stats.requests_failed.load(Relaxed),
                draft_tokens_proposed_total: stats.draft_tokens_proposed.load(Relaxed),
                draft_tokens_accepted_total: stats.draft_tokens_accepted.load(Relaxed),
                prompt_tokens_cached_total: stats.prompt_tokens_cached.load(Relaxed),
            },
            recent_requests: state.dashboard.recent(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn example() -> ClusterSnapshot {
        ClusterSnapshot {
            status: "ok".into(),
            model: "SmolLM2".into(),
            n_layers: 30,
            uptime_s: 12,
            stages: vec![StageView {
                node_id: "a".into(),
                name: "laptop".into(),
                layers: [0, 30],
                predicted_ms: Some(4.0),
                predicted_hop_ms: None,
                measured_ms: Some(4.5),
                hop_rtt_ms: Some(0.3),
                weight_bytes: Some(1 << 20),
                memory_budget_bytes: Some(1 << 30),
            }],
            nodes: vec![NodeView {
                node_id: "a".into(),
                name: "laptop".into(),
                state: "ready".into(),
                layers: Some([0, 30]),
                step_ms: Some(4.5),
                hop_rtt_us: Some(300),
                ..NodeView::default()
            }],
            cluster: ClusterInfo { node_id: "c".into(), plan: Some("1 stage".into()), ..ClusterInfo::default() },
            live: LiveFigures { tokens_per_s: 12.5, requests_in_flight: 1, active: 1, ..LiveFigures::default() },
            recent_requests: vec![RequestRecord::new("r1", "chat", Instant::now(), 3, 4, "stop")],
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_it_was_written() {
        let snapshot = example();
        let json = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(serde_json::from_str::<ClusterSnapshot>(&json).unwrap(), snapshot);
    }

    #[test]
    fn missing_fields_read_as_their_defaults() {
        let snapshot: ClusterSnapshot = serde_json::from_str(r#"{"model": "m", "stages": [{"name": "x"}]}"#).unwrap();
        assert_eq!(snapshot.model, "m");
        assert_eq!(snapshot.stages[0].name, "x");
        assert_eq!(snapshot.stages[0].measured_ms, None);
        assert!(snapshot.nodes.is_empty());
    }

    /// The object's keys against a schema's `properties` and `required`.
    fn check_against_schema(what: &str, object: &Value, schema: &Value) {
        let keys: Vec<&String> = object.as_object().unwrap_or_else(|| panic!("{what} is not an object")).keys().collect();
        let properties = schema["properties"].as_object().unwrap_or_else(|| panic!("{what}: the schema has no properties"));
        for key in &keys {
            assert!(properties.contains_key(*key), "{what}.{key} is served but not in openapi.json");
        }
        for key in properties.keys() {
            assert!(object.get(key).is_some(), "{what}.{key} is in openapi.json but not served");
        }
        for required in schema["required"].as_array().into_iter().flatten() {
            assert!(object.get(required.as_str().unwrap()).is_some(), "{what}.{required} is required by openapi.json");
        }
    }

    #[test]
    fn the_json_names_the_fields_openapi_json_documents() {
        let spec: Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        let schema = &spec["components"]["schemas"]["ClusterSnapshot"];
        let json = serde_json::to_value(example()).unwrap();
        check_against_schema("snapshot", &json, schema);
        check_against_schema("stages[0]", &json["stages"][0], &schema["properties"]["stages"]["items"]);
        check_against_schema("nodes[0]", &json["nodes"][0], &schema["properties"]["nodes"]["items"]);
        check_against_schema("cluster", &json["cluster"], &schema["properties"]["cluster"]);
        check_against_schema("live", &json["live"], &schema["properties"]["live"]);
        check_against_schema(
            "recent_requests[0]",
            &json["recent_requests"][0],
            &schema["properties"]["recent_requests"]["items"],
        );
    }
}
