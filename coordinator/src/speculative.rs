//! Speculative decoding's proposer and its pacing, sans-IO.
//!
//! On a pipeline every generated token makes a trip through every stage and hop. A step may
//! instead carry the next token and a few proposed ones as extra rows of the same segment;
//! the last stage keeps the longest prefix its sampler would have drawn anyway and the token
//! after it ([`potluck_engine::sampler::Sampler::verify`]), so the text is exactly plain
//! decoding's (greedy: the same tokens; seeded sampling: the same draws, one random number
//! per position) while a trip may yield several tokens. Every stage rolls its cache back over
//! the rejected rows when the sequence's next step starts inside them.
//!
//! The default proposer is prompt lookup (n-gram drafting): the sequence's last few tokens are
//! looked up earlier in the sequence (its prompt and answer so far), and what followed them
//! there is proposed. It needs no model and wins where answers repeat their input (editing
//! code, summarising, extraction, JSON). [`Pacing`] follows the acceptance: the draft length
//! doubles after a fully accepted draft, halves after a rejected one, and drafting pauses
//! after repeated misses, so a sequence whose text does not repeat pays almost nothing.
//! [`DraftModel`] proposes instead with a small model of the same vocabulary (`--draft`).

/// Longest and shortest suffix looked up. Two tokens at least: one-token matches propose
/// mostly noise.
pub const NGRAM_TOKENS_MAX: usize = 4;
pub const NGRAM_TOKENS_MIN: usize = 2;
/// Most tokens proposed at once (and the first draft's length).
pub const DRAFT_LENGTH_MAX: usize = 8;
pub const DRAFT_LENGTH_START: usize = 4;
/// Drafts in a row with nothing accepted before drafting pauses, and for how many steps.
pub const MISSES_BEFORE_PAUSE: u32 = 3;
pub const PAUSE_STEPS: u32 = 16;

/// Up to `k` tokens that followed the latest earlier occurrence of the sequence's last
/// `n` tokens (the longest `n` from [`NGRAM_TOKENS_MAX`] down to [`NGRAM_TOKENS_MIN`] that
/// occurs); empty when none does.
pub fn propose(tokens: &[u32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    for n in (NGRAM_TOKENS_MIN..=NGRAM_TOKENS_MAX).rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        // Latest occurrence first: recent text predicts best. The match must be followed by
        // at least one token, so it ends before the suffix itself.
        if let Some(start) = (0..tokens.len() - n).rev().find(|&i| &tokens[i..i + n] == suffix) {
            let from = start + n;
            let end = (from + k).min(tokens.len());
            return tokens[from..end].to_vec();
        }
    }
    Vec::new()
}

/// One sequence's draft length, following its acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    length: usize,
    misses: u32,
    paused: u32,
}

impl Default for Pacing {
    fn default() -> Self {
        Self { length: DRAFT_LENGTH_START, misses: 0, paused: 0 }
    }
}

impl Pacing {
    /// How many tokens to propose at this step (0 while paused); counts a paused step.
    pub fn next_length(&mut self) -> usize {
        if self.paused > 0 {
            self.paused -= 1;
            return 0;
        }
        self.length
    }

    /// The outcome of a draft of `proposed` tokens, `accepted` of them kept.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        if accepted == proposed {
            self.length = (self.length * 2).min(DRAFT_LENGTH_MAX);
            self.misses = 0;
        } else {
            self.length = (self.length / 2).max(1);
            if accepted == 0 {
                self.misses += 1;
                if self.misses >= MISSES_BEFORE_PAUSE {
                    self.misses = 0;
                    self.paused = PAUSE_STEPS;
                    self.length = DRAFT_LENGTH_START;
                }
            } else {
                self.misses = 0;
            }
        }
    }
}

/// A small model of the same vocabulary that proposes drafts by running greedily on the
/// coordinator (`coordinator serve --draft FILE`, as llama.cpp's `--model-draft`): where the
/// text does not repeat itself, a model that often guesses the next tokens still saves trips.
/// The draft only proposes: the target model's last stage keeps what its own sampler draws,
/// so the text is the same with any draft, good or bad.
///
/// It keeps one KV cache per sequence and the tokens it holds; each proposal first brings the
/// cache to the sequence's tokens (rolled back to the common prefix, then the rest fed in one
/// step), then runs one step per proposed token.
pub struct DraftModel {
    slice: potluck_engine::arch::ModelSlice,
    context_length: usize,
    caches: std::collections::HashMap<u64, DraftCache>,
}

struct DraftCache {
    cache: potluck_engine::kv_cache::SequenceCache,
    /// The tokens in `cache`, in order.
    tokens: Vec<u32>,
}

impl DraftModel {
    /// A draft model over `slice` (every layer of the draft GGUF), its caches `context_length`
    /// positions long.
    pub fn new(slice: potluck_engine::arch::ModelSlice, context_length: usize) -> Self {
        Self { slice, context_length, caches: Default::default() }
    }

    /// Up to `k` tokens the draft model picks greedily after `tokens` (sequence `sequence`'s
    /// prompt and answer so far); empty when `k` is 0 or the draft model cannot run (its
    /// cache for the sequence is then dropped, and the next proposal starts afresh).
    pub fn propose(&mut self, sequence: u64, tokens: &[u32], k: usize) -> Vec<u32> {
        if k == 0 || tokens.is_empty() {
            return Vec::new();
        }
        match self.try_propose(sequence, tokens, k) {
            Ok(draft) => draft,
            Err(_) => {
                self.caches.remove(&sequence);
                Vec::new()
            }
        }
    }

    fn try_propose(&mut self, sequence: u64, tokens: &[u32], k: usize) -> Result<Vec<u32>, potluck_engine::EngineError> {
        let slice = &self.slice;
        let context_length = self.context_length;
        let entry = self
            .caches
            .entry(sequence)
            .or_insert_with(|| DraftCache { cache: slice.new_cache(context_length), tokens: Vec::new() });
        // Keep what the sequence still starts with, but always feed its last token again at
        // least (its logits give the first proposal).
        let common = entry.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
        if common < entry.tokens.len() {
            entry.cache.truncate(common)?;
            entry.tokens.truncate(common);
        }
        let room = entry.cache.capacity_max().saturating_sub(tokens.len());
        let k = k.min(room);
        let mut draft = Vec::with_capacity(k);
        let mut feed = tokens[common..].to_vec();
        while draft.len() < k {
            let mut hidden = slice.embed(&feed)?;
            slice.forward_layers(&mut hidden, &[feed.len()], &mut [&mut entry.cache])?;
            entry.tokens.extend_from_slice(&feed);
            let n_embd = hidden.len() / feed.len();
            let logits = slice.head(&hidden[(feed.len() - 1) * n_embd..])?;
            let next = potluck_engine::sampler::argmax(&logits);
            draft.push(next);
            feed = vec![next];
        }
        Ok(draft)
    }

    /// Drops sequence `sequence`'s cache (it finished).
    pub fn forget(&mut self, sequence: u64) {
        self.caches.remove(&sequence);
    }

    /// Sequences whose caches are held.
    pub fn held(&self) -> usize {
        self.caches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_longest_match_proposes_what_followed_it() {
        //            0  1  2  3  4  5  6  7  8  9
        let tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 2, 3];
        // "2 3" last occurred at 6..8, followed by 5 2 3.
        assert_eq!(propose(&tokens, 3), [5, 2, 3]);
        // "3 2 3"? no; "5 2 3"? no; "2 3" at 6: k is capped by what follows.
        assert_eq!(propose(&tokens, 8), [5, 2, 3]);
        // A longer suffix wins over a later shorter one: "1 2 3" → 4 (at 0) vs "2 3" → 5.
        let tokens = [1, 2, 3, 4, 7, 2, 3, 5, 1, 2, 3];
        assert_eq!(propose(&tokens, 2), [4, 7]);
        assert!(propose(&[1, 2, 3, 4], 4).is_empty(), "nothing repeats");
        assert!(propose(&[7, 7], 4).is_empty(), "a suffix needs an earlier occurrence");
        assert!(propose(&tokens, 0).is_empty());
    }

    #[test]
    fn pacing_follows_acceptance_and_pauses_after_misses() {
        let mut p = Pacing::default();
        assert_eq!(p.next_length(), 4);
        p.record(4, 4);
        assert_eq!(p.next_length(), 8);
        p.record(8, 8);
        assert_eq!(p.next_length(), DRAFT_LENGTH_MAX);
        p.record(8, 3);
        assert_eq!(p.next_length(), 4);
        for _ in 0..MISSES_BEFORE_PAUSE {
            let k = p.next_length();
            p.record(k, 0);
        }
        assert!((0..PAUSE_STEPS).all(|_| p.next_length() == 0), "paused");
        assert_eq!(p.next_length(), DRAFT_LENGTH_START, "and drafting again after the pause");
    }
}
