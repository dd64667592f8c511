//! Structured outputs: answers held to a JSON schema (OpenAI's `response_format`) by
//! constrained decoding.
//!
//! The grammar engine is llguidance (what llama.cpp and vLLM use): it compiles a JSON schema
//! into a grammar over the model's own tokens and, at each step, computes which tokens may
//! come next. Here the coordinator holds each constrained sequence's [`Grammar`] (it sees
//! every token come back), attaches the allowed set to the step's sampling segment
//! ([`potluck_protocol::AllowedTokens`]), and the stage that samples masks the logits with
//! it before its sampler draws. So any pipeline and any model can be constrained, and the
//! workers need neither the tokenizer nor the grammar engine.
//!
//! Sans-IO: a [`Grammar`] is a state machine fed tokens; nothing here blocks or reads a
//! clock.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use potluck_engine::tokenizer::Tokenizer;
use potluck_protocol::AllowedTokens;
use serde_json::{json, Value};

/// Bytes of a JSON schema accepted at most: far above what applications send (OpenAI caps a
/// schema at 100 properties and 5 levels of nesting), small enough that compiling one is
/// quick.
pub const SCHEMA_BYTES_MAX: usize = 64 * 1024;

/// The tokenizer as llguidance sees it: every token's bytes in a trie (special tokens marked,
/// so text can never spell them), and the tokenizer itself for strings it must tokenize.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // llguidance asks for text it forces (a fixed key, say); it is UTF-8 in every grammar
        // built here, so the lossy path never replaces anything.
        self.tokenizer.encode(&String::from_utf8_lossy(s), false)
    }
}

/// Compiles grammars for one model's vocabulary; built once at start, shared by requests.
pub struct GrammarFactory {
    factory: ParserFactory,
    /// The model's vocabulary (the logits' length), which masks cover.
    vocab: usize,
    /// End-of-sequence tokens: allowed wherever the grammar may end.
    stop_ids: Arc<Vec<u32>>,
    eos: u32,
}

impl std::fmt::Debug for GrammarFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarFactory").field("vocab", &self.vocab).finish_non_exhaustive()
    }
}

/// Why a `response_format` cannot be honoured (the API answers 400 with it).
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("the schema is {0} bytes; at most {SCHEMA_BYTES_MAX} are accepted")]
    TooLarge(usize),
    #[error("{0}")]
    Compile(String),
}

impl GrammarFactory {
    /// `model_vocab` is the model's vocabulary (its logits' length), at least the tokenizer's.
    pub fn new(tokenizer: Arc<Tokenizer>, model_vocab: usize, stop_ids: Vec<u32>) -> anyhow::Result<Self> {
        let vocab = model_vocab.max(tokenizer.vocab_size());
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                if id as usize >= tokenizer.vocab_size() {
                    Vec::new() // padding rows of the output matrix: never a token
                } else if tokenizer.is_special(id) {
                    // Marked, as llguidance expects: only a grammar naming it can produce it.
                    let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    bytes.extend_from_slice(&tokenizer.token_bytes(id, true));
                    bytes
                } else {
                    tokenizer.token_bytes(id, false).into_owned()
                }
            })
            .collect();
        let eos = tokenizer.eos_id().or_else(|| stop_ids.first().copied()).unwrap_or(0);
        let info = TokRxInfo { tok_end_of_turn: stop_ids.iter().copied().find(|&t| t != eos), ..TokRxInfo::new(vocab as u32, eos) };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)?;
        // Compile errors come back as values; nothing is printed by the library.
        factory.quiet();
        Ok(Self { factory, vocab: model_vocab, stop_ids: Arc::new(stop_ids), eos })
    }

    /// A grammar for OpenAI's `response_format` value (already checked to be an object):
    /// `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema":
    /// {"schema": …}}`. `None` for `{"type": "text"}`.
    pub fn for_response_format(&self, format: &Value) -> Result<Option<Grammar>, GrammarError> {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => self.json_schema(json!({"type": "object"})).map(Some),
            Some("json_schema") => {
                let schema = format
                    .get("json_schema")
                    .and_then(|s| s.get("schema"))
                    .ok_or_else(|| GrammarError::Compile("json_schema.schema is required".into()))?;
                self.json_schema(schema.clone()).map(Some)
            }
            other => Err(GrammarError::Compile(format!(
                "response_format.type must be \"text\", \"json_object\" or \"json_schema\", not {}",
                other.map_or("missing".to_string(), |t| format!("{t:?}"))
            ))),
        }
    }

    /// A grammar for JSON values valid under `schema`. The answer is written compactly, as
    /// models print JSON (`", "` between items, `": "` after keys, no other whitespace): a
    /// small model given free whitespace can fill its whole budget with newlines.
    pub fn json_schema(&self, mut schema: Value) -> Result<Grammar, GrammarError> {
        let size = serde_json::to_string(&schema).map_or(0, |s| s.len());
        if size > SCHEMA_BYTES_MAX {
            return Err(GrammarError::TooLarge(size));
        }
        if !schema.is_object() && !schema.is_boolean() {
            return Err(GrammarError::Compile("a JSON schema is an object (or true/false)".into()));
        }
        if let Some(object) = schema.as_object_mut() {
            object.entry("x-guidance").or_insert_with(
                || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": true}),
            );
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| GrammarError::Compile(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError::Compile(error));
        }
        Ok(Grammar { matcher, vocab: self.vocab, stop_ids: self.stop_ids.clone(), eos: self.eos })
    }
}

/// The [`GrammarFactory`], built on the first request that needs one: its token trie and
/// lexer tables take memory that a server which never sees a schema should not hold (built at
/// start for SmolLM2's 49k vocabulary, the coordinator's resident memory before any worker
/// went from 36 to 56 MiB), and time its start should not wait on.
pub struct LazyGrammars {
    tokenizer: Arc<Tokenizer>,
    model_vocab: usize,
    stop_ids: Vec<u32>,
    built: std::sync::OnceLock<Result<Arc<GrammarFactory>, String>>,
}

impl LazyGrammars {
    pub fn new(tokenizer: Arc<Tokenizer>, model_vocab: usize, stop_ids: Vec<u32>) -> Self {
        Self { tokenizer, model_vocab, stop_ids, built: std::sync::OnceLock::new() }
    }

    /// The factory, built now if this is the first call; an error when this model's
    /// vocabulary cannot be indexed (said once in the log, then to each request).
    pub fn get(&self) -> Result<Arc<GrammarFactory>, String> {
        self.built
            .get_or_init(|| {
                let started = std::time::Instant::now();
                match GrammarFactory::new(self.tokenizer.clone(), self.model_vocab, self.stop_ids.clone()) {
                    Ok(factory) => {
                        tracing::info!(ms = started.elapsed().as_millis() as u64, "token trie for structured outputs built");
                        Ok(Arc::new(factory))
                    }
                    Err(error) => {
                        tracing::warn!(%error, "structured outputs are unavailable for this model's vocabulary");
                        Err(format!("structured outputs are unavailable for this model's vocabulary: {error}"))
                    }
                }
            })
            .clone()
    }
}

/// One sequence's grammar: which tokens may come next, advanced by each token drawn.
#[derive(Clone)]
pub struct Grammar {
    matcher: Matcher,
    vocab: usize,
    stop_ids: Arc<Vec<u32>>,
    eos: u32,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("vocab", &self.vocab).finish_non_exhaustive()
    }
}

impl Grammar {
    /// The tokens allowed next, over the model's vocabulary. Where the grammar may end, the
    /// model's end-of-sequence tokens are allowed (every one of them: a chat model ends its
    /// turn with its own); once it must end, only they are.
    pub fn allowed(&mut self) -> Result<AllowedTokens, String> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        let vocab = self.vocab;
        let mut words = vec![0u64; vocab.div_ceil(64)];
        for (i, &w) in mask.as_slice().iter().enumerate() {
            let (word, shift) = (i / 2, (i % 2) * 32);
            if word < words.len() {
                words[word] |= u64::from(w) << shift;
            }
        }
        if vocab % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (vocab % 64)) - 1;
            }
        }
        let is_allowed = |words: &[u64], t: u32| (t as usize) < vocab && words[t as usize / 64] & (1 << (t % 64)) != 0;
        if is_allowed(&words, self.eos) {
            for &t in self.stop_ids.iter().filter(|&&t| (t as usize) < vocab) {
                words[t as usize / 64] |= 1 << (t % 64);
            }
        }
        if words.iter().all(|&w| w == 0) {
            return Err("the grammar allows no token".into());
        }
        Ok(AllowedTokens { vocab: vocab as u32, words })
    }

    /// Advances past `token` (never an end-of-sequence token: the sequence ends there).
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The text so far is a complete value (the model may stop here).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default model's tokenizer (scripts/test.sh fetches the model).
    fn factory() -> (GrammarFactory, Arc<Tokenizer>) {
        let path = std::env::var_os("POTLUCK_MODEL").map(std::path::PathBuf::from).unwrap_or_else(|| {
            dirs::cache_dir().expect("a cache directory").join("potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
        let (_, content) = potluck_engine::profile::ModelProfile::from_path(&path)
            .unwrap_or_else(|e| panic!("model missing at {}: run `coordinator fetch-model` or set POTLUCK_MODEL ({e})", path.display()));
        let tokenizer = Arc::new(Tokenizer::from_gguf(&content).unwrap());
        let stops = tokenizer.stop_ids().to_vec();
        let vocab = tokenizer.vocab_size();
        (GrammarFactory::new(tokenizer.clone(), vocab, stops).unwrap(), tokenizer)
    }

    #[test]
    fn a_schema_allows_exactly_its_json() {
        let (factory, tokenizer) = factory();
        let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
        let mut grammar = factory.json_schema(schema).unwrap();
        // Walk the tokens of a valid answer: each is allowed when its turn comes.
        for id in tokenizer.encode("{\"ok\": true}", false) {
            let allowed = grammar.allowed().unwrap();
            assert!(allowed.is_allowed(id), "{:?} refused", tokenizer.token_text(id));
            grammar.accept(id).unwrap();
        }
        assert!(grammar.is_accepting());
        let end = grammar.allowed().unwrap();
        let stop = tokenizer.eos_id().unwrap();
        assert!(end.is_allowed(stop));
        assert_eq!(end.words.iter().map(|w| w.count_ones()).sum::<u32>() as usize, {
            let mut stops = tokenizer.stop_ids().to_vec();
            stops.sort_unstable();
            stops.dedup();
            stops.len()
        });
        // Text that breaks the schema is refused at its first wrong token.
        let mut grammar = factory.json_schema(json!({"type": "integer", "minimum": 0})).unwrap();
        let minus = tokenizer.encode("-", false)[0];
        assert!(!grammar.allowed().unwrap().is_allowed(minus));
    }

    #[test]
    fn unsupported_schemas_are_named() {
        let (factory, _) = factory();
        let error = factory.json_schema(json!({"type": "string", "format": "no-such-format"})).unwrap_err().to_string();
        assert!(error.contains("no-such-format"), "{error}");
        assert!(matches!(factory.json_schema(json!(3)), Err(GrammarError::Compile(_))));
        let big = json!({"description": "x".repeat(SCHEMA_BYTES_MAX)});
        assert!(matches!(factory.json_schema(big), Err(GrammarError::TooLarge(_))));
    }
}
