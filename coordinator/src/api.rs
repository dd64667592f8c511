//! The OpenAI-compatible HTTP API. This module is the only place that knows OpenAI JSON.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streaming SSE and not),
//! `GET /v1/models`, `GET /health`. Every error is OpenAI-shaped JSON
//! (`{"error": {"message", "type", "param", "code"}}`) built in one place, [`ApiError`].
//! Unknown fields are ignored as OpenAI does; known fields of the wrong type are a 400.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use potluck_engine::chat_template::ChatMessage;
use potluck_engine::sampler::SamplingParams;
use potluck_engine::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::generation::{FinishReason, GenerateEvent, GenerateRequest, SubmitError, TOP_LOGPROBS_MAX};
use potluck_protocol::limits::PROMPT_LOGPROBS_TOKENS_MAX;

use crate::snapshot::ClusterSnapshot;
use crate::state::{unix_now, AppState};
use crate::text::{TextAssembler, STOP_STRINGS_MAX, STOP_STRING_BYTES_MAX};

/// Largest request body accepted; bigger ones get a 413. A prompt longer than the context is
/// refused after tokenizing anyway; this bounds the work before that.
pub const REQUEST_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Messages per chat request at most.
pub const CHAT_MESSAGES_MAX: usize = 1024;
/// SSE events buffered towards one client.
const SSE_EVENTS_BUFFERED: usize = 64;
/// Seconds a client is told to wait when the queue is full.
const RETRY_AFTER_SECONDS: u32 = 2;

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/", get(crate::dashboard::page))
        .route("/events", get(crate::dashboard::events))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------
// Errors

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: None, code: None }
    }
    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn status(mut self, status: StatusCode, kind: &'static str) -> Self {
        self.status = status;
        self.kind = kind;
        self
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::bad_request(message).status(StatusCode::INTERNAL_SERVER_ERROR, "server_error")
    }
    fn unavailable(message: impl Into<String>) -> Self {
        Self::bad_request(message).status(StatusCode::SERVICE_UNAVAILABLE, "server_error").code("model_unavailable")
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE || self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::bad_request(format!("request body is larger than {REQUEST_BODY_BYTES_MAX} bytes"))
                .status(status, "invalid_request_error")
                .code("request_too_large")
        } else {
            ApiError::bad_request(format!("could not read the request body: {rejection}"))
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError::bad_request(e.to_string()).status(StatusCode::SERVICE_UNAVAILABLE, "server_error").code("overloaded")
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::bad_request(format!("no route for {} {}", request.method(), request.uri().path()))
        .status(StatusCode::NOT_FOUND, "invalid_request_error")
        .code("not_found")
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::bad_request(format!("method {} is not allowed on {}", request.method(), request.uri().path()))
        .status(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error")
        .code("method_not_allowed")
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare in constant time so the key cannot be guessed byte by byte from timings.
        let ok = presented.is_some_and(|p| constant_time_eq(p.as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError::bad_request("invalid or missing API key: send `Authorization: Bearer <key>`")
                .status(StatusCode::UNAUTHORIZED, "invalid_request_error")
                .code("invalid_api_key")
                .into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

// ---------------------------------------------------------------------------------------
// Requests

/// Sampling and length fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
struct CommonParams {
    /// Accepted and ignored: any model name serves the loaded model.
    #[allow(dead_code)]
    model: Option<String>,
    max_tokens: Option<u64>,
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
    n: Option<u64>,
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
struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    max_completion_tokens: Option<u64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    #[serde(flatten)]
    common: CommonParams,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
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
struct CompletionRequest {
    prompt: Value,
    /// Put the prompt before the completion in `text` (and, with `logprobs`, its tokens'
    /// log-probabilities before the completion's: the first token has none).
    echo: Option<bool>,
    /// Log-probabilities of each token and of this many alternatives (0..=20).
    logprobs: Option<u64>,
    #[serde(flatten)]
    common: CommonParams,
}

/// What both endpoints hand to [`run_generation`] once the request is understood.
struct Prepared {
    prompt: Vec<u32>,
    generate: GenerateRequest,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    want_logprobs: bool,
    /// Completions' `echo`: the prompt comes first in the text.
    echo: bool,
}

impl CommonParams {
    fn prepare(
        &self,
        prompt: Vec<u32>,
        max_tokens: Option<u64>,
        default_max_tokens: Option<usize>,
        (want_logprobs, top_logprobs): (bool, usize),
        state: &AppState,
    ) -> Result<Prepared, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad_request("only n = 1 is supported").param("n"));
            }
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
        let temperature = self.temperature.unwrap_or(0.8);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ApiError::bad_request("temperature must be a number ≥ 0").param("temperature"));
        }
        let top_p = self.top_p.unwrap_or(0.95);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request("top_p must be in (0, 1]").param("top_p"));
        }
        let min_p = self.min_p.unwrap_or(0.05);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad_request("min_p must be in [0, 1]").param("min_p"));
        }
        for (value, name) in [(self.presence_penalty, "presence_penalty"), (self.frequency_penalty, "frequency_penalty")] {
            if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(ApiError::bad_request(format!("{name} must be in [-2, 2]")).param(name));
            }
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
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
            top_k: self.top_k.map_or(40, |k| k.clamp(0, u32::MAX as i64) as u32),
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64),
            ..SamplingParams::default()
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
            },
            prompt,
            stops,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            want_logprobs,
            echo: false,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Handlers

/// The cluster's picture, as the dashboard draws it.
async fn health(State(state): State<Arc<AppState>>) -> Json<ClusterSnapshot> {
    Json(ClusterSnapshot::capture(&state))
}

/// The OpenAPI 3 description of this API (kept beside this file; tests check the server
/// against it).
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}

/// Prometheus text format (version 0.0.4).
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let s = state.service.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric("potluck_requests_queued", "gauge", "Requests waiting to be admitted.", s.queued.load(Relaxed));
    metric("potluck_sequences_active", "gauge", "Sequences being generated.", s.active.load(Relaxed));
    metric("potluck_requests_finished_total", "counter", "Generations that ended normally.", s.requests_finished.load(Relaxed));
    metric("potluck_requests_failed_total", "counter", "Generations that ended in an error.", s.requests_failed.load(Relaxed));
    metric("potluck_prompt_tokens_total", "counter", "Prompt tokens of finished generations.", s.prompt_tokens.load(Relaxed));
    metric("potluck_generated_tokens_total", "counter", "Tokens generated by finished generations.", s.completion_tokens.load(Relaxed));
    metric("potluck_tokens_sampled_total", "counter", "Tokens handed to requests, counted as they are generated.", s.tokens_generated.load(Relaxed));
    metric("potluck_steps_total", "counter", "Forward steps run.", s.steps.load(Relaxed));
    metric("potluck_step_rows_total", "counter", "Token rows computed in forward steps.", s.step_rows.load(Relaxed));
    metric("potluck_step_busy_microseconds_total", "counter", "Time spent computing steps.", s.step_busy_us.load(Relaxed));
    let snapshot = ClusterSnapshot::capture(&state);
    metric("potluck_nodes", "gauge", "Nodes holding layers of the pipeline in force (1: this machine alone).", snapshot.stages.len() as u64);
    // Per worker and per stage, labelled. Label values are escaped as the text format asks.
    let label = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP potluck_workers Workers known to the coordinator, by state.\n# TYPE potluck_workers gauge");
    for state_name in ["joining", "loading", "ready", "gone"] {
        let n = snapshot.nodes.iter().filter(|n| n.state.starts_with(state_name)).count();
        let _ = writeln!(out, "potluck_workers{{state=\"{state_name}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP potluck_worker_steps_total Steps a worker's stage has run (its last heartbeat).\n# TYPE potluck_worker_steps_total counter");
    for n in &snapshot.nodes {
        let _ = writeln!(out, "potluck_worker_steps_total{{node=\"{}\"}} {}", label(&n.name), n.steps);
    }
    let _ = writeln!(out, "# HELP potluck_worker_busy_microseconds_total Time a worker's stage has spent computing.\n# TYPE potluck_worker_busy_microseconds_total counter");
    for n in &snapshot.nodes {
        let _ = writeln!(out, "potluck_worker_busy_microseconds_total{{node=\"{}\"}} {}", label(&n.name), n.busy_us);
    }
    let _ = writeln!(out, "# HELP potluck_stage_predicted_milliseconds The plan's predicted time per token of each stage.\n# TYPE potluck_stage_predicted_milliseconds gauge");
    for s in &snapshot.stages {
        if let Some(ms) = s.predicted_ms {
            let _ = writeln!(out, "potluck_stage_predicted_milliseconds{{node=\"{}\",layers=\"{}..{}\"}} {ms}", label(&s.name), s.layers[0], s.layers[1]);
        }
    }
    // Measured, per stage: time per step and the round trip of the hop out of it.
    let stages = &snapshot.stages;
    let _ = writeln!(out, "# HELP potluck_stage_measured_milliseconds Measured time per step of each stage (latest heartbeat interval that ran steps).\n# TYPE potluck_stage_measured_milliseconds gauge");
    for stage in stages {
        if let Some(ms) = stage.measured_ms {
            let _ = writeln!(out, "potluck_stage_measured_milliseconds{{node=\"{}\"}} {ms}", label(&stage.name));
        }
    }
    let _ = writeln!(out, "# HELP potluck_hop_rtt_milliseconds QUIC's smoothed round-trip time of each hop (stage to the next stage; the last stage to the coordinator).\n# TYPE potluck_hop_rtt_milliseconds gauge");
    for (i, stage) in stages.iter().enumerate() {
        if let Some(ms) = stage.hop_rtt_ms {
            let to = stages.get(i + 1).map_or(crate::cluster::COORDINATOR_NODE, |next| next.name.as_str());
            let _ = writeln!(out, "potluck_hop_rtt_milliseconds{{from=\"{}\",to=\"{}\"}} {ms}", label(&stage.name), label(to));
        }
    }
    let _ = writeln!(
        out,
        "# HELP potluck_tokens_per_second Generated tokens per second over the last few seconds.\n# TYPE potluck_tokens_per_second gauge\npotluck_tokens_per_second {}",
        snapshot.live.tokens_per_s
    );
    if let Some(tps) = snapshot.cluster.predicted_tokens_per_s {
        let _ = writeln!(out, "# HELP potluck_plan_predicted_tokens_per_second The plan's predicted decode speed.\n# TYPE potluck_plan_predicted_tokens_per_second gauge\npotluck_plan_predicted_tokens_per_second {tps}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": state.started_unix, "owned_by": "potluck"}]
    }))
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let request: ChatRequest = parse_json(&body)?;
    if request.messages.is_empty() || request.messages.len() > CHAT_MESSAGES_MAX {
        return Err(ApiError::bad_request(format!("messages must hold 1 to {CHAT_MESSAGES_MAX} messages")).param("messages"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for m in &request.messages {
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
        messages.push(ChatMessage { role: m.role.clone(), content });
    }
    let top_logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (_, Some(n)) if n as usize > TOP_LOGPROBS_MAX => {
            return Err(ApiError::bad_request(format!("top_logprobs must be at most {TOP_LOGPROBS_MAX}")).param("top_logprobs"))
        }
        (true, n) => n.unwrap_or(0) as usize,
        (false, _) => 0,
    };
    let tokenizer = state.tokenizer.clone();
    let template = state.template.clone();
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ApiError> {
        let text = template.render(&messages, true).map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
        let mut ids = Vec::new();
        if tokenizer.add_bos() {
            ids.extend(tokenizer.bos_id());
        }
        ids.extend(tokenizer.encode(&text, true));
        Ok(ids)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))??;
    let max_tokens = request.max_completion_tokens.or(request.common.max_tokens);
    let want_logprobs = request.logprobs.unwrap_or(false);
    let prepared = request.common.prepare(prompt, max_tokens, None, (want_logprobs, top_logprobs), &state)?;
    run_generation(state, prepared, Endpoint::Chat).await
}

async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let request: CompletionRequest = parse_json(&body)?;
    let prompt_input = match &request.prompt {
        Value::String(s) => PromptInput::Text(s.clone()),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => PromptInput::Text(items[0].as_str().unwrap_or_default().to_owned()),
        Value::Array(items) if items.len() == 1 && items[0].is_array() => PromptInput::Ids(token_ids(&items[0])?),
        Value::Array(items) if items.iter().all(Value::is_number) => PromptInput::Ids(token_ids(&request.prompt)?),
        Value::Array(_) => return Err(ApiError::bad_request("batched prompts are not supported: send one prompt per request").param("prompt")),
        _ => return Err(ApiError::bad_request("prompt must be a string or an array of token ids").param("prompt")),
    };
    let prompt = match prompt_input {
        PromptInput::Ids(ids) => ids,
        PromptInput::Text(text) => {
            let tokenizer = state.tokenizer.clone();
            tokio::task::spawn_blocking(move || {
                let mut ids = Vec::new();
                if tokenizer.add_bos() {
                    ids.extend(tokenizer.bos_id());
                }
                ids.extend(tokenizer.encode(&text, true));
                ids
            })
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
        }
    };
    let top_logprobs = match request.logprobs {
        Some(n) if n as usize > TOP_LOGPROBS_MAX => {
            return Err(ApiError::bad_request(format!("logprobs must be at most {TOP_LOGPROBS_MAX}")).param("logprobs"))
        }
        n => n.map(|n| n as usize),
    };
    let echo = request.echo.unwrap_or(false);
    if echo && top_logprobs.is_some() && prompt.len() > PROMPT_LOGPROBS_TOKENS_MAX as usize {
        return Err(ApiError::bad_request(format!(
            "log-probabilities of a prompt are computed for at most {PROMPT_LOGPROBS_TOKENS_MAX} tokens"
        ))
        .param("prompt"));
    }
    // OpenAI's completions default is 16 tokens.
    let mut prepared = request.common.prepare(
        prompt,
        request.common.max_tokens,
        Some(16),
        (top_logprobs.is_some(), top_logprobs.unwrap_or(0)),
        &state,
    )?;
    prepared.echo = echo;
    prepared.generate.prompt_logprobs = echo && top_logprobs.is_some();
    run_generation(state, prepared, Endpoint::Completion).await
}

enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

fn token_ids(value: &Value) -> Result<Vec<u32>, ApiError> {
    let items = value.as_array().ok_or_else(|| ApiError::bad_request("prompt must be an array of token ids").param("prompt"))?;
    items
        .iter()
        .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| ApiError::bad_request("token ids must be non-negative integers").param("prompt"))
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{nanos:x}{:04x}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// One OpenAI `logprobs.content` entry.
fn logprob_entry(tokenizer: &Tokenizer, id: u32, logprob: Option<f32>, top: &[(u32, f32)]) -> Value {
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
struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends `id`, whose text starts at character `*offset` (advanced past it). `logprob`
    /// and `top` are `None` for a token without context (the prompt's first).
    fn push(&mut self, tokenizer: &Tokenizer, offset: &mut usize, id: u32, logprob: Option<f32>, top: Option<&[(u32, f32)]>) {
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

    fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The object so far, leaving `self` empty (a streamed chunk carries its own tokens).
    fn take(&mut self) -> Value {
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
fn completion_preamble(tokenizer: &Tokenizer, prepared: &Prepared) -> (String, Option<CompletionLogprobs>, usize) {
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
    /// Chat's `logprobs.content` entries.
    logprobs: Vec<Value>,
    /// Completions' `logprobs` object, when asked for.
    completion_logprobs: Option<CompletionLogprobs>,
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// Puts a request on the dashboard's list when it ends, however it ends (a client that
/// goes away mid-stream leaves it `cancelled`).
struct Recorder {
    state: Arc<AppState>,
    id: String,
    endpoint: Endpoint,
    started: std::time::Instant,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish_reason: &'static str,
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

async fn run_generation(state: Arc<AppState>, prepared: Prepared, endpoint: Endpoint) -> Result<Response, ApiError> {
    let receiver = state.service.submit(prepared.generate.clone())?;
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
        let (tx, rx) = mpsc::channel::<Result<Event, std::convert::Infallible>>(SSE_EVENTS_BUFFERED);
        tokio::spawn(stream_events(prepared, receiver, tx, created, recorder));
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        return Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response());
    }
    let outcome = collect(&state, &prepared, endpoint, receiver).await;
    recorder.finish_reason = "error";
    let mut outcome = outcome?;
    recorder.finish_reason = outcome.finish_reason;
    recorder.completion_tokens = outcome.completion_tokens;
    let model = &state.model_id;
    let usage = usage_json(outcome.prompt_tokens, outcome.completion_tokens);
    let body = match endpoint {
        Endpoint::Chat => {
            let logprobs = if prepared.want_logprobs { json!({"content": outcome.logprobs}) } else { Value::Null };
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": logprobs, "finish_reason": outcome.finish_reason}],
                "usage": usage,
            })
        }
        Endpoint::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": outcome.text,
                         "logprobs": outcome.completion_logprobs.as_mut().map_or(Value::Null, CompletionLogprobs::take),
                         "finish_reason": outcome.finish_reason}],
            "usage": usage,
        }),
    };
    Ok(Json(body).into_response())
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
    while let Some(event) = receiver.recv().await {
        match event {
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
                    return Ok(Outcome { text, finish_reason, prompt_tokens, completion_tokens, logprobs, completion_logprobs });
                }
            }
            GenerateEvent::Finished { reason, prompt_tokens, completion_tokens } => {
                text.push_str(&assembler.finish());
                let finish_reason = if assembler.stopped() { "stop" } else { finish_reason_str(reason) };
                return Ok(Outcome { text, finish_reason, prompt_tokens, completion_tokens, logprobs, completion_logprobs });
            }
            GenerateEvent::Failed(message) => return Err(ApiError::internal(message)),
            GenerateEvent::Unavailable(message) => return Err(ApiError::unavailable(message)),
        }
    }
    Err(ApiError::internal("the generation service stopped"))
}

/// Streams one request's events as SSE chunks; `recorder` (which knows the request's id and
/// endpoint) lists it on the dashboard when it ends.
async fn stream_events(
    prepared: Prepared,
    mut receiver: mpsc::UnboundedReceiver<GenerateEvent>,
    tx: mpsc::Sender<Result<Event, std::convert::Infallible>>,
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
    let (finish, prompt_tokens, completion_tokens) = loop {
        let Some(event) = receiver.recv().await else {
            let error = ApiError::internal("the generation service stopped");
            let _ = send(error.body()).await;
            return;
        };
        if preamble_pending && !matches!(event, GenerateEvent::PromptLogprobs(_)) {
            preamble_pending = false;
            let logprobs = completion_logprobs.as_mut().filter(|lp| !lp.is_empty()).map(CompletionLogprobs::take);
            let prompt = std::mem::take(&mut echo);
            if (!prompt.is_empty() || logprobs.is_some()) && !send(chunk(Some(&prompt), None, logprobs, false)).await {
                return;
            }
        }
        match event {
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
                           "created": created, "model": model, "choices": [], "usage": usage_json(prompt_tokens, completion_tokens)});
        if !send(usage).await {
            return;
        }
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
}
