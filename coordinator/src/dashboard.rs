//! The cluster dashboard: the page at `/`, the live snapshot it draws (`/events`, one
//! [`ClusterSnapshot`] a second as a server-sent event; `/health` serves the same JSON
//! once), and what the snapshot needs remembered between requests — the samples behind live
//! tokens/s and the coordinator's own stage time, and the recent requests.
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
use crate::snapshot::{ClusterSnapshot, RequestRecord};
use crate::state::AppState;

/// How often `/events` sends a snapshot.
pub const EVENTS_INTERVAL: Duration = Duration::from_secs(1);
/// `/events` streams open at once at most (each costs a task and a snapshot a second);
/// past it a viewer gets 503 and its browser retries.
pub const EVENT_STREAMS_MAX: usize = 32;
/// Seconds a viewer turned away (too many streams) is told to wait before retrying.
const EVENTS_RETRY_AFTER_SECONDS: u32 = 5;
/// Requests the dashboard lists (newest first).
pub const RECENT_REQUESTS_MAX: usize = 20;
/// The live rates are taken over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(3);
/// Samples closer together than this are not kept (many viewers must not shrink the window).
const SAMPLE_SPACING: Duration = Duration::from_millis(200);
/// Samples kept at most (RATE_WINDOW / SAMPLE_SPACING, and then some).
const SAMPLES_MAX: usize = 32;

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

    /// The requests listed now, newest first.
    pub(crate) fn recent(&self) -> Vec<RequestRecord> {
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
            [(header::RETRY_AFTER, EVENTS_RETRY_AFTER_SECONDS.to_string())],
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
            let snapshot = serde_json::to_string(&ClusterSnapshot::capture(&state)).unwrap_or_default();
            let event = Event::default().event("cluster").data(snapshot);
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
