//! Writes a seeded random-weight GGUF (llama, qwen2, qwen3, phi3 or qwen3moe; with experts for
//! the MoE presets) of a preset shape, printing its size and the time
//! it took: the models for scale tests and benchmarks that no one has to download.
//!
//! `cargo run --release -p potluck-engine --example random_gguf -- --out FILE
//! [--preset tiny|tiny-moe|llama3-8b|llama3-70b|qwen3-8b|qwen2.5-72b|mixtral-8x7b|qwen3-30b-a3b]
//! [--arch llama|qwen2|qwen3|phi3|qwen3moe] [--layers N]
//! [--dtype q4_0|q4_k_m|...] [--seed N] [--tied] [--threads N] [--rope-scaling linear:F|yarn:F:CTX|longrope:ATTN:CTX]
//! [--tokenizer-from DONOR.gguf | --no-tokenizer]`
//!
//! `--arch` defaults to the preset's family (qwen3-8b: qwen3, qwen3-30b-a3b: qwen3moe,
//! qwen2.5-72b: qwen2, else llama: mixtral-8x7b and tiny-moe are llama files with experts, as
//! Mixtral's are). `--layers` replaces the preset's layer count (tiny 4, 8B 32, 70B 80). Types: f32, f16,
//! bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2k, q3k, q4k, q5k, q6k (every matrix, the embedding
//! and the head; norms stay f32), or q4_k_m: llama.cpp's Q4_K_M mix (Q4_K, with Q6_K for the
//! head and for `attn_v` and `ffn_down` of the layers llama.cpp gives more bits; see
//! `DTypeChoice::q4_k_m`), written directly rather than requantized. The tokenizer is copied from the donor GGUF, by default the
//! coordinator's SmolLM2 download (`coordinator fetch-model`; `$POTLUCK_MODEL` overrides),
//! and the vocabulary takes its size; `--no-tokenizer` keeps the preset's vocabulary and
//! writes no tokenizer (the engine's slices run without one, a server does not).
//!
//! Std argument parsing only, so that the engine gains no dependency for an example.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use potluck_engine::random_gguf::{self, Architecture, ModelShape, RandomGguf, TokenizerMetadata};
use potluck_engine::threads::ComputePool;
use potluck_engine::EngineError;

const USAGE: &str = "usage: random_gguf --out FILE \
[--preset tiny|tiny-moe|llama3-8b|llama3-70b|qwen3-8b|qwen2.5-72b|mixtral-8x7b|qwen3-30b-a3b] \
[--arch llama|qwen2|qwen3|phi3|qwen3moe] [--layers N] \
[--dtype q4_0] [--seed N] [--tied] [--threads N] [--rope-scaling linear:F|yarn:F:CTX|longrope:ATTN:CTX] \
[--tokenizer-from DONOR.gguf | --no-tokenizer]";

/// Where the tokenizer comes from.
enum Donor {
    Default,
    Path(PathBuf),
    None,
}

struct Args {
    shape: ModelShape,
    architecture: Architecture,
    dtype: GgmlDType,
    /// `--dtype q4_k_m`: the mix rather than one type.
    q4_k_m: bool,
    seed: u64,
    tied: bool,
    threads: usize,
    donor: Donor,
    /// `--rope-scaling linear:F` / `yarn:F:CTX` / `longrope:ATTN:CTX`.
    rope_scaling: Option<String>,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut preset = "tiny".to_string();
    let mut layers = None;
    let mut architecture = None;
    let mut dtype = GgmlDType::Q4_0;
    let mut q4_k_m = false;
    let mut seed = 1;
    let mut tied = false;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut donor = Donor::Default;
    let mut rope_scaling = None;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--tied" => tied = true,
            "--no-tokenizer" => donor = Donor::None,
            "-h" | "--help" => return Err(USAGE.into()),
            _ => {
                let value = args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
                let number = |what: &str| value.parse::<u64>().map_err(|e| format!("{what} `{value}`: {e}"));
                match flag.as_str() {
                    "--preset" => preset = value.clone(),
                    "--arch" => architecture = Some(Architecture::from_name(&value).map_err(|e| e.to_string())?),
                    "--layers" => layers = Some(u32::try_from(number("--layers")?).map_err(|e| format!("--layers: {e}"))?),
                    "--dtype" if matches!(value.to_ascii_lowercase().replace('_', "").as_str(), "q4km") => {
                        (dtype, q4_k_m) = (GgmlDType::Q4K, true)
                    }
                    "--dtype" => (dtype, q4_k_m) = (random_gguf::parse_dtype(&value).map_err(|e| e.to_string())?, false),
                    "--seed" => seed = number("--seed")?,
                    "--threads" => threads = number("--threads")?.max(1) as usize,
                    "--tokenizer-from" => donor = Donor::Path(PathBuf::from(value)),
                    "--rope-scaling" => rope_scaling = Some(value.clone()),
                    "--out" => out = Some(PathBuf::from(value)),
                    _ => return Err(format!("unknown flag `{flag}`\n{USAGE}")),
                }
            }
        }
    }
    let shape = ModelShape::preset(&preset, layers).map_err(|e| e.to_string())?;
    let out = out.ok_or_else(|| format!("--out is required\n{USAGE}"))?;
    let architecture = architecture.unwrap_or(if shape.experts.is_some() && preset.starts_with("qwen3") {
        Architecture::Qwen3Moe
    } else if preset.starts_with("qwen3") {
        Architecture::Qwen3
    } else if preset.starts_with("qwen2") {
        Architecture::Qwen2
    } else {
        Architecture::Llama
    });
    Ok(Args { shape, architecture, dtype, q4_k_m, seed, tied, threads, donor, rope_scaling, out })
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), EngineError> {
    let mut model = RandomGguf::new(args.shape, args.dtype, args.seed);
    model.architecture = args.architecture;
    model.tied_embeddings = args.tied;
    if let Some(spec) = &args.rope_scaling {
        model = model.with_rope_scaling(spec)?;
    }
    if args.q4_k_m {
        model.dtypes = random_gguf::DTypeChoice::q4_k_m(model.shape.n_layers);
    }
    let donor = match args.donor {
        Donor::Path(path) => Some(path),
        Donor::None => None,
        Donor::Default => Some(random_gguf::default_donor_path().ok_or_else(|| {
            EngineError::Tokenizer(format!(
                "no default tokenizer donor ({}): run `coordinator fetch-model`, set POTLUCK_MODEL, \
                 pass --tokenizer-from DONOR.gguf, or --no-tokenizer",
                random_gguf::DEFAULT_DONOR_FILE
            ))
        })?),
    };
    if let Some(path) = &donor {
        model = model.with_tokenizer(TokenizerMetadata::from_gguf(path)?);
    }
    let expected_bytes = model.file_bytes()?;
    let pool = ComputePool::new(args.threads);
    println!(
        "writing {} ({}, {} layers, hidden {}, FFN {}, vocab {}, {}, seed {}, tokenizer {}): {:.1} MB on {} threads, \
         at most {:.1} MB of buffers",
        args.out.display(),
        model.architecture.gguf_name(),
        model.shape.n_layers,
        model.shape.n_embd,
        model.shape.n_ff,
        model.shape.vocab_size,
        if args.q4_k_m { "Q4_K_M".to_string() } else { format!("{:?}", args.dtype) },
        args.seed,
        donor.as_ref().map_or("none".into(), |p| p.display().to_string()),
        expected_bytes as f64 / 1e6,
        args.threads,
        model.buffer_bytes_max(args.threads)? as f64 / 1e6,
    );
    let start = Instant::now();
    let report = model.write_with_pool(&args.out, &pool)?;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "wrote {} tensors, {} bytes ({:.1} MB) in {seconds:.2} s ({:.0} MB/s); types {:?}",
        report.n_tensors,
        report.file_bytes,
        report.file_bytes as f64 / 1e6,
        report.file_bytes as f64 / 1e6 / seconds.max(1e-9),
        report.tensor_types,
    );
    Ok(())
}
