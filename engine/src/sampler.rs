//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition / frequency /
//! presence penalties and logit bias, seeded and reproducible; plus the hooks that grammars
//! and speculative decoding build on.
//!
//! The order follows llama.cpp's default sampler chain: penalties → top-k → top-p → min-p →
//! temperature → draw. `temperature <= 0` (or `top_k == 1`) is greedy: the arg-max of the
//! processed logits, with ties going to the lowest id. Sampling parameters travel with the
//! request, so whichever stage samples does exactly what the single-machine engine does.
//!
//! # Hook order
//!
//! One draw ([`Sampler::try_sample`]) runs, in this order:
//!
//! 1. **Logit processors** ([`LogitProcessor`]), each over the full row of logits, in chain
//!    order. The chain [`Sampler::new`] builds from [`SamplingParams`] is
//!    [`LogitBias`] → [`Penalties`], as llama.cpp's `common_sampler_init` adds
//!    `logit_bias` before the samplers of `params.samplers` (penalties first among those), so
//!    a bias moves a logit *before* the repetition penalty divides or multiplies it. Processors
//!    added with [`Sampler::push_processor`] (a [`TokenMask`], a grammar) run after these: a
//!    mask sets logits to −∞, which every built-in step leaves at −∞, so its place only matters
//!    to processors that read the logits. Masking before the draw is llama.cpp's
//!    `grammar_first` path; its default (draw, then resample if the grammar refuses) gives the
//!    same distribution but consumes the random stream differently.
//! 2. **The built-in chain** on the processed logits: greedy arg-max, or top-k → top-p →
//!    min-p (on probabilities at temperature 1) → temperature → one uniform draw.
//! 3. **Accept**: every processor is told the chosen token ([`LogitProcessor::accept`]), as
//!    llama.cpp's `llama_sampler_sample` ends with `llama_sampler_accept`, so a stateful
//!    processor (a grammar's parse stack) advances once per token of the sequence.
//!
//! [`Sampler::verify`] checks several proposed tokens (speculative decoding) by running
//! exactly these steps on one row per position, as llama.cpp's
//! `common_sampler_sample_and_accept_n` does: its output, and the sampler's random state after
//! it, are the same as sampling one token at a time.

use std::collections::HashMap;
use std::fmt;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How many recent tokens the penalties look at when the request does not say
/// (llama.cpp's `penalty_last_n` default).
pub const PENALTY_LAST_N_DEFAULT: usize = 64;

/// Largest magnitude of one finite logit bias, in logits: OpenAI's documented range is
/// [-100, 100], where ±100 bans or forces a token for any realistic logits. A larger value
/// would add nothing but the chance of an overflow to +∞ and a NaN in the softmax. The one
/// bias allowed past it is −∞, a strict ban (llama.cpp's `"logit_bias": [[id, false]]`):
/// −∞ is what a mask writes, and every step of the chain already leaves it at −∞.
pub const LOGIT_BIAS_MAX: f32 = 100.0;

/// Conditions a sampler reports instead of panicking: a request's bad parameters, a caller's
/// mismatched shapes, a processor that cannot go on.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplerError {
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfVocab { token: u32, vocab: usize },
    #[error("logit bias {bias} for token {token} is neither within [-{LOGIT_BIAS_MAX}, {LOGIT_BIAS_MAX}] nor -inf (a ban)")]
    BiasOutOfRange { token: u32, bias: f32 },
    #[error("token {0} is given more than one logit bias")]
    DuplicateBias(u32),
    #[error("{processor} was built for {expected} logits but was given {actual}")]
    VocabMismatch { processor: &'static str, expected: usize, actual: usize },
    #[error("the token mask allows no token, so nothing can be drawn")]
    NothingAllowed,
    /// Every logit is −∞ or NaN once the processors ran (biases of −∞ on every token, a mask
    /// and a bias that together leave nothing): drawing would silently yield token 0.
    #[error("no token is left to draw: every logit is -inf or NaN after the logit processors")]
    NoCandidates,
    #[error("{processor} does not allow token {token} here")]
    TokenRejected { processor: &'static str, token: u32 },
    #[error("expected {rows} rows of {vocab} logits, got {len} values")]
    BadRows { rows: usize, vocab: usize, len: usize },
    #[error("draft probability at row {row}, token {token} is negative or not finite")]
    BadDraftProbability { row: usize, token: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// 0.0 means no min-p cut.
    pub min_p: f32,
    /// Multiplicative penalty on logits of recent tokens (1.0: off), as in CTRL / llama.cpp.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a token in the recent window (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Subtracted once if a token occurs in the recent window (OpenAI semantics).
    pub presence_penalty: f32,
    /// Window of recent tokens the penalties consider.
    pub penalty_last_n: usize,
    /// Seed of the random draw; `None` picks one from the OS.
    pub seed: Option<u64>,
    /// (token, bias) pairs added to the logits before the penalties (OpenAI's `logit_bias`:
    /// -100 ≈ ban, +100 ≈ force; −∞ is a strict ban, as llama.cpp's `false`). Defaults to
    /// empty when absent, so params serialized before this field existed still parse.
    /// Checked by [`SamplingParams::validate`]. JSON has no −∞ (serde_json writes it as
    /// `null`, which does not read back), so a JSON form of a ban should say -100.
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: PENALTY_LAST_N_DEFAULT,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 1, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Checks what a request may get wrong against the model's vocabulary: each logit bias
    /// names a token of the vocabulary, at most once, with a bias within ±[`LOGIT_BIAS_MAX`]
    /// or −∞ (a ban). Meant for the edge that receives the request, so that a bad one
    /// is refused with a reason instead of failing later on the last stage.
    pub fn validate(&self, vocab: usize) -> Result<(), SamplerError> {
        LogitBias::new(&self.logit_bias, vocab).map(|_| ())
    }
}

/// A step that rewrites a row of logits before the built-in chain draws from it, and is told
/// which token was drawn. The shape is llama.cpp's `llama_sampler_i` (`apply` over the
/// candidates, `accept` of the chosen token) narrowed to what a processor before the chain
/// needs; like HF's `LogitsProcessor` it sees the whole row and the sequence so far.
///
/// `Send` because a sequence's sampler lives in the worker's state, which moves between
/// tasks; `Debug` so a sampler can be logged; cloning comes from [`CloneProcessor`] (any
/// `Clone` processor has it), so a sampler can be forked, e.g. for a draft model.
pub trait LogitProcessor: Send + fmt::Debug + CloneProcessor {
    /// A short fixed name for errors and logs ("logit_bias", "penalties", "token_mask").
    fn name(&self) -> &'static str;

    /// Rewrites `logits` (one row over the whole vocabulary) in place; `history` is the
    /// sequence so far, prompt included. An error means no token can be drawn correctly
    /// (wrong row length, a mask that allows nothing): the caller must not draw.
    fn process(&mut self, logits: &mut [f32], history: &[u32]) -> Result<(), SamplerError>;

    /// Told each token that joins the sequence, once, in order, after it was chosen: the
    /// hook for state that advances with the sequence (a grammar). An error means the token
    /// cannot follow (the processor's state is then undefined, as after a failed
    /// `llama_sampler_accept` of a grammar). Stateless processors keep the default.
    fn accept(&mut self, token: u32) -> Result<(), SamplerError> {
        let _ = token;
        Ok(())
    }
}

/// Clones a boxed processor; implemented for every `Clone` processor, never by hand.
pub trait CloneProcessor {
    fn clone_box(&self) -> Box<dyn LogitProcessor>;
}

impl<T: LogitProcessor + Clone + 'static> CloneProcessor for T {
    fn clone_box(&self) -> Box<dyn LogitProcessor> {
        Box::new(self.clone())
    }
}

impl Clone for Box<dyn LogitProcessor> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// Adds a fixed bias to some tokens' logits (OpenAI's `logit_bias`, llama.cpp's
/// `llama_sampler_init_logit_bias`). Entries are sorted by token, one per token.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitBias {
    entries: Vec<(u32, f32)>,
}

impl LogitBias {
    /// Checks every entry (token within `vocab`, bias within ±[`LOGIT_BIAS_MAX`] or −∞, no
    /// token twice: a list, unlike OpenAI's JSON object, could say two things of a token).
    pub fn new(entries: &[(u32, f32)], vocab: usize) -> Result<Self, SamplerError> {
        let mut sorted = entries.to_vec();
        for &(token, bias) in &sorted {
            if token as usize >= vocab {
                return Err(SamplerError::TokenOutOfVocab { token, vocab });
            }
            if !(bias.abs() <= LOGIT_BIAS_MAX || bias == f32::NEG_INFINITY) {
                return Err(SamplerError::BiasOutOfRange { token, bias });
            }
        }
        sorted.sort_unstable_by_key(|e| e.0);
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(SamplerError::DuplicateBias(pair[0].0));
        }
        Ok(Self { entries: sorted })
    }

    /// For params that were not validated against a vocabulary (see [`Sampler::new`]):
    /// clamps each finite bias into range and +∞ to +[`LOGIT_BIAS_MAX`], keeps −∞ (a ban),
    /// drops NaN and keeps the last entry of a token given twice (as a JSON object's last key
    /// wins). Ids past the vocabulary are still
    /// refused, by [`LogitProcessor::process`], when the row's length is known.
    fn clamped(entries: &[(u32, f32)]) -> Self {
        let mut kept: Vec<(u32, f32)> = entries
            .iter()
            .rev()
            .filter(|e| !e.1.is_nan())
            .map(|&(token, bias)| {
                let kept = if bias == f32::NEG_INFINITY { bias } else { bias.clamp(-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX) };
                (token, kept)
            })
            .collect();
        // Stable sort of the reversed list, then keep the first of each run: the last given.
        kept.sort_by_key(|e| e.0);
        kept.dedup_by_key(|e| e.0);
        Self { entries: kept }
    }

    pub fn entries(&self) -> &[(u32, f32)] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl LogitProcessor for LogitBias {
    fn name(&self) -> &'static str {
        "logit_bias"
    }

    fn process(&mut self, logits: &mut [f32], _history: &[u32]) -> Result<(), SamplerError> {
        let vocab = logits.len();
        for &(token, bias) in &self.entries {
            let logit = logits.get_mut(token as usize).ok_or(SamplerError::TokenOutOfVocab { token, vocab })?;
            *logit += bias;
        }
        Ok(())
    }
}

/// Repetition (CTRL's, as llama.cpp applies it), frequency and presence (OpenAI's) penalties
/// over the last `penalty_last_n` tokens of the history. Stateless across steps: it reads
/// the window from `history` each time, so a sampler can be rebuilt from the history alone
/// (llama.cpp keeps a ring buffer fed by `accept` instead; the result is the same).
#[derive(Debug, Clone)]
pub struct Penalties {
    repetition: f32,
    frequency: f32,
    presence: f32,
    last_n: usize,
    /// Occurrences per token in the window; kept only to reuse its allocation.
    counts: HashMap<u32, u32>,
}

impl Penalties {
    /// `None` when the params penalise nothing, so an inactive processor costs nothing.
    pub fn from_params(p: &SamplingParams) -> Option<Self> {
        let active = p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        if !active || p.penalty_last_n == 0 {
            return None;
        }
        Some(Self {
            repetition: p.repetition_penalty,
            frequency: p.frequency_penalty,
            presence: p.presence_penalty,
            last_n: p.penalty_last_n,
            counts: HashMap::new(),
        })
    }
}

impl LogitProcessor for Penalties {
    fn name(&self) -> &'static str {
        "penalties"
    }

    fn process(&mut self, logits: &mut [f32], history: &[u32]) -> Result<(), SamplerError> {
        let window = &history[history.len().saturating_sub(self.last_n)..];
        self.counts.clear();
        for &t in window {
            *self.counts.entry(t).or_insert(0) += 1;
        }
        for (&token, &count) in &self.counts {
            // An id past the row cannot be penalised; skipping it is what the sampler has
            // always done (the history comes from our own tokenizer and sampler).
            let Some(l) = logits.get_mut(token as usize) else { continue };
            if self.repetition != 1.0 {
                *l = if *l > 0.0 { *l / self.repetition } else { *l * self.repetition };
            }
            *l -= count as f32 * self.frequency + self.presence;
        }
        Ok(())
    }
}

/// The set of tokens allowed at this step, as one bit per token of the vocabulary; every
/// other token's logit becomes −∞. The shape grammar-constrained decoding fills in each step
/// (llama.cpp's grammar sampler does the same to the candidates it rejects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    /// Bit `t % 64` of word `t / 64` is set when token `t` is allowed.
    words: Vec<u64>,
    vocab: usize,
}

impl TokenMask {
    /// A mask over `vocab` tokens that allows none yet.
    pub fn none(vocab: usize) -> Self {
        Self { words: vec![0; vocab.div_ceil(64)], vocab }
    }

    /// A mask over `vocab` tokens that allows every one.
    pub fn all(vocab: usize) -> Self {
        let mut mask = Self { words: vec![u64::MAX; vocab.div_ceil(64)], vocab };
        if !vocab.is_multiple_of(64) {
            // Bits past the vocabulary stay clear so that `count_allowed` is exact.
            if let Some(last) = mask.words.last_mut() {
                *last = (1u64 << (vocab % 64)) - 1;
            }
        }
        mask
    }

    pub fn from_allowed(vocab: usize, allowed: impl IntoIterator<Item = u32>) -> Result<Self, SamplerError> {
        let mut mask = Self::none(vocab);
        for token in allowed {
            mask.allow(token)?;
        }
        Ok(mask)
    }

    pub fn allow(&mut self, token: u32) -> Result<(), SamplerError> {
        let (word, bit) = self.position(token)?;
        self.words[word] |= bit;
        Ok(())
    }

    pub fn disallow(&mut self, token: u32) -> Result<(), SamplerError> {
        let (word, bit) = self.position(token)?;
        self.words[word] &= !bit;
        Ok(())
    }

    /// False for a token past the vocabulary.
    pub fn is_allowed(&self, token: u32) -> bool {
        self.position(token).is_ok_and(|(word, bit)| self.words[word] & bit != 0)
    }

    pub fn count_allowed(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    fn position(&self, token: u32) -> Result<(usize, u64), SamplerError> {
        let index = token as usize;
        if index >= self.vocab {
            return Err(SamplerError::TokenOutOfVocab { token, vocab: self.vocab });
        }
        Ok((index / 64, 1u64 << (index % 64)))
    }
}

impl LogitProcessor for TokenMask {
    fn name(&self) -> &'static str {
        "token_mask"
    }

    fn process(&mut self, logits: &mut [f32], _history: &[u32]) -> Result<(), SamplerError> {
        if logits.len() != self.vocab {
            return Err(SamplerError::VocabMismatch { processor: self.name(), expected: self.vocab, actual: logits.len() });
        }
        // With nothing allowed every logit would be −∞ and the chain would fall back to
        // token 0: a silent wrong answer, so refuse instead.
        if self.count_allowed() == 0 {
            return Err(SamplerError::NothingAllowed);
        }
        for (chunk, &word) in logits.chunks_mut(64).zip(&self.words) {
            if word == u64::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1u64 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    /// A token outside the mask cannot join the sequence (it can only arrive through
    /// [`Sampler::accept`], since a draw never picks a −∞ logit).
    fn accept(&mut self, token: u32) -> Result<(), SamplerError> {
        if self.is_allowed(token) {
            Ok(())
        } else {
            Err(SamplerError::TokenRejected { processor: self.name(), token })
        }
    }
}

/// The outcome of [`Sampler::verify`]: the first `accepted` proposed tokens are part of the
/// sequence, followed by `next`, the token the sampler chose where the proposal stopped
/// being right (or after its last token). A step therefore always yields `accepted + 1`
/// tokens, so speculative decoding never does worse than one token per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    pub accepted: usize,
    pub next: u32,
}

/// One sequence's sampler: its parameters, its random state and its chain of processors.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
    /// Applied in order before the built-in chain; see "Hook order" above.
    processors: Vec<Box<dyn LogitProcessor>>,
}

impl Sampler {
    /// A sampler for params not checked against the vocabulary (the worker's: the wire does
    /// not carry a logit bias yet). It never fails: a bias outside ±[`LOGIT_BIAS_MAX`] is
    /// clamped (−∞, a ban, is kept), a NaN one dropped, and an id past the vocabulary makes
    /// [`Sampler::try_sample`] fail. Prefer [`Sampler::try_new`] where the vocabulary is known.
    pub fn new(params: SamplingParams) -> Self {
        let bias = LogitBias::clamped(&params.logit_bias);
        Self::with_bias(params, bias)
    }

    /// A sampler for a vocabulary of `vocab` tokens, refusing params that
    /// [`SamplingParams::validate`] refuses.
    pub fn try_new(params: SamplingParams, vocab: usize) -> Result<Self, SamplerError> {
        let bias = LogitBias::new(&params.logit_bias, vocab)?;
        Ok(Self::with_bias(params, bias))
    }

    fn with_bias(params: SamplingParams, bias: LogitBias) -> Self {
        let rng = match params.seed {
            Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        // Only active processors join the chain, so params without bias or penalties cost
        // nothing per token and draw exactly as before processors existed.
        let mut processors: Vec<Box<dyn LogitProcessor>> = Vec::new();
        if !bias.is_empty() {
            processors.push(Box::new(bias));
        }
        if let Some(penalties) = Penalties::from_params(&params) {
            processors.push(Box::new(penalties));
        }
        Self { params, rng, processors }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Appends `processor` to the chain, after those built from the params (a grammar's mask,
    /// for instance). It sees only tokens accepted from now on.
    pub fn push_processor(&mut self, processor: Box<dyn LogitProcessor>) {
        self.processors.push(processor);
    }

    /// The names of the processors in chain order, for logs and tests.
    pub fn processor_names(&self) -> Vec<&'static str> {
        self.processors.iter().map(|p| p.name()).collect()
    }

    /// Picks the next token from `logits` (modified in place by the processors), given the
    /// tokens of the sequence so far (`history`, prompt included), and tells the processors
    /// it was accepted. The caller appends it to its history.
    ///
    /// Fails, drawing nothing, when a processor fails or when no logit is left above −∞
    /// ([`SamplerError::NoCandidates`]): the built-in chain would then return token 0, a
    /// silent wrong answer.
    pub fn try_sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32, SamplerError> {
        self.process(logits, history)?;
        let token = self.draw(logits);
        self.accept(token)?;
        Ok(token)
    }

    /// [`Sampler::try_sample`] for callers that cannot handle an error: the processors built
    /// from params fail only on a bias id past the vocabulary, which the edge's
    /// [`SamplingParams::validate`] refuses. If one fails anyway it is logged and skipped and
    /// the others still run, so one bad entry degrades the request instead of ending the
    /// stage. Callers that add processors which can fail (a grammar) use `try_sample`.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        for processor in &mut self.processors {
            if let Err(error) = processor.process(logits, history) {
                tracing::error!(%error, processor = processor.name(), "logit processor failed; skipping it for this token");
            }
        }
        // Checked only behind processors, so the path without them scans nothing more than
        // it always did; the draw's fallback (the arg-max, token 0 here) stays as it was.
        if !self.processors.is_empty() && !has_candidate(logits) {
            tracing::error!(error = %SamplerError::NoCandidates, "drawing the arg-max of a row the processors emptied");
        }
        let token = self.draw(logits);
        if let Err(error) = self.accept(token) {
            tracing::error!(%error, token, "a logit processor refused the sampled token");
        }
        token
    }

    /// Runs the processors over one row, in chain order, and refuses a row they left empty.
    fn process(&mut self, logits: &mut [f32], history: &[u32]) -> Result<(), SamplerError> {
        for processor in &mut self.processors {
            processor.process(logits, history)?;
        }
        if has_candidate(logits) {
            Ok(())
        } else {
            Err(SamplerError::NoCandidates)
        }
    }

    /// Tells every processor that `token` joined the sequence. [`Sampler::try_sample`],
    /// [`Sampler::sample`] and [`Sampler::verify`] already do so for the tokens they return;
    /// call this only for tokens that join without being drawn here (a forced token).
    pub fn accept(&mut self, token: u32) -> Result<(), SamplerError> {
        for processor in &mut self.processors {
            processor.accept(token)?;
        }
        Ok(())
    }

    /// Checks proposed tokens (speculative decoding) in one go. `logits_rows` holds
    /// `proposed.len() + 1` rows of `vocab` logits: row `i` is the target model's output
    /// after `history` + `proposed[..i]`.
    ///
    /// The rule, for `i` from 0: process row `i` with the history extended by the tokens
    /// accepted so far, and draw `y` from it exactly as [`Sampler::try_sample`] does (greedy:
    /// `y` is the arg-max, lowest id on ties, and no random number is used; otherwise one
    /// uniform number from the sampler's RNG picks `y` among the top-k → top-p → min-p →
    /// temperature candidates). If `y == proposed[i]` it is accepted and the next row is
    /// checked; otherwise `next = y` and the rest of the proposal is dropped. When every
    /// proposed token is accepted, `next` is the draw from the last row. Rows past the first
    /// rejection are not read.
    ///
    /// This is the standard acceptance rule of speculative sampling (Leviathan et al. 2023;
    /// Chen et al. 2023) for a drafter that gives a token rather than a distribution, i.e.
    /// draft probability q = δ(x) (a greedy drafter): it accepts `x` with probability
    /// min(1, p(x)/q(x)) = p(x), and on rejection `next` follows normalised max(0, p − δ(x)),
    /// which is p without `x`. So each token follows exactly the sampler's distribution p, a
    /// token with p(x) = 0 (cut, masked or banned) is never accepted, and with greedy params
    /// it accepts exactly the prefix that equals the arg-maxes. Because it uses one uniform
    /// number per drawn token, as sampling one token at a time does, the output, the random
    /// state afterwards and every processor's state equal those of sequential sampling: a
    /// seed gives the same tokens with or without speculation. With the draft's
    /// probabilities, [`Sampler::verify_with_draft`] accepts more often.
    pub fn verify(
        &mut self,
        logits_rows: &[f32],
        vocab: usize,
        proposed: &[u32],
        history: &[u32],
    ) -> Result<Verification, SamplerError> {
        check_rows(logits_rows.len(), vocab, proposed.len() + 1)?;
        check_proposed(proposed, vocab)?;
        let mut sequence = Vec::with_capacity(history.len() + proposed.len() + 1);
        sequence.extend_from_slice(history);
        let mut row = Vec::with_capacity(vocab);
        for (i, &draft) in proposed.iter().enumerate() {
            row.clear();
            row.extend_from_slice(&logits_rows[i * vocab..(i + 1) * vocab]);
            let token = self.try_sample(&mut row, &sequence)?;
            if token != draft {
                return Ok(Verification { accepted: i, next: token });
            }
            sequence.push(token);
        }
        row.clear();
        row.extend_from_slice(&logits_rows[proposed.len() * vocab..]);
        let next = self.try_sample(&mut row, &sequence)?;
        Ok(Verification { accepted: proposed.len(), next })
    }

    /// [`Sampler::verify`] with the draft model's probabilities (`draft_probs`:
    /// `proposed.len()` rows of `vocab`, row `i` the distribution `proposed[i]` was drawn
    /// from), using the standard rejection rule of speculative sampling (Leviathan et al.
    /// 2023; Chen et al. 2023): accept `x` with probability min(1, p(x)/q(x)) where p is
    /// this sampler's distribution after the whole chain; on rejection draw `next` from
    /// normalised max(0, p − q). Each token's distribution stays exactly p, and more draft
    /// tokens are accepted than by [`Sampler::verify`], but the random stream is consumed
    /// differently from sequential sampling (still reproducible for a seed). Greedy params
    /// ignore the draft: the rule then reduces to the arg-max comparison.
    pub fn verify_with_draft(
        &mut self,
        logits_rows: &[f32],
        draft_probs: &[f32],
        vocab: usize,
        proposed: &[u32],
        history: &[u32],
    ) -> Result<Verification, SamplerError> {
        check_rows(logits_rows.len(), vocab, proposed.len() + 1)?;
        check_rows(draft_probs.len(), vocab, proposed.len())?;
        check_proposed(proposed, vocab)?;
        if let Some(at) = draft_probs.iter().position(|q| !(q.is_finite() && *q >= 0.0)) {
            return Err(SamplerError::BadDraftProbability { row: at / vocab, token: (at % vocab) as u32 });
        }
        if self.params.is_greedy() {
            return self.verify(logits_rows, vocab, proposed, history);
        }
        let mut sequence = Vec::with_capacity(history.len() + proposed.len() + 1);
        sequence.extend_from_slice(history);
        let mut row = Vec::with_capacity(vocab);
        for (i, &draft) in proposed.iter().enumerate() {
            row.clear();
            row.extend_from_slice(&logits_rows[i * vocab..(i + 1) * vocab]);
            self.process(&mut row, &sequence)?;
            // Only +∞ logits left: the draw falls back to the arg-max, so p is one-hot there.
            let target = distribution(&self.params, &row).unwrap_or_else(|| Distribution::one_hot(argmax(&row)));
            let q = &draft_probs[i * vocab..(i + 1) * vocab];
            let p_x = target.probability(draft);
            let q_x = q[draft as usize];
            // u < p/q written without the division: q(x) = 0 (the drafter could not have
            // drawn x) accepts whenever p(x) > 0; p(x) = 0 always rejects.
            let u: f32 = self.rng.random();
            if u * q_x < p_x {
                self.accept(draft)?;
                sequence.push(draft);
                continue;
            }
            let next = target.draw_residual(q, &mut self.rng);
            self.accept(next)?;
            return Ok(Verification { accepted: i, next });
        }
        row.clear();
        row.extend_from_slice(&logits_rows[proposed.len() * vocab..]);
        let next = self.try_sample(&mut row, &sequence)?;
        Ok(Verification { accepted: proposed.len(), next })
    }

    /// The built-in chain over processed logits: greedy arg-max, or the candidates' draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        match distribution(&self.params, logits) {
            Some(target) => target.draw(&mut self.rng),
            // Nothing finite to weigh; the arg-max is as good as any and draws no number.
            None => argmax(logits),
        }
    }
}

/// Whether any token can still be drawn: a logit above −∞ (NaN is not).
fn has_candidate(logits: &[f32]) -> bool {
    logits.iter().any(|&l| l > f32::NEG_INFINITY)
}

/// `len` must be exactly `rows` rows of a non-empty vocabulary.
fn check_rows(len: usize, vocab: usize, rows: usize) -> Result<(), SamplerError> {
    match vocab.checked_mul(rows) {
        Some(expected) if vocab > 0 && expected == len => Ok(()),
        _ => Err(SamplerError::BadRows { rows, vocab, len }),
    }
}

/// A proposed id past the vocabulary is a drafter's bug (a different tokenizer); say so
/// rather than merely reject it.
fn check_proposed(proposed: &[u32], vocab: usize) -> Result<(), SamplerError> {
    match proposed.iter().find(|&&t| t as usize >= vocab) {
        Some(&token) => Err(SamplerError::TokenOutOfVocab { token, vocab }),
        None => Ok(()),
    }
}

/// What the built-in chain leaves to draw from: candidates best first, with their weights
/// after temperature (unnormalised, as the draw uses them).
struct Distribution {
    candidates: Vec<(u32, f32)>,
    weights: Vec<f32>,
    total: f32,
}

/// top-k → top-p → min-p → temperature over processed logits; `None` when no logit is finite.
fn distribution(p: &SamplingParams, logits: &[f32]) -> Option<Distribution> {
    // Candidates sorted by logit, best first; top-k bounds the sort.
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = if p.top_k > 0 { (p.top_k as usize).min(candidates.len()) } else { candidates.len() };
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, by_logit);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(by_logit);

    // Softmax at temperature 1 for the top-p / min-p cuts (llama.cpp applies them before
    // temperature in its default chain).
    let max = candidates[0].1;
    let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    let mut keep = candidates.len();
    if p.top_p < 1.0 {
        let mut cumulative = 0.0;
        for (i, &prob) in probs.iter().enumerate() {
            cumulative += prob;
            if cumulative >= p.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let threshold = probs[0] * p.min_p;
        keep = keep.min(probs.iter().take_while(|&&x| x >= threshold).count().max(1));
    }
    candidates.truncate(keep.max(1));

    // Temperature; the draw normalises by `total`.
    let weights: Vec<f32> = candidates.iter().map(|c| ((c.1 - max) / p.temperature).exp()).collect();
    let total: f32 = weights.iter().sum();
    Some(Distribution { candidates, weights, total })
}

impl Distribution {
    fn one_hot(token: u32) -> Self {
        Self { candidates: vec![(token, 0.0)], weights: vec![1.0], total: 1.0 }
    }

    /// One uniform number, walked along the cumulative weights.
    fn draw(&self, rng: &mut rand::rngs::StdRng) -> u32 {
        let mut r = rng.random::<f32>() * self.total;
        for (c, w) in self.candidates.iter().zip(&self.weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        self.candidates.last().map_or(0, |c| c.0)
    }

    fn probability(&self, token: u32) -> f32 {
        self.candidates
            .iter()
            .zip(&self.weights)
            .find(|(c, _)| c.0 == token)
            .map_or(0.0, |(_, w)| w / self.total)
    }

    /// A draw from normalised max(0, p − q): the residual of speculative sampling's rejection
    /// rule. Tokens outside the candidates have p = 0 and so no residual. If the residual is
    /// empty (p ≤ q everywhere, which only rounding allows after a rejection), draw from p.
    fn draw_residual(&self, q: &[f32], rng: &mut rand::rngs::StdRng) -> u32 {
        let residual: Vec<f32> = self
            .candidates
            .iter()
            .zip(&self.weights)
            .map(|(c, w)| (w / self.total - q.get(c.0 as usize).copied().unwrap_or(0.0)).max(0.0))
            .collect();
        let total: f32 = residual.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return self.draw(rng);
        }
        let mut r = rng.random::<f32>() * total;
        let mut last_positive = self.candidates[0].0;
        for (c, &w) in self.candidates.iter().zip(&residual) {
            if w > 0.0 {
                if r < w {
                    return c.0;
                }
                r -= w;
                last_positive = c.0;
            }
        }
        last_positive
    }
}

/// Index of the largest logit; ties go to the lowest index (as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of raw logits for `ids` (what llama.cpp reports as `n_probs` with
/// `post_sampling_probs = false`).
pub fn log_softmax_at(logits: &[f32], ids: &[u32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    ids.iter().map(|&i| logits[i as usize] - lse).collect()
}

/// The `n` most likely tokens with their log-probabilities, best first.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(n - 1, by_logit);
    idx.truncate(n);
    idx.sort_unstable_by(by_logit);
    idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect()
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(7), ..Default::default() };
        let draw = || {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 over flat-ish logits should vary");
    }

    #[test]
    fn top_k_restricts_to_the_best() {
        let logits: Vec<f32> = vec![5.0, 4.9, 0.0, 0.0, 0.0];
        let params = SamplingParams { temperature: 5.0, top_k: 2, top_p: 1.0, min_p: 0.0, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(params);
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone(), &[]) < 2);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits: Vec<f32> = vec![10.0, 0.0, 0.0, 0.0];
        for params in [
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, seed: Some(3), ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.1, seed: Some(3), ..Default::default() },
        ] {
            let mut s = Sampler::new(params);
            for _ in 0..100 {
                assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
            }
        }
    }

    #[test]
    fn penalties_change_greedy_choice() {
        let params = SamplingParams { presence_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1]), 0);
        let params = SamplingParams { repetition_penalty: 3.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1]), 0);
        let params = SamplingParams { frequency_penalty: 0.6, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1]), 1, "one occurrence costs 0.6");
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1, 1]), 0, "two cost 1.2");
    }

    #[test]
    fn logprobs_are_normalised() {
        let logits = vec![1.0, 2.0, 3.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1, 0]);
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!((log_softmax_at(&logits, &[2])[0] - top[0].1).abs() < 1e-6);
    }

    /// The penalty arithmetic and `sample` as they were before processors existed, kept to
    /// prove the refactor bit-identical.
    fn old_apply_penalties(logits: &mut [f32], history: &[u32], p: &SamplingParams) {
        let active = p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        if !active || p.penalty_last_n == 0 {
            return;
        }
        let window = &history[history.len().saturating_sub(p.penalty_last_n)..];
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in window {
            *counts.entry(t).or_insert(0) += 1;
        }
        for (&token, &count) in &counts {
            let Some(l) = logits.get_mut(token as usize) else { continue };
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
            *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }

    fn old_sample(p: &SamplingParams, rng: &mut rand::rngs::StdRng, logits: &mut [f32], history: &[u32]) -> u32 {
        old_apply_penalties(logits, history, p);
        if p.is_greedy() {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)).collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = if p.top_k > 0 { (p.top_k as usize).min(candidates.len()) } else { candidates.len() };
        if k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit);
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(by_logit);
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = candidates.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, &prob) in probs.iter().enumerate() {
                cumulative += prob;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&x| x >= threshold).count().max(1));
        }
        candidates.truncate(keep.max(1));
        let weights: Vec<f32> = candidates.iter().map(|c| ((c.1 - max) / p.temperature).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut r = rng.random::<f32>() * total;
        for (c, w) in candidates.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        candidates.last().map_or(0, |c| c.0)
    }

    /// Every combination of the penalty and cut settings, greedy and not.
    fn param_grid() -> Vec<SamplingParams> {
        let mut grid = Vec::new();
        for &(temperature, top_k) in &[(0.0, 40), (0.7, 0), (1.3, 5), (1.0, 1)] {
            for &(top_p, min_p) in &[(1.0, 0.0), (0.9, 0.05)] {
                for &repetition_penalty in &[1.0, 1.3, 0.8] {
                    for &(frequency_penalty, presence_penalty) in &[(0.0, 0.0), (0.4, 0.0), (0.0, 0.7), (-0.3, 0.5)] {
                        for &penalty_last_n in &[0, 4, 64] {
                            grid.push(SamplingParams {
                                temperature,
                                top_k,
                                top_p,
                                min_p,
                                repetition_penalty,
                                frequency_penalty,
                                presence_penalty,
                                penalty_last_n,
                                seed: Some(grid.len() as u64),
                                logit_bias: Vec::new(),
                            });
                        }
                    }
                }
            }
        }
        grid
    }

    #[test]
    fn processors_are_bit_identical_to_the_old_sampler() {
        let vocab = 50;
        let mut data = rand::rngs::StdRng::seed_from_u64(99);
        for params in param_grid() {
            let mut new = Sampler::new(params.clone());
            let mut old_rng = rand::rngs::StdRng::seed_from_u64(params.seed.unwrap());
            let mut history: Vec<u32> = (0..10).map(|_| data.random_range(0..vocab as u32 + 3)).collect();
            for _ in 0..20 {
                let logits: Vec<f32> = (0..vocab).map(|_| data.random_range(-4.0f32..4.0)).collect();
                let (mut a, mut b) = (logits.clone(), logits);
                let ta = new.sample(&mut a, &history);
                let tb = old_sample(&params, &mut old_rng, &mut b, &history);
                assert_eq!(ta, tb, "{params:?}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "processed logits differ for {params:?}");
                history.push(ta);
            }
        }
    }

    #[test]
    fn chain_from_params_is_bias_then_penalties() {
        assert!(Sampler::new(SamplingParams::default()).processor_names().is_empty());
        let params = SamplingParams { repetition_penalty: 2.0, logit_bias: vec![(0, 1.0)], ..SamplingParams::greedy() };
        let mut s = Sampler::try_new(params, 2).unwrap();
        assert_eq!(s.processor_names(), ["logit_bias", "penalties"]);
        // llama.cpp's order: (1 + 1) / 2 = 1, not 1 / 2 + 1 = 1.5.
        let mut logits = [1.0, 0.0];
        s.sample(&mut logits, &[0]);
        assert_eq!(logits[0], 1.0);
    }

    #[test]
    fn logit_bias_is_validated() {
        let with = |logit_bias: Vec<(u32, f32)>| SamplingParams { logit_bias, ..SamplingParams::greedy() };
        assert_eq!(with(vec![(9, 1.0)]).validate(10), Ok(()));
        assert_eq!(with(vec![(10, 1.0)]).validate(10), Err(SamplerError::TokenOutOfVocab { token: 10, vocab: 10 }));
        assert_eq!(with(vec![(1, 100.5)]).validate(10), Err(SamplerError::BiasOutOfRange { token: 1, bias: 100.5 }));
        assert!(matches!(with(vec![(1, f32::NAN)]).validate(10), Err(SamplerError::BiasOutOfRange { token: 1, .. })));
        assert_eq!(with(vec![(3, 1.0), (3, 2.0)]).validate(10), Err(SamplerError::DuplicateBias(3)));
        assert!(Sampler::try_new(with(vec![(10, 1.0)]), 10).is_err());
    }

    #[test]
    fn logit_bias_bans_and_forces() {
        let logits = [5.0, 4.0, 0.0, 1.0];
        let ban = SamplingParams { logit_bias: vec![(0, -100.0)], ..SamplingParams::greedy() };
        assert_eq!(Sampler::try_new(ban, 4).unwrap().sample(&mut logits.clone(), &[]), 1);
        let force = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(4),
            logit_bias: vec![(2, 100.0)],
            ..Default::default()
        };
        let mut s = Sampler::try_new(force, 4).unwrap();
        for _ in 0..200 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 2);
        }
    }

    #[test]
    fn unvalidated_bias_is_clamped_and_an_id_past_the_vocabulary_fails_cleanly() {
        let params = SamplingParams { logit_bias: vec![(1, 500.0), (1, -3.0), (7, f32::NAN)], ..SamplingParams::greedy() };
        let mut s = Sampler::new(params);
        let mut logits = [0.0, 0.0];
        assert_eq!(s.sample(&mut logits, &[]), 0, "the last bias given for a token wins");
        assert_eq!(logits, [0.0, -3.0]);
        let params = SamplingParams { logit_bias: vec![(1, 500.0), (9, 1.0)], ..SamplingParams::greedy() };
        let mut logits = [0.0, 0.0];
        assert_eq!(
            Sampler::new(params.clone()).try_sample(&mut logits, &[]),
            Err(SamplerError::TokenOutOfVocab { token: 9, vocab: 2 })
        );
        // The infallible form logs and goes on; here the bias of token 1 already applied.
        let mut logits = [0.0, 0.0];
        assert_eq!(Sampler::new(params).sample(&mut logits, &[]), 1);
        assert_eq!(logits[1], LOGIT_BIAS_MAX);
    }

    #[test]
    fn params_without_logit_bias_still_parse() {
        let old = r#"{"temperature":0.5,"top_k":3,"top_p":0.9,"min_p":0.0,"repetition_penalty":1.1,
            "frequency_penalty":0.0,"presence_penalty":0.2,"penalty_last_n":64,"seed":7}"#;
        let params: SamplingParams = serde_json::from_str(old).unwrap();
        assert!(params.logit_bias.is_empty());
        let biased = SamplingParams { logit_bias: vec![(5, -100.0), (2, 3.5)], ..params };
        let json = serde_json::to_string(&biased).unwrap();
        assert_eq!(serde_json::from_str::<SamplingParams>(&json).unwrap(), biased);
    }

    #[test]
    fn logit_bias_of_negative_infinity_removes_a_token() {
        let ban = |params: SamplingParams| SamplingParams { logit_bias: vec![(0, f32::NEG_INFINITY)], ..params };
        assert_eq!(ban(SamplingParams::greedy()).validate(4), Ok(()));
        let plus = SamplingParams { logit_bias: vec![(0, f32::INFINITY)], ..SamplingParams::greedy() };
        assert!(matches!(plus.validate(4), Err(SamplerError::BiasOutOfRange { token: 0, .. })));

        let logits = [5.0, 4.0, 0.0, 1.0];
        let mut greedy = Sampler::try_new(ban(SamplingParams::greedy()), 4).unwrap();
        let mut row = logits;
        assert_eq!(greedy.try_sample(&mut row, &[]), Ok(1));
        assert_eq!(row[0], f32::NEG_INFINITY);

        // Hot, uncut, and with penalties on the banned token (which must not lift it off −∞):
        // token 0 has by far the largest logit, yet never comes out.
        let hot = SamplingParams {
            temperature: 3.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.3,
            frequency_penalty: -2.0,
            ..Default::default()
        };
        for seed in 0..50 {
            let mut s = Sampler::try_new(ban(SamplingParams { seed: Some(seed), ..hot.clone() }), 4).unwrap();
            for _ in 0..20 {
                let mut row = logits;
                assert_ne!(s.try_sample(&mut row, &[0, 0, 0]).unwrap(), 0, "seed {seed}");
                assert_eq!(row[0], f32::NEG_INFINITY);
            }
        }

        // Unvalidated params keep the ban and clamp +∞ to a force.
        let params = SamplingParams { logit_bias: vec![(0, f32::NEG_INFINITY), (2, f32::INFINITY)], ..SamplingParams::greedy() };
        let mut row = logits;
        assert_eq!(Sampler::new(params).try_sample(&mut row, &[]), Ok(2));
        assert_eq!(row, [f32::NEG_INFINITY, 4.0, LOGIT_BIAS_MAX, 1.0]);
    }

    #[test]
    fn banning_every_token_is_an_error_not_token_zero() {
        let ban_all = vec![(0, f32::NEG_INFINITY), (1, f32::NEG_INFINITY), (2, f32::NEG_INFINITY)];
        let hot = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(1), ..Default::default() };
        for params in [SamplingParams::greedy(), hot] {
            let mut s = Sampler::try_new(SamplingParams { logit_bias: ban_all.clone(), ..params.clone() }, 3).unwrap();
            assert_eq!(s.try_sample(&mut [1.0, 2.0, 3.0], &[]), Err(SamplerError::NoCandidates), "{params:?}");
            assert_eq!(s.verify(&[1.0, 2.0, 3.0], 3, &[], &[]), Err(SamplerError::NoCandidates));
            // The infallible form logs and falls back, as the chain always has; no panic.
            assert_eq!(s.sample(&mut [1.0, 2.0, 3.0], &[]), 0);

            // A mask and a bias that together leave nothing.
            let mut s = Sampler::try_new(SamplingParams { logit_bias: vec![(1, f32::NEG_INFINITY)], ..params.clone() }, 3).unwrap();
            s.push_processor(Box::new(TokenMask::from_allowed(3, [1]).unwrap()));
            assert_eq!(s.try_sample(&mut [1.0, 2.0, 3.0], &[]), Err(SamplerError::NoCandidates), "{params:?}");
        }
    }

    #[test]
    fn token_mask_allows_only_its_set() {
        let vocab = 130; // more than two words, the last one partial
        let allowed = [3u32, 64, 129];
        let mask = TokenMask::from_allowed(vocab, allowed).unwrap();
        assert_eq!(mask.count_allowed(), 3);
        assert!(mask.is_allowed(64) && !mask.is_allowed(65) && !mask.is_allowed(500));
        assert_eq!(TokenMask::all(vocab).count_allowed(), vocab);
        assert_eq!(TokenMask::from_allowed(vocab, [130]), Err(SamplerError::TokenOutOfVocab { token: 130, vocab }));

        let logits: Vec<f32> = (0..vocab).map(|i| (i % 7) as f32).collect();
        let mut greedy = Sampler::new(SamplingParams::greedy());
        greedy.push_processor(Box::new(mask.clone()));
        let mut row = logits.clone();
        // Allowed logits: 3 → 3.0, 64 → 1.0, 129 → 3.0; the tie goes to the lower id.
        assert_eq!(greedy.try_sample(&mut row, &[]), Ok(3));
        assert!(row.iter().enumerate().all(|(i, l)| allowed.contains(&(i as u32)) == l.is_finite()));

        let params = SamplingParams { temperature: 2.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(2), ..Default::default() };
        let mut s = Sampler::new(params);
        s.push_processor(Box::new(mask));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(s.try_sample(&mut logits.clone(), &[]).unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), allowed);
        assert_eq!(s.accept(4), Err(SamplerError::TokenRejected { processor: "token_mask", token: 4 }));
    }

    #[test]
    fn token_mask_refuses_what_it_cannot_mask() {
        let mut s = Sampler::new(SamplingParams::greedy());
        s.push_processor(Box::new(TokenMask::none(4)));
        assert_eq!(s.try_sample(&mut [1.0; 4], &[]), Err(SamplerError::NothingAllowed));
        let mut s = Sampler::new(SamplingParams::greedy());
        s.push_processor(Box::new(TokenMask::all(4)));
        assert_eq!(
            s.try_sample(&mut [1.0; 5], &[]),
            Err(SamplerError::VocabMismatch { processor: "token_mask", expected: 4, actual: 5 })
        );
    }

    /// A stateful processor: records what it is told, and bans the token it last accepted
    /// (so its state visibly steers the draw).
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        accepted: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    }

    impl LogitProcessor for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }

        fn process(&mut self, logits: &mut [f32], _history: &[u32]) -> Result<(), SamplerError> {
            if let Some(&last) = self.accepted.lock().unwrap().last() {
                logits[last as usize] = f32::NEG_INFINITY;
            }
            Ok(())
        }

        fn accept(&mut self, token: u32) -> Result<(), SamplerError> {
            self.accepted.lock().unwrap().push(token);
            Ok(())
        }
    }

    /// A deterministic stand-in for the model: logits as a function of the history.
    fn fake_model(history: &[u32], vocab: usize) -> Vec<f32> {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in history {
            hash = (hash ^ t as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(hash);
        (0..vocab).map(|_| rng.random_range(-3.0f32..3.0)).collect()
    }

    /// Drafts that are fully right, partly right and wrong at the first token, in turn: each
    /// verify() must give exactly the tokens that one-at-a-time sampling gives, and leave the
    /// sampler (random state, processors) where sequential sampling leaves it.
    fn verify_matches_sequential(params: SamplingParams) {
        let vocab = 12;
        let prompt = vec![1u32, 2, 3];
        let sequential_recorder = Recorder::default();
        let mut sequential = Sampler::try_new(params.clone(), vocab).unwrap();
        sequential.push_processor(Box::new(sequential_recorder.clone()));
        let mut reference = prompt.clone();
        for _ in 0..60 {
            let mut logits = fake_model(&reference, vocab);
            let token = sequential.try_sample(&mut logits, &reference).unwrap();
            reference.push(token);
        }

        let recorder = Recorder::default();
        let mut speculative = Sampler::try_new(params.clone(), vocab).unwrap();
        speculative.push_processor(Box::new(recorder.clone()));
        // (draft length, index of the wrong token)
        let drafts = [(4, None), (3, Some(1)), (3, Some(0)), (1, None), (5, Some(4)), (2, Some(0)), (0, None)];
        let mut history = prompt.clone();
        let mut kinds_seen = [false; 3];
        for round in 0.. {
            let remaining = reference.len() - history.len();
            if remaining == 0 {
                break;
            }
            let (length, wrong_at) = drafts[round % drafts.len()];
            let length = length.min(remaining - 1);
            let mut proposed = reference[history.len()..history.len() + length].to_vec();
            let wrong_at = wrong_at.filter(|&w| w < length);
            if let Some(w) = wrong_at {
                proposed[w] = (proposed[w] + 1) % vocab as u32;
            }
            let mut rows = Vec::with_capacity((length + 1) * vocab);
            for i in 0..=length {
                let prefix: Vec<u32> = history.iter().chain(&proposed[..i]).copied().collect();
                rows.extend(fake_model(&prefix, vocab));
            }
            let v = speculative.verify(&rows, vocab, &proposed, &history).unwrap();
            assert_eq!(v.accepted, wrong_at.unwrap_or(length), "{params:?} round {round}");
            kinds_seen[match wrong_at {
                None => 0,
                Some(0) => 2,
                Some(_) => 1,
            }] = true;
            history.extend_from_slice(&proposed[..v.accepted]);
            history.push(v.next);
            assert_eq!(history, reference[..history.len()], "{params:?} round {round}");
        }
        assert_eq!(kinds_seen, [true; 3]);
        assert_eq!(*recorder.accepted.lock().unwrap(), reference[prompt.len()..]);
        assert_eq!(*recorder.accepted.lock().unwrap(), *sequential_recorder.accepted.lock().unwrap());
        // Same random state afterwards: the next draws agree too.
        let logits = fake_model(&reference, vocab);
        for _ in 0..5 {
            assert_eq!(
                speculative.try_sample(&mut logits.clone(), &reference),
                sequential.try_sample(&mut logits.clone(), &reference)
            );
        }
    }

    #[test]
    fn verify_greedy_matches_sequential_sampling() {
        verify_matches_sequential(SamplingParams::greedy());
        verify_matches_sequential(SamplingParams {
            repetition_penalty: 1.3,
            presence_penalty: 0.4,
            logit_bias: vec![(0, 2.0), (5, -1.5)],
            ..SamplingParams::greedy()
        });
    }

    #[test]
    fn verify_seeded_sampling_matches_sequential_sampling() {
        verify_matches_sequential(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(5), ..Default::default() });
        verify_matches_sequential(SamplingParams {
            temperature: 0.8,
            frequency_penalty: 0.3,
            repetition_penalty: 1.1,
            penalty_last_n: 8,
            seed: Some(11),
            logit_bias: vec![(3, 1.0)],
            ..Default::default()
        });
    }

    /// Random rows of logits for `rows` positions over `vocab` tokens.
    fn random_rows(data: &mut rand::rngs::StdRng, rows: usize, vocab: usize) -> Vec<f32> {
        (0..rows * vocab).map(|_| data.random_range(-3.0f32..3.0)).collect()
    }

    #[test]
    fn verify_greedy_accepts_exactly_the_matching_prefix() {
        let vocab = 8;
        let mut data = rand::rngs::StdRng::seed_from_u64(17);
        for _ in 0..20 {
            let rows = random_rows(&mut data, 5, vocab);
            let best: Vec<u32> = rows.chunks(vocab).map(argmax).collect();
            for wrong_at in 0..=4 {
                let mut proposed = best[..4].to_vec();
                if wrong_at < 4 {
                    proposed[wrong_at] = (proposed[wrong_at] + 1 + data.random_range(0..vocab as u32 - 1)) % vocab as u32;
                }
                let v = Sampler::new(SamplingParams::greedy()).verify(&rows, vocab, &proposed, &[]).unwrap();
                assert_eq!(v, Verification { accepted: wrong_at, next: best[wrong_at] }, "{proposed:?} vs {best:?}");
            }
        }
        // A tie goes to the lower id, so proposing the higher of two equal logits is a miss.
        let rows = [0.0, 0.0, 3.0, 0.0, 0.0, 3.0, /* second row */ 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let v = Sampler::new(SamplingParams::greedy()).verify(&rows, 6, &[5], &[]).unwrap();
        assert_eq!(v, Verification { accepted: 0, next: 2 });
    }

    #[test]
    fn verify_with_temperature_is_deterministic_per_seed() {
        let vocab = 10;
        let mut data = rand::rngs::StdRng::seed_from_u64(23);
        let mut outcomes = std::collections::BTreeSet::new();
        for seed in 0..100 {
            let params = SamplingParams { temperature: 0.9, top_k: 0, top_p: 0.95, min_p: 0.0, seed: Some(seed), ..Default::default() };
            // Sharper rows, and the arg-maxes proposed, so that some drafts are accepted.
            let rows: Vec<f32> = random_rows(&mut data, 5, vocab).iter().map(|l| l * 2.0).collect();
            let proposed: Vec<u32> = rows.chunks(vocab).take(4).map(argmax).collect();
            let run = || {
                let mut s = Sampler::new(params.clone());
                let v = s.verify(&rows, vocab, &proposed, &[9, 9]).unwrap();
                // The random state afterwards is part of the outcome.
                let after: Vec<u32> = (0..5).map(|_| s.sample(&mut rows[..vocab].to_vec(), &[])).collect();
                (v, after)
            };
            let first = run();
            assert_eq!(first, run(), "seed {seed}");
            outcomes.insert(first.0.accepted);
        }
        assert!(outcomes.len() >= 3, "acceptance lengths seen: {outcomes:?}");
    }

    #[test]
    fn verify_never_accepts_a_token_with_zero_target_probability() {
        let vocab = 10;
        let top_k = 3;
        let mut data = rand::rngs::StdRng::seed_from_u64(31);
        for seed in 0..300 {
            let params = SamplingParams { temperature: 2.0, top_k, top_p: 1.0, min_p: 0.0, seed: Some(seed), ..Default::default() };
            let rows = random_rows(&mut data, 2, vocab);
            let mut ranked: Vec<u32> = (0..vocab as u32).collect();
            ranked.sort_by(|&a, &b| rows[b as usize].total_cmp(&rows[a as usize]));
            let (kept, cut) = ranked.split_at(top_k as usize);
            let proposed = cut[data.random_range(0..cut.len())];
            let v = Sampler::new(params.clone()).verify(&rows, vocab, &[proposed], &[]).unwrap();
            assert_eq!(v.accepted, 0, "seed {seed}: token {proposed} is outside the top-{top_k}");
            assert!(kept.contains(&v.next), "seed {seed}: next {} is outside the top-{top_k}", v.next);

            // The same with a drafter certain of that token.
            let mut draft = vec![0.0; vocab];
            draft[proposed as usize] = 1.0;
            let v = Sampler::new(params.clone()).verify_with_draft(&rows, &draft, vocab, &[proposed], &[]).unwrap();
            assert_eq!(v.accepted, 0, "seed {seed}");
            assert!(kept.contains(&v.next), "seed {seed}");

            // And a token banned by bias, on flat logits where it would otherwise be likely.
            let banned = SamplingParams { top_k: 0, logit_bias: vec![(4, f32::NEG_INFINITY)], ..params };
            let v = Sampler::new(banned).verify(&[0.0; 20], vocab, &[4], &[]).unwrap();
            assert_eq!(v.accepted, 0, "seed {seed}");
            assert_ne!(v.next, 4);
        }
    }

    #[test]
    fn verify_refuses_bad_shapes() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.verify(&[0.0; 8], 4, &[1], &[]), Ok(Verification { accepted: 0, next: 0 }));
        assert_eq!(s.verify(&[0.0; 7], 4, &[1], &[]), Err(SamplerError::BadRows { rows: 2, vocab: 4, len: 7 }));
        assert_eq!(s.verify(&[], 0, &[], &[]), Err(SamplerError::BadRows { rows: 1, vocab: 0, len: 0 }));
        assert_eq!(s.verify(&[0.0; 8], 4, &[4], &[]), Err(SamplerError::TokenOutOfVocab { token: 4, vocab: 4 }));
        assert_eq!(
            s.verify_with_draft(&[0.0; 8], &[0.5, -0.1, 0.3, 0.3], 4, &[1], &[]),
            Err(SamplerError::BadDraftProbability { row: 0, token: 1 })
        );
        assert_eq!(
            s.verify_with_draft(&[0.0; 8], &[0.25; 8], 4, &[1], &[]),
            Err(SamplerError::BadRows { rows: 1, vocab: 4, len: 8 })
        );
    }

    #[test]
    fn verify_with_draft_keeps_the_target_distribution() {
        let logits = [1.0f32, 0.5, -0.5, 0.0];
        let max = 1.0f32;
        let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let target: Vec<f32> = logits.iter().map(|l| (l - max).exp() / total).collect();
        let draft = [0.1f32, 0.6, 0.2, 0.1];
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(21), ..Default::default() };
        let mut s = Sampler::new(params);
        let mut drafter = rand::rngs::StdRng::seed_from_u64(8);
        let rows: Vec<f32> = logits.iter().chain(&logits).copied().collect();
        let trials = 40_000;
        let mut counts = [0usize; 4];
        let mut accepted = 0;
        for _ in 0..trials {
            let r: f32 = drafter.random();
            let proposed = if r < 0.1 { 0 } else if r < 0.7 { 1 } else if r < 0.9 { 2 } else { 3 };
            let v = s.verify_with_draft(&rows, &draft, 4, &[proposed], &[]).unwrap();
            let first = if v.accepted == 1 { proposed } else { v.next };
            counts[first as usize] += 1;
            accepted += v.accepted;
        }
        for (count, p) in counts.iter().zip(&target) {
            let frequency = *count as f32 / trials as f32;
            assert!((frequency - p).abs() < 0.01, "{counts:?} vs {target:?}");
        }
        // Acceptance rate is sum(min(p, q)).
        let expected: f32 = target.iter().zip(&draft).map(|(p, q)| p.min(*q)).sum();
        assert!((accepted as f32 / trials as f32 - expected).abs() < 0.01);
    }

    /// Pearson's chi-square statistic of `counts` against the distribution `p`.
    fn chi_square(counts: &[usize], p: &[f32]) -> f64 {
        let n: usize = counts.iter().sum();
        counts.iter().zip(p).map(|(&c, &p)| {
            let expected = n as f64 * f64::from(p);
            (c as f64 - expected).powi(2) / expected
        }).sum()
    }

    /// Speculative decoding keeps the sampled distribution. Stated before running it: over
    /// 20,000 seeded runs (seeds 0..20,000, temperature 1) the first token emitted after a
    /// fixed one-token draft (prompt lookup's are fixed, not drawn) must pass Pearson's
    /// chi-square test against the softmax at α = 0.001 (6 tokens, 5 degrees of freedom:
    /// statistic below 20.52), and must equal plain sampling's token seed for seed. The same
    /// test must reject a planted bias: a verifier that accepts every proposal.
    #[test]
    fn drafts_keep_the_sampled_distribution_and_a_planted_bias_is_caught() {
        const CRITICAL_5_DOF_ALPHA_0001: f64 = 20.515;
        let logits = [1.2f32, 0.4, 0.0, -0.3, 0.9, -1.0];
        let max = 1.2f32;
        let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let target: Vec<f32> = logits.iter().map(|l| (l - max).exp() / total).collect();
        let rows: Vec<f32> = logits.iter().chain(&logits).copied().collect();
        let draft = [4u32];
        let (mut verified, mut plain, mut biased) = ([0usize; 6], [0usize; 6], [0usize; 6]);
        for seed in 0..20_000u64 {
            let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(seed), ..Default::default() };
            let v = Sampler::new(params.clone()).verify(&rows, 6, &draft, &[]).unwrap();
            let first = if v.accepted == 1 { draft[0] } else { v.next };
            let alone = Sampler::new(params).sample(&mut logits.to_vec(), &[]);
            assert_eq!(first, alone, "seed {seed}: the draft changed the draw");
            verified[first as usize] += 1;
            plain[alone as usize] += 1;
            // The planted bias: every proposal accepted.
            biased[draft[0] as usize] += 1;
        }
        let (good, bad) = (chi_square(&verified, &target), chi_square(&biased, &target));
        assert!(good < CRITICAL_5_DOF_ALPHA_0001, "verified drafts: chi-square {good:.2} ({verified:?} vs {target:?})");
        assert!(chi_square(&plain, &target) < CRITICAL_5_DOF_ALPHA_0001);
        assert!(bad > CRITICAL_5_DOF_ALPHA_0001, "the test must catch accepting every proposal: {bad:.2}");
    }

    #[test]
    fn verify_with_draft_is_verify_when_greedy() {
        let vocab = 6;
        let rows: Vec<f32> = (0..3).flat_map(|i| fake_model(&[i], vocab)).collect();
        let proposed = [argmax(&rows[..vocab]), (argmax(&rows[vocab..2 * vocab]) + 1) % vocab as u32];
        let draft = vec![1.0 / vocab as f32; 2 * vocab];
        let a = Sampler::new(SamplingParams::greedy()).verify(&rows, vocab, &proposed, &[]);
        let b = Sampler::new(SamplingParams::greedy()).verify_with_draft(&rows, &draft, vocab, &proposed, &[]);
        assert_eq!(a, b);
        assert_eq!(a.unwrap().accepted, 1);
    }
}
