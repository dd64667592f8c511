//! Request bodies as the two generation endpoints accept them, their checks, and the limits
//! that bound a request before any work is done for it.
//!
//! Every check returns an [`ApiError`] naming the offending parameter (a 400, as OpenAI
//! answers); nothing a client sends can panic. Limits on the generated text itself (stop
//! strings) are [`crate::text`]'s, on log-probabilities the wire protocol's (every stage
//! checks them too), on the generation loop [`crate::generation`]'s.

use potluck_engine::chat_template::ChatMessage;
use potluck_engine::sampler::SamplingParams;
use potluck_engine::tokenizer::Tokenizer;
use potluck_protocol::limits::{LOGIT_BIAS_TOKENS_MAX, PROMPT_LOGPROBS_TOKENS_MAX, TOP_LOGPROBS_MAX};
use serde::Deserialize;
use serde_json::Value;

use super::ApiError;
use crate::generation::GenerateRequest;
use crate::state::AppState;
use crate::structured::Grammar;
use crate::tools::{self, ToolFormat, ToolRequest};
use crate::text::{STOP_STRINGS_MAX, STOP_STRING_BYTES_MAX};

/// Largest request body accepted; bigger ones get a 413. A prompt longer than the context is
/// refused after tokenizing anyway; this bounds the work before that.
pub const REQUEST_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Messages per chat request at most.
pub const CHAT_MESSAGES_MAX: usize = 1024;
/// Tokens a completions request generates when it names no `max_tokens`: OpenAI's default
/// for that endpoint (chat's default is the rest of the context).
pub const COMPLETION_MAX_TOKENS_DEFAULT: usize = 16;

/// Sampling and length fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub(super) struct CommonParams {
    /// Accepted and ignored: any model name serves the loaded model.
    #[allow(dead_code)]
    model: Option<String>,
    pub(super) max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<StopField>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    #[serde(alias = "repeat_penalty")]
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    /// llama-server's name: false opts out of prefix caching for this request.
    cache_prompt: Option<bool>,
    /// false turns speculative decoding off for this request.
    speculative: Option<bool>,
    n: Option<u64>,
    /// OpenAI's `logit_bias`: token id (a string key) → bias within [-100, 100]; -100 bans.
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// Fields whose meaning we cannot honour yet: refused with a 400 that names them, never
    /// answered as if they had been (`Self::refuse_unsupported`). Fields that change nothing
    /// here (`user`, `store`, `metadata`, `parallel_tool_calls`) are accepted and ignored, as
    /// serde ignores every field not named.
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
    suffix: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    pub(super) max_completion_tokens: Option<u64>,
    pub(super) logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    #[serde(flatten)]
    pub(super) common: CommonParams,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    /// A tool result's call id, and the function's name.
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionRequest {
    prompt: Value,
    /// Put the prompt before the completion in `text` (and, with `logprobs`, its tokens'
    /// log-probabilities before the completion's: the first token has none).
    pub(super) echo: Option<bool>,
    /// Log-probabilities of each token and of this many alternatives (0..=20).
    logprobs: Option<u64>,
    #[serde(flatten)]
    pub(super) common: CommonParams,
}

/// What both endpoints hand to [`super::responses::run_generation`] once the request is
/// understood.
pub(super) struct Prepared {
    pub(super) prompt: Vec<u32>,
    pub(super) generate: GenerateRequest,
    pub(super) stops: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) want_logprobs: bool,
    /// Completions' `echo`: the prompt comes first in the text.
    pub(super) echo: bool,
    /// Chat with tools: the family's call syntax, and whether a call is forced; the answer's
    /// text then goes through a [`tools::ToolStream`].
    pub(super) tools: Option<(ToolFormat, bool)>,
    /// Choices to generate (`n`), each its own sequence.
    pub(super) n: usize,
}

/// Most choices one request may ask for (`n`): each is a sequence of the batch, and the
/// batch holds 16.
pub const CHOICES_MAX: usize = 8;

impl CommonParams {
    /// A 400 naming the first field set to something this server cannot do yet. Empty or
    /// neutral values (no functions, `function_call: "none"`) ask for nothing and pass.
    /// (`suffix` is the completions endpoint's: [`CompletionRequest::fill_in_the_middle`].) (`tools` and `tool_choice` are the chat endpoint's:
    /// [`ChatRequest::tool_request`]; completions refuse them in [`CompletionRequest::refuse_tools`].)
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let unsupported = |param: &'static str, what: &str| {
            Err(ApiError::bad_request(format!("{param} is not supported by this server yet: {what}")).param(param).code("unsupported_parameter"))
        };
        let set = |v: &Option<Value>| match v {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::String(s)) => !s.is_empty() && s != "none",
            Some(_) => true,
        };
        for (value, param) in [(&self.functions, "functions"), (&self.function_call, "function_call")] {
            if set(value) {
                return unsupported(param, "the deprecated function-call fields are not implemented: send tools and tool_choice");
            }
        }
        Ok(())
    }

    /// The grammar `response_format` asks for: none for `{"type": "text"}` or no field; a
    /// JSON schema's (or any JSON object's, for `json_object`) otherwise. A schema the
    /// grammar engine cannot enforce is a 400 that says which part.
    fn grammar(&self, state: &AppState) -> Result<Option<Grammar>, ApiError> {
        let Some(format) = self.response_format.as_ref().filter(|f| !f.is_null()) else { return Ok(None) };
        let bad = |message: String| ApiError::bad_request(message).param("response_format").code("invalid_response_format");
        if !format.is_object() {
            return Err(bad("response_format is an object such as {\"type\": \"json_object\"}".into()));
        }
        let factory = state.grammars.get().map_err(bad)?;
        factory.for_response_format(format).map_err(|e| bad(format!("response_format cannot be enforced: {e}")))
    }

    /// `logit_bias` as the engine takes it: each key a token id of the vocabulary, each value
    /// within ±[`LOGIT_BIAS_MAX`](potluck_engine::sampler::LOGIT_BIAS_MAX), at most
    /// [`LOGIT_BIAS_TOKENS_MAX`] of them.
    fn logit_bias(&self, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(map) = &self.logit_bias else { return Ok(Vec::new()) };
        let bad = |message: String| Err(ApiError::bad_request(message).param("logit_bias"));
        if map.len() > LOGIT_BIAS_TOKENS_MAX as usize {
            return bad(format!("logit_bias may name at most {LOGIT_BIAS_TOKENS_MAX} tokens"));
        }
        let mut biases = Vec::with_capacity(map.len());
        for (key, value) in map {
            let Ok(token) = key.trim().parse::<u32>() else {
                return bad(format!("logit_bias keys are token ids; {key:?} is not one"));
            };
            let Some(bias) = value.as_f64() else {
                return bad(format!("the logit bias of token {token} is not a number"));
            };
            biases.push((token, bias as f32));
        }
        let params = SamplingParams { logit_bias: biases, ..SamplingParams::default() };
        match params.validate(vocab) {
            Ok(()) => Ok(params.logit_bias),
            Err(e) => bad(e.to_string()),
        }
    }

    pub(super) fn prepare(
        &self,
        prompt: Vec<u32>,
        max_tokens: Option<u64>,
        default_max_tokens: Option<usize>,
        (want_logprobs, top_logprobs): (bool, usize),
        state: &AppState,
    ) -> Result<Prepared, ApiError> {
        self.refuse_unsupported()?;
        let n = self.n.unwrap_or(1);
        if n == 0 || n > CHOICES_MAX as u64 {
            return Err(ApiError::bad_request(format!("n must be in 1..={CHOICES_MAX}")).param("n"));
        }
        if n > 1 && self.stream.unwrap_or(false) {
            return Err(ApiError::bad_request("n > 1 is answered whole, not streamed: send stream: false or n: 1").param("n"));
        }
        let context = state.service.context_length();
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
        }
        if prompt.len() >= context {
            return Err(ApiError::bad_request(format!(
                "the prompt is {} tokens long; this model's context holds {context} tokens (prompt and completion together)",
                prompt.len()
            ))
            .code("context_length_exceeded"));
        }
        if let Some(vocab_bad) = prompt.iter().find(|&&t| t as usize >= state.tokenizer.vocab_size()) {
            return Err(ApiError::bad_request(format!("token id {vocab_bad} is outside the vocabulary")).param("prompt"));
        }
        let room = context - prompt.len();
        let max_tokens = match max_tokens {
            Some(m) => (m.min(usize::MAX as u64) as usize).min(room),
            None => default_max_tokens.unwrap_or(room).min(room),
        };
        // What a field left out means: the engine's defaults (llama.cpp's), defined once there.
        let defaults = SamplingParams::default();
        let temperature = self.temperature.unwrap_or(defaults.temperature);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ApiError::bad_request("temperature must be a number ≥ 0").param("temperature"));
        }
        let top_p = self.top_p.unwrap_or(defaults.top_p);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request("top_p must be in (0, 1]").param("top_p"));
        }
        let min_p = self.min_p.unwrap_or(defaults.min_p);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad_request("min_p must be in [0, 1]").param("min_p"));
        }
        for (value, name) in [(self.presence_penalty, "presence_penalty"), (self.frequency_penalty, "frequency_penalty")] {
            if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(ApiError::bad_request(format!("{name} must be in [-2, 2]")).param(name));
            }
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(defaults.repetition_penalty);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(ApiError::bad_request("repetition_penalty must be > 0").param("repetition_penalty"));
        }
        let stops = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stops.len() > STOP_STRINGS_MAX || stops.iter().any(|s| s.len() > STOP_STRING_BYTES_MAX) {
            return Err(ApiError::bad_request(format!(
                "at most {STOP_STRINGS_MAX} stop strings of at most {STOP_STRING_BYTES_MAX} bytes each"
            ))
            .param("stop"));
        }
        let sampling = SamplingParams {
            temperature,
            top_k: self.top_k.map_or(defaults.top_k, |k| k.clamp(0, u32::MAX as i64) as u32),
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            seed: self.seed.map(|s| s as u64),
            logit_bias: self.logit_bias(state.tokenizer.vocab_size())?,
            ..defaults
        };
        Ok(Prepared {
            generate: GenerateRequest {
                prompt: prompt.clone(),
                max_tokens,
                sampling,
                ignore_eos: self.ignore_eos.unwrap_or(false),
                logprobs: want_logprobs,
                top_logprobs,
                prompt_logprobs: false,
                grammar: self.grammar(state)?,
                cache_prompt: self.cache_prompt.unwrap_or(true),
                speculative: self.speculative.unwrap_or(true),
            },
            prompt,
            stops,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            want_logprobs,
            echo: false,
            tools: None,
            n: n as usize,
        })
    }
}

impl ChatRequest {
    /// The messages as the chat template takes them: 1 to [`CHAT_MESSAGES_MAX`] of them,
    /// content as a string or as text parts (other part types are refused).
    pub(super) fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() || self.messages.len() > CHAT_MESSAGES_MAX {
            return Err(ApiError::bad_request(format!("messages must hold 1 to {CHAT_MESSAGES_MAX} messages")).param("messages"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        if part.kind != "text" {
                            return Err(ApiError::bad_request(format!("content parts of type `{}` are not supported (text only)", part.kind)).param("messages"));
                        }
                        text.push_str(part.text.as_deref().unwrap_or(""));
                    }
                    text
                }
            };
            let mut message = ChatMessage::new(m.role.clone(), content);
            if let Some(calls) = &m.tool_calls {
                let mut shown = Vec::with_capacity(calls.len());
                for call in calls {
                    let function = call.get("function").filter(|f| f.get("name").is_some_and(Value::is_string)).ok_or_else(|| {
                        ApiError::bad_request("each tool call in messages has a function with a name").param("messages")
                    })?;
                    let arguments = tools::arguments_for_template(function.get("arguments").unwrap_or(&Value::Null));
                    shown.push(serde_json::json!({"id": call.get("id"), "type": "function",
                        "function": {"name": function["name"], "arguments": arguments}}));
                }
                message.tool_calls = Some(shown);
            }
            message.tool_call_id = m.tool_call_id.clone();
            message.name = m.name.clone();
            messages.push(message);
        }
        Ok(messages)
    }

    /// The request's tools, checked; `None` without tools or with `tool_choice: "none"`.
    pub(super) fn tool_request(&self) -> Result<Option<ToolRequest>, ApiError> {
        let request = ToolRequest::parse(self.common.tools.as_ref(), self.common.tool_choice.as_ref())
            .map_err(|e| ApiError::bad_request(e.message).param(e.param))?;
        if request.is_some() && self.common.response_format.as_ref().is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text")) {
            return Err(ApiError::bad_request("response_format cannot be combined with tools: the tool call has its own format")
                .param("response_format"));
        }
        Ok(request)
    }

    /// Alternatives per token: `top_logprobs` when `logprobs` is on, else none.
    pub(super) fn top_logprobs(&self) -> Result<usize, ApiError> {
        match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(n)) if n > u64::from(TOP_LOGPROBS_MAX) => Err(ApiError::bad_request(format!(
                "top_logprobs must be at most {TOP_LOGPROBS_MAX}"
            ))
            .param("top_logprobs")),
            (true, n) => Ok(n.unwrap_or(0) as usize),
            (false, _) => Ok(0),
        }
    }
}

/// A completions prompt: text to tokenize, or token ids as they are.
pub(super) enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

impl CompletionRequest {
    /// Tools belong to chat: a completion has no template to show them through.
    pub(super) fn refuse_tools(&self) -> Result<(), ApiError> {
        for (value, param) in [(&self.common.tools, "tools"), (&self.common.tool_choice, "tool_choice")] {
            if value.as_ref().is_some_and(|v| !v.is_null() && v != &Value::Array(Vec::new()) && v != "none") {
                return Err(ApiError::bad_request(format!("{param} is for /v1/chat/completions (a completion has no chat template to show tools through)"))
                    .param(param)
                    .code("unsupported_parameter"));
            }
        }
        Ok(())
    }

    /// Completions' `suffix` (fill-in-the-middle): the prompt's text and the suffix as the
    /// model's FIM sequence, prefix–suffix–middle as llama.cpp's `/infill` writes it; the
    /// model then writes the middle. `None` without a suffix (or an empty one, OpenAI's
    /// neutral value); a 400 when the model's vocabulary has no FIM tokens or the prompt is
    /// token ids.
    pub(super) fn fill_in_the_middle(&self, tokenizer: &Tokenizer) -> Result<Option<Vec<u32>>, ApiError> {
        let suffix = match &self.common.suffix {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) if s.is_empty() => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::bad_request("suffix must be a string").param("suffix")),
        };
        let PromptInput::Text(prefix) = self.prompt_input()? else {
            return Err(ApiError::bad_request("suffix needs the prompt as text, not token ids").param("suffix"));
        };
        fim_prompt(tokenizer, &prefix, &suffix).map(Some).ok_or_else(|| {
            ApiError::bad_request("suffix (fill-in-the-middle) needs a model trained for it: this model's vocabulary has no FIM tokens")
                .param("suffix")
                .code("unsupported_parameter")
        })
    }

    /// The one prompt: a string, token ids, or a batch of exactly one of either.
    pub(super) fn prompt_input(&self) -> Result<PromptInput, ApiError> {
        Ok(match &self.prompt {
            Value::String(s) => PromptInput::Text(s.clone()),
            Value::Array(items) if items.len() == 1 && items[0].is_string() => PromptInput::Text(items[0].as_str().unwrap_or_default().to_owned()),
            Value::Array(items) if items.len() == 1 && items[0].is_array() => PromptInput::Ids(token_ids(&items[0])?),
            Value::Array(items) if items.iter().all(Value::is_number) => PromptInput::Ids(token_ids(&self.prompt)?),
            Value::Array(_) => return Err(ApiError::bad_request("batched prompts are not supported: send one prompt per request").param("prompt")),
            _ => return Err(ApiError::bad_request("prompt must be a string or an array of token ids").param("prompt")),
        })
    }

    /// `logprobs`: alternatives per token, when log-probabilities are asked for.
    pub(super) fn top_logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            Some(n) if n > u64::from(TOP_LOGPROBS_MAX) => {
                Err(ApiError::bad_request(format!("logprobs must be at most {TOP_LOGPROBS_MAX}")).param("logprobs"))
            }
            n => Ok(n.map(|n| n as usize)),
        }
    }
}

/// Echo with log-probabilities computes one per prompt token: at most
/// [`PROMPT_LOGPROBS_TOKENS_MAX`] of them.
pub(super) fn check_prompt_logprobs_length(prompt_tokens: usize) -> Result<(), ApiError> {
    if prompt_tokens > PROMPT_LOGPROBS_TOKENS_MAX as usize {
        return Err(ApiError::bad_request(format!(
            "log-probabilities of a prompt are computed for at most {PROMPT_LOGPROBS_TOKENS_MAX} tokens"
        ))
        .param("prompt"));
    }
    Ok(())
}

fn token_ids(value: &Value) -> Result<Vec<u32>, ApiError> {
    let items = value.as_array().ok_or_else(|| ApiError::bad_request("prompt must be an array of token ids").param("prompt"))?;
    items
        .iter()
        .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| ApiError::bad_request("token ids must be non-negative integers").param("prompt"))
}

/// The FIM tokens of the families that have them, as (prefix, suffix, middle): Qwen 2.5
/// Coder's, StarCoder's, CodeLlama's, DeepSeek Coder's.
const FIM_TOKENS: [(&str, &str, &str); 4] = [
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
];

/// `[BOS] PRE prefix SUF suffix MID` in the model's FIM tokens, or None when it has none.
pub fn fim_prompt(tokenizer: &Tokenizer, prefix: &str, suffix: &str) -> Option<Vec<u32>> {
    let (pre, suf, mid) = FIM_TOKENS.iter().find_map(|(p, s, m)| Some((tokenizer.token_id(p)?, tokenizer.token_id(s)?, tokenizer.token_id(m)?)))?;
    let mut ids = Vec::new();
    if tokenizer.add_bos() {
        ids.extend(tokenizer.bos_id());
    }
    ids.push(pre);
    ids.extend(tokenizer.encode(prefix, false));
    ids.push(suf);
    ids.extend(tokenizer.encode(suffix, false));
    ids.push(mid);
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Qwen vocabulary (DeepSeek-R1-Distill-Qwen-7B's header; scripts/test.sh fetches it) has
    /// Qwen's FIM tokens; SmolLM2's has none.
    #[test]
    fn fill_in_the_middle_uses_the_models_own_tokens() {
        let home = std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"));
        let donor = std::env::var_os("POTLUCK_QWEN2_TOKENIZER")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| home.join(".cache/potluck/test-data/deepseek-r1-distill-qwen-7b.part-0000.gguf"));
        let (_, content) = potluck_engine::profile::ModelProfile::from_path(&donor)
            .unwrap_or_else(|e| panic!("the Qwen tokenizer donor at {} (scripts/test.sh fetches it): {e}", donor.display()));
        let qwen = Tokenizer::from_gguf(&content).unwrap();
        let ids = fim_prompt(&qwen, "def add(a, b):\n    return ", "\n\nprint(add(1, 2))").unwrap();
        let names: Vec<&str> = ids.iter().filter(|&&id| qwen.is_special(id)).filter_map(|&id| qwen.token_text(id)).collect();
        assert!(names.ends_with(&["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]), "{names:?}");
        assert_eq!(*ids.last().unwrap(), qwen.token_id("<|fim_middle|>").unwrap());
        assert_eq!(qwen.decode(&ids, false), "def add(a, b):\n    return \n\nprint(add(1, 2))");
        let smol = std::env::var_os("POTLUCK_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| home.join(".cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        let (_, content) = potluck_engine::profile::ModelProfile::from_path(&smol).unwrap();
        assert_eq!(fim_prompt(&Tokenizer::from_gguf(&content).unwrap(), "a", "b"), None);
    }
}
