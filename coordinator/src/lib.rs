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
pub mod http;
pub mod membership;
pub mod pipeline;
pub mod rollout;
pub mod snapshot;
pub mod state;
pub mod speculative;
pub mod status;
pub mod structured;
pub mod tools;
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
use potluck_shard_planner::format_bytes;

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
    /// Whether this machine runs the layers itself until workers take them.
    pub local: LocalLayers,
    /// Speculative decoding with prompt-lookup drafts (`--no-speculative` turns it off).
    pub speculative: bool,
    /// A small model of the same vocabulary whose greedy guesses are the drafts (`--draft`;
    /// a path or a name `--model` takes), run on this machine.
    pub draft: Option<PathBuf>,
}

/// Whether `load` puts every layer on this machine. The plan comes before the loading: a
/// model that does not fit is never loaded here (a 42 GB model on a 16 GB coordinator would
/// be killed before any worker could join); the API and the dashboard serve at once, and
/// `/v1/*` answers 503 `model_unavailable`, saying what is missing, until workers join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalLayers {
    /// Every layer here when the weights and the KV cache (context × sequences) fit this
    /// machine's memory budget; otherwise none until workers join.
    IfFits { memory_budget_bytes: u64 },
    /// Never (`--no-local-layers`): the model serves once workers hold it.
    Never,
}

/// Bytes the whole model needs on one machine: every layer's weights, the embedding and the
/// head, and the KV cache of [`generation::ACTIVE_SEQUENCES_MAX`] sequences of
/// `context_length` positions. The planner's own formula (`stage_memory_bytes`),
/// so this check and the plan never disagree.
pub fn whole_model_bytes(profile: &ModelProfile, context_length: usize) -> u64 {
    let model = potluck_node::planner_model(profile, "model");
    let workload = potluck_shard_planner::Workload {
        context_tokens: context_length as u32,
        sequences: generation::ACTIVE_SEQUENCES_MAX as u32,
    };
    potluck_shard_planner::stage_memory_bytes(&model, 0..profile.n_layers, workload)
}

/// Everything loaded and ready to answer: the API state.
pub fn load(config: &ServeConfig) -> Result<Arc<state::AppState>> {
    let ResolvedModel { path, id: model_id } = model::resolve(&ModelSpec::from_arg(config.model.as_deref()))?;
    let started = std::time::Instant::now();
    let (profile, content) = ModelProfile::from_path(&path).with_context(|| format!("cannot load the model {}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(&content).context("cannot build the tokenizer from the GGUF")?;
    let template = ChatTemplate::from_gguf(&content, &tokenizer).context("cannot load the chat template from the GGUF")?;
    let context_length = config.context_length.min(profile.context_length);
    let needed = whole_model_bytes(&profile, context_length);
    let unavailable = match config.local {
        LocalLayers::IfFits { memory_budget_bytes } if needed > memory_budget_bytes => Some(format!(
            "the model needs {} (weights and the KV cache of {} sequences × {context_length} positions) and this machine lends {}: \
             {} missing. Add a machine: run `worker join` with the join line `coordinator serve` printed",
            format_bytes(needed),
            generation::ACTIVE_SEQUENCES_MAX,
            format_bytes(memory_budget_bytes),
            format_bytes(needed - memory_budget_bytes),
        )),
        LocalLayers::IfFits { .. } => None,
        LocalLayers::Never => Some(
            "this coordinator keeps no layers (--no-local-layers) and no worker holds the model yet: \
             run `worker join` with the join line `coordinator serve` printed"
                .to_string(),
        ),
    };
    let pipeline: Box<dyn pipeline::Pipeline> = match &unavailable {
        Some(message) => {
            tracing::warn!(needed_mib = needed >> 20, "{message}");
            Box::new(pipeline::UnavailablePipeline::new(message.clone()))
        }
        None => {
            let model = ModelSlice::load(&path, 0..profile.n_layers, Backend::cpu(config.threads))
                .with_context(|| format!("cannot load the model {}", path.display()))?;
            tracing::info!(
                model = %path.display(),
                layers = profile.n_layers,
                weights_mib = model.size_in_bytes() as f64 / (1 << 20) as f64,
                load_ms = started.elapsed().as_millis() as u64,
                "model loaded; running every layer on this machine (no workers)"
            );
            let runner = potluck_node::stage::StageRunner::new(
                model,
                context_length,
                generation::ACTIVE_SEQUENCES_MAX,
                potluck_protocol::Dtype::F32,
            );
            Box::new(pipeline::LocalPipeline::new(runner))
        }
    };
    // Sliding-window layers drop old positions, so a kept cache may lack what a copy needs
    // and a cache may not roll back over a draft.
    let sliding = profile.sliding_layers.iter().any(|&sliding| sliding);
    let draft = match &config.draft {
        Some(spec) if config.speculative && !sliding => Some(load_draft(spec, &tokenizer, context_length, config.threads)?),
        Some(_) => {
            tracing::warn!("--draft is ignored: speculative decoding is off (--no-speculative, or a sliding-window model)");
            None
        }
        None => None,
    };
    let options = generation::GenerationOptions { prefix_caching: !sliding, speculative: config.speculative && !sliding, draft };
    let service = generation::GenerationService::start(pipeline, context_length, tokenizer.stop_ids().to_vec(), options);
    let tokenizer = Arc::new(tokenizer);
    let grammars = structured::LazyGrammars::new(tokenizer.clone(), profile.vocab_size, tokenizer.stop_ids().to_vec());
    let tool_format = template.as_ref().map(tools::ToolFormat::detect);
    Ok(Arc::new(state::AppState {
        grammars,
        tool_format,
        whole_model_local: unavailable.is_none(),
        cluster: cluster::ClusterStatus::local(profile.n_layers),
        model_path: path.clone(),
        profile: profile.clone(),
        service,
        tokenizer,
        template: template.map(Arc::new),
        model_id,
        api_key: config.api_key.clone(),
        started_unix: state::unix_now(),
        dashboard: Default::default(),
        events_closing: tokio::sync::watch::Sender::new(false),
    }))
}

/// The draft model `spec` (a path or a model name), checked to share the served model's
/// vocabulary token for token (a draft's ids must mean the same tokens), loaded whole onto
/// this machine.
fn load_draft(spec: &std::path::Path, tokenizer: &Tokenizer, context_length: usize, threads: usize) -> Result<speculative::DraftModel> {
    let ResolvedModel { path, .. } = model::resolve(&ModelSpec::from_arg(Some(spec)))?;
    let (profile, content) =
        ModelProfile::from_path(&path).with_context(|| format!("cannot load the draft model {}", path.display()))?;
    let theirs = Tokenizer::from_gguf(&content).with_context(|| format!("cannot read the draft model's tokenizer ({})", path.display()))?;
    let differs = if theirs.vocab_size() != tokenizer.vocab_size() {
        Some(format!("{} tokens against the served model's {}", theirs.vocab_size(), tokenizer.vocab_size()))
    } else {
        (0..tokenizer.vocab_size() as u32)
            .find(|&id| theirs.token_text(id) != tokenizer.token_text(id))
            .map(|id| format!("token {id} is {:?} there, {:?} here", theirs.token_text(id), tokenizer.token_text(id)))
    };
    if let Some(difference) = differs {
        anyhow::bail!(
            "the draft model {} does not share the served model's vocabulary ({difference}): a draft's token ids \
             must mean the same tokens (use a smaller model of the same family)",
            path.display()
        );
    }
    let slice = ModelSlice::load(&path, 0..profile.n_layers, Backend::cpu(threads))
        .with_context(|| format!("cannot load the draft model {}", path.display()))?;
    tracing::info!(draft = %path.display(), layers = profile.n_layers, weights_mib = slice.size_in_bytes() >> 20, "draft model loaded");
    Ok(speculative::DraftModel::new(slice, context_length))
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
    http::serve(listener, api::router(state), shutdown).await;
    Ok(())
}
