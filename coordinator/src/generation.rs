//! The generation service: one OS thread that owns the loaded model and runs every admitted
//! sequence through it, batching their rows into shared forward steps.
//!
//! Each step takes, from every active sequence, either its next prompt chunk (prefill, at
//! most [`PREFILL_CHUNK_ROWS`] rows, so a long prompt does not stall the others) or its last
//! sampled token (decode); one `forward_layers` call runs them all, the head runs only on the
//! rows that end a sequence's input, and each sequence samples its next token. New requests
//! join between steps; finished or abandoned ones (the client went away: the receiver was
//! dropped) leave and free their KV cache.
//!
//! The service works in token ids; text (detokenization, stop strings) is the API's job.

use std::sync::mpsc as std_mpsc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use potluck_engine::kv_cache::SequenceCache;
use potluck_engine::model::LlamaSlice;
use potluck_engine::sampler::{log_softmax_at, top_logprobs, Sampler, SamplingParams};
use potluck_engine::threads::ComputePool;
use tokio::sync::mpsc;

/// Sequences decoded together at most; more wait in the queue.
pub const ACTIVE_SEQUENCES_MAX: usize = 16;
/// Requests waiting for a slot at most; past this the API answers 503.
pub const QUEUED_REQUESTS_MAX: usize = 64;
/// Prompt rows one sequence contributes to a step at most (chunked prefill).
pub const PREFILL_CHUNK_ROWS: usize = 256;
/// Rows in one step at most, over all sequences: bounds a step's scratch memory and latency.
pub const STEP_ROWS_MAX: usize = 512;
/// Alternatives reported per token at most (OpenAI allows 20).
pub const TOP_LOGPROBS_MAX: usize = 20;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most; also bounded by the context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past end-of-sequence tokens (benchmarks that need an exact count).
    pub ignore_eos: bool,
    /// Report each token's log-probability (costs a log-sum-exp over the vocabulary).
    pub logprobs: bool,
    /// With `logprobs`, also report this many most likely alternatives.
    pub top_logprobs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (not included in the output).
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

#[derive(Debug, Clone)]
pub enum GenerateEvent {
    /// A generated token; `logprob` and `top` only when the request asked for log-probabilities.
    Token { id: u32, logprob: Option<f32>, top: Vec<(u32, f32)> },
    Finished { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {QUEUED_REQUESTS_MAX} requests are already waiting")]
    QueueFull,
    #[error("the generation service has stopped")]
    Stopped,
}

struct Job {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<GenerateEvent>,
}

/// Handle to the generation thread; cheap to clone.
#[derive(Clone)]
pub struct GenerationService {
    jobs: std_mpsc::SyncSender<Job>,
    context_length: usize,
    stop_ids: Arc<Vec<u32>>,
    stats: Arc<ServiceStats>,
}

/// Counters the generation thread keeps for `/metrics` (monotonic unless named a gauge).
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Gauge: requests submitted but not yet admitted.
    pub queued: AtomicU64,
    /// Gauge: sequences being generated.
    pub active: AtomicU64,
    pub requests_finished: AtomicU64,
    pub requests_failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub step_rows: AtomicU64,
    /// Time spent computing steps, in microseconds.
    pub step_busy_us: AtomicU64,
}

impl GenerationService {
    /// Starts the generation thread over `model` (which must hold every layer).
    pub fn start(model: LlamaSlice, pool: ComputePool, context_length: usize, stop_ids: Vec<u32>) -> Self {
        assert!(model.is_first() && model.is_last(), "the local service runs the whole model");
        let context_length = context_length.min(model.profile().context_length);
        let (jobs, receiver) = std_mpsc::sync_channel(QUEUED_REQUESTS_MAX);
        let stop_ids = Arc::new(stop_ids);
        let stats = Arc::new(ServiceStats::default());
        let (thread_stop_ids, thread_stats) = (stop_ids.clone(), stats.clone());
        std::thread::Builder::new()
            .name("potluck-generation".into())
            .spawn(move || run(model, pool, context_length, thread_stop_ids, thread_stats, receiver))
            .expect("spawning the generation thread");
        Self { jobs, context_length, stop_ids, stats }
    }

    /// Tokens a sequence may hold in all (prompt + completion).
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, request: GenerateRequest) -> Result<mpsc::UnboundedReceiver<GenerateEvent>, SubmitError> {
        // Unbounded on purpose: the generator must never wait on a slow client (that would
        // stall every sequence in the batch), and a request's events are bounded anyway by
        // its token budget, at most the context length plus one.
        let (events, receiver) = mpsc::unbounded_channel();
        match self.jobs.try_send(Job { request, events }) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                Ok(receiver)
            }
            Err(std_mpsc::TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(std_mpsc::TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

struct Sequence {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<GenerateEvent>,
    cache: SequenceCache,
    sampler: Sampler,
    /// Prompt tokens followed by generated ones.
    tokens: Vec<u32>,
    /// Tokens of `tokens` already in the cache.
    n_cached: usize,
    n_generated: usize,
    done: bool,
    /// When the sequence was admitted and when its first token was sampled (for the log).
    admitted_at: std::time::Instant,
    first_token_at: Option<std::time::Instant>,
}

fn run(
    model: LlamaSlice,
    pool: ComputePool,
    context_length: usize,
    stop_ids: Arc<Vec<u32>>,
    stats: Arc<ServiceStats>,
    jobs: std_mpsc::Receiver<Job>,
) {
    let mut active: Vec<Sequence> = Vec::new();
    loop {
        stats.active.store(active.len() as u64, Ordering::Relaxed);
        // Admit: block when idle, otherwise take whatever is waiting, up to the cap.
        if active.is_empty() {
            match jobs.recv() {
                Ok(job) => {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    admit(&model, context_length, job, &mut active)
                }
                Err(_) => return, // every handle dropped: shut down.
            }
        }
        while active.len() < ACTIVE_SEQUENCES_MAX {
            match jobs.try_recv() {
                Ok(job) => {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    admit(&model, context_length, job, &mut active)
                }
                Err(_) => break,
            }
        }
        active.retain(|s| !s.done && !s.events.is_closed());
        if active.is_empty() {
            continue;
        }
        stats.active.store(active.len() as u64, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(&model, &pool, &stop_ids, context_length, &stats, &mut active)
        }));
        stats.step_busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(panic) = outcome {
            // A bug, not a user error: fail the requests of this step and keep serving.
            let message = panic_message(&panic);
            tracing::error!(%message, "generation step panicked; failing its requests");
            for seq in active.drain(..) {
                let _ = seq.events.send(GenerateEvent::Failed(format!("internal error: {message}")));
            }
        }
    }
}

fn admit(model: &LlamaSlice, context_length: usize, job: Job, active: &mut Vec<Sequence>) {
    let Job { request, events } = job;
    if request.prompt.is_empty() || request.prompt.len() >= context_length {
        let _ = events.send(GenerateEvent::Failed(format!(
            "prompt of {} tokens does not fit the context of {context_length} tokens",
            request.prompt.len()
        )));
        return;
    }
    if request.max_tokens == 0 {
        let _ = events.send(GenerateEvent::Finished {
            reason: FinishReason::Length,
            prompt_tokens: request.prompt.len(),
            completion_tokens: 0,
        });
        return;
    }
    active.push(Sequence {
        cache: model.new_cache(context_length),
        sampler: Sampler::new(request.sampling.clone()),
        tokens: request.prompt.clone(),
        n_cached: 0,
        n_generated: 0,
        done: false,
        admitted_at: std::time::Instant::now(),
        first_token_at: None,
        request,
        events,
    });
}

fn step(
    model: &LlamaSlice,
    pool: &ComputePool,
    stop_ids: &[u32],
    context_length: usize,
    stats: &ServiceStats,
    active: &mut [Sequence],
) {
    // Gather each sequence's rows for this step, within the step's row budget.
    let mut step_tokens = Vec::new();
    let mut segments = Vec::new();
    let mut members = Vec::new();
    for (i, seq) in active.iter().enumerate() {
        let pending = seq.tokens.len() - seq.n_cached;
        let budget = STEP_ROWS_MAX - step_tokens.len();
        let n = pending.min(PREFILL_CHUNK_ROWS).min(budget);
        if n == 0 {
            continue;
        }
        step_tokens.extend_from_slice(&seq.tokens[seq.n_cached..seq.n_cached + n]);
        segments.push(n);
        members.push(i);
    }
    if members.is_empty() {
        return;
    }
    stats.step_rows.fetch_add(step_tokens.len() as u64, Ordering::Relaxed);
    let failed = |active: &mut [Sequence], message: String| {
        stats.requests_failed.fetch_add(members.len() as u64, Ordering::Relaxed);
        for &i in &members {
            let _ = active[i].events.send(GenerateEvent::Failed(message.clone()));
            active[i].done = true;
        }
    };
    let mut hidden = match model.embed(&step_tokens) {
        Ok(h) => h,
        Err(e) => return failed(active, e.to_string()),
    };
    {
        let mut caches: Vec<&mut SequenceCache> = Vec::with_capacity(members.len());
        // Borrow each member's cache mutably (members are distinct, increasing indices).
        let mut rest: &mut [Sequence] = active;
        let mut offset = 0;
        for &i in &members {
            let (_, tail) = rest.split_at_mut(i - offset);
            let (head, tail) = tail.split_at_mut(1);
            caches.push(&mut head[0].cache);
            rest = tail;
            offset = i + 1;
        }
        if let Err(e) = model.forward_layers(&mut hidden, &segments, &mut caches, pool) {
            return failed(active, e.to_string());
        }
    }
    // The rows that complete a sequence's input produce its next token.
    let n_embd = model.profile().n_embd;
    let mut head_rows = Vec::new();
    let mut samplers = Vec::new();
    let mut row_end = 0;
    for (&i, &n) in members.iter().zip(&segments) {
        row_end += n;
        let seq = &mut active[i];
        seq.n_cached += n;
        if seq.n_cached == seq.tokens.len() {
            head_rows.extend_from_slice(&hidden[(row_end - 1) * n_embd..row_end * n_embd]);
            samplers.push(i);
        }
    }
    if samplers.is_empty() {
        return;
    }
    let logits = match model.head(&head_rows, pool) {
        Ok(l) => l,
        Err(e) => return failed(active, e.to_string()),
    };
    let vocab = model.profile().vocab_size;
    for (row, &i) in samplers.iter().enumerate() {
        let seq = &mut active[i];
        let mut row_logits = logits[row * vocab..(row + 1) * vocab].to_vec();
        // Log-probabilities are of the raw logits (before penalties), as llama.cpp and
        // OpenAI report them; computed only when asked for.
        let raw = seq.request.logprobs.then(|| row_logits.clone());
        let id = seq.sampler.sample(&mut row_logits, &seq.tokens);
        seq.first_token_at.get_or_insert_with(std::time::Instant::now);
        let (logprob, top) = match &raw {
            Some(raw) => (
                Some(log_softmax_at(raw, &[id])[0]),
                top_logprobs(raw, seq.request.top_logprobs.min(TOP_LOGPROBS_MAX)),
            ),
            None => (None, Vec::new()),
        };
        if !seq.request.ignore_eos && stop_ids.contains(&id) {
            finish(seq, FinishReason::Stop, stats);
            continue;
        }
        seq.tokens.push(id);
        seq.n_generated += 1;
        if seq.events.send(GenerateEvent::Token { id, logprob, top }).is_err() {
            seq.done = true; // client gone
            continue;
        }
        if seq.n_generated >= seq.request.max_tokens || seq.tokens.len() >= context_length {
            finish(seq, FinishReason::Length, stats);
        }
    }
}

fn finish(seq: &mut Sequence, reason: FinishReason, stats: &ServiceStats) {
    stats.requests_finished.fetch_add(1, Ordering::Relaxed);
    stats.prompt_tokens.fetch_add(seq.request.prompt.len() as u64, Ordering::Relaxed);
    stats.completion_tokens.fetch_add(seq.n_generated as u64, Ordering::Relaxed);
    let now = std::time::Instant::now();
    let first = seq.first_token_at.unwrap_or(now);
    let decode_s = (now - first).as_secs_f64();
    tracing::info!(
        prompt_tokens = seq.request.prompt.len(),
        completion_tokens = seq.n_generated,
        ?reason,
        time_to_first_token_ms = (first - seq.admitted_at).as_millis() as u64,
        decode_tokens_per_s = if decode_s > 0.0 { ((seq.n_generated.saturating_sub(1)) as f64 / decode_s).round() } else { 0.0 },
        "request finished"
    );
    let _ = seq.events.send(GenerateEvent::Finished {
        reason,
        prompt_tokens: seq.request.prompt.len(),
        completion_tokens: seq.n_generated,
    });
    seq.done = true;
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
