//! `shard-planner`: plan a cluster, or compare our plan with the memory-proportional split.
//!
//! ```text
//! shard-planner plan     --cluster examples/clusters/home-ethernet.toml --model llama-3.1-70b-q4_k_m
//! shard-planner simulate --cluster examples/clusters/home-wifi.toml --gguf model.gguf --context 8192
//! shard-planner models
//! ```
//!
//! A thin binary: the planning is `potluck_shard_planner`'s; this reads the cluster file, the
//! GGUF header (through the engine) or a built-in spec, and prints.

mod cluster_file;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use potluck_shard_planner::specs::{builtin_model, BUILTIN_MODELS, KV_ELEMENT_BYTES_DEFAULT};
use potluck_shard_planner::{
    dense_layer_flops_per_token, format_bytes, head_flops_per_token, plan, proportional_plan, Objective,
    ModelProfile, Plan, PlanRequest, Workload,
};

/// Most bytes of a previous plan's JSON read: a plan is a few KB.
const PREVIOUS_PLAN_BYTES_MAX: u64 = 4 << 20;

#[derive(Parser)]
#[command(
    name = "shard-planner",
    version,
    about = "Plan which node runs which layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the plan that minimises predicted decode time for the cluster.
    Plan {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// The plan in force (JSON from `plan --json`): prefer moving few weights.
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Print the plan as JSON (the dashboard's form) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compare our plan with the memory-proportional split (exo, llama.cpp) on one scenario.
    Simulate {
        #[command(flatten)]
        scenario: ScenarioArgs,
    },
    /// List the built-in model specs.
    Models,
}

#[derive(Args)]
struct ScenarioArgs {
    /// The cluster file (TOML; see examples/clusters/).
    #[arg(long)]
    cluster: PathBuf,
    /// A built-in model spec (see `shard-planner models`).
    #[arg(long, conflicts_with = "gguf", required_unless_present = "gguf")]
    model: Option<String>,
    /// A GGUF file: only its header is read.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Tokens per sequence the KV cache must hold.
    #[arg(long, default_value_t = 4096)]
    context: u32,
    /// Sequences served at once.
    #[arg(long, default_value_t = 1)]
    sequences: u32,
    /// The node that must be stage 0 (the coordinator); overrides the file's `first_node`.
    #[arg(long)]
    first: Option<String>,
    /// KV-cache bytes per element for a built-in spec (the engine's cache is f16: 2; f32: 4).
    #[arg(long, default_value_t = KV_ELEMENT_BYTES_DEFAULT)]
    kv_element_bytes: u64,
    /// Plan for many sequences at once: minimise the slowest stage or hop rather than one
    /// sequence's token time.
    #[arg(long)]
    throughput: bool,
}

/// The planner's view of a GGUF, from the engine's header reader.
fn profile_from_gguf(path: &Path) -> Result<ModelProfile> {
    let (p, _content) = potluck_engine::profile::ModelProfile::from_path(path)
        .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
    let name = p.name.clone().unwrap_or_else(|| {
        path.file_stem().map_or_else(
            || "model".into(),
            |stem| stem.to_string_lossy().into_owned(),
        )
    });
    let layer_flops = dense_layer_flops_per_token(
        p.n_embd as u64,
        p.n_ff as u64,
        p.n_head as u64,
        p.n_head_kv as u64,
        p.head_dim as u64,
    );
    let mut model = ModelProfile::dense(
        name,
        p.layer_weight_bytes.clone(),
        layer_flops,
        p.embedding_bytes,
        p.head_bytes,
        head_flops_per_token(p.n_embd as u64, p.vocab_size as u64),
        p.tied_embeddings,
        p.kv_bytes_per_token_per_layer,
        p.activation_bytes_per_token,
    );
    model.layer_kv_positions_max = p.layer_kv_positions_max();
    Ok(model)
}

struct Scenario {
    model: ModelProfile,
    cluster: cluster_file::Cluster,
    workload: Workload,
    first: Option<String>,
    objective: Objective,
}

impl ScenarioArgs {
    fn load(&self) -> Result<Scenario> {
        let model = match (&self.model, &self.gguf) {
            (Some(id), None) => {
                let Some(spec) = builtin_model(id) else {
                    let known: Vec<&str> = BUILTIN_MODELS.iter().map(|m| m.id).collect();
                    bail!("no built-in model {id:?}; known: {}", known.join(", "));
                };
                spec.profile(self.kv_element_bytes)
            }
            (None, Some(path)) => profile_from_gguf(path)?,
            _ => bail!("give either --model or --gguf"),
        };
        let cluster = cluster_file::read(&self.cluster)?;
        let first = self.first.clone().or_else(|| cluster.first_node.clone());
        let workload = Workload {
            context_tokens: self.context,
            sequences: self.sequences,
        };
        Ok(Scenario {
            model,
            cluster,
            workload,
            first,
            objective: if self.throughput { Objective::Throughput } else { Objective::Latency },
        })
    }
}

impl Scenario {
    fn request(&self) -> PlanRequest<'_> {
        let request = PlanRequest::new(
            &self.model,
            &self.cluster.nodes,
            &self.cluster.links,
            self.workload,
        )
        .with_objective(self.objective);
        match &self.first {
            Some(first) => request.with_first_node(first),
            None => request,
        }
    }
}

fn read_previous(path: &Path) -> Result<Plan> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading previous plan {}", path.display()))?
        .len();
    if size > PREVIOUS_PLAN_BYTES_MAX {
        bail!("{} is {size} bytes: not a plan", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading previous plan {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing previous plan {}", path.display()))
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "NO"
    }
}

/// `println!` that returns a failed write as an error instead of panicking: a reader that
/// closes the pipe early (`shard-planner plan … | head`) is its choice, not our crash.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?;
    }};
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            // The whole chain on one line ("planning: the model does not fit: …"), with no
            // backtrace: these are a user's errors, not the program's.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Plan {
            scenario,
            previous,
            json,
        } => {
            let scenario = scenario.load()?;
            let previous = previous.as_deref().map(read_previous).transpose()?;
            let mut request = scenario.request();
            if let Some(previous) = &previous {
                request = request.with_previous(previous);
            }
            let plan = plan(&request).context("planning")?;
            if json {
                out!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                use std::io::Write as _;
                write!(std::io::stdout(), "{plan}")?;
            }
        }
        Command::Simulate { scenario } => {
            let scenario = scenario.load()?;
            let request = scenario.request();
            if let Some(description) = &scenario.cluster.description {
                out!("scenario: {description}\n");
            }
            let baseline = proportional_plan(&request)?;
            let ours = plan(&request);
            match &ours {
                Ok(ours) => out!("== potluck ==\n{ours}"),
                Err(error) => out!("== potluck ==\nno plan: {error}\n"),
            }
            out!("== memory-proportional split (exo, llama.cpp) ==\n{baseline}");
            out!(
                "{:<22} {:>9} {:>10} {:>7} {:>5}",
                "", "tokens/s", "ms/token", "stages", "fits"
            );
            if let Ok(ours) = &ours {
                out!(
                    "{:<22} {:>9.2} {:>10.1} {:>7} {:>5}",
                    "potluck",
                    ours.tokens_per_s,
                    ours.token_time_ms,
                    ours.stages.len(),
                    yes_no(ours.fits)
                );
            }
            out!(
                "{:<22} {:>9.2} {:>10.1} {:>7} {:>5}",
                "memory-proportional",
                baseline.tokens_per_s,
                baseline.token_time_ms,
                baseline.stages.len(),
                yes_no(baseline.fits)
            );
            match &ours {
                Ok(ours) if baseline.fits => out!(
                    "potluck is {:.1}× the memory-proportional split's tokens/s",
                    ours.tokens_per_s / baseline.tokens_per_s
                ),
                Ok(_) => {
                    let over: u64 = baseline
                        .stages
                        .iter()
                        .map(|s| s.memory_used_bytes.saturating_sub(s.memory_budget_bytes))
                        .sum();
                    out!(
                        "the memory-proportional split does not fit ({} over budget): it would \
                         not run; its tokens/s are what it would predict if it did",
                        format_bytes(over)
                    )
                }
                Err(_) => {}
            }
            if let Err(error) = ours {
                return Err(error).context("planning");
            }
        }
        Command::Models => {
            out!(
                "{:<24} {:>7} {:>12} {:>14}  {}",
                "model", "layers", "weights", "KV per token", "engine"
            );
            for model in BUILTIN_MODELS {
                let profile = model.profile(KV_ELEMENT_BYTES_DEFAULT);
                let experts = model.architecture.n_expert > 0;
                let engine = if potluck_engine::profile::engine_runs(model.gguf_architecture, experts) {
                    "runs".to_string()
                } else if experts {
                    format!("planning only (`{}` experts not run yet)", model.gguf_architecture)
                } else {
                    format!("planning only (`{}` not run yet)", model.gguf_architecture)
                };
                out!(
                    "{:<24} {:>7} {:>12} {:>14}  {}",
                    model.id,
                    profile.n_layers,
                    format_bytes(profile.weight_bytes_min()),
                    format_bytes(
                        profile.kv_bytes_per_token_per_layer * u64::from(profile.n_layers)
                    ),
                    engine,
                );
            }
            out!(
                "(Q4_K_M sizes from the architecture; KV cache in f16 as the engine keeps it)"
            );
        }
    }
    Ok(())
}
