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

use std::time::Duration;

use potluck_engine::sampler::SamplingParams;
use potluck_protocol::limits::{ACTIVATION_ROWS_MAX, MASKED_SEGMENTS_MAX, SEGMENTS_MAX, TOP_LOGPROBS_MAX};
use potluck_protocol::{Message, Segment, SequenceStart};
use potluck_node::stage::sampling_wire;
use tokio::sync::mpsc;

use crate::pipeline::{Pipeline, PipelineError};

/// Sequences decoded together at most; more wait in the queue.
pub const ACTIVE_SEQUENCES_MAX: usize = 16;
/// Requests waiting for a slot at most; past this the API answers 503.
pub const QUEUED_REQUESTS_MAX: usize = 64;
/// Prompt rows one sequence contributes to a step at most (chunked prefill).
pub const PREFILL_CHUNK_ROWS: usize = 256;
/// Rows in one step at most, over all sequences: bounds a step's scratch memory and latency.
pub const STEP_ROWS_MAX: usize = 512;
/// A step whose sampled tokens have not come back by then fails its sequences (a stage that
/// died is noticed sooner, by membership; this bounds everything else).
pub const STEP_TIMEOUT_MS: u64 = 120_000;
/// How often the idle generation thread looks for a new pipeline.
const IDLE_POLL_MS: u64 = 50;
/// Most active sequences for which a draft model (`--draft`) proposes; with more, drafts come
/// from prompt lookup. The draft model runs one forward pass per proposed token on the
/// generation thread, for every drafting sequence: on a 3-stage cluster with 5 ms links
/// (SmolLM2-135M as its own draft, `examples/bench_speculative.py --netns plk --draft`) one
/// stream ran 1.60–1.73× faster with it, 16 concurrent chats drafting with it all 0.32× (65
/// against 205 tok/s); with this cap, 1.48× for one stream and 0.91× for 16 (195 against 214).
pub const DRAFT_MODEL_SEQUENCES_MAX: usize = 2;

/// Shortest shared prefix worth starting from a kept cache (prefix caching): below this the
/// copy saves less than a step costs.
pub const PREFIX_REUSE_TOKENS_MIN: usize = 16;

// A step must fit one activations message, one segment per sequence; a prompt chunk must fit
// a step.
const _: () = assert!(STEP_ROWS_MAX <= ACTIVATION_ROWS_MAX as usize, "a step's rows fit one Activations message");
const _: () = assert!(ACTIVE_SEQUENCES_MAX <= SEGMENTS_MAX as usize, "a step's segments fit one message");
const _: () = assert!(ACTIVE_SEQUENCES_MAX <= MASKED_SEGMENTS_MAX as usize, "every sequence of a step may carry a grammar's mask");
const _: () = assert!(PREFILL_CHUNK_ROWS <= STEP_ROWS_MAX, "a prompt chunk fits a step");

/// What the generation thread may do beyond plain decoding (the defaults: prefix caching
/// and prompt-lookup drafts on, no draft model).
pub struct GenerationOptions {
    /// Keep finished sequences' caches for requests that start with the same tokens (off
    /// for models whose sliding-window layers drop old positions).
    pub prefix_caching: bool,
    /// Speculative decoding (`--no-speculative` turns it off; off for sliding-window models
    /// too, whose caches cannot always roll back).
    pub speculative: bool,
    /// Drafts from this small model (`--draft`) instead of prompt lookup.
    pub draft: Option<crate::speculative::DraftModel>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self { prefix_caching: true, speculative: true, draft: None }
    }
}

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
    /// Report the log-probability of every prompt token after the first (with
    /// `top_logprobs` alternatives), before any generated token: completions' `echo`.
    /// With `max_tokens` 0 the prompt is evaluated and nothing is generated.
    pub prompt_logprobs: bool,
    /// Holds the answer to a grammar (a JSON schema): each step's sampling segment carries
    /// the tokens it allows, and each token drawn advances it.
    pub grammar: Option<crate::structured::Grammar>,
    /// Prefix caching (llama-server's `cache_prompt`): start from the kept cache of an
    /// earlier request with the same first tokens, and keep this one's cache when it ends.
    pub cache_prompt: bool,
    /// Speculative decoding for this request (`"speculative": false` turns it off).
    pub speculative: bool,
}

/// The log-probability of the prompt token at `position` (≥ 1) given those before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenLogprob {
    pub position: usize,
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
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
    /// Prompt log-probabilities, in position order, each position once (only when the
    /// request asked for them; all of them arrive before the first `Token`).
    PromptLogprobs(Vec<PromptTokenLogprob>),
    Finished { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    /// This many prompt tokens come from a kept cache (prefix caching) and are not computed
    /// again; sent at admission, before anything else, only when there are some.
    PromptCached(usize),
    Failed(String),
    /// The model cannot run now (the cluster lost the memory it needs, or has no workers
    /// yet): the client should retry later (HTTP 503).
    Unavailable(String),
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
    pipelines: std_mpsc::Sender<Box<dyn Pipeline>>,
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
    /// Prompt tokens taken from kept caches (prefix caching) instead of computed.
    pub prompt_tokens_cached: AtomicU64,
    /// Speculative decoding: steps that carried a draft, tokens proposed, tokens accepted.
    pub draft_steps: AtomicU64,
    pub draft_tokens_proposed: AtomicU64,
    pub draft_tokens_accepted: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub step_rows: AtomicU64,
    /// Time spent computing steps, in microseconds.
    pub step_busy_us: AtomicU64,
    /// Tokens handed to requests as they are generated (`completion_tokens` counts them
    /// when a request finishes): the dashboard's live rate.
    pub tokens_generated: AtomicU64,
    /// The coordinator's own stage, when it holds layers: steps, time computing, and the
    /// round trip of its link to the next stage (0 when it has none).
    pub local_stage_steps: AtomicU64,
    pub local_stage_busy_us: AtomicU64,
    pub local_hop_rtt_us: AtomicU64,
}

impl GenerationService {
    /// Starts the generation thread over `pipeline`; sequences hold `context_length` tokens
    /// at most (the caller clamps it to the model's).
    ///
    /// With `prefix_caching`, finished sequences' caches stay on every stage (in the slots of
    /// the [`ACTIVE_SEQUENCES_MAX`] sequences the plan budgeted KV memory for, evicted least
    /// recently used first when a new sequence needs the slot) and a request whose prompt
    /// starts with the same tokens starts from a copy. Off for models whose sliding-window
    /// layers drop old positions (a copy would miss them).
    ///
    /// With `options.speculative`, eligible sequences (no log-probabilities, no grammar)
    /// carry prompt-lookup drafts in their decode steps ([`crate::speculative`]).
    pub fn start(pipeline: Box<dyn Pipeline>, context_length: usize, stop_ids: Vec<u32>, options: GenerationOptions) -> Self {
        let (jobs, receiver) = std_mpsc::sync_channel(QUEUED_REQUESTS_MAX);
        let (pipelines, pipeline_receiver) = std_mpsc::channel();
        let stop_ids = Arc::new(stop_ids);
        let stats = Arc::new(ServiceStats::default());
        let (thread_stop_ids, thread_stats) = (stop_ids.clone(), stats.clone());
        std::thread::Builder::new()
            .name("potluck-generation".into())
            .spawn(move || {
                Generator {
                    pipeline,
                    pipelines: pipeline_receiver,
                    context_length,
                    stop_ids: thread_stop_ids,
                    stats: thread_stats,
                    next_sequence_id: 1,
                    next_step: 1,
                    broken: false,
                    in_flight: Default::default(),
                    prefix_caching: options.prefix_caching,
                    speculative: options.speculative,
                    draft: options.draft,
                    kept: Vec::new(),
                }
                .run(receiver)
            })
            .expect("spawning the generation thread");
        Self { jobs, pipelines, context_length, stop_ids, stats }
    }

    /// Moves generation onto `pipeline` (the cluster changed). Sequences in flight replay
    /// their tokens so far into the new pipeline's KV caches and go on where they were.
    pub fn replace_pipeline(&self, pipeline: Box<dyn Pipeline>) -> Result<(), SubmitError> {
        self.pipelines.send(pipeline).map_err(|_| SubmitError::Stopped)
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
    id: u64,
    request: GenerateRequest,
    events: mpsc::UnboundedSender<GenerateEvent>,
    /// Prompt tokens followed by generated ones.
    tokens: Vec<u32>,
    /// Tokens of `tokens` already in the cache.
    n_cached: usize,
    n_generated: usize,
    /// Tokens of `tokens` sent in steps (`n_cached` plus those in steps not back yet). A
    /// prompt's chunks go out one behind the other without waiting (every stage runs them
    /// in order); a decode step needs the token the last one sampled.
    n_sent: usize,
    /// The next prompt position whose log-probability the client is owed (a replay on a
    /// new pipeline computes them again; each is passed on once).
    prompt_logprobs_next: usize,
    done: bool,
    /// When the sequence was admitted and when its first token was sampled (for the log).
    admitted_at: std::time::Instant,
    first_token_at: Option<std::time::Instant>,
    /// The kept cache this sequence starts from (its first start only; a replay computes all).
    prefix: Option<potluck_protocol::PrefixReuse>,
    /// Prompt tokens that came from a kept cache.
    cached_tokens: usize,
    /// Ended normally (not failed): its cache holds exactly its tokens, and may be kept.
    finished: bool,
    /// The draft in flight (speculative decoding), and the draft length's pacing.
    draft: Vec<u32>,
    pacing: crate::speculative::Pacing,
}

/// A finished sequence whose cache every stage still holds, for prefix caching.
struct Kept {
    id: u64,
    /// The tokens in its cache.
    tokens: Vec<u32>,
}

struct Generator {
    pipeline: Box<dyn Pipeline>,
    pipelines: std_mpsc::Receiver<Box<dyn Pipeline>>,
    context_length: usize,
    stop_ids: Arc<Vec<u32>>,
    stats: Arc<ServiceStats>,
    next_sequence_id: u64,
    next_step: u64,
    /// The pipeline lost a stage: nothing is stepped until a new one arrives.
    broken: bool,
    /// Steps sent and not yet answered, oldest first (answers come back in send order).
    in_flight: std::collections::VecDeque<InFlight>,
    prefix_caching: bool,
    speculative: bool,
    /// The draft model proposing drafts, if one was given (else prompt lookup).
    draft: Option<crate::speculative::DraftModel>,
    /// Kept caches, least recently used first; with the active sequences, at most
    /// [`ACTIVE_SEQUENCES_MAX`] (what every stage holds at most).
    kept: Vec<Kept>,
}

/// A step in the pipeline: its number and, per sequence, the rows it carries.
struct InFlight {
    step: u64,
    members: Vec<(u64, usize)>,
}

impl Generator {
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        let mut active: Vec<Sequence> = Vec::new();
        loop {
            self.stats.active.store(active.len() as u64, Ordering::Relaxed);
            self.take_new_pipeline(&mut active);
            // Retire before admitting: a client that sends its next turn the moment the last
            // one finished must find that turn's cache kept (admitting first missed it).
            self.retire(&mut active);
            // Admit: wait when idle, otherwise take whatever is waiting, up to the cap.
            if active.is_empty() && self.in_flight.is_empty() {
                match jobs.recv_timeout(Duration::from_millis(IDLE_POLL_MS)) {
                    Ok(job) => {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        self.admit(job, &mut active)
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return, // every handle dropped
                }
            }
            while active.len() < ACTIVE_SEQUENCES_MAX {
                match jobs.try_recv() {
                    Ok(job) => {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        self.admit(job, &mut active)
                    }
                    Err(_) => break,
                }
            }
            if active.is_empty() && self.in_flight.is_empty() {
                continue;
            }
            if self.broken {
                // Wait for the cluster's next pipeline (taken at the top of the loop).
                if let Ok(pipeline) = self.pipelines.recv_timeout(Duration::from_millis(IDLE_POLL_MS)) {
                    self.install(pipeline, &mut active);
                }
                continue;
            }
            self.stats.active.store(active.len() as u64, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.fill(&mut active);
                self.collect(&mut active);
            }));
            self.stats.step_busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.publish_local_stage();
            if let Err(panic) = outcome {
                // A bug, not a user error: fail the requests in flight and keep serving.
                let message = panic_message(&panic);
                tracing::error!(%message, "generation step panicked; failing its requests");
                for seq in active.iter_mut() {
                    let _ = seq.events.send(GenerateEvent::Failed(format!("internal error: {message}")));
                    seq.done = true;
                }
                self.in_flight.clear();
                self.retire(&mut active);
            }
        }
    }

    /// Drops finished and abandoned sequences, freeing their caches on every stage. (A
    /// sequence still in a step in flight is released behind that step: every stage sees
    /// the step first, and its sampled token is then ignored.)
    fn retire(&mut self, active: &mut Vec<Sequence>) {
        let mut released = Vec::new();
        let mut kept = Vec::new();
        let caching = self.prefix_caching && !self.broken;
        let mut draft = self.draft.as_mut();
        active.retain_mut(|s| {
            let stays = !s.done && !s.events.is_closed();
            if !stays {
                if let Some(model) = draft.as_mut() {
                    model.forget(s.id);
                }
                if caching && s.finished && s.request.cache_prompt && !s.request.prompt_logprobs && s.n_cached >= PREFIX_REUSE_TOKENS_MIN {
                    kept.push(Kept { id: s.id, tokens: s.tokens[..s.n_cached].to_vec() });
                } else {
                    released.push(s.id);
                }
            }
            stays
        });
        for new in kept {
            // A kept cache whose tokens begin the new one's is of no more use.
            let (covered, others): (Vec<Kept>, Vec<Kept>) =
                std::mem::take(&mut self.kept).into_iter().partition(|k| new.tokens.starts_with(&k.tokens));
            self.kept = others;
            released.extend(covered.iter().map(|k| k.id));
            self.kept.push(new);
        }
        for id in released {
            if let Err(e) = self.pipeline.send(Message::release(id)) {
                tracing::debug!(sequence = id, error = %e, "could not release a sequence's caches");
            }
        }
    }

    /// The kept cache that shares the longest prefix with `prompt` (at least
    /// [`PREFIX_REUSE_TOKENS_MIN`] tokens, and never the whole prompt: its last token must be
    /// computed to sample from), marked most recently used; and room made for one more
    /// sequence beside `active` by evicting the least recently used others.
    fn reuse_for(&mut self, prompt: &[u32], active: usize) -> Option<potluck_protocol::PrefixReuse> {
        let best = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, k)| (i, k.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1)))
            .filter(|&(_, n)| n >= PREFIX_REUSE_TOKENS_MIN)
            .max_by_key(|&(i, n)| (n, i));
        let chosen = best.map(|(i, n)| {
            // Most recently used: the last the eviction below reaches.
            let k = self.kept.remove(i);
            let reuse = potluck_protocol::PrefixReuse { sequence_id: k.id, positions: n as u32 };
            self.kept.push(k);
            reuse
        });
        self.make_room(active);
        // Without a slot beside its source the new sequence computes everything.
        chosen.filter(|c| self.kept.last().is_some_and(|k| k.id == c.sequence_id))
    }

    /// Releases the least recently used kept caches until one more sequence fits beside
    /// `active` ones on every stage.
    fn make_room(&mut self, active: usize) {
        let room = ACTIVE_SEQUENCES_MAX.saturating_sub(active + 1);
        while self.kept.len() > room {
            let evicted = self.kept.remove(0);
            if let Err(e) = self.pipeline.send(Message::release(evicted.id)) {
                tracing::debug!(sequence = evicted.id, error = %e, "could not release a kept cache");
            }
        }
    }

    /// Switches to a new pipeline if one was offered, replaying every active sequence.
    fn take_new_pipeline(&mut self, active: &mut [Sequence]) {
        let mut newest = None;
        while let Ok(p) = self.pipelines.try_recv() {
            newest = Some(p);
        }
        if let Some(pipeline) = newest {
            self.install(pipeline, active);
        }
    }

    fn install(&mut self, pipeline: Box<dyn Pipeline>, active: &mut [Sequence]) {
        self.broken = false;
        tracing::info!(pipeline = %pipeline.describe(), replayed_sequences = active.len(), "generation moves to a new pipeline");
        self.pipeline = pipeline;
        // Steps in flight on the old pipeline are lost; their sequences replay from scratch.
        self.in_flight.clear();
        // Kept caches were the old pipeline's. A stage that serves the new one too may
        // still hold them: release them there, so they do not take its slots.
        for kept in std::mem::take(&mut self.kept) {
            let _ = self.pipeline.send(Message::release(kept.id));
        }
        for seq in active.iter_mut() {
            seq.n_cached = 0;
            seq.n_sent = 0;
            seq.prefix = None;
            seq.draft.clear();
            if let Err(e) = self.pipeline.send(sequence_start(seq)) {
                let _ = seq.events.send(GenerateEvent::Unavailable(format!("the request cannot go on: {e}")));
                seq.done = true;
            }
        }
    }

    fn admit(&mut self, job: Job, active: &mut Vec<Sequence>) {
        // A pipeline offered before this request was submitted serves it: the cluster shows
        // itself ready only after offering the pipeline, so a client that saw it ready and
        // then asked must not meet the one before (the idle wait above sleeps on the jobs).
        self.take_new_pipeline(active);
        let context_length = self.context_length;
        let Job { request, events } = job;
        if request.prompt.is_empty() || request.prompt.len() >= context_length {
            let _ = events.send(GenerateEvent::Failed(format!(
                "prompt of {} tokens does not fit the context of {context_length} tokens",
                request.prompt.len()
            )));
            return;
        }
        if request.max_tokens == 0 && !(request.prompt_logprobs && request.prompt.len() > 1) {
            let _ = events.send(GenerateEvent::Finished {
                reason: FinishReason::Length,
                prompt_tokens: request.prompt.len(),
                completion_tokens: 0,
            });
            return;
        }
        let mut request = request;
        // One concrete seed per sequence: a replay after a pipeline change draws the same way.
        request.sampling.seed = Some(request.sampling.seed.unwrap_or_else(rand::random));
        let id = self.next_sequence_id;
        self.next_sequence_id += 1;
        let seq = Sequence {
            id,
            tokens: request.prompt.clone(),
            n_cached: 0,
            n_generated: 0,
            prompt_logprobs_next: 1,
            n_sent: 0,
            done: false,
            admitted_at: std::time::Instant::now(),
            first_token_at: None,
            prefix: None,
            cached_tokens: 0,
            finished: false,
            draft: Vec::new(),
            pacing: Default::default(),
            request,
            events,
        };
        let mut seq = seq;
        if self.prefix_caching && !self.broken && seq.request.cache_prompt && !seq.request.prompt_logprobs {
            if let Some(reuse) = self.reuse_for(&seq.request.prompt, active.len()) {
                let n = reuse.positions as usize;
                seq.prefix = Some(reuse);
                seq.n_cached = n;
                seq.n_sent = n;
                seq.cached_tokens = n;
                self.stats.prompt_tokens_cached.fetch_add(n as u64, Ordering::Relaxed);
                let _ = seq.events.send(GenerateEvent::PromptCached(n));
            }
        } else {
            // Room for the new sequence beside the kept caches all the same.
            self.make_room(active.len());
        }
        // While the pipeline is broken the next one's replay opens the sequence.
        if self.broken {
            active.push(seq);
            return;
        }
        if let Err(e) = self.pipeline.send(sequence_start(&seq)) {
            let _ = seq.events.send(GenerateEvent::Unavailable(format!("the model is not available: {e}")));
            return;
        }
        active.push(seq);
    }

    /// Sends steps until the pipeline holds as many as it has stages (so that each stage
    /// has a step to work on while the others work on theirs), each over a share of the
    /// sequences with rows to send: decoding ones not in a step already, and the next chunk
    /// of each prompt (a prompt's chunks need not wait for each other).
    fn fill(&mut self, active: &mut [Sequence]) {
        let context_length = self.context_length;
        // A draft model drafts for few sequences only; with more, prompt lookup does.
        let model_drafts = active.iter().filter(|s| !s.done).count() <= DRAFT_MODEL_SEQUENCES_MAX;
        let depth = self.pipeline.depth().max(1);
        // Sequences per step: an even share, so the steps in flight are alike in size.
        let share = active.len().div_ceil(depth).max(1);
        while self.in_flight.len() < depth && !self.broken {
            let mut tokens = Vec::new();
            let mut segments = Vec::new();
            let mut members = Vec::new();
            for seq in active.iter_mut().filter(|s| s.n_sent < s.tokens.len() && !s.done) {
                if members.len() == share {
                    break;
                }
                let pending = seq.tokens.len() - seq.n_sent;
                let budget = STEP_ROWS_MAX - tokens.len();
                let n = pending.min(PREFILL_CHUNK_ROWS).min(budget);
                if n == 0 {
                    continue;
                }
                let sample = seq.n_sent + n == seq.tokens.len();
                // The grammar has seen every token up to here (a sampling segment goes out
                // only once the previous token is back), so its mask is for this draw.
                let allowed = match seq.request.grammar.as_mut().filter(|_| sample && seq.request.max_tokens > 0) {
                    Some(grammar) => match grammar.allowed() {
                        Ok(allowed) => Some(allowed),
                        Err(e) => {
                            let _ = seq.events.send(GenerateEvent::Failed(format!("the response format cannot go on: {e}")));
                            seq.done = true;
                            continue;
                        }
                    },
                    None => None,
                };
                tokens.extend_from_slice(&seq.tokens[seq.n_sent..seq.n_sent + n]);
                // Speculative decoding: a decode step may carry proposed tokens after its one.
                let draft = if self.speculative && n == 1 && pending == 1 && drafts_allowed(&seq.request) {
                    // Within the context, the step's rows, and what the answer may still add
                    // (the step's own token is one of them).
                    let room = (context_length - 1)
                        .saturating_sub(seq.tokens.len())
                        .min(STEP_ROWS_MAX - tokens.len())
                        .min(seq.request.max_tokens.saturating_sub(seq.n_generated + 1));
                    let length = seq.pacing.next_length().min(room);
                    match self.draft.as_mut().filter(|_| model_drafts) {
                        Some(model) => model.propose(seq.id, &seq.tokens, length),
                        None => crate::speculative::propose(&seq.tokens, length),
                    }
                } else {
                    Vec::new()
                };
                tokens.extend_from_slice(&draft);
                segments.push(Segment {
                    sequence_id: seq.id,
                    first_position: seq.n_sent as u32,
                    n_rows: (n + draft.len()) as u32,
                    sample,
                    allowed,
                    draft: draft.clone(),
                });
                if !draft.is_empty() {
                    self.stats.draft_steps.fetch_add(1, Ordering::Relaxed);
                    self.stats.draft_tokens_proposed.fetch_add(draft.len() as u64, Ordering::Relaxed);
                }
                seq.draft = draft;
                members.push((seq.id, n));
                seq.n_sent += n;
            }
            if members.is_empty() {
                return;
            }
            self.stats.steps.fetch_add(1, Ordering::Relaxed);
            self.stats.step_rows.fetch_add(tokens.len() as u64, Ordering::Relaxed);
            let step = self.next_step;
            self.next_step += 1;
            match self.pipeline.send(Message::step_tokens(step, segments, tokens)) {
                Ok(()) => self.in_flight.push_back(InFlight { step, members }),
                Err(e) => self.step_failed(active, &members, e),
            }
        }
    }

    /// Waits for the oldest step in flight and hands its sequences their tokens.
    fn collect(&mut self, active: &mut [Sequence]) {
        let Some(oldest) = self.in_flight.front() else { return };
        let expected = oldest.step;
        let sampled = match self.pipeline.recv(Duration::from_millis(STEP_TIMEOUT_MS)) {
            // An answer to a step given up on earlier (it timed out): not ours.
            Ok(s) if s.step < expected => return,
            Ok(s) => s,
            Err(e) => {
                let lost = self.in_flight.pop_front().expect("looked at above");
                return self.step_failed(active, &lost.members, e);
            }
        };
        // Answers come in send order: one for a later step means the ones before it are lost.
        while self.in_flight.front().is_some_and(|f| f.step < sampled.step) {
            let lost = self.in_flight.pop_front().expect("checked");
            let message = format!("internal error: step {} lost in the pipeline", lost.step);
            self.step_failed(active, &lost.members, PipelineError::Step(message));
        }
        let Some(done) = self.in_flight.pop_front().filter(|f| f.step == sampled.step) else {
            tracing::warn!(step = sampled.step, "an answer to a step that was never sent; ignored");
            return;
        };
        for &(id, rows) in &done.members {
            if let Some(seq) = active.iter_mut().find(|s| s.id == id) {
                seq.n_cached += rows;
            }
        }
        self.pass_on_prompt_logprobs(active, sampled.prompt);
        let context_length = self.context_length;
        for token in sampled.tokens {
            let Some(seq) = active.iter_mut().find(|s| s.id == token.sequence_id) else { continue };
            if seq.done || seq.n_sent != seq.n_cached || seq.n_cached != seq.tokens.len() {
                continue;
            }
            if seq.request.max_tokens == 0 {
                // Only the prompt was to be evaluated (echo with max_tokens 0).
                finish(seq, FinishReason::Length, &self.stats);
                continue;
            }
            seq.first_token_at.get_or_insert_with(std::time::Instant::now);
            // The draft's accepted tokens come first: already in every stage's cache.
            let draft = std::mem::take(&mut seq.draft);
            let accepted = (token.accepted as usize).min(draft.len());
            seq.pacing.record(draft.len(), accepted);
            self.stats.draft_tokens_accepted.fetch_add(accepted as u64, Ordering::Relaxed);
            let mut ended = false;
            for &id in &draft[..accepted] {
                if !seq.request.ignore_eos && self.stop_ids.contains(&id) {
                    finish(seq, FinishReason::Stop, &self.stats);
                    ended = true;
                    break;
                }
                seq.tokens.push(id);
                seq.n_cached += 1;
                seq.n_sent += 1;
                seq.n_generated += 1;
                self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
                if seq.events.send(GenerateEvent::Token { id, logprob: None, top: Vec::new() }).is_err() {
                    seq.done = true; // client gone
                    ended = true;
                    break;
                }
                if seq.n_generated >= seq.request.max_tokens || seq.tokens.len() >= context_length {
                    finish(seq, FinishReason::Length, &self.stats);
                    ended = true;
                    break;
                }
            }
            if ended {
                continue;
            }
            let id = token.token;
            let logprob = token.logprob;
            let top: Vec<(u32, f32)> = token.top.iter().map(|t| (t.token, t.logprob)).collect();
            // A grammar allows an end-of-sequence token only where the answer is complete,
            // and nothing after it: it ends the answer even for `ignore_eos`.
            if (!seq.request.ignore_eos || seq.request.grammar.is_some()) && self.stop_ids.contains(&id) {
                finish(seq, FinishReason::Stop, &self.stats);
                continue;
            }
            if let Some(grammar) = seq.request.grammar.as_mut() {
                // Only a logit bias that banned every token the grammar allowed lets the
                // stage draw outside it; the request then ends instead of breaking its format.
                if let Err(e) = grammar.accept(id) {
                    let _ = seq.events.send(GenerateEvent::Failed(format!(
                        "the sampled token {id} breaks the response format ({e}); does logit_bias ban every token the format allows?"
                    )));
                    seq.done = true;
                    continue;
                }
            }
            seq.tokens.push(id);
            seq.n_generated += 1;
            self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
            if seq.events.send(GenerateEvent::Token { id, logprob, top }).is_err() {
                seq.done = true; // client gone
                continue;
            }
            if seq.n_generated >= seq.request.max_tokens || seq.tokens.len() >= context_length {
                finish(seq, FinishReason::Length, &self.stats);
            }
        }
    }

    /// A step failed: a broken pipeline keeps its sequences (the next pipeline replays
    /// them); any other failure fails the step's sequences, and only them.
    fn step_failed(&mut self, active: &mut [Sequence], members: &[(u64, usize)], error: PipelineError) {
        if let PipelineError::Broken(_) = error {
            // The sequences stay: the next pipeline replays them (the cluster re-plans, or
            // says it cannot, with a pipeline that fails them).
            tracing::warn!(error = %error, "step lost; waiting for a new pipeline");
            self.broken = true;
            return;
        }
        let message = error.to_string();
        self.stats.requests_failed.fetch_add(members.len() as u64, Ordering::Relaxed);
        for &(id, _) in members {
            if let Some(seq) = active.iter_mut().find(|s| s.id == id) {
                let _ = seq.events.send(GenerateEvent::Failed(message.clone()));
                seq.done = true;
            }
        }
    }

    /// Hands each sequence the prompt log-probabilities it is owed, in position order.
    fn pass_on_prompt_logprobs(&self, active: &mut [Sequence], entries: Vec<potluck_protocol::PromptLogprob>) {
        if entries.is_empty() {
            return;
        }
        for seq in active.iter_mut().filter(|s| s.request.prompt_logprobs && !s.done) {
            let mut owed = Vec::new();
            for e in entries.iter().filter(|e| e.sequence_id == seq.id) {
                if e.position as usize == seq.prompt_logprobs_next {
                    seq.prompt_logprobs_next += 1;
                    owed.push(PromptTokenLogprob {
                        position: e.position as usize,
                        token: e.token,
                        logprob: e.logprob,
                        top: e.top.iter().map(|t| (t.token, t.logprob)).collect(),
                    });
                }
            }
            if !owed.is_empty() && seq.events.send(GenerateEvent::PromptLogprobs(owed)).is_err() {
                seq.done = true; // client gone
            }
        }
    }

    /// Copies the coordinator's own stage's counters into the stats.
    fn publish_local_stage(&self) {
        if let Some(local) = self.pipeline.local_stage() {
            self.stats.local_stage_steps.store(local.counters.steps, Ordering::Relaxed);
            self.stats.local_stage_busy_us.store(local.counters.busy_us, Ordering::Relaxed);
            let rtt = local.next_hop_rtt.map_or(0, |d| d.as_micros() as u64);
            self.stats.local_hop_rtt_us.store(rtt, Ordering::Relaxed);
        }
    }
}

/// The message that opens `seq` on every stage (or re-opens it, on a new pipeline, with
/// the tokens it holds so far).
fn sequence_start(seq: &Sequence) -> Message {
    let window = seq
        .request
        .sampling
        .penalty_last_n
        .min(potluck_protocol::limits::PENALTY_WINDOW_TOKENS_MAX as usize)
        .min(seq.tokens.len());
    Message::SequenceStart(SequenceStart {
        sequence_id: seq.id,
        sampling: sampling_wire(&seq.request.sampling),
        logprobs: seq.request.logprobs,
        top_logprobs: seq.request.top_logprobs.min(TOP_LOGPROBS_MAX as usize) as u32,
        history: seq.tokens[seq.tokens.len() - window..].to_vec(),
        prompt: if seq.request.prompt_logprobs { seq.request.prompt.clone() } else { Vec::new() },
        prefix: seq.prefix,
    })
}

/// Whether a request's decode steps may carry drafts: not when it wants log-probabilities
/// (the stage reports none for drafted tokens) or follows a grammar (each drafted position
/// would need its own mask).
fn drafts_allowed(request: &GenerateRequest) -> bool {
    request.speculative && !request.logprobs && request.grammar.is_none() && !request.prompt_logprobs
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
        cached_prompt_tokens = seq.cached_tokens,
        decode_tokens_per_s = if decode_s > 0.0 { ((seq.n_generated.saturating_sub(1)) as f64 / decode_s).round() } else { 0.0 },
        "request finished"
    );
    let _ = seq.events.send(GenerateEvent::Finished {
        reason,
        prompt_tokens: seq.request.prompt.len(),
        completion_tokens: seq.n_generated,
    });
    seq.done = true;
    seq.finished = true;
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
