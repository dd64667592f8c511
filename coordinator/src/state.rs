//! [`AppState`]: everything the HTTP handlers share — the generation service, the model's
//! tokenizer and template, the cluster's shared view and the dashboard's memory.
//!
//! One value, built once by [`crate::load`] and handed to [`crate::serve`]; the routes
//! ([`crate::api`]) and the dashboard ([`crate::dashboard`]) read it, neither owns it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use potluck_engine::chat_template::ChatTemplate;
use potluck_engine::profile::ModelProfile;
use potluck_engine::tokenizer::Tokenizer;

use crate::cluster::ClusterStatus;
use crate::dashboard::Dashboard;
use crate::generation::GenerationService;

pub struct AppState {
    pub service: GenerationService,
    /// Every layer was loaded on this machine at start (the model fit its budget); false
    /// when the model waits for workers (`lib::LocalLayers`).
    pub whole_model_local: bool,
    /// What `/health` (and the dashboard) show of the cluster: nodes, stages, the plan.
    pub cluster: ClusterStatus,
    /// The model file and its header (the cluster serves weights from it).
    pub model_path: std::path::PathBuf,
    pub profile: ModelProfile,
    pub tokenizer: Arc<Tokenizer>,
    /// Compiles `response_format` schemas and tool-call grammars over the model's
    /// vocabulary (built on first use; a vocabulary that cannot be indexed gets such
    /// requests a 400 saying so).
    pub grammars: crate::structured::LazyGrammars,
    /// How the chat template's model family writes tool calls (None without a template).
    pub tool_format: Option<crate::tools::ToolFormat>,
    /// The GGUF's chat template; None for a base model (the chat endpoint then refuses).
    pub template: Option<Arc<ChatTemplate>>,
    /// The name `/v1/models` reports; requests may name any model and get this one.
    pub model_id: String,
    pub api_key: Option<String>,
    pub started_unix: u64,
    /// Recent requests and the samples behind the dashboard's live rates.
    pub dashboard: Dashboard,
    /// Set when the server shuts down, so open `/events` streams end.
    pub events_closing: tokio::sync::watch::Sender<bool>,
}

/// Seconds since the Unix epoch (0 on a clock set before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
