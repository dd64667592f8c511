//! Text ↔ token ids, built from a GGUF file's `tokenizer.ggml.*` metadata and matching
//! llama.cpp's tokenizer (`src/llama-vocab.cpp`) id for id.
//!
//! Two vocabulary kinds are supported:
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE. The text is first split into words by
//!   the pre-tokenizer regexes that `tokenizer.ggml.pre` selects (llama.cpp's
//!   `llm_tokenizer_bpe` constructor), each word's bytes are mapped through GPT-2's
//!   byte-to-unicode table, and adjacent symbols are merged lowest rank first
//!   (`tokenizer.ggml.merges`, rank = index).
//! * `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE (llama.cpp's
//!   `llm_tokenizer_spm`): spaces become U+2581, adjacent symbols are merged highest
//!   `tokenizer.ggml.scores` first, and characters outside the vocabulary fall back to
//!   `<0xXX>` byte tokens.
//!
//! Before either runs, special tokens are cut out of the text (llama.cpp's
//! `tokenizer_st_partition`): user-defined tokens always, control tokens only when the caller
//! asks to parse them — so text typed by a user cannot forge `<|im_end|>` unless we let it.
//!
//! Decoding mirrors `llama_token_to_piece` / `llama_detokenize`, and [`StreamDecoder`] turns
//! a stream of ids into text without ever emitting half a UTF-8 character.
//!
//! **Bounds:** every merge loop is a priority queue over one word's symbols (O(n log n) per
//! word, as llama.cpp); nothing is cached per request; the only per-model tables are sized by
//! the vocabulary and the merge list that the GGUF header already holds.

use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use candle_core::quantized::gguf_file;

use crate::error::EngineError;

/// Backtracking steps fancy-regex may take in one match attempt of a pre-tokenizer regex
/// (its own default). Past it the rest of that text fragment is kept as one word rather than
/// failing the request: a pathological input then costs at most this much work per word.
pub const PRE_TOKENIZER_BACKTRACK_LIMIT: usize = 1_000_000;

/// What llama.cpp calls a token's attribute, from `tokenizer.ggml.token_type`
/// (llama.cpp's `LLAMA_TOKEN_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// 0 or any value we do not know: decodes to nothing.
    Undefined,
    /// 1: ordinary text.
    Normal,
    /// 2: the unknown token; treated like a control token.
    Unknown,
    /// 3: control tokens (`<|im_start|>`, `<s>`): matched in text only when parsing specials,
    /// rendered only when asked.
    Control,
    /// 4: user-defined (added) tokens: always matched in text, always rendered.
    UserDefined,
    /// 5: unused slots: decode to nothing.
    Unused,
    /// 6: SentencePiece byte tokens `<0xXX>`.
    Byte,
}

impl TokenKind {
    fn from_gguf(token_type: i64) -> Self {
        match token_type {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// Which algorithm turns a fragment of plain text into ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// `tokenizer.ggml.model = "gpt2"`: byte-level BPE.
    Bpe,
    /// `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback.
    Spm,
}

struct TokenData {
    text: String,
    score: f32,
    kind: TokenKind,
}

/// One BPE merge: the pair's rank (lower merges first) and the symbol it produces.
#[derive(Clone, Copy)]
struct Merge {
    rank: u32,
    merged: u32,
}

struct Bpe {
    pre_tokenizer: PreTokenizer,
    /// llama.cpp's `ignore_merges` (Llama-3 style): a word that is itself a token is emitted
    /// whole, without merging.
    ignore_merges: bool,
    /// Symbol ids for merge parts and results that are not vocabulary tokens. They number from
    /// the vocabulary size up, so a symbol id below it *is* the token id. llama.cpp keys its
    /// merges by strings; interning them once makes the merge loop hash two integers instead.
    extra_symbols: HashMap<String, u32>,
    merges: HashMap<(u32, u32), Merge>,
}

pub struct Tokenizer {
    vocab_kind: VocabKind,
    tokens: Vec<TokenData>,
    /// Text → id; on duplicate texts the last id wins, as in llama.cpp's `token_to_id`.
    token_to_id: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first: the order in which
    /// llama.cpp's `tokenizer_st_partition` cuts them out of the text.
    special_by_length: Vec<u32>,
    /// Each token's bytes with specials rendered (llama.cpp's `cache_token_to_piece`).
    pieces: Vec<Box<[u8]>>,
    bpe: Option<Bpe>,
    /// SPM: the token for each byte value (`<0xXX>`, else the byte itself, else unk).
    spm_byte_tokens: Vec<Option<u32>>,
    add_space_prefix: bool,
    clean_spaces: bool,
    add_bos: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_kind", &self.vocab_kind)
            .field("vocab_size", &self.tokens.len())
            .field("add_bos", &self.add_bos)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("stop_ids", &self.stop_ids)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers (llama.cpp `llm_tokenizer_bpe::llm_tokenizer_bpe`)
// ---------------------------------------------------------------------------------------------

/// GPT-2's regex as llama.cpp writes it: without the trailing `|\s+`, which changes nothing
/// because text no regex matches becomes a word of its own anyway.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama-3's regex with llama.cpp's case-insensitive-contraction rewrite.
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama-3's with single digits.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral Tekken, in llama.cpp's form (upper/lower case classes spelled with lookaheads).
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const RE_BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const RE_DEEPSEEK3_WORDS: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;

/// What a `tokenizer.ggml.pre` value selects (llama.cpp `llama_vocab::impl::load`).
struct PreConfig {
    /// Applied in order, each splitting every word the previous ones produced.
    regexes: &'static [&'static str],
    ignore_merges: bool,
    /// The pre-type's default for `add_bos` (the GGUF key overrides it).
    add_bos: bool,
    /// llama.cpp's `clean_spaces` (detokenizer removes " ," " ." " 's" …).
    clean_spaces: bool,
    /// ChatGLM-4 has no BOS whatever the default.
    no_bos: bool,
}

impl PreConfig {
    const fn new(regexes: &'static [&'static str]) -> Self {
        Self {
            regexes,
            ignore_merges: false,
            add_bos: false,
            clean_spaces: true,
            no_bos: false,
        }
    }
    const fn no_clean(mut self) -> Self {
        self.clean_spaces = false;
        self
    }
}

const PRE_DEFAULT: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    RE_GPT2,
    r"\p{N}+",
    "[0-9][0-9][0-9]",
];

/// The pre-tokenizer for a `tokenizer.ggml.pre` value; `None` for values we do not know.
fn pre_config(pre: &str) -> Option<PreConfig> {
    let config = match pre {
        "default" => PreConfig::new(PRE_DEFAULT),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..PreConfig::new(&[RE_LLAMA3])
        },
        "dbrx" | "smaug-bpe" => PreConfig::new(&[RE_LLAMA3]),
        "glm4" | "chatglm-bpe" => PreConfig {
            no_bos: true,
            ..PreConfig::new(&[RE_LLAMA3])
        },
        "deepseek-coder" => PreConfig::new(&[
            "[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            "[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ])
        .no_clean(),
        "deepseek-v3" | "hunyuan-dense" => {
            PreConfig::new(&[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", RE_DEEPSEEK3_WORDS]).no_clean()
        }
        "falcon" => PreConfig::new(&[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"]),
        // StarCoder family, SmolLM among them: every digit is its own word.
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" => {
            PreConfig::new(&[r"\p{N}", RE_GPT2])
        }
        "smollm" | "command-r" => PreConfig::new(&[r"\p{N}", RE_GPT2]).no_clean(),
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "exaone4" => PreConfig::new(&[RE_GPT2]),
        "trillion" | "granite-docling" => PreConfig::new(&[RE_GPT2]).no_clean(),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "hunyuan" | "grok-2" => {
            PreConfig::new(&[RE_QWEN2]).no_clean()
        }
        "stablelm2" | "megrez" => PreConfig::new(&[RE_QWEN2]),
        "poro-chat" => PreConfig::new(&[RE_BLOOM]).no_clean(),
        "bloom" | "gpt3-finnish" => PreConfig::new(&[RE_BLOOM]),
        "viking" => PreConfig::new(&[RE_BLOOM, r"\p{N}"]).no_clean(),
        "tekken" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..PreConfig::new(&[RE_TEKKEN]).no_clean()
        },
        "gpt-4o" | "llama4" | "minimax-m2" => PreConfig::new(&[RE_GPT4O]).no_clean(),
        "seed-coder" => PreConfig::new(&[RE_SEED_CODER]).no_clean(),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => PreConfig::new(&[RE_BAILINGMOE]).no_clean(),
        _ => return None,
    };
    Some(config)
}

struct PreTokenizer {
    regexes: Vec<fancy_regex::Regex>,
}

impl PreTokenizer {
    fn new(patterns: &[&str]) -> Result<Self, EngineError> {
        let regexes = patterns
            .iter()
            .map(|pattern| {
                fancy_regex::RegexBuilder::new(pattern)
                    .backtrack_limit(PRE_TOKENIZER_BACKTRACK_LIMIT)
                    .build()
                    .map_err(|e| {
                        EngineError::Tokenizer(format!("pre-tokenizer regex {pattern:?}: {e}"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { regexes })
    }

    /// Splits `text` into words as llama.cpp's `unicode_regex_split`: each regex runs over
    /// each word so far (its lookaheads see only that word), and both its matches and the
    /// text between them become words. Returns byte ranges into `text`.
    fn split(&self, text: &str) -> Vec<(usize, usize)> {
        let mut words = vec![(0, text.len())];
        for regex in &self.regexes {
            let mut next = Vec::with_capacity(words.len() * 2);
            for &(start, end) in &words {
                let word = &text[start..end];
                let mut done = 0;
                for found in regex.find_iter(word) {
                    match found {
                        Ok(m) => {
                            if m.start() > done {
                                next.push((start + done, start + m.start()));
                            }
                            if m.end() > m.start() {
                                next.push((start + m.start(), start + m.end()));
                            }
                            done = m.end();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "pre-tokenizer regex gave up; keeping the rest as one word");
                            break;
                        }
                    }
                }
                if done < word.len() {
                    next.push((start + done, end));
                }
            }
            words = next;
        }
        words
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68
/// bytes are given the code points from U+0100 up, in byte order.
fn byte_to_char_table() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    for b in 0..256u32 {
        let code_point = if printable(b) {
            b
        } else {
            next_extra += 1;
            255 + next_extra
        };
        // Every value here is below U+0144, a valid scalar value.
        table[b as usize] = char::from_u32(code_point).unwrap_or('\u{FFFD}');
    }
    table
}

#[cfg(test)]
fn byte_level_decode(text: &str, byte_to_char: &[char; 256]) -> Vec<u8> {
    let mut char_to_byte: HashMap<char, u8> = HashMap::with_capacity(256);
    for (b, &c) in byte_to_char.iter().enumerate() {
        char_to_byte.insert(c, b as u8);
    }
    byte_level_decode_with(text, &char_to_byte)
}

/// llama.cpp's `llama_decode_text`: a byte-level token text back to its bytes. A character
/// outside the table (which no real byte-level vocabulary has) is kept as its UTF-8, where
/// llama.cpp would splice in an `[UNK_BYTE_…]` marker.
fn byte_level_decode_with(text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata helpers
// ---------------------------------------------------------------------------------------------

type Metadata = HashMap<String, gguf_file::Value>;

fn value_as_i64(value: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match value {
        V::U8(v) => *v as i64,
        V::I8(v) => *v as i64,
        V::U16(v) => *v as i64,
        V::I16(v) => *v as i64,
        V::U32(v) => *v as i64,
        V::I32(v) => *v as i64,
        V::U64(v) => i64::try_from(*v).ok()?,
        V::I64(v) => *v,
        V::Bool(v) => *v as i64,
        _ => return None,
    })
}

fn meta_str<'a>(metadata: &'a Metadata, key: &str) -> Result<Option<&'a str>, EngineError> {
    match metadata.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(EngineError::BadGguf(format!(
            "`{key}` is not a string: {:?}",
            other.value_type()
        ))),
    }
}

fn meta_bool(metadata: &Metadata, key: &str) -> Result<Option<bool>, EngineError> {
    match metadata.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => value_as_i64(other).map(|v| Some(v != 0)).ok_or_else(|| {
            EngineError::BadGguf(format!("`{key}` is not a bool: {:?}", other.value_type()))
        }),
    }
}

fn meta_array<'a>(
    metadata: &'a Metadata,
    key: &str,
) -> Result<Option<&'a [gguf_file::Value]>, EngineError> {
    match metadata.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(EngineError::BadGguf(format!(
            "`{key}` is not an array: {:?}",
            other.value_type()
        ))),
    }
}

/// A token id from the metadata, `None` when absent; an id outside the vocabulary is ignored
/// with a warning, as llama.cpp does ("bad special token … using default id").
fn meta_token_id(metadata: &Metadata, key: &str, vocab_size: usize) -> Option<u32> {
    let id = value_as_i64(metadata.get(key)?)?;
    if id < 0 || id as u64 >= vocab_size as u64 {
        tracing::warn!(
            key,
            id,
            vocab_size,
            "special token id outside the vocabulary; ignoring it"
        );
        return None;
    }
    Some(id as u32)
}

// Token texts llama.cpp recognises by name (llama_vocab::impl::load).
const EOT_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_NAMES: &[&str] = &["<|eom_id|>"];
const FIM_PAD_NAMES: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_NAMES: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_NAMES: &[&str] = &["<|file_sep|>"];
/// Tokens that end generation whatever the metadata says.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

// ---------------------------------------------------------------------------------------------
// Construction
// ---------------------------------------------------------------------------------------------

impl Tokenizer {
    /// Builds the tokenizer from a GGUF header (no tensor data is read).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, EngineError> {
        Self::from_metadata(&content.metadata)
    }

    /// Builds the tokenizer from GGUF metadata key/values.
    pub fn from_metadata(metadata: &Metadata) -> Result<Self, EngineError> {
        let model = meta_str(metadata, "tokenizer.ggml.model")?
            .ok_or_else(|| EngineError::MissingMetadata("tokenizer.ggml.model".into()))?;
        let vocab_kind = match model {
            "gpt2" => VocabKind::Bpe,
            "llama" => VocabKind::Spm,
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };

        // --- the vocabulary --------------------------------------------------------------
        let texts = meta_array(metadata, "tokenizer.ggml.tokens")?
            .ok_or_else(|| EngineError::MissingMetadata("tokenizer.ggml.tokens".into()))?;
        if texts.is_empty() || texts.len() > u32::MAX as usize {
            return Err(EngineError::BadGguf(format!(
                "vocabulary of {} tokens",
                texts.len()
            )));
        }
        let vocab_size = texts.len();
        let scores = meta_array(metadata, "tokenizer.ggml.scores")?;
        let token_types = meta_array(metadata, "tokenizer.ggml.token_type")?;
        for (key, array) in [
            ("tokenizer.ggml.scores", scores),
            ("tokenizer.ggml.token_type", token_types),
        ] {
            if let Some(array) = array {
                if array.len() != vocab_size {
                    return Err(EngineError::BadGguf(format!(
                        "`{key}` has {} entries for {vocab_size} tokens",
                        array.len()
                    )));
                }
            }
        }
        let mut tokens = Vec::with_capacity(vocab_size);
        let mut token_to_id = HashMap::with_capacity(vocab_size);
        for (i, value) in texts.iter().enumerate() {
            let gguf_file::Value::String(text) = value else {
                return Err(EngineError::BadGguf(format!("token {i} is not a string")));
            };
            // llama.cpp renames empty tokens so that every text maps back to one id.
            let text = if text.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                text.clone()
            };
            let score = match scores.map(|s| &s[i]) {
                Some(gguf_file::Value::F32(v)) => *v,
                Some(gguf_file::Value::F64(v)) => *v as f32,
                Some(other) => {
                    return Err(EngineError::BadGguf(format!(
                        "score {i} is not a float: {:?}",
                        other.value_type()
                    )))
                }
                None => 0.0,
            };
            let kind = match token_types.map(|t| &t[i]) {
                Some(v) => TokenKind::from_gguf(value_as_i64(v).ok_or_else(|| {
                    EngineError::BadGguf(format!("token type {i} is not an integer"))
                })?),
                None => TokenKind::Normal,
            };
            token_to_id.insert(text.clone(), i as u32);
            tokens.push(TokenData { text, score, kind });
        }

        // --- per-kind settings (llama.cpp defaults, then the GGUF keys) ------------------
        let pre_name = meta_str(metadata, "tokenizer.ggml.pre")?;
        let mut bpe = None;
        // llama.cpp's defaults per vocabulary kind; the GGUF keys below override them.
        let (mut add_space_prefix, clean_spaces, mut add_bos, mut bos_id, mut eos_id, mut unk_id) =
            match vocab_kind {
                VocabKind::Spm => (true, false, true, Some(1), Some(2), Some(0)),
                VocabKind::Bpe => {
                    let config = match pre_name.and_then(pre_config) {
                        Some(config) => config,
                        None => {
                            // llama.cpp: "missing or unrecognized pre-tokenizer type, using: 'default'".
                            tracing::warn!(pre = ?pre_name, "missing or unknown tokenizer.ggml.pre; using llama.cpp's default pre-tokenizer");
                            PreConfig::new(PRE_DEFAULT)
                        }
                    };
                    bpe = Some(Self::build_bpe(
                        metadata,
                        &config,
                        &token_to_id,
                        vocab_size,
                    )?);
                    // llama.cpp's BOS/EOS defaults for GPT-2 vocabularies are both 11.
                    let bos_id = if config.no_bos { None } else { Some(11) };
                    (
                        false,
                        config.clean_spaces,
                        config.add_bos,
                        bos_id,
                        Some(11),
                        None,
                    )
                }
            };
        bos_id = bos_id.filter(|&id| (id as usize) < vocab_size);
        eos_id = eos_id.filter(|&id| (id as usize) < vocab_size);
        unk_id = unk_id.filter(|&id| (id as usize) < vocab_size);
        if let Some(v) = meta_bool(metadata, "tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }
        if let Some(id) = meta_token_id(metadata, "tokenizer.ggml.bos_token_id", vocab_size) {
            bos_id = Some(id);
        }
        if let Some(id) = meta_token_id(metadata, "tokenizer.ggml.eos_token_id", vocab_size) {
            eos_id = Some(id);
        }
        if let Some(id) = meta_token_id(metadata, "tokenizer.ggml.unknown_token_id", vocab_size) {
            unk_id = Some(id);
        }
        if let Some(v) = meta_bool(metadata, "tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }

        // --- end-of-generation tokens (llama.cpp's special_eog_ids) ----------------------
        // Tokens found by name are forced to control type, as llama.cpp does ("control-looking
        // token … was not control-type"), so they are never emitted as their text by accident.
        let by_name = |names: &[&str], tokens: &mut Vec<TokenData>| -> Vec<u32> {
            let mut ids: Vec<u32> = names
                .iter()
                .filter_map(|n| token_to_id.get(*n).copied())
                .collect();
            ids.sort_unstable();
            for &id in &ids {
                tokens[id as usize].kind = TokenKind::Control;
            }
            ids
        };
        let eot_id = meta_token_id(metadata, "tokenizer.ggml.eot_token_id", vocab_size)
            .or_else(|| by_name(EOT_NAMES, &mut tokens).first().copied());
        let eom_id = meta_token_id(metadata, "tokenizer.ggml.eom_token_id", vocab_size)
            .or_else(|| by_name(EOM_NAMES, &mut tokens).first().copied());
        let mut stop: BTreeSet<u32> = BTreeSet::new();
        for (key, names) in [
            ("tokenizer.ggml.fim_pad_token_id", FIM_PAD_NAMES),
            ("tokenizer.ggml.fim_rep_token_id", FIM_REP_NAMES),
            ("tokenizer.ggml.fim_sep_token_id", FIM_SEP_NAMES),
        ] {
            let id = meta_token_id(metadata, key, vocab_size)
                .or_else(|| by_name(names, &mut tokens).first().copied());
            stop.extend(id);
        }
        stop.extend(by_name(EOG_NAMES, &mut tokens));
        stop.extend(eos_id);
        stop.extend(eot_id);
        stop.extend(eom_id);
        let stop_ids: Vec<u32> = stop.into_iter().collect();

        // --- special tokens, longest first; pieces ---------------------------------------
        let mut special_by_length: Vec<u32> = (0..vocab_size as u32)
            .filter(|&id| {
                matches!(
                    tokens[id as usize].kind,
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                )
            })
            .collect();
        // Stable, so equal lengths keep id order (llama.cpp's std::sort leaves ties unspecified).
        special_by_length.sort_by_key(|&id| Reverse(tokens[id as usize].text.len()));

        let byte_to_char = byte_to_char_table();
        let char_to_byte: HashMap<char, u8> = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let pieces = tokens
            .iter()
            .map(|token| -> Box<[u8]> {
                match (token.kind, vocab_kind) {
                    (TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined, _) => {
                        token.text.as_bytes().into()
                    }
                    (TokenKind::Normal, VocabKind::Bpe) => {
                        byte_level_decode_with(&token.text, &char_to_byte).into()
                    }
                    (TokenKind::Normal, VocabKind::Spm) => {
                        token.text.replace('\u{2581}', " ").into_bytes().into()
                    }
                    (TokenKind::Byte, VocabKind::Spm) => parse_byte_token(&token.text)
                        .map(|b| vec![b])
                        .unwrap_or_default()
                        .into(),
                    _ => Box::default(),
                }
            })
            .collect();

        let spm_byte_tokens = match vocab_kind {
            VocabKind::Spm => (0..=255u8)
                .map(|b| {
                    token_to_id
                        .get(&format!("<0x{b:02X}>"))
                        .or_else(|| {
                            if b.is_ascii() {
                                token_to_id.get(&(b as char).to_string())
                            } else {
                                None
                            }
                        })
                        .copied()
                        .or(unk_id)
                })
                .collect(),
            VocabKind::Bpe => Vec::new(),
        };

        Ok(Self {
            vocab_kind,
            tokens,
            token_to_id,
            special_by_length,
            pieces,
            bpe,
            spm_byte_tokens,
            add_space_prefix,
            clean_spaces,
            add_bos,
            bos_id,
            eos_id,
            unk_id,
            stop_ids,
        })
    }

    fn build_bpe(
        metadata: &Metadata,
        config: &PreConfig,
        token_to_id: &HashMap<String, u32>,
        vocab_size: usize,
    ) -> Result<Bpe, EngineError> {
        let merge_list = meta_array(metadata, "tokenizer.ggml.merges")?
            .ok_or_else(|| EngineError::MissingMetadata("tokenizer.ggml.merges".into()))?;
        let mut extra_symbols: HashMap<String, u32> = HashMap::new();
        let mut merges = HashMap::with_capacity(merge_list.len());
        let intern = |text: &str, extra: &mut HashMap<String, u32>| -> u32 {
            if let Some(&id) = token_to_id.get(text) {
                return id;
            }
            let next = (vocab_size + extra.len()) as u32;
            *extra.entry(text.to_owned()).or_insert(next)
        };
        for (rank, value) in merge_list.iter().enumerate() {
            let gguf_file::Value::String(merge) = value else {
                return Err(EngineError::BadGguf(format!(
                    "merge {rank} is not a string"
                )));
            };
            // llama.cpp splits at the first space after the first byte.
            let Some(pos) = merge
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1)
            else {
                continue;
            };
            let (left, right) = (&merge[..pos], &merge[pos + 1..]);
            let left_id = intern(left, &mut extra_symbols);
            let right_id = intern(right, &mut extra_symbols);
            let merged = intern(&format!("{left}{right}"), &mut extra_symbols);
            // The first (lowest) rank of a repeated pair wins, as with llama.cpp's emplace.
            merges.entry((left_id, right_id)).or_insert(Merge {
                rank: rank as u32,
                merged,
            });
        }
        Ok(Bpe {
            pre_tokenizer: PreTokenizer::new(config.regexes)?,
            ignore_merges: config.ignore_merges,
            extra_symbols,
            merges,
        })
    }
}

/// `<0xAB>` → 0xAB (llama.cpp's `token_to_byte`).
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment {
    /// A byte range of the input still to be tokenized.
    Text(usize, usize),
    Token(u32),
}

/// One symbol of a word being merged: a byte range of the word, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
    /// BPE: the interned symbol id, `None` for a character that no token or merge knows.
    id: Option<u32>,
}

const NO_SYMBOL: usize = usize::MAX;

/// A BPE merge candidate. Field order makes the derived order (rank, then leftmost), which
/// `Reverse` turns into a min-heap: llama.cpp's `llm_bigram_bpe::comparator`.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct BpeBigram {
    rank: u32,
    left: usize,
    right: usize,
    left_id: u32,
    right_id: u32,
}

/// An SPM merge candidate; the heap pops the highest score, then the leftmost.
struct SpmBigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for SpmBigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for SpmBigram {}
impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for SpmBigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Symbols for each character of `text`, linked in order.
fn char_symbols(text: &str) -> Vec<Symbol> {
    let n = text.chars().count();
    text.char_indices()
        .enumerate()
        .map(|(i, (start, c))| Symbol {
            start,
            end: start + c.len_utf8(),
            prev: if i == 0 { NO_SYMBOL } else { i - 1 },
            next: if i + 1 == n { NO_SYMBOL } else { i + 1 },
            id: None,
        })
        .collect()
}

/// Unlinks `right` into `left` (which must be its left neighbour).
fn merge_symbols(symbols: &mut [Symbol], left: usize, right: usize) {
    symbols[left].end = symbols[right].end;
    symbols[left].next = symbols[right].next;
    symbols[right].end = symbols[right].start; // empty: dead
    if symbols[left].next != NO_SYMBOL {
        let next = symbols[left].next;
        symbols[next].prev = left;
    }
}

impl Tokenizer {
    /// Text → ids. Never adds BOS (see [`Tokenizer::add_bos`]). With `parse_special`, control
    /// tokens written in the text (`<|im_start|>`) become their ids; without it they are
    /// tokenized as the characters they are made of. User-defined tokens are matched either
    /// way, as in llama.cpp.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition_special(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        match self.vocab_kind {
            VocabKind::Bpe => {
                let Some(bpe) = &self.bpe else { return out };
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(start, end) => {
                            let fragment_text = &text[start..end];
                            for (ws, we) in bpe.pre_tokenizer.split(fragment_text) {
                                self.bpe_word(bpe, &fragment_text[ws..we], &mut out);
                            }
                        }
                    }
                }
            }
            VocabKind::Spm => {
                // llama.cpp adds the prefix space at the start and after every special token.
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Fragment::Text(start, end) => {
                            let mut escaped = String::with_capacity(end - start + 3);
                            if self.add_space_prefix && after_special {
                                escaped.push('\u{2581}');
                            }
                            for c in text[start..end].chars() {
                                escaped.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            self.spm_fragment(&escaped, &mut out);
                            after_special = false;
                        }
                    }
                }
            }
        }
        out
    }

    /// llama.cpp's `tokenizer_st_partition`: for each special token, longest first, cut every
    /// occurrence out of the text fragments that remain.
    fn partition_special(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0, text.len())];
        for &id in &self.special_by_length {
            let token = &self.tokens[id as usize];
            if !parse_special && matches!(token.kind, TokenKind::Control | TokenKind::Unknown) {
                continue;
            }
            let needle = token.text.as_str();
            let occurs = fragments
                .iter()
                .any(|f| matches!(*f, Fragment::Text(s, e) if text[s..e].contains(needle)));
            if !occurs {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut start, end) = fragment else {
                    next.push(fragment);
                    continue;
                };
                // A match of a valid UTF-8 needle in valid UTF-8 text starts and ends on
                // character boundaries, so the slices below are sound.
                while let Some(pos) = text[start..end].find(needle) {
                    if pos > 0 {
                        next.push(Fragment::Text(start, start + pos));
                    }
                    next.push(Fragment::Token(id));
                    start += pos + needle.len();
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            fragments = next;
        }
        fragments
    }

    fn symbol_id(&self, bpe: &Bpe, text: &str) -> Option<u32> {
        self.token_to_id
            .get(text)
            .or_else(|| bpe.extra_symbols.get(text))
            .copied()
    }

    /// One pre-tokenized word through byte-level BPE (llama.cpp's `llm_tokenizer_bpe_session`).
    fn bpe_word(&self, bpe: &Bpe, word: &str, out: &mut Vec<u32>) {
        thread_local! {
            static BYTE_TO_CHAR: [char; 256] = byte_to_char_table();
        }
        let encoded: String =
            BYTE_TO_CHAR.with(|table| word.bytes().map(|b| table[b as usize]).collect());
        if bpe.ignore_merges {
            if let Some(&id) = self.token_to_id.get(&encoded) {
                out.push(id);
                return;
            }
        }
        let mut symbols = char_symbols(&encoded);
        for symbol in &mut symbols {
            symbol.id = self.symbol_id(bpe, &encoded[symbol.start..symbol.end]);
        }

        // Entries carry the pair they were made for, so that stale ones (a side has merged
        // since) are recognised and skipped.
        let mut queue: BinaryHeap<Reverse<BpeBigram>> = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<_>, symbols: &[Symbol], left: usize, right: usize| {
            if left == NO_SYMBOL || right == NO_SYMBOL {
                return;
            }
            if let (Some(l), Some(r)) = (symbols[left].id, symbols[right].id) {
                if let Some(merge) = bpe.merges.get(&(l, r)) {
                    queue.push(Reverse(BpeBigram {
                        rank: merge.rank,
                        left,
                        right,
                        left_id: l,
                        right_id: r,
                    }));
                }
            }
        };
        for i in 1..symbols.len() {
            push(&mut queue, &symbols, i - 1, i);
        }
        while let Some(Reverse(BpeBigram {
            left,
            right,
            left_id: l,
            right_id: r,
            ..
        })) = queue.pop()
        {
            let (ls, rs) = (symbols[left], symbols[right]);
            if ls.start == ls.end
                || rs.start == rs.end
                || ls.next != right
                || ls.id != Some(l)
                || rs.id != Some(r)
            {
                continue;
            }
            let Some(merge) = bpe.merges.get(&(l, r)) else {
                continue;
            };
            merge_symbols(&mut symbols, left, right);
            symbols[left].id = Some(merge.merged);
            push(&mut queue, &symbols, symbols[left].prev, left);
            push(&mut queue, &symbols, left, symbols[left].next);
        }

        let vocab_size = self.tokens.len() as u32;
        let mut i = if symbols.is_empty() { NO_SYMBOL } else { 0 };
        while i != NO_SYMBOL {
            let symbol = symbols[i];
            match symbol.id {
                Some(id) if id < vocab_size => out.push(id),
                _ => {
                    // llama.cpp looks each byte of the symbol up as a one-byte token; only
                    // ASCII bytes can be one (vocabulary texts are UTF-8).
                    for &b in &encoded.as_bytes()[symbol.start..symbol.end] {
                        if b.is_ascii() {
                            if let Some(&id) = self.token_to_id.get(&(b as char).to_string()) {
                                out.push(id);
                            }
                        }
                    }
                }
            }
            i = symbol.next;
        }
    }

    /// One escaped text fragment through SentencePiece BPE (llama.cpp's
    /// `llm_tokenizer_spm_session`).
    fn spm_fragment(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols = char_symbols(text);
        let mut queue = BinaryHeap::new();
        let push =
            |queue: &mut BinaryHeap<SpmBigram>, symbols: &[Symbol], left: usize, right: usize| {
                if left == NO_SYMBOL || right == NO_SYMBOL {
                    return;
                }
                let (start, end) = (symbols[left].start, symbols[right].end);
                if let Some(&id) = self.token_to_id.get(&text[start..end]) {
                    queue.push(SpmBigram {
                        score: self.tokens[id as usize].score,
                        left,
                        right,
                        len: end - start,
                    });
                }
            };
        for i in 1..symbols.len() {
            push(&mut queue, &symbols, i - 1, i);
        }
        while let Some(bigram) = queue.pop() {
            let (ls, rs) = (symbols[bigram.left], symbols[bigram.right]);
            let (left_len, right_len) = (ls.end - ls.start, rs.end - rs.start);
            if left_len == 0 || right_len == 0 || left_len + right_len != bigram.len {
                continue;
            }
            merge_symbols(&mut symbols, bigram.left, bigram.right);
            push(&mut queue, &symbols, symbols[bigram.left].prev, bigram.left);
            push(&mut queue, &symbols, bigram.left, symbols[bigram.left].next);
        }

        let mut i = if symbols.is_empty() { NO_SYMBOL } else { 0 };
        while i != NO_SYMBOL {
            let symbol = symbols[i];
            let piece = &text[symbol.start..symbol.end];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                // A symbol that is not a token is a single character (merges only make
                // tokens): spell it in byte tokens. llama.cpp aborts when a byte has no
                // token; we use <unk>, or drop the byte when there is none.
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.spm_byte_tokens[b as usize]),
                ),
            }
            i = symbol.next;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Queries and decoding
// ---------------------------------------------------------------------------------------------

impl Tokenizer {
    /// Whether a prompt should start with BOS (`tokenizer.ggml.add_bos_token`, defaulting as
    /// llama.cpp: true for SentencePiece and Llama-3-style BPE, false for other BPE).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// Ids that end generation, ascending: llama.cpp's end-of-generation set — eos, eot
    /// (`tokenizer.ggml.eot_token_id`), eom, the FIM pad/repo/file-separator tokens, and
    /// tokens named `<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>`, `<|endoftext|>`…
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn vocab_kind(&self) -> VocabKind {
        self.vocab_kind
    }

    /// The token's type; `None` outside the vocabulary.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.tokens.get(id as usize).map(|t| t.kind)
    }

    /// Control or user-defined.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_kind(id),
            Some(TokenKind::Control | TokenKind::UserDefined)
        )
    }

    /// The raw vocabulary string (e.g. `ĠParis`); `None` outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| t.text.as_str())
    }

    /// The id of a vocabulary string, if it is one.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The bytes this token stands for (llama.cpp's `token_to_piece`): byte-level decoded for
    /// BPE; `▁` → space and `<0xXX>` → that byte for SentencePiece. Control and unknown tokens
    /// give their text only with `render_special`; user-defined tokens always give their text
    /// (as in llama.cpp); unused tokens and ids outside the vocabulary give nothing.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> Cow<'_, [u8]> {
        match self.tokens.get(id as usize) {
            None => Cow::Borrowed(&[]),
            Some(t)
                if !render_special && matches!(t.kind, TokenKind::Control | TokenKind::Unknown) =>
            {
                Cow::Borrowed(&[])
            }
            Some(_) => Cow::Borrowed(&self.pieces[id as usize]),
        }
    }

    /// Ids → text, as llama.cpp's `llama_detokenize(…, remove_special = false, unparse_special =
    /// render_special)`: SentencePiece drops the first token's leading space (the prefix space
    /// encoding added), and vocabularies with `clean_spaces` get llama.cpp's punctuation and
    /// contraction clean-up. Invalid UTF-8 becomes U+FFFD. To decode generated text piece by
    /// piece, use [`StreamDecoder`], which does neither.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let piece = self.token_bytes(id, render_special);
            let piece: &[u8] = if remove_space {
                piece.strip_prefix(b" ").unwrap_or(&piece)
            } else {
                &piece
            };
            bytes.extend_from_slice(piece);
            remove_space = false;
        }
        if self.clean_spaces {
            bytes = clean_spaces(&bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// llama.cpp's `clean_spaces` passes in `llama_vocab::impl::detokenize`, byte for byte.
fn clean_spaces(text: &[u8]) -> Vec<u8> {
    if text.is_empty() {
        return Vec::new();
    }
    // First pass: " ?", " !", " .", " ," lose the space.
    let mut out = vec![text[0]];
    for i in 1..text.len() {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            out.pop();
        }
        out.push(x);
    }
    // Second pass: " ' " loses both spaces.
    let mut t = out;
    let mut out = vec![t[0]];
    let mut i = 1;
    while i < t.len() {
        let x = t[i];
        if x == b'\'' && i + 1 < t.len() && t[i - 1] == b' ' && t[i + 1] == b' ' {
            out.pop();
            i += 1;
            t[i] = 0; // as llama.cpp: the skipped space no longer counts as one
        }
        out.push(x);
        i += 1;
    }
    // Third pass: " 's", " 'm", " 're", " 've" lose the space.
    let t = out;
    let mut out = vec![t[0]];
    for i in 1..t.len() {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < t.len() {
            let x1 = t[i + 1];
            if matches!(x1, b's' | b'm') {
                out.pop();
            } else if !matches!(x1, b't' | b'd') && i + 2 < t.len() {
                let x2 = t[i + 2];
                if matches!((x1, x2), (b'r', b'e') | (b'v', b'e')) {
                    out.pop();
                }
            }
        }
        out.push(x);
    }
    out
}

/// Turns a stream of token ids into text, holding back the bytes of a UTF-8 character that
/// later tokens complete, so no piece it returns ever ends in half a character. Invalid
/// sequences are replaced by U+FFFD as soon as they are known to be invalid, so at most three
/// bytes are ever held back.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    render_special: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new(render_special: bool) -> Self {
        Self {
            render_special,
            pending: Vec::new(),
        }
    }

    /// The text that `id` completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending
            .extend_from_slice(&tok.token_bytes(id, self.render_special));
        let mut text = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Sound: from_utf8 vouched for these bytes.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        text
    }

    /// Flushes what is held back (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

// ---------------------------------------------------------------------------------------------
// Tests (tiny hand-made vocabularies; the real model is checked in tests/tokenizer_reference.rs)
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A byte-level vocabulary: every printable ASCII byte, `Ġ` (space), the Latin-1 pieces of
    /// "é", a few merges, and specials.
    fn bpe_metadata(pre: &str) -> Metadata {
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
            "<tool>".into(),
        ];
        let table = byte_to_char_table();
        for b in 0..=255u8 {
            tokens.push(table[b as usize].to_string());
        }
        let merged = [
            "he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworld", "ld", "Ġworl", "12", "123",
        ];
        tokens.extend(merged.iter().map(|s| s.to_string()));
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "l d",
            "1 2", "12 3",
        ];
        let mut types = vec![Value::I32(3), Value::I32(3), Value::I32(3), Value::I32(4)];
        types.extend((4..tokens.len()).map(|_| Value::I32(1)));
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strings(&token_refs)),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
            ("tokenizer.ggml.merges".to_string(), strings(&merges)),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                Value::Bool(false),
            ),
        ])
    }

    fn ids_of(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
        texts
            .iter()
            .map(|t| {
                tok.token_id(t)
                    .unwrap_or_else(|| panic!("{t:?} not in vocab"))
            })
            .collect()
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let table = byte_to_char_table();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[0], 'Ā');
        assert_eq!(table[0xAD], 'Ń');
        assert_eq!(byte_level_decode("ĠParisĊ", &table), b" Paris\n");
    }

    #[test]
    fn bpe_merges_by_rank() {
        let tok = Tokenizer::from_metadata(&bpe_metadata("gpt-2")).unwrap();
        assert_eq!(
            tok.encode("hello world", true),
            ids_of(&tok, &["hello", "Ġworld"])
        );
        // "hellx": "hell" then a lone "x".
        assert_eq!(tok.encode("hellx", true), ids_of(&tok, &["hell", "x"]));
        // Rank decides, not length: "l d" outranks nothing here, but in "wold" it is all there is.
        assert_eq!(tok.encode(" wold", true), ids_of(&tok, &["Ġw", "o", "ld"]));
        assert_eq!(
            tok.decode(&tok.encode("hello world", true), false),
            "hello world"
        );
        assert!(!tok.add_bos());
        assert_eq!(tok.encode("", true), Vec::<u32>::new());
    }

    #[test]
    fn smollm_splits_digits_but_gpt2_keeps_them() {
        let smollm = Tokenizer::from_metadata(&bpe_metadata("smollm")).unwrap();
        assert_eq!(
            smollm.encode("123", false),
            ids_of(&smollm, &["1", "2", "3"])
        );
        let gpt2 = Tokenizer::from_metadata(&bpe_metadata("gpt-2")).unwrap();
        assert_eq!(gpt2.encode("123", false), ids_of(&gpt2, &["123"]));
    }

    #[test]
    fn pre_tokenizer_words() {
        let split = |pre: &str, text: &str| -> Vec<String> {
            let config = pre_config(pre).unwrap();
            let p = PreTokenizer::new(config.regexes).unwrap();
            p.split(text)
                .into_iter()
                .map(|(s, e)| text[s..e].to_string())
                .collect()
        };
        assert_eq!(split("gpt-2", "a  b   c"), ["a", " ", " b", "  ", " c"]);
        assert_eq!(
            split("gpt-2", "I'm here!\n"),
            ["I", "'m", " here", "!", "\n"]
        );
        assert_eq!(split("smollm", " 3.14"), [" ", "3", ".", "1", "4"]);
        assert_eq!(split("llama-bpe", "12345 I'M"), ["123", "45", " I", "'M"]);
        assert_eq!(split("qwen2", "x 42\n\n"), ["x", " ", "4", "2", "\n\n"]);
    }

    #[test]
    fn special_tokens_parsed_only_when_asked() {
        let tok = Tokenizer::from_metadata(&bpe_metadata("gpt-2")).unwrap();
        let parsed = tok.encode("<|im_start|>hello<|im_end|>", true);
        assert_eq!(parsed[0], 1);
        assert_eq!(&parsed[1..], &ids_of(&tok, &["hello", "<|im_end|>"])[..]);
        let plain = tok.encode("<|im_start|>hello", false);
        assert!(!plain.contains(&1));
        assert_eq!(tok.decode(&plain, false), "<|im_start|>hello");
        // User-defined tokens are matched even without parse_special, as in llama.cpp.
        assert_eq!(tok.encode("<tool>", false), vec![3]);
        // Rendering.
        assert_eq!(tok.decode(&parsed, true), "<|im_start|>hello<|im_end|>");
        assert_eq!(tok.decode(&parsed, false), "hello");
        assert_eq!(&*tok.token_bytes(3, false), b"<tool>");
        assert!(tok.is_special(1) && tok.is_special(3) && !tok.is_special(300));
    }

    #[test]
    fn stop_ids_follow_llama_cpp() {
        let tok = Tokenizer::from_metadata(&bpe_metadata("gpt-2")).unwrap();
        // eos (2 = <|im_end|>) and <|endoftext|> by name.
        assert_eq!(tok.stop_ids(), &[0, 2]);
        assert!(tok.is_stop(2) && !tok.is_stop(1));
    }

    #[test]
    fn unknown_pre_falls_back_to_default() {
        let tok = Tokenizer::from_metadata(&bpe_metadata("no-such-pre")).unwrap();
        assert_eq!(
            tok.encode("hello world", true),
            ids_of(&tok, &["hello", "Ġworld"])
        );
    }

    #[test]
    fn missing_keys_are_errors() {
        let mut m = bpe_metadata("gpt-2");
        m.remove("tokenizer.ggml.merges");
        assert!(matches!(
            Tokenizer::from_metadata(&m),
            Err(EngineError::MissingMetadata(_))
        ));
        let mut m = bpe_metadata("gpt-2");
        m.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&m),
            Err(EngineError::Tokenizer(_))
        ));
        let mut m = bpe_metadata("gpt-2");
        m.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(vec![Value::I32(1)]),
        );
        assert!(matches!(
            Tokenizer::from_metadata(&m),
            Err(EngineError::BadGguf(_))
        ));
    }

    #[test]
    fn stream_decoder_holds_back_split_characters() {
        let tok = Tokenizer::from_metadata(&bpe_metadata("gpt-2")).unwrap();
        // "é" is C3 A9: byte-level tokens "Ã" and "©".
        let ids = tok.encode("hé!", false);
        assert_eq!(ids, ids_of(&tok, &["h", "Ã", "©", "!"]));
        let mut stream = StreamDecoder::new(false);
        let pieces: Vec<String> = ids.iter().map(|&id| stream.push(&tok, id)).collect();
        assert_eq!(pieces, ["h", "", "é", "!"]);
        assert_eq!(stream.finish(), "");
        // An unfinished character is flushed lossily; an invalid byte is replaced at once.
        let mut stream = StreamDecoder::new(false);
        assert_eq!(stream.push(&tok, ids[1]), "");
        assert_eq!(stream.finish(), "\u{FFFD}");
        let lone_continuation = tok.token_id("©").unwrap();
        assert_eq!(stream.push(&tok, lone_continuation), "\u{FFFD}");
    }

    #[test]
    fn long_inputs_stay_fast() {
        let tok = Tokenizer::from_metadata(&bpe_metadata("smollm")).unwrap();
        for text in [
            "a".repeat(200_000),
            " ".repeat(200_000) + "x",
            "12".repeat(100_000),
            "é".repeat(100_000),
        ] {
            let start = std::time::Instant::now();
            let ids = tok.encode(&text, true);
            assert!(!ids.is_empty());
            assert_eq!(tok.decode(&ids, false), text);
            assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
        }
    }

    #[test]
    fn clean_spaces_matches_llama_cpp() {
        assert_eq!(
            clean_spaces(b"Hello , world ! it 's I 'm we 're x ' y don 't"),
            b"Hello, world! it's I'm we're x'y don 't".to_vec()
        );
        assert_eq!(clean_spaces(b""), Vec::<u8>::new());
    }

    /// SentencePiece: a hand-made vocabulary with scores and byte fallback.
    fn spm_metadata() -> Metadata {
        let vocab: &[(&str, f32, i32)] = &[
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0xC3>", 0.0, 6),
            ("<0xA9>", 0.0, 6),
            ("▁", -1.0, 1),
            ("h", -2.0, 1),
            ("e", -2.0, 1),
            ("l", -2.0, 1),
            ("o", -2.0, 1),
            ("▁h", -3.0, 1),
            ("ll", -1.5, 1),
            ("▁he", -3.5, 1),
            ("llo", -5.0, 1),
            ("he", -4.0, 1),
        ];
        HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vocab.iter().map(|v| Value::String(v.0.into())).collect()),
            ),
            (
                "tokenizer.ggml.scores".to_string(),
                Value::Array(vocab.iter().map(|v| Value::F32(v.1)).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(vocab.iter().map(|v| Value::I32(v.2)).collect()),
            ),
        ])
    }

    #[test]
    fn spm_merges_by_score_with_prefix_space() {
        let tok = Tokenizer::from_metadata(&spm_metadata()).unwrap();
        assert!(tok.add_bos());
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
        // "▁hello": ll (-1.5), then ▁h (-3), then ▁he (-3.5), then llo (-5).
        assert_eq!(tok.encode("hello", false), ids_of(&tok, &["▁he", "llo"]));
        // The prefix space comes back after a special token too.
        assert_eq!(
            tok.encode("<s>hello", true),
            ids_of(&tok, &["<s>", "▁he", "llo"])
        );
        // Decoding drops the prefix space.
        assert_eq!(tok.decode(&tok.encode("hello", false), false), "hello");
        assert_eq!(
            tok.decode(&ids_of(&tok, &["<s>", "▁he", "llo"]), true),
            "<s> hello"
        );
    }

    #[test]
    fn spm_byte_fallback() {
        let tok = Tokenizer::from_metadata(&spm_metadata()).unwrap();
        let ids = tok.encode("hé", false);
        assert_eq!(ids, ids_of(&tok, &["▁h", "<0xC3>", "<0xA9>"]));
        assert_eq!(tok.decode(&ids, false), "hé");
        // No token for "x" nor its byte: <unk>.
        assert_eq!(tok.encode("x", false), ids_of(&tok, &["▁", "<unk>"]));
        let mut stream = StreamDecoder::new(false);
        let text: String = ids.iter().map(|&id| stream.push(&tok, id)).collect();
        assert_eq!(text, " hé");
    }
}
