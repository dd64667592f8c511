//! Streamed answers (`"stream": true`): OpenAI's `chat.completion.chunk` /
//! `text_completion` chunks as server-sent events, ended by `data: [DONE]`, with a `usage`
//! chunk when `stream_options.include_usage` asks for one.
//!
//! A task per request turns generation events into chunks; a bounded channel
//! ([`SSE_EVENTS_BUFFERED`]) stands between it and the client, and a client that goes away
//! drops the receiver, which cancels the generation.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::responses::{completion_preamble, finish_reason_str, logprob_entry, usage_json, CompletionLogprobs, Endpoint, Recorder};
use super::validation::Prepared;
use super::ApiError;
use crate::generation::GenerateEvent;
use crate::text::TextAssembler;

/// SSE events buffered towards one client.
const SSE_EVENTS_BUFFERED: usize = 64;

/// The SSE response for `prepared`, fed by a task that runs until the generation ends or
/// the client leaves.
pub(super) fn respond(
    prepared: Prepared,
    receiver: mpsc::UnboundedReceiver<GenerateEvent>,
    created: u64,
    recorder: Recorder,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(SSE_EVENTS_BUFFERED);
    tokio::spawn(stream_events(prepared, receiver, tx, created, recorder));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Streams one request's events as SSE chunks; `recorder` (which knows the request's id and
/// endpoint) lists it on the dashboard when it ends.
async fn stream_events(
    prepared: Prepared,
    mut receiver: mpsc::UnboundedReceiver<GenerateEvent>,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    created: u64,
    mut recorder: Recorder,
) {
    let (state, id, endpoint) = (recorder.state.clone(), recorder.id.clone(), recorder.endpoint);
    let model = state.model_id.clone();
    let chunk = |text: Option<&str>, finish: Option<&str>, logprobs: Option<Value>, first: bool| -> Value {
        match endpoint {
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
            }
            Endpoint::Completion => json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}]}),
        }
    };
    // A chunk whose delta is a tool-call piece (or content, for requests with tools).
    let delta_chunk = |delta: Value| -> Value {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]})
    };
    let mut tool_stream = prepared.tools.map(|(format, forced)| crate::tools::ToolStream::new(format, forced));
    let send = |value: Value| {
        let tx = tx.clone();
        async move { tx.send(Ok(Event::default().data(value.to_string()))).await.is_ok() }
    };
    if endpoint == Endpoint::Chat && !send(chunk(Some(""), None, None, true)).await {
        return;
    }
    let tokenizer = &state.tokenizer;
    let mut assembler = TextAssembler::new(prepared.stops.clone());
    let mut completion_tokens = 0;
    // Completions: the echoed prompt (and its log-probabilities, which all arrive before
    // the first generated token) go out as one chunk before the first token's.
    let (mut echo, mut completion_logprobs, mut offset) = match endpoint {
        Endpoint::Completion => completion_preamble(tokenizer, &prepared),
        Endpoint::Chat => (String::new(), None, 0),
    };
    let mut preamble_pending = endpoint == Endpoint::Completion && prepared.echo;
    let mut cached_tokens = 0;
    let (finish, prompt_tokens, completion_tokens) = loop {
        let Some(event) = receiver.recv().await else {
            let error = ApiError::internal("the generation service stopped");
            let _ = send(error.body()).await;
            return;
        };
        if preamble_pending && !matches!(event, GenerateEvent::PromptLogprobs(_) | GenerateEvent::PromptCached(_)) {
            preamble_pending = false;
            let logprobs = completion_logprobs.as_mut().filter(|lp| !lp.is_empty()).map(CompletionLogprobs::take);
            let prompt = std::mem::take(&mut echo);
            if (!prompt.is_empty() || logprobs.is_some()) && !send(chunk(Some(&prompt), None, logprobs, false)).await {
                return;
            }
        }
        match event {
            GenerateEvent::PromptCached(n) => cached_tokens = n,
            GenerateEvent::PromptLogprobs(entries) => {
                if let Some(lp) = completion_logprobs.as_mut() {
                    for e in entries {
                        lp.push(tokenizer, &mut offset, e.token, Some(e.logprob), Some(&e.top));
                    }
                }
            }
            GenerateEvent::Token { id: token, logprob, top } => {
                completion_tokens += 1;
                recorder.completion_tokens = completion_tokens;
                let text = assembler.push(tokenizer, token);
                if let Some(tools) = tool_stream.as_mut() {
                    for delta in tools.push(&text) {
                        if !send(delta_chunk(crate::tools::delta_json(&delta))).await {
                            return;
                        }
                    }
                    // The token's log-probability, when asked for, in a chunk of its own: the
                    // text it belongs to may be held (a call in the making).
                    if prepared.want_logprobs {
                        let mut chunk = delta_chunk(json!({}));
                        chunk["choices"][0]["logprobs"] = json!({"content": [logprob_entry(tokenizer, token, logprob, &top)]});
                        if !send(chunk).await {
                            return;
                        }
                    }
                    if assembler.stopped() {
                        for delta in tools.finish() {
                            if !send(delta_chunk(crate::tools::delta_json(&delta))).await {
                                return;
                            }
                        }
                        break (if tools.made_calls() { "tool_calls" } else { "stop" }, prepared.prompt.len(), completion_tokens);
                    }
                    continue;
                }
                let logprobs = match completion_logprobs.as_mut() {
                    Some(lp) => {
                        lp.push(tokenizer, &mut offset, token, logprob, Some(&top));
                        Some(lp.take())
                    }
                    None => prepared
                        .want_logprobs
                        .then(|| json!({"content": [logprob_entry(tokenizer, token, logprob, &top)]})),
                };
                if (!text.is_empty() || logprobs.is_some()) && !send(chunk(Some(&text), None, logprobs, false)).await {
                    return; // client gone: dropping `receiver` cancels the generation
                }
                if assembler.stopped() {
                    break ("stop", prepared.prompt.len(), completion_tokens);
                }
            }
            GenerateEvent::Finished { reason, prompt_tokens, completion_tokens } => {
                let text = assembler.finish();
                if let Some(tools) = tool_stream.as_mut() {
                    let mut deltas = tools.push(&text);
                    deltas.extend(tools.finish());
                    for delta in deltas {
                        if !send(delta_chunk(crate::tools::delta_json(&delta))).await {
                            return;
                        }
                    }
                    let finish = if tools.made_calls() && reason == crate::generation::FinishReason::Stop { "tool_calls" } else { finish_reason_str(reason) };
                    break (finish, prompt_tokens, completion_tokens);
                }
                if !text.is_empty() && !send(chunk(Some(&text), None, None, false)).await {
                    return;
                }
                break (finish_reason_str(reason), prompt_tokens, completion_tokens);
            }
            GenerateEvent::Failed(message) => {
                recorder.finish_reason = "error";
                let _ = send(ApiError::internal(message).body()).await;
                let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                return;
            }
            GenerateEvent::Unavailable(message) => {
                recorder.finish_reason = "error";
                let _ = send(ApiError::unavailable(message).body()).await;
                let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                return;
            }
        }
    };
    drop(receiver);
    recorder.finish_reason = finish;
    recorder.completion_tokens = completion_tokens;
    let closing = match endpoint {
        Endpoint::Chat => chunk(None, Some(finish), None, false),
        Endpoint::Completion => chunk(Some(""), Some(finish), None, false),
    };
    if !send(closing).await {
        return;
    }
    if prepared.include_usage {
        let usage = json!({"id": id, "object": if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
                           "created": created, "model": model, "choices": [], "usage": usage_json(prompt_tokens, completion_tokens, cached_tokens)});
        if !send(usage).await {
            return;
        }
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
}
