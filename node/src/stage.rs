//! The stage runtime: one contiguous layer range of the model, the KV caches of the sequences
//! passing through it, and (on the last stage) their samplers. It turns the messages a stage
//! receives into the one it sends on, with no I/O of its own, so the same code runs inside a
//! worker (fed by a QUIC stream) and inside the coordinator (the single-machine case, or the
//! coordinator's own first stage), and is tested without sockets.
//!
//! What flows in, in order, on one stage's input:
//!
//! * [`SequenceStart`] — creates the sequence's KV cache here (and its sampler on the last
//!   stage), then travels on, so it reaches every stage before the sequence's first step.
//! * [`StepTokens`] (stage 0) or [`Activations`] (the others) — one step: several sequences'
//!   rows. The stage runs its layers; it sends on [`Activations`], or, on the last stage,
//!   runs the head on the rows that complete a sequence's input and sends back
//!   [`SampledTokens`].
//! * [`ReleaseSequence`] — frees the sequence's cache here, then travels on.
//!
//! **Invariant:** a step is validated whole (known sequences, positions equal to what each
//! cache holds, shapes) before any cache changes, so a bad frame leaves the stage as it was.

use std::collections::HashMap;

use potluck_engine::kv_cache::SequenceCache;
use potluck_engine::arch::ModelSlice;
use potluck_engine::sampler::{log_softmax_at, top_logprobs, Sampler, SamplingParams};
use potluck_protocol::limits::TOP_LOGPROBS_MAX;
use potluck_protocol::{
    payload_to_rows, rows_to_payload, Activations, AllowedTokens, Dtype, LogitBiasEntry, Message, PromptLogprob, SampledToken, SampledTokens, SamplingWire, Segment, SequenceStart,
    TokenLogprob,
};

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("sequence {0} is unknown on this stage (no SequenceStart, or already released)")]
    UnknownSequence(u64),
    #[error("sequence {sequence_id}: step starts at position {got}, but this stage holds {held} positions")]
    PositionMismatch { sequence_id: u64, got: u32, held: usize },
    #[error("this stage holds {held} sequences, its budget is {max}")]
    TooManySequences { held: usize, max: usize },
    #[error("a step's rows ({rows}) do not match its {what} ({len})")]
    Shape { rows: usize, what: &'static str, len: usize },
    #[error("sequence {0} appears twice in one step")]
    RepeatedSequence(u64),
    #[error("{0} is not a message a stage accepts on its data stream")]
    UnexpectedMessage(&'static str),
    #[error("stage {stage} expects {expected}, got {got}")]
    WrongInput { stage: &'static str, expected: &'static str, got: &'static str },
    #[error("prompt token {token} is outside the model's vocabulary of {vocab}")]
    TokenOutOfVocabulary { token: u32, vocab: usize },
    #[error("a token mask covers {mask} tokens, the model's vocabulary is {vocab}")]
    MaskVocabulary { mask: u32, vocab: usize },
    #[error("the engine failed: {0}")]
    Engine(#[from] potluck_engine::error::EngineError),
}

/// Counters for heartbeats and `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct StageCounters {
    pub steps: u64,
    pub rows: u64,
    pub busy_us: u64,
}

struct StageSequence {
    cache: SequenceCache,
    /// Last stage only.
    sampling: Option<SamplingState>,
    /// Rows at the end of the cache that were a draft (speculative decoding): the sequence's
    /// next step may start up to this many positions early, rolling the cache back.
    draft_rows: usize,
}

struct SamplingState {
    sampler: Sampler,
    /// The tokens the penalties look at: the history sent with SequenceStart plus every
    /// token sampled here since.
    history: Vec<u32>,
    logprobs: bool,
    top_logprobs: usize,
    /// The prompt, when the sequence asked for its tokens' log-probabilities (else empty).
    prompt: Vec<u32>,
}

/// Rows the head runs over at once for prompt log-probabilities (each row's logits are a
/// vocabulary of f32s: 64 rows of a 128k vocabulary are 32 MiB).
const PROMPT_HEAD_ROWS: usize = 64;

/// One stage of the pipeline.
pub struct StageRunner {
    model: ModelSlice,
    context_length: usize,
    sequences_max: usize,
    activation_dtype: Dtype,
    sequences: HashMap<u64, StageSequence>,
    counters: StageCounters,
}

impl StageRunner {
    /// A stage over `model`; each sequence's cache holds `context_length` positions at most,
    /// and at most `sequences_max` sequences are held at once. Activations sent on use
    /// `activation_dtype`.
    pub fn new(model: ModelSlice, context_length: usize, sequences_max: usize, activation_dtype: Dtype) -> Self {
        Self {
            model,
            context_length: context_length.max(1),
            sequences_max: sequences_max.max(1),
            activation_dtype,
            sequences: HashMap::new(),
            counters: StageCounters::default(),
        }
    }

    pub fn model(&self) -> &ModelSlice {
        &self.model
    }

    pub fn counters(&self) -> StageCounters {
        self.counters
    }

    pub fn sequences_held(&self) -> usize {
        self.sequences.len()
    }

    /// Bytes of KV cache held by every sequence on this stage.
    pub fn kv_bytes(&self) -> u64 {
        self.sequences.values().map(|s| s.cache.size_in_bytes() as u64).sum()
    }

    /// Handles one message from the stage's input and returns what to send on: to the next
    /// stage, or from the last stage to the coordinator (only [`SampledTokens`]).
    pub fn handle(&mut self, message: Message) -> Result<Option<Message>, StageError> {
        match message {
            Message::SequenceStart(start) => {
                self.start_sequence(&start)?;
                Ok((!self.model.is_last()).then_some(Message::SequenceStart(start)))
            }
            Message::ReleaseSequence(release) => {
                self.sequences.remove(&release.sequence_id);
                Ok((!self.model.is_last()).then_some(Message::ReleaseSequence(release)))
            }
            Message::StepTokens(step) => {
                if !self.model.is_first() {
                    return Err(StageError::WrongInput { stage: "past the first", expected: "Activations", got: "StepTokens" });
                }
                let hidden = {
                    check_rows(&step.segments, step.tokens.len(), "tokens")?;
                    self.check_step(&step.segments)?;
                    self.model.embed(&step.tokens)?
                };
                self.run_step(step.step, step.segments, hidden).map(Some)
            }
            Message::Activations(act) => {
                if self.model.is_first() {
                    return Err(StageError::WrongInput { stage: "first", expected: "StepTokens", got: "Activations" });
                }
                let n_embd = self.model.profile().n_embd;
                if act.hidden as usize != n_embd {
                    return Err(StageError::Shape { rows: act.hidden as usize, what: "model's hidden size", len: n_embd });
                }
                // The protocol checked payload = rows × hidden × dtype size.
                let rows: usize = act.segments.iter().map(|s| s.n_rows as usize).sum();
                check_rows(&act.segments, act.payload.len() / (n_embd * act.dtype.size_bytes() as usize), "payload")?;
                self.check_step(&act.segments)?;
                let hidden = payload_to_rows(&act.payload, act.dtype)
                    .map_err(|_| StageError::Shape { rows, what: "payload", len: act.payload.len() })?;
                self.run_step(act.step, act.segments, hidden).map(Some)
            }
            other => Err(StageError::UnexpectedMessage(other.kind().name())),
        }
    }

    fn start_sequence(&mut self, start: &SequenceStart) -> Result<(), StageError> {
        // A start for a sequence already here re-opens it from scratch: the coordinator
        // replays a sequence (after the pipeline changed) with everything it holds so far.
        self.sequences.remove(&start.sequence_id);
        if self.sequences.len() >= self.sequences_max {
            return Err(StageError::TooManySequences { held: self.sequences.len(), max: self.sequences_max });
        }
        let sampling = self.model.is_last().then(|| SamplingState {
            sampler: Sampler::new(sampling_params(&start.sampling)),
            history: start.history.clone(),
            logprobs: start.logprobs,
            top_logprobs: (start.top_logprobs.min(TOP_LOGPROBS_MAX)) as usize,
            prompt: start.prompt.clone(),
        });
        let cache = match &start.prefix {
            None => self.model.new_cache(self.context_length),
            // Prefix caching: the same tokens' keys and values, computed for an earlier request.
            Some(prefix) => {
                let source = self.sequences.get(&prefix.sequence_id).ok_or(StageError::UnknownSequence(prefix.sequence_id))?;
                source.cache.fork_prefix(prefix.positions as usize)?
            }
        };
        self.sequences.insert(start.sequence_id, StageSequence { cache, sampling, draft_rows: 0 });
        Ok(())
    }

    /// Every segment names a held sequence, once, at the position its cache is at; on the
    /// last stage a token mask covers the model's vocabulary.
    fn check_step(&self, segments: &[Segment]) -> Result<(), StageError> {
        let mut seen = std::collections::HashSet::with_capacity(segments.len());
        for s in segments {
            if !seen.insert(s.sequence_id) {
                return Err(StageError::RepeatedSequence(s.sequence_id));
            }
            let seq = self.sequences.get(&s.sequence_id).ok_or(StageError::UnknownSequence(s.sequence_id))?;
            // The step starts where the cache ends, or inside the last step's draft (its
            // rejected rows are rolled back).
            let held = seq.cache.len();
            let first = s.first_position as usize;
            if first > held || first < held - seq.draft_rows.min(held) {
                return Err(StageError::PositionMismatch {
                    sequence_id: s.sequence_id,
                    got: s.first_position,
                    held: seq.cache.len(),
                });
            }
            let vocab = self.model.profile().vocab_size;
            if let Some(allowed) = s.allowed.as_ref().filter(|a| self.model.is_last() && a.vocab as usize != vocab) {
                return Err(StageError::MaskVocabulary { mask: allowed.vocab, vocab });
            }
        }
        Ok(())
    }

    fn run_step(&mut self, step: u64, segments: Vec<Segment>, mut hidden: Vec<f32>) -> Result<Message, StageError> {
        let started = std::time::Instant::now();
        let rows: Vec<usize> = segments.iter().map(|s| s.n_rows as usize).collect();
        {
            // Segments name distinct sequences (checked): borrow each one's cache mutably.
            let mut by_id: HashMap<u64, &mut StageSequence> = self.sequences.iter_mut().map(|(k, v)| (*k, v)).collect();
            let mut caches: Vec<&mut SequenceCache> = Vec::with_capacity(segments.len());
            for s in &segments {
                let seq = by_id.remove(&s.sequence_id).ok_or(StageError::UnknownSequence(s.sequence_id))?;
                if seq.cache.len() > s.first_position as usize {
                    // The last draft's rejected rows (checked: within it).
                    seq.cache.truncate(s.first_position as usize)?;
                }
                seq.draft_rows = s.draft.len();
                caches.push(&mut seq.cache);
            }
            self.model.forward_layers(&mut hidden, &rows, &mut caches)?;
        }
        let n_rows: usize = rows.iter().sum();
        self.counters.steps += 1;
        self.counters.rows += n_rows as u64;
        let out = if self.model.is_last() {
            Message::SampledTokens(self.sample(step, &segments, &hidden)?)
        } else {
            let n_embd = self.model.profile().n_embd;
            Message::Activations(Activations {
                step,
                segments,
                dtype: self.activation_dtype,
                hidden: n_embd as u32,
                payload: rows_to_payload(&hidden, self.activation_dtype),
            })
        };
        self.counters.busy_us += started.elapsed().as_micros() as u64;
        Ok(out)
    }

    /// The head over each sampling segment's last row, then each sequence's sampler; and,
    /// for sequences that asked for them, the log-probability of every prompt token that
    /// follows one of the step's rows.
    fn sample(&mut self, step: u64, segments: &[Segment], hidden: &[f32]) -> Result<SampledTokens, StageError> {
        let n_embd = self.model.profile().n_embd;
        let mut head_rows = Vec::new();
        let mut samplers = Vec::new();
        let mut row_end = 0;
        for s in segments {
            row_end += s.n_rows as usize;
            if s.sample {
                // The last row, and with a draft the rows that predict each draft token too.
                let first = row_end - 1 - s.draft.len();
                head_rows.extend_from_slice(&hidden[first * n_embd..row_end * n_embd]);
                samplers.push((s.sequence_id, s.allowed.as_ref(), s.draft.as_slice()));
            }
        }
        let prompt = self.prompt_logprobs(segments, hidden)?;
        let mut tokens = Vec::with_capacity(samplers.len());
        if samplers.is_empty() {
            return Ok(SampledTokens { step, tokens, prompt });
        }
        let logits = self.model.head(&head_rows)?;
        let vocab = self.model.profile().vocab_size;
        let mut row = 0;
        for (id, allowed, draft) in samplers {
            let seq = self.sequences.get_mut(&id).ok_or(StageError::UnknownSequence(id))?;
            let state = seq.sampling.as_mut().expect("the last stage keeps a sampler per sequence");
            if !draft.is_empty() {
                let rows = &logits[row * vocab..(row + draft.len() + 1) * vocab];
                row += draft.len() + 1;
                tokens.push(verify_draft(state, id, rows, vocab, draft));
                continue;
            }
            let mut row_logits = logits[row * vocab..(row + 1) * vocab].to_vec();
            row += 1;
            // Log-probabilities are of the raw logits (before penalties), as llama.cpp and
            // OpenAI report them; computed only when asked for.
            let raw = state.logprobs.then(|| row_logits.clone());
            if let Some(allowed) = allowed {
                apply_mask(&mut row_logits, allowed);
            }
            let token = state.sampler.sample(&mut row_logits, &state.history);
            state.history.push(token);
            let (logprob, top) = match &raw {
                Some(raw) => (Some(log_softmax_at(raw, &[token])[0]), top_wire(raw, state.top_logprobs)),
                None => (None, Vec::new()),
            };
            tokens.push(SampledToken { sequence_id: id, token, logprob, top, accepted: 0 });
        }
        Ok(SampledTokens { step, tokens, prompt })
    }

    /// Row at position `p` of a sequence with a prompt predicts position `p + 1`: for each
    /// such row whose next token is still the prompt's, that token's log-probability.
    fn prompt_logprobs(&self, segments: &[Segment], hidden: &[f32]) -> Result<Vec<PromptLogprob>, StageError> {
        let n_embd = self.model.profile().n_embd;
        // (sequence, position of the predicted token, its id, top count, row in `hidden`)
        let mut wanted = Vec::new();
        let mut row_start = 0;
        for s in segments {
            if let Some(state) = self.sequences.get(&s.sequence_id).and_then(|q| q.sampling.as_ref()) {
                for r in 0..s.n_rows as usize {
                    let next = s.first_position as usize + r + 1;
                    if let Some(&token) = state.prompt.get(next) {
                        wanted.push((s.sequence_id, next as u32, token, state.top_logprobs, row_start + r));
                    }
                }
            }
            row_start += s.n_rows as usize;
        }
        let vocab = self.model.profile().vocab_size;
        let mut out = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(PROMPT_HEAD_ROWS) {
            let mut rows = Vec::with_capacity(chunk.len() * n_embd);
            for &(.., row) in chunk {
                rows.extend_from_slice(&hidden[row * n_embd..(row + 1) * n_embd]);
            }
            let logits = self.model.head(&rows)?;
            for (i, &(sequence_id, position, token, top_n, _)) in chunk.iter().enumerate() {
                let row = &logits[i * vocab..(i + 1) * vocab];
                if token as usize >= vocab {
                    return Err(StageError::TokenOutOfVocabulary { token, vocab });
                }
                out.push(PromptLogprob {
                    sequence_id,
                    position,
                    token,
                    logprob: log_softmax_at(row, &[token])[0],
                    top: top_wire(row, top_n),
                });
            }
        }
        Ok(out)
    }
}

fn top_wire(logits: &[f32], n: usize) -> Vec<TokenLogprob> {
    top_logprobs(logits, n).into_iter().map(|(token, logprob)| TokenLogprob { token, logprob }).collect()
}

/// A draft checked by the sequence's sampler ([`Sampler::verify`]: row `i` is drawn from as
/// plain decoding would draw there, one random number per row, so a seed gives the same text
/// with or without drafts); the accepted tokens and the next one join the history. A sampler
/// that cannot draw (a bias that bans every token) takes no draft token and draws the first
/// row as plain decoding does.
fn verify_draft(state: &mut SamplingState, id: u64, rows: &[f32], vocab: usize, draft: &[u32]) -> SampledToken {
    let (accepted, token) = match state.sampler.verify(rows, vocab, draft, &state.history) {
        Ok(v) => (v.accepted, v.next),
        Err(error) => {
            tracing::warn!(%error, sequence = id, "the draft could not be checked; drawing without it");
            (0, state.sampler.sample(&mut rows[..vocab].to_vec(), &state.history))
        }
    };
    state.history.extend_from_slice(&draft[..accepted]);
    state.history.push(token);
    SampledToken { sequence_id: id, token, logprob: None, top: Vec::new(), accepted: accepted as u32 }
}

/// Sets every logit the mask does not allow to −∞ (a grammar's constraint: the sampler's
/// chain keeps them there, so only allowed tokens can be drawn).
/// Its size was checked with the step ([`StageRunner::check_step`]).
fn apply_mask(logits: &mut [f32], allowed: &AllowedTokens) {
    for (chunk, &word) in logits.chunks_mut(64).zip(&allowed.words) {
        if word == u64::MAX {
            continue;
        }
        for (bit, logit) in chunk.iter_mut().enumerate() {
            if word & (1u64 << bit) == 0 {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

fn check_rows(segments: &[Segment], len: usize, what: &'static str) -> Result<(), StageError> {
    let rows: usize = segments.iter().map(|s| s.n_rows as usize).sum();
    if rows != len {
        return Err(StageError::Shape { rows, what, len });
    }
    Ok(())
}

/// The engine's sampling parameters from their wire form.
pub fn sampling_params(w: &SamplingWire) -> SamplingParams {
    SamplingParams {
        temperature: w.temperature,
        top_k: w.top_k,
        top_p: w.top_p,
        min_p: w.min_p,
        repetition_penalty: w.repetition_penalty,
        frequency_penalty: w.frequency_penalty,
        presence_penalty: w.presence_penalty,
        penalty_last_n: w.penalty_last_n as usize,
        seed: Some(w.seed),
        logit_bias: w.logit_bias.iter().map(|e| (e.token, e.bias)).collect(),
    }
}

/// The wire form of `params`; a request without a seed gets a random one here, so every stage
/// that might ever sample this sequence draws the same tokens.
pub fn sampling_wire(params: &SamplingParams) -> SamplingWire {
    SamplingWire {
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        min_p: params.min_p,
        repetition_penalty: params.repetition_penalty,
        frequency_penalty: params.frequency_penalty,
        presence_penalty: params.presence_penalty,
        penalty_last_n: params.penalty_last_n.min(potluck_protocol::limits::PENALTY_WINDOW_TOKENS_MAX as usize) as u32,
        seed: params.seed.unwrap_or_else(rand::random),
        logit_bias: params.logit_bias.iter().map(|&(token, bias)| LogitBiasEntry { token, bias }).collect(),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_carries_the_logit_bias_and_bounds_it_as_the_engine_does() {
        assert_eq!(potluck_protocol::limits::LOGIT_BIAS_ABS_MAX, potluck_engine::sampler::LOGIT_BIAS_MAX);
        let params = SamplingParams { logit_bias: vec![(3, -100.0), (5, f32::NEG_INFINITY), (8, 2.5)], seed: Some(9), ..SamplingParams::greedy() };
        let back = sampling_params(&sampling_wire(&params));
        assert_eq!((back.logit_bias, back.seed), (params.logit_bias, Some(9)));
    }
}
