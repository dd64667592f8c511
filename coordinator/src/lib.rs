//! # potluck-coordinator
//!
//! The coordinator serves the OpenAI-compatible API and drives the model. With no workers it
//! runs every layer itself, so one machine works out of the box.
//!
//! * [`api`] — the HTTP routes and the only code that knows OpenAI JSON.
//! * [`generation`] — the generation thread: admits requests, batches their rows into shared
//!   forward steps, samples, and streams token events back.
//! * [`text`] — detokenization and stop strings for what the client sees.
//! * [`dashboard`] — the page at `/`, its live snapshot (`/events`, `/health`).
//! * [`state`] — [`state::AppState`], what every route shares.
//! * [`snapshot`] — [`snapshot::ClusterSnapshot`], the one picture of the cluster: `/health`,
//!   `/events`, `/metrics` and `coordinator status` all show it.
//! * [`membership`] and [`rollout`] — pure state machines (time passed in, actions out) that
//!   [`cluster`]'s driver runs: who is in the cluster, and how a new plan goes live.
//!
//! **Invariant:** this crate and `worker` are the only ones with sockets; the engine never
//! sees a request, only token ids.

pub mod api;
pub mod cluster;
pub mod dashboard;
pub mod generation;
pub mod membership;
pub mod pipeline;
pub mod rollout;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod text;

use potluck_node::model::{self, ModelSpec, ResolvedModel};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use potluck_engine::chat_template::ChatTemplate;
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_engine::tokenizer::Tokenizer;

/// Default context per sequence when `--ctx-size` is not given: enough for chat, and small
/// enough that 16 concurrent sequences' KV caches stay modest on a laptop.
pub const CONTEXT_LENGTH_DEFAULT: usize = 4096;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The GGUF to serve; `None` fetches the default model.
    pub model: Option<PathBuf>,
    pub threads: usize,
    pub api_key: Option<String>,
    pub context_length: usize,
}

/// Everything loaded and ready to answer: the API state.
pub fn load(config: &ServeConfig) -> Result<Arc<state::AppState>> {
    let ResolvedModel { path, id: model_id } = model::resolve(&ModelSpec::from_arg(config.model.as_deref()))?;
    let started = std::time::Instant::now();
    let (profile, content) = ModelProfile::from_path(&path).with_context(|| format!("cannot load the model {}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(&content).context("cannot build the tokenizer from the GGUF")?;
    let template = ChatTemplate::from_gguf(&content, &tokenizer).context("cannot load the chat template from the GGUF")?;
    let model = ModelSlice::load(&path, 0..profile.n_layers, Backend::cpu(config.threads)).with_context(|| format!("cannot load the model {}", path.display()))?;
    tracing::info!(
        model = %path.display(),
        layers = profile.n_layers,
        weights_mib = model.size_in_bytes() as f64 / (1 << 20) as f64,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded; running every layer on this machine (no workers)"
    );
    let context_length = config.context_length.min(profile.context_length);
    let runner = potluck_node::stage::StageRunner::new(
        model,
        context_length,
        generation::ACTIVE_SEQUENCES_MAX,
        potluck_protocol::Dtype::F32,
    );
    let service = generation::GenerationService::start(
        Box::new(pipeline::LocalPipeline::new(runner)),
        context_length,
        tokenizer.stop_ids().to_vec(),
    );
    Ok(Arc::new(state::AppState {
        cluster: cluster::ClusterStatus::local(profile.n_layers),
        model_path: path.clone(),
        profile: profile.clone(),
        service,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        model_id,
        api_key: config.api_key.clone(),
        started_unix: state::unix_now(),
        dashboard: Default::default(),
        events_closing: tokio::sync::watch::Sender::new(false),
    }))
}

/// Serves the API on an already bound listener until `shutdown` resolves (tests bind
/// `127.0.0.1:0` and pass the listener in).
pub async fn serve(
    state: Arc<state::AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let closing = state.events_closing.clone();
    let shutdown = async move {
        shutdown.await;
        // Open dashboards end their event streams, or the graceful shutdown would wait on them.
        closing.send_replace(true);
    };
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")
}
