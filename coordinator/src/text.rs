//! Turning generated token ids into the text a client sees: streaming detokenization (never
//! half a UTF-8 character) and stop strings (never leaking a partial stop string).

use potluck_engine::tokenizer::{StreamDecoder, Tokenizer};

/// Longest stop string accepted, in bytes; bounds the text held back while matching.
pub const STOP_STRING_BYTES_MAX: usize = 256;
/// Stop strings per request at most (OpenAI allows 4; llama-server more).
pub const STOP_STRINGS_MAX: usize = 16;

/// Accumulates token ids and releases text that is safe to show.
pub struct TextAssembler {
    decoder: StreamDecoder,
    stops: Vec<String>,
    /// Decoded text not yet released because it may be the start of a stop string.
    held: String,
    stopped: bool,
}

impl TextAssembler {
    pub fn new(stops: Vec<String>) -> Self {
        Self { decoder: StreamDecoder::new(false), stops, held: String::new(), stopped: false }
    }

    /// True once a stop string has been seen; nothing more is released after that.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token; returns the text now safe to release (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        let piece = self.decoder.push(tokenizer, id);
        self.held.push_str(&piece);
        self.release(false)
    }

    /// The end of generation: releases whatever is held (no stop string can complete now).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let rest = self.decoder.finish();
        self.held.push_str(&rest);
        self.release(true)
    }

    fn release(&mut self, at_end: bool) -> String {
        // A complete stop string: release what precedes it and stop.
        let earliest = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            self.stopped = true;
            let out = self.held[..at].to_owned();
            self.held.clear();
            return out;
        }
        if at_end {
            return std::mem::take(&mut self.held);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep_from = self.held.len();
        for stop in &self.stops {
            for (i, _) in self.held.char_indices() {
                if i >= keep_from {
                    break;
                }
                let suffix = &self.held[i..];
                if stop.starts_with(suffix) {
                    keep_from = i;
                    break;
                }
            }
        }
        let out = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        out
    }
}
