//! The engine against llama.cpp on every architecture it runs (llama, qwen2, qwen3, phi3, and
//! the mixtures of experts: Mixtral's layout and qwen3moe),
//! on seeded random-weight GGUFs: teacher-forced log-probabilities within llama.cpp's own
//! spread, top-1 equal wherever llama.cpp's margin is clear, over a prompt step and decode
//! steps.
//!
//! Reference: tests/fixtures/arch-agreement.json, made by examples/llamacpp_arch_fixtures.py
//! (llama-cpp-python 0.3.36, flash attention on: llama.cpp's CPU default). The models are
//! rebuilt here by the same writer with the same arguments; the fixture's sha256 proves it is
//! the same file. The tokenizer comes from the default model (`$POTLUCK_MODEL`, else the
//! coordinator's cache): a missing one is a failure, never a silent pass.
//!
//! The yardstick is the one docs/benchmarks.md uses for the reference model: llama.cpp
//! without flash attention against itself with it (mean |Δ| 0.0421, max 0.2176 there). Each
//! case's own figure of that spread is in the fixture and printed beside ours.

use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::quant::Isa;
use potluck_engine::random_gguf::{self, Architecture, ModelShape, RandomGguf, TokenizerMetadata};
use potluck_engine::sampler::{argmax, log_softmax_at};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// docs/benchmarks.md's yardstick: llama.cpp's non-flash path against its flash path on the
/// reference model.
const MEAN_ABS_DELTA_MAX: f64 = 0.042;
const MAX_ABS_DELTA_MAX: f64 = 0.22;
/// Positions where llama.cpp's top-1 leads its top-2 by less than this are not counted for
/// top-1 agreement (either answer is within numerical noise there).
const TOP1_MARGIN_MIN: f64 = 0.1;
/// The per-sequence context llama.cpp ran the fixture with (`n_ctx` in the script).
const LLAMA_CPP_CONTEXT: usize = 256;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/arch-agreement.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The case's model, rebuilt; panics unless it is byte for byte the file llama.cpp read.
fn rebuild(case: &Value, dir: &std::path::Path) -> std::path::PathBuf {
    let donor = random_gguf::default_donor_path()
        .expect("the default model (the tokenizer donor) is missing: run `coordinator fetch-model` or set POTLUCK_MODEL");
    let shape = ModelShape::preset(case["preset"].as_str().unwrap(), None).unwrap();
    let dtype = random_gguf::parse_dtype(case["dtype"].as_str().unwrap()).unwrap();
    let mut model = RandomGguf::new(shape, dtype, case["seed"].as_u64().unwrap());
    model.architecture = Architecture::from_name(case["architecture"].as_str().unwrap()).unwrap();
    model.tied_embeddings = case["tied"].as_bool().unwrap();
    if let Some(spec) = case.get("rope_scaling") {
        model = model.with_rope_scaling(spec.as_str().unwrap()).unwrap();
    }
    let model = model.with_tokenizer(TokenizerMetadata::from_gguf(&donor).unwrap());
    let path = dir.join(format!("{}.gguf", case["name"].as_str().unwrap()));
    model.write(&path).unwrap();
    let sha256: String = Sha256::digest(std::fs::read(&path).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha256, case["sha256"].as_str().unwrap(), "{}: not the file the fixture was made from", case["name"]);
    path
}

#[test]
fn every_architecture_agrees_with_llama_cpp() {
    let dir = std::env::temp_dir().join(format!("potluck-arch-agreement-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = fixture();
    let cases = fixture["cases"].as_array().unwrap();
    let mut architectures: Vec<&str> = cases.iter().map(|c| c["architecture"].as_str().unwrap()).collect();
    architectures.sort_unstable();
    architectures.dedup();
    assert_eq!(architectures, ["llama", "phi3", "qwen2", "qwen3", "qwen3moe"], "one case per architecture the engine runs");
    assert!(cases.iter().any(|c| c["preset"] == "tiny-moe" && c["architecture"] == "llama"), "Mixtral's layout (llama with experts) is covered");
    for scaling in ["linear", "yarn", "longrope"] {
        assert!(cases.iter().any(|c| c["rope_scaling"].as_str().is_some_and(|s| s.starts_with(scaling))), "{scaling} RoPE scaling is covered");
    }
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let path = rebuild(case, &dir);
        let slice = ModelSlice::load(&path, 0..ModelShape::preset(case["preset"].as_str().unwrap(), None).unwrap().n_layers, Backend::cpu(1))
            .unwrap();
        let tokens: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        // The prompt in one step (prefill kernels), then one token per step (decode), as
        // llama.cpp was fed.
        let prompt = case["prompt_tokens"].as_u64().unwrap() as usize;
        // llama.cpp's context (the fixture's n_ctx): LongRoPE picks its factors by it.
        let mut cache = slice.new_cache(LLAMA_CPP_CONTEXT);
        let mut logits = Vec::new();
        for step in std::iter::once(&tokens[..prompt]).chain(tokens[prompt..].chunks(1)) {
            let mut hidden = slice.embed(step).unwrap();
            slice.forward_layers(&mut hidden, &[step.len()], &mut [&mut cache]).unwrap();
            logits.extend(slice.head(&hidden).unwrap());
        }
        let vocab = logits.len() / tokens.len();
        let (mut deltas, mut flips, mut excluded) = (Vec::new(), 0, 0);
        for (row, top) in logits.chunks_exact(vocab).zip(case["top_logprobs"].as_array().unwrap()) {
            let pair = |k: usize| (top[k][0].as_u64().unwrap() as u32, top[k][1].as_f64().unwrap());
            let ((id, want), (_, second)) = (pair(0), pair(1));
            deltas.push((f64::from(log_softmax_at(row, &[id])[0]) - want).abs());
            if want - second >= TOP1_MARGIN_MIN {
                flips += usize::from(argmax(row) != id);
            } else {
                excluded += 1;
            }
        }
        let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
        let max = deltas.iter().cloned().fold(0.0, f64::max);
        let theirs = &case["llamacpp_without_flash"];
        println!(
            "{name}: {} positions ({excluded} under the {TOP1_MARGIN_MIN} margin); potluck: mean |Δ logprob| {mean:.4}, max {max:.4}, \
             {flips} top-1 flips; llama.cpp without flash attention: mean {:.4}, max {:.4}, {} flips",
            deltas.len(),
            theirs["mean_abs_delta"].as_f64().unwrap(),
            theirs["max_abs_delta"].as_f64().unwrap(),
            theirs["top1_flips"]
        );
        assert_eq!(deltas.len(), tokens.len());
        assert!(mean <= MEAN_ABS_DELTA_MAX && max <= MAX_ABS_DELTA_MAX, "{name}: mean {mean}, max {max}");
        // Our x86 kernels (AVX2 and up) sum quantized dots in llama.cpp's order: no flip is
        // excused there. The portable fallback sums another way, so there it may flip where
        // llama.cpp's own other path flips (the margin rule alone would then be noise).
        let flips_allowed = if Isa::detect() >= Isa::Avx2 { 0 } else { theirs["top1_flips"].as_u64().unwrap() as usize };
        assert!(flips <= flips_allowed, "{name}: top-1 differs from llama.cpp's where its margin is clear ({flips} positions)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the engine does not run is refused at load, by name, with what it does run: never
/// computed as if it were something else.
#[test]
fn what_the_engine_does_not_run_is_refused_by_name() {
    use candle_core::quantized::gguf_file::Value as Meta;
    use candle_core::quantized::GgmlDType;
    let dir = std::env::temp_dir().join(format!("potluck-arch-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |architecture: Architecture, extra: Vec<(&str, Meta)>| -> String {
        let mut model = RandomGguf::new(ModelShape { n_layers: 1, ..ModelShape::tiny() }, GgmlDType::Q8_0, 1);
        model.architecture = architecture;
        let arch = architecture.gguf_name();
        model.extra_metadata = extra.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)).collect();
        let path = dir.join("refused.gguf");
        model.write(&path).unwrap();
        match ModelSlice::load(&path, 0..1, Backend::cpu(1)) {
            Ok(_) => "loaded".into(),
            Err(e) => e.to_string(),
        }
    };
    let longrope = load(Architecture::Phi3, vec![("rope.scaling.type", Meta::String("longrope".into())), ("rope.scaling.factor", Meta::F32(4.0))]);
    assert!(longrope.contains("LongRoPE") && longrope.contains("phi3"), "{longrope}");
    let other = load(Architecture::Qwen2, vec![("rope.scaling.type", Meta::String("su".into())), ("rope.scaling.factor", Meta::F32(4.0))]);
    assert!(other.contains("other than linear or YaRN"), "{other}");
    // The same keys without scaling (factor 1) are plain RoPE, and run; YaRN runs.
    assert_eq!(load(Architecture::Qwen2, vec![("rope.scaling.type", Meta::String("su".into())), ("rope.scaling.factor", Meta::F32(1.0))]), "loaded");
    assert_eq!(load(Architecture::Qwen2, vec![("rope.scaling.type", Meta::String("yarn".into())), ("rope.scaling.factor", Meta::F32(4.0))]), "loaded");
    let window = load(Architecture::Qwen3, vec![("attention.sliding_window", Meta::U32(128))]);
    // Phi-3's window key is ignored, as llama.cpp ignores it (it runs Phi-3 with full attention).
    assert_eq!(load(Architecture::Phi3, vec![("attention.sliding_window", Meta::U32(2047))]), "loaded");
    assert!(window.contains("sliding attention window"), "{window}");
    // Experts where llama.cpp's graph for the architecture has none (qwen2moe is its own
    // architecture, with shared experts the engine does not run).
    let experts = load(Architecture::Qwen2, vec![("expert_count", Meta::U32(8)), ("expert_used_count", Meta::U32(2))]);
    assert!(experts.contains("mixture-of-experts"), "{experts}");
    // A llama file that says it has experts but holds a dense FFN: the missing tensor named.
    let missing = load(Architecture::Llama, vec![("expert_count", Meta::U32(8)), ("expert_used_count", Meta::U32(2))]);
    assert!(missing.contains("blk.0.ffn_gate_inp.weight"), "{missing}");
    let too_many = load(Architecture::Llama, vec![("expert_count", Meta::U32(8)), ("expert_used_count", Meta::U32(9))]);
    assert!(too_many.contains("9 experts used per token of 8"), "{too_many}");
    // An i-quant tensor (IQ4_XS, ggml type 23): named by its type, with what runs instead.
    let path = dir.join("refused.gguf");
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    assert_eq!(&bytes[at..at + 4], &2u32.to_le_bytes(), "two dims");
    let type_at = at + 4 + 2 * 8;
    bytes[type_at..type_at + 4].copy_from_slice(&23u32.to_le_bytes());
    let iq = dir.join("iq4_xs.gguf");
    std::fs::write(&iq, &bytes).unwrap();
    let refused = ModelSlice::load(&iq, 0..1, Backend::cpu(1)).err().expect("an IQ4_XS file is refused").to_string();
    assert!(refused.contains("IQ4_XS") && refused.contains("Q4_K") && refused.contains("llama-quantize"), "{refused}");
    // An architecture the engine has no module for: named, with the ones it has.
    let mut bytes = std::fs::read(&path).unwrap();
    let key = b"general.architecture";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8; // type, length
    assert_eq!(&bytes[at..at + 5], b"llama");
    bytes[at..at + 5].copy_from_slice(b"gemma");
    std::fs::write(&path, &bytes).unwrap();
    let other = ModelSlice::load(&path, 0..1, Backend::cpu(1)).err().expect("a gemma file is refused").to_string();
    assert!(other.contains("`gemma`") && other.contains("qwen3"), "{other}");
    let _ = std::fs::remove_dir_all(&dir);
}
