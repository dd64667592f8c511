//! Running one generation and answering with OpenAI's response bodies: `chat.completion`
//! and `text_completion`, their `usage`, and both log-probability shapes (chat's
//! `logprobs.content` entries, completions' legacy `tokens`/`token_logprobs`/`top_logprobs`/
//! `text_offset` object). Streamed answers are [`super::streaming`]'s; both list the request
//! on the dashboard when it ends ([`Recorder`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use axum::Json;
use potluck_engine::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::validation::Prepared;
use super::ApiError;
use crate::generation::{FinishReason, GenerateEvent};
use crate::state::{unix_now, AppState};
use crate::text::TextAssembler;

/// Which endpoint a request came in on: it decides the response's shape.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Endpoint {
    Chat,
    Completion,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{nanos:x}{:04x}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

pub(super) fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// One OpenAI `logprobs.content` entry.
pub(super) fn logprob_entry(tokenizer: &Tokenizer, id: u32, logprob: Option<f32>, top: &[(u32, f32)]) -> Value {
    let token_json = |id: u32, lp: f32| {
        json!({"token": token_string(tokenizer, id), "logprob": lp, "bytes": tokenizer.token_bytes(id, false)})
    };
    let mut entry = token_json(id, logprob.unwrap_or(f32::NAN));
    entry["top_logprobs"] = Value::Array(top.iter().map(|&(t, lp)| token_json(t, lp)).collect());
    entry
}

/// The completions endpoint's `logprobs` object: the tokens, their log-probabilities, the
/// alternatives as token → log-probability maps, and each token's character offset in the
/// prompt followed by the completion (OpenAI's legacy shape, which evaluation harnesses read).
#[derive(Debug, Default)]
pub(super) struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends `id`, whose text starts at character `*offset` (advanced past it). `logprob`
    /// and `top` are `None` for a token without context (the prompt's first).
    pub(super) fn push(&mut self, tokenizer: &Tokenizer, offset: &mut usize, id: u32, logprob: Option<f32>, top: Option<&[(u32, f32)]>) {
        let text = token_string(tokenizer, id);
        self.text_offset.push(*offset);
        *offset += text.chars().count();
        self.tokens.push(Value::String(text));
        self.token_logprobs.push(json!(logprob));
        self.top_logprobs.push(match top {
            Some(top) => Value::Object(top.iter().map(|&(t, lp)| (token_string(tokenizer, t), json!(lp))).collect()),
            None => Value::Null,
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The object so far, leaving `self` empty (a streamed chunk carries its own tokens).
    pub(super) fn take(&mut self) -> Value {
        let taken = std::mem::take(self);
        json!({
            "tokens": taken.tokens,
            "token_logprobs": taken.token_logprobs,
            "top_logprobs": taken.top_logprobs,
            "text_offset": taken.text_offset,
        })
    }
}

fn token_string(tokenizer: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(&tokenizer.token_bytes(id, false)).into_owned()
}

/// What a completion shows before its first generated token: the echoed prompt (text and,
/// when asked, its first token, which has no log-probability), and where the completion's
/// character offsets start.
pub(super) fn completion_preamble(tokenizer: &Tokenizer, prepared: &Prepared) -> (String, Option<CompletionLogprobs>, usize) {
    let mut logprobs = prepared.want_logprobs.then(CompletionLogprobs::default);
    if !prepared.echo && logprobs.is_none() {
        return (String::new(), None, 0); // nothing shows the prompt: no need to decode it
    }
    let prompt_text = tokenizer.decode(&prepared.prompt, false);
    let mut offset = 0;
    if let (true, Some(lp)) = (prepared.echo, logprobs.as_mut()) {
        lp.push(tokenizer, &mut offset, prepared.prompt[0], None, None);
    } else {
        offset = prompt_text.chars().count();
    }
    let text = if prepared.echo { prompt_text } else { String::new() };
    (text, logprobs, offset)
}

/// Everything a finished generation produced.
struct Outcome {
    text: String,
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    /// Chat's `logprobs.content` entries.
    logprobs: Vec<Value>,
    /// Completions' `logprobs` object, when asked for.
    completion_logprobs: Option<CompletionLogprobs>,
}

/// OpenAI's `usage`; `prompt_tokens_details.cached_tokens` counts the prompt tokens that came
/// from a kept cache (prefix caching).
pub(super) fn usage_json(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}})
}

/// Puts a request on the dashboard's list when it ends, however it ends (a client that
/// goes away mid-stream leaves it `cancelled`).
pub(super) struct Recorder {
    pub(super) state: Arc<AppState>,
    pub(super) id: String,
    pub(super) endpoint: Endpoint,
    started: std::time::Instant,
    prompt_tokens: usize,
    pub(super) completion_tokens: usize,
    pub(super) finish_reason: &'static str,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let endpoint = match self.endpoint {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "completion",
        };
        self.state.dashboard.record(crate::snapshot::RequestRecord::new(
            &self.id,
            endpoint,
            self.started,
            self.prompt_tokens,
            self.completion_tokens,
            self.finish_reason,
        ));
    }
}

pub(super) async fn run_generation(state: Arc<AppState>, prepared: Prepared, endpoint: Endpoint) -> Result<Response, ApiError> {
    // `n` choices are `n` sequences (seeded `seed`, `seed + 1`, … when a seed is given), all
    // queued before any is awaited so they are decoded together.
    let mut receivers = Vec::with_capacity(prepared.n);
    for i in 0..prepared.n {
        let mut generate = prepared.generate.clone();
        generate.sampling.seed = generate.sampling.seed.map(|s| s.wrapping_add(i as u64));
        receivers.push(state.service.submit(generate)?);
    }
    let id = response_id(endpoint);
    let created = unix_now();
    let mut recorder = Recorder {
        state: state.clone(),
        id: id.clone(),
        endpoint,
        started: std::time::Instant::now(),
        prompt_tokens: prepared.prompt.len(),
        completion_tokens: 0,
        finish_reason: "cancelled",
    };
    if prepared.stream {
        let receiver = receivers.pop().expect("a streamed request has one choice");
        return Ok(super::streaming::respond(prepared, receiver, created, recorder));
    }
    let outcomes = futures::future::join_all(receivers.into_iter().map(|r| collect(&state, &prepared, endpoint, r))).await;
    recorder.finish_reason = "error";
    let outcomes: Vec<Outcome> = outcomes.into_iter().collect::<Result<_, _>>()?;
    let completion_tokens = outcomes.iter().map(|o| o.completion_tokens).sum();
    let (prompt_tokens, cached_tokens) = (outcomes[0].prompt_tokens, outcomes.iter().map(|o| o.cached_tokens).max().unwrap_or(0));
    let (choices, reasons): (Vec<Value>, Vec<&'static str>) =
        outcomes.into_iter().enumerate().map(|(i, o)| choice_json(&prepared, endpoint, i, o)).unzip();
    recorder.finish_reason = reasons[0];
    recorder.completion_tokens = completion_tokens;
    let model = &state.model_id;
    // The prompt is counted once, as OpenAI does for `n` > 1.
    let usage = usage_json(prompt_tokens, completion_tokens, cached_tokens);
    let object = match endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completion => "text_completion",
    };
    let body = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices, "usage": usage});
    Ok(Json(body).into_response())
}

/// One choice of a non-streamed answer, and its finish reason.
fn choice_json(prepared: &Prepared, endpoint: Endpoint, index: usize, mut outcome: Outcome) -> (Value, &'static str) {
    match endpoint {
        Endpoint::Chat => {
            let logprobs = if prepared.want_logprobs { json!({"content": outcome.logprobs}) } else { Value::Null };
            let mut message = json!({"role": "assistant", "content": outcome.text});
            let mut finish_reason = outcome.finish_reason;
            if let Some((format, forced)) = prepared.tools {
                let mut stream = crate::tools::ToolStream::new(format, forced);
                let mut deltas = stream.push(&outcome.text);
                deltas.extend(stream.finish());
                let (content, calls) = crate::tools::assemble(deltas);
                if !calls.is_empty() {
                    // OpenAI: a message that calls tools has null content when it says nothing.
                    message = json!({"role": "assistant", "content": if content.trim().is_empty() { Value::Null } else { json!(content) }, "tool_calls": calls});
                    if finish_reason == "stop" {
                        finish_reason = "tool_calls";
                    }
                } else {
                    message["content"] = json!(content);
                }
            }
            (json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}), finish_reason)
        }
        Endpoint::Completion => (
            json!({"index": index, "text": outcome.text,
                   "logprobs": outcome.completion_logprobs.as_mut().map_or(Value::Null, CompletionLogprobs::take),
                   "finish_reason": outcome.finish_reason}),
            outcome.finish_reason,
        ),
    }
}

async fn collect(
    state: &AppState,
    prepared: &Prepared,
    endpoint: Endpoint,
    mut receiver: mpsc::UnboundedReceiver<GenerateEvent>,
) -> Result<Outcome, ApiError> {
    let tokenizer = &state.tokenizer;
    let mut assembler = TextAssembler::new(prepared.stops.clone());
    let (mut text, mut completion_logprobs, mut offset) = match endpoint {
        Endpoint::Completion => completion_preamble(tokenizer, prepared),
        Endpoint::Chat => (String::new(), None, 0),
    };
    let mut logprobs = Vec::new();
    let mut completion_tokens = 0;
    let mut cached_tokens = 0;
    while let Some(event) = receiver.recv().await {
        match event {
            GenerateEvent::PromptCached(n) => cached_tokens = n,
            GenerateEvent::PromptLogprobs(entries) => {
                if let Some(lp) = completion_logprobs.as_mut() {
                    for e in entries {
                        lp.push(tokenizer, &mut offset, e.token, Some(e.logprob), Some(&e.top));
                    }
                }
            }
            GenerateEvent::Token { id, logprob, top } => {
                completion_tokens += 1;
                text.push_str(&assembler.push(tokenizer, id));
                if let Some(lp) = completion_logprobs.as_mut() {
                    lp.push(tokenizer, &mut offset, id, logprob, Some(&top));
                } else if prepared.want_logprobs {
                    logprobs.push(logprob_entry(tokenizer, id, logprob, &top));
                }
                if assembler.stopped() {
                    // Dropping the receiver cancels the rest of the generation.
                    let prompt_tokens = prepared.prompt.len();
                    let finish_reason = "stop";
                    return Ok(Outcome { text, finish_reason, prompt_tokens, completion_tokens, cached_tokens, logprobs, completion_logprobs });
                }
            }
            GenerateEvent::Finished { reason, prompt_tokens, completion_tokens } => {
                text.push_str(&assembler.finish());
                let finish_reason = if assembler.stopped() { "stop" } else { finish_reason_str(reason) };
                return Ok(Outcome { text, finish_reason, prompt_tokens, completion_tokens, cached_tokens, logprobs, completion_logprobs });
            }
            GenerateEvent::Failed(message) => return Err(ApiError::internal(message)),
            GenerateEvent::Unavailable(message) => return Err(ApiError::unavailable(message)),
        }
    }
    Err(ApiError::internal("the generation service stopped"))
}
