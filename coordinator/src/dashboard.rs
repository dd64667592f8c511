//! The cluster dashboard: the page at `/`, the live snapshot it draws (`/events`, one
//! server-sent event a second; `/health` serves the same JSON once), and the figures only
//! the dashboard needs — live tokens/s, the coordinator's own stage time, recent requests.
//!
//! The page is one self-contained HTML file (`dashboard.html`, inline CSS and JS, nothing
//! fetched from elsewhere) compiled into the binary: no front-end build step, and it works
//! on a LAN with no internet.
//!
//! Rates are computed lazily from timestamped samples of monotonic counters, taken when a
//! snapshot is built (at most every [`SAMPLE_SPACING`]), so nothing runs while no one looks.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};

use crate::state::AppState;
use crate::cluster::{ClusterView, StageView, COORDINATOR_NODE};
use crate::generation::ServiceStats;

/// How often `/events` sends a snapshot.
pub const EVENTS_INTERVAL: Duration = Duration::from_secs(1);
/// `/events` streams open at once at most (each costs a task and a snapshot a second);
/// past it a viewer gets 503 and its browser retries.
pub const EVENT_STREAMS_MAX: usize = 32;
/// Requests the dashboard lists (newest first).
pub const RECENT_REQUESTS_MAX: usize = 20;
/// The live rates are taken over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(3);
/// Samples closer together than this are not kept (many viewers must not shrink the window).
const SAMPLE_SPACING: Duration = Duration::from_millis(200);
/// Samples kept at most (RATE_WINDOW / SAMPLE_SPACING, and then some).
const SAMPLES_MAX: usize = 32;

/// One finished (or failed) request, as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub id: String,
    /// `"chat"` or `"completion"`.
    pub endpoint: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub duration_ms: u64,
    /// Completion tokens over the whole request time (prefill included).
    pub tokens_per_s: f64,
    /// `"stop"`, `"length"`, `"error"`, or `"cancelled"` (the client went away).
    pub finish_reason: &'static str,
    pub finished_unix_ms: u64,
}

impl RequestRecord {
    pub fn new(
        id: &str,
        endpoint: &'static str,
        started: Instant,
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: &'static str,
    ) -> Self {
        let elapsed = started.elapsed();
        let finished_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            id: id.to_owned(),
            endpoint,
            prompt_tokens,
            completion_tokens,
            duration_ms: elapsed.as_millis() as u64,
            tokens_per_s: if elapsed.as_secs_f64() > 0.0 { completion_tokens as f64 / elapsed.as_secs_f64() } else { 0.0 },
            finish_reason,
            finished_unix_ms,
        }
    }
}

/// What the dashboard remembers between snapshots.
#[derive(Debug, Default)]
pub struct Dashboard {
    recent: Mutex<VecDeque<RequestRecord>>,
    samples: Mutex<Samples>,
    /// `/events` streams open now.
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// One open `/events` stream; counted while it lives.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug, Default)]
struct Samples {
    ring: VecDeque<Sample>,
    /// The coordinator stage's last measured ms per step (kept while it idles).
    local_step_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    tokens: u64,
    local_steps: u64,
    local_busy_us: u64,
}

/// The rates a snapshot reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveRates {
    pub tokens_per_s: f64,
    pub local_step_ms: Option<f64>,
}

impl LiveRates {
    /// Tokens/s to one decimal, as the dashboard and `/metrics` show it.
    pub fn tokens_per_s_rounded(&self) -> f64 {
        (self.tokens_per_s * 10.0).round() / 10.0
    }
}

impl Samples {
    /// Adds a sample taken at `at` (unless the last one is too recent) and returns the rates
    /// over the newest sample and the oldest one within [`RATE_WINDOW`] of it.
    fn observe(&mut self, sample: Sample) -> LiveRates {
        let recent_enough = self.ring.back().is_some_and(|last| sample.at.duration_since(last.at) < SAMPLE_SPACING);
        if !recent_enough {
            self.ring.push_back(sample);
            while self.ring.len() > SAMPLES_MAX {
                self.ring.pop_front();
            }
        }
        let newest = *self.ring.back().expect("pushed above or before");
        // The oldest sample still inside the window, but never the newest itself.
        let oldest = self
            .ring
            .iter()
            .find(|s| newest.at.duration_since(s.at) <= RATE_WINDOW && s.at < newest.at)
            .copied();
        let Some(oldest) = oldest else {
            return LiveRates { tokens_per_s: 0.0, local_step_ms: self.local_step_ms };
        };
        let seconds = newest.at.duration_since(oldest.at).as_secs_f64();
        let tokens_per_s = newest.tokens.saturating_sub(oldest.tokens) as f64 / seconds;
        if newest.local_steps > oldest.local_steps && newest.local_busy_us >= oldest.local_busy_us {
            let ms = (newest.local_busy_us - oldest.local_busy_us) as f64 / (newest.local_steps - oldest.local_steps) as f64 / 1000.0;
            self.local_step_ms = Some(ms);
        } else if newest.local_steps < oldest.local_steps {
            self.local_step_ms = None; // a new pipeline's stage started from zero
        }
        LiveRates { tokens_per_s, local_step_ms: self.local_step_ms }
    }
}

impl Dashboard {
    pub fn record(&self, record: RequestRecord) {
        let mut recent = self.recent.lock().expect("recent requests lock");
        recent.push_front(record);
        recent.truncate(RECENT_REQUESTS_MAX);
    }

    /// A slot for one more `/events` stream, unless [`EVENT_STREAMS_MAX`] are open.
    fn open_stream(&self) -> Option<StreamSlot> {
        let previous = self.streams.fetch_add(1, Relaxed);
        let slot = StreamSlot(self.streams.clone());
        (previous < EVENT_STREAMS_MAX).then_some(slot)
    }

    fn recent(&self) -> Vec<RequestRecord> {
        self.recent.lock().expect("recent requests lock").iter().cloned().collect()
    }

    /// The live rates now (takes a sample; see [`Samples::observe`]).
    pub fn rates(&self, state: &AppState) -> LiveRates {
        let stats = state.service.stats();
        let sample = Sample {
            at: Instant::now(),
            tokens: stats.tokens_generated.load(Relaxed),
            local_steps: stats.local_stage_steps.load(Relaxed),
            local_busy_us: stats.local_stage_busy_us.load(Relaxed),
        };
        self.samples.lock().expect("samples lock").observe(sample)
    }
}

/// One stage of the pipeline in force with what was measured of it.
pub struct MeasuredStage<'a> {
    pub view: &'a StageView,
    /// Time per step: the worker's between its last heartbeats that ran steps, or the
    /// coordinator's own over the live window.
    pub measured_ms: Option<f64>,
    /// QUIC's round trip of the hop out of the stage (to the next one, or back here).
    pub hop_rtt_ms: Option<f64>,
}

/// The stages of `cluster` with their measurements (`/health`, `/events` and `/metrics`).
pub fn measured_stages<'a>(cluster: &'a ClusterView, stats: &ServiceStats, rates: LiveRates) -> Vec<MeasuredStage<'a>> {
    let local_rtt_us = stats.local_hop_rtt_us.load(Relaxed);
    cluster
        .stages
        .iter()
        .map(|view| {
            let node = cluster.nodes.iter().find(|n| n.node_id == view.node_id);
            let (measured_ms, hop_rtt_us) = if view.node_id == COORDINATOR_NODE {
                (rates.local_step_ms, (local_rtt_us > 0).then_some(local_rtt_us))
            } else {
                (node.and_then(|n| n.step_ms), node.and_then(|n| n.hop_rtt_us))
            };
            MeasuredStage { view, measured_ms, hop_rtt_ms: hop_rtt_us.map(|us| us as f64 / 1000.0) }
        })
        .collect()
}

/// The whole picture: `/health`'s body and every `/events` message.
pub fn snapshot(state: &AppState) -> Value {
    let cluster = state.cluster.snapshot();
    let stats = state.service.stats();
    let rates = state.dashboard.rates(state);
    let stages: Vec<Value> = measured_stages(&cluster, stats, rates)
        .into_iter()
        .map(|s| {
            let mut v = serde_json::to_value(s.view).unwrap_or(Value::Null);
            v["measured_ms"] = json!(s.measured_ms);
            v["hop_rtt_ms"] = json!(s.hop_rtt_ms);
            v
        })
        .collect();
    let nodes: Vec<Value> = cluster
        .nodes
        .iter()
        .map(|n| {
            let mut v = serde_json::to_value(n).unwrap_or(Value::Null);
            v["memory_used_bytes"] = json!(n.weight_bytes + n.kv_bytes);
            v
        })
        .collect();
    let queued = stats.queued.load(Relaxed);
    let active = stats.active.load(Relaxed);
    json!({
        "status": "ok",
        "model": state.model_id,
        "n_layers": state.profile.n_layers,
        "uptime_s": crate::state::unix_now().saturating_sub(state.started_unix),
        "stages": stages,
        "nodes": nodes,
        "cluster": {
            "node_id": cluster.node_id,
            "listen": cluster.listen,
            "join_command": cluster.join_command,
            "predicted_tokens_per_s": cluster.predicted_tokens_per_s,
            "weight_bytes_sent": cluster.weight_bytes_sent,
            "plan": cluster.plan,
        },
        "live": {
            "tokens_per_s": rates.tokens_per_s_rounded(),
            "generated_tokens_total": stats.tokens_generated.load(Relaxed),
            "requests_in_flight": queued + active,
            "queued": queued,
            "active": active,
            "requests_finished_total": stats.requests_finished.load(Relaxed),
            "requests_failed_total": stats.requests_failed.load(Relaxed),
        },
        "recent_requests": state.dashboard.recent(),
    })
}

/// `GET /`: the dashboard page.
pub async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// `GET /events`: a snapshot now and every [`EVENTS_INTERVAL`], until the client leaves or
/// the server shuts down (an open dashboard must not hold up a graceful shutdown).
pub async fn events(State(state): State<Arc<AppState>>) -> Response {
    let Some(slot) = state.dashboard.open_stream() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            format!("at most {EVENT_STREAMS_MAX} dashboards may follow /events at once"),
        )
            .into_response();
    };
    let mut closing = state.events_closing.subscribe();
    let stream = async_stream(move |tx| async move {
        let _slot = slot;
        let mut tick = tokio::time::interval(EVENTS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = closing.wait_for(|closing| *closing) => return,
            }
            let event = Event::default().event("cluster").data(snapshot(&state).to_string());
            if tx.send(Ok(event)).await.is_err() {
                return; // the viewer left
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// A stream fed by a task: `body` gets the sending half and runs until it returns or the
/// receiver is dropped.
fn async_stream<F, Fut>(body: F) -> tokio_stream::wrappers::ReceiverStream<Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, tokens: u64, local_steps: u64, local_busy_us: u64) -> Sample {
        Sample { at, tokens, local_steps, local_busy_us }
    }

    #[test]
    fn rates_come_from_the_window_and_the_stage_time_survives_idling() {
        let t0 = Instant::now();
        let mut s = Samples::default();
        let r = s.observe(sample(t0, 0, 0, 0));
        assert_eq!(r, LiveRates { tokens_per_s: 0.0, local_step_ms: None }, "one sample: no rate yet");
        let r = s.observe(sample(t0 + Duration::from_secs(1), 50, 50, 150_000));
        assert_eq!(r.tokens_per_s, 50.0);
        assert_eq!(r.local_step_ms, Some(3.0));
        let r = s.observe(sample(t0 + Duration::from_secs(2), 150, 100, 400_000));
        assert_eq!(r.tokens_per_s, 75.0, "over the whole window, not the last second");
        assert_eq!(r.local_step_ms, Some(4.0));
        // Idle for long: the window holds only idle samples.
        for i in 3..10 {
            s.observe(sample(t0 + Duration::from_secs(i), 150, 100, 400_000));
        }
        let r = s.observe(sample(t0 + Duration::from_secs(10), 150, 100, 400_000));
        assert_eq!(r.tokens_per_s, 0.0);
        // The last window that saw steps held only the second interval: 250 ms / 50 steps.
        assert_eq!(r.local_step_ms, Some(5.0), "the last measured stage time stays");
    }

    #[test]
    fn close_samples_are_not_kept_and_the_ring_is_bounded() {
        let t0 = Instant::now();
        let mut s = Samples::default();
        for i in 0..1000 {
            s.observe(sample(t0 + Duration::from_millis(i * 10), i, 0, 0));
        }
        assert!(s.ring.len() <= SAMPLES_MAX);
        let spacing = s.ring.iter().zip(s.ring.iter().skip(1)).map(|(a, b)| b.at - a.at).min().unwrap();
        assert!(spacing >= SAMPLE_SPACING, "{spacing:?}");
    }

    #[test]
    fn event_streams_are_bounded_and_freed() {
        let d = Dashboard::default();
        let slots: Vec<_> = (0..EVENT_STREAMS_MAX).map(|_| d.open_stream().expect("within the limit")).collect();
        assert!(d.open_stream().is_none(), "one past the limit");
        drop(slots);
        assert!(d.open_stream().is_some(), "closed streams free their slots");
    }

    #[test]
    fn recent_requests_are_newest_first_and_bounded() {
        let d = Dashboard::default();
        for i in 0..(RECENT_REQUESTS_MAX + 5) {
            d.record(RequestRecord::new(&format!("r{i}"), "chat", Instant::now(), 1, 1, "stop"));
        }
        let recent = d.recent();
        assert_eq!(recent.len(), RECENT_REQUESTS_MAX);
        assert_eq!(recent[0].id, format!("r{}", RECENT_REQUESTS_MAX + 4));
    }
}
