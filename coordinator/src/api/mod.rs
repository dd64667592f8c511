//! The OpenAI-compatible HTTP API. This module is the only place that knows OpenAI JSON.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streaming SSE and not),
//! `GET /v1/models`, `GET /health`, `GET /metrics`, `GET /openapi.json`, and the dashboard's
//! `/` and `/events`. Every error is OpenAI-shaped JSON
//! (`{"error": {"message", "type", "param", "code"}}`) built in one place, [`ApiError`].
//! Unknown fields are ignored as OpenAI does; known fields of the wrong type are a 400.
//!
//! * this file — the router, the API key check, [`ApiError`], and the thin route handlers;
//! * [`validation`] — request bodies, their checks and the request limits;
//! * [`responses`] — running a generation and the OpenAI response bodies (logprobs too);
//! * [`streaming`] — the same answers as server-sent event chunks;
//! * [`metrics`] — `/metrics` in Prometheus' text format.

mod metrics;
mod responses;
mod streaming;
mod validation;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::generation::SubmitError;
use crate::snapshot::ClusterSnapshot;
use crate::state::AppState;
use crate::tools::{ToolFormat, ToolRequest};
use responses::{run_generation, Endpoint};
use validation::{ChatRequest, CompletionRequest, PromptInput};

pub use validation::{CHAT_MESSAGES_MAX, REQUEST_BODY_BYTES_MAX};

/// Seconds a client is told to wait when the queue is full.
const RETRY_AFTER_SECONDS: u32 = 2;

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/admin/workers/{node_id}/drain", post(drain_worker))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/", get(crate::dashboard::page))
        .route("/events", get(crate::dashboard::events))
        .route("/health", get(health))
        .route("/metrics", get(metrics::metrics))
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
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: None, code: None }
    }
    pub(crate) fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub(crate) fn status(mut self, status: StatusCode, kind: &'static str) -> Self {
        self.status = status;
        self.kind = kind;
        self
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::bad_request(message).status(StatusCode::INTERNAL_SERVER_ERROR, "server_error")
    }
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::bad_request(message).status(StatusCode::SERVICE_UNAVAILABLE, "server_error").code("model_unavailable")
    }
    pub(crate) fn body(&self) -> Value {
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

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
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
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../openapi.json")).into_response()
}
async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": state.started_unix, "owned_by": "potluck"}]
    }))
}

/// Most tokens `/detokenize` takes, and `/tokenize` returns: a context's worth is far below.
pub const TOKENIZE_TOKENS_MAX: usize = 1 << 20;

/// llama-server's `/tokenize`: `{"content", "add_special"}` → `{"tokens"}`. Control tokens
/// written in the text become their ids, as llama-server parses them; `add_special` adds
/// the BOS token where the model adds one.
async fn tokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    struct TokenizeRequest {
        content: String,
        #[serde(default)]
        add_special: bool,
    }
    let request: TokenizeRequest = parse_json(&body?)?;
    let tokenizer = state.tokenizer.clone();
    let tokens = tokio::task::spawn_blocking(move || {
        let mut ids = Vec::new();
        if request.add_special && tokenizer.add_bos() {
            ids.extend(tokenizer.bos_id());
        }
        ids.extend(tokenizer.encode(&request.content, true));
        ids
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?;
    Ok(Json(json!({ "tokens": tokens })))
}

/// llama-server's `/detokenize`: `{"tokens"}` → `{"content"}`; an id outside the vocabulary
/// is a 400 naming it.
async fn detokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    struct DetokenizeRequest {
        tokens: Vec<u32>,
    }
    let request: DetokenizeRequest = parse_json(&body?)?;
    if request.tokens.len() > TOKENIZE_TOKENS_MAX {
        return Err(ApiError::bad_request(format!("at most {TOKENIZE_TOKENS_MAX} tokens")).param("tokens"));
    }
    let vocab = state.tokenizer.vocab_size();
    if let Some(bad) = request.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {vocab} tokens")).param("tokens"));
    }
    let tokenizer = state.tokenizer.clone();
    let content = tokio::task::spawn_blocking(move || tokenizer.decode(&request.tokens, true))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?;
    Ok(Json(json!({ "content": content })))
}

/// The dashboard's drain control: the worker shuts down and the cluster re-plans without it.
async fn drain_worker(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(node_id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.cluster.drain(&node_id).await {
        Ok(name) => Ok(Json(json!({"drained": node_id, "name": name}))),
        Err(e @ crate::cluster::DrainError::UnknownWorker(_)) => {
            Err(ApiError::bad_request(e.to_string()).status(StatusCode::NOT_FOUND, "not_found_error"))
        }
        Err(e) => Err(ApiError::bad_request(e.to_string()).status(StatusCode::CONFLICT, "invalid_request_error")),
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let request: ChatRequest = parse_json(&body)?;
    let messages = request.messages()?;
    let top_logprobs = request.top_logprobs()?;
    let tool_request = request.tool_request()?;
    let tokenizer = state.tokenizer.clone();
    let Some(template) = state.template.clone() else {
        return Err(ApiError::bad_request(format!(
            "the model {} has no chat template (its GGUF carries none: a base model, not tuned for chat); \
             send the text as a prompt to /v1/completions instead",
            state.model_id
        ))
        .code("no_chat_template"));
    };
    let format = state.tool_format.unwrap_or(ToolFormat::Generic);
    let shown = tool_request.clone();
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ApiError> {
        let mut text = match &shown {
            None => template.render(&messages, true),
            Some(tools) => {
                let messages = crate::tools::messages_for_template(messages, tools, format);
                let given = (format != ToolFormat::Generic).then_some(tools.tools.as_slice());
                template.render_with_tools(&messages, given, true)
            }
        }
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
        if shown.as_ref().is_some_and(ToolRequest::forced) {
            // The call's opening is the prompt's: the model writes the call itself.
            text.push_str(format.forced_opening());
        }
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
    let mut prepared = request.common.prepare(prompt, max_tokens, None, (want_logprobs, top_logprobs), &state)?;
    if let Some(tools) = &tool_request {
        if let Some(schema) = tools.grammar_schema(format) {
            let factory = state.grammars.get().map_err(|e| ApiError::bad_request(e).param("tools"))?;
            let grammar = factory
                .json_schema(schema)
                .map_err(|e| ApiError::bad_request(format!("a tool's parameters cannot be enforced: {e}")).param("tools"))?;
            prepared.generate.grammar = Some(grammar);
        }
        prepared.tools = Some((format, tools.forced()));
    }
    run_generation(state, prepared, Endpoint::Chat).await
}

async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let request: CompletionRequest = parse_json(&body)?;
    request.refuse_tools()?;
    let fim = request.fill_in_the_middle(&state.tokenizer)?;
    let prompt = match fim.map_or_else(|| request.prompt_input(), |ids| Ok(PromptInput::Ids(ids)))? {
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
    let top_logprobs = request.top_logprobs()?;
    let echo = request.echo.unwrap_or(false);
    if echo && top_logprobs.is_some() {
        validation::check_prompt_logprobs_length(prompt.len())?;
    }
    let mut prepared = request.common.prepare(
        prompt,
        request.common.max_tokens,
        Some(validation::COMPLETION_MAX_TOKENS_DEFAULT),
        (top_logprobs.is_some(), top_logprobs.unwrap_or(0)),
        &state,
    )?;
    prepared.echo = echo;
    prepared.generate.prompt_logprobs = echo && top_logprobs.is_some();
    run_generation(state, prepared, Endpoint::Completion).await
}
