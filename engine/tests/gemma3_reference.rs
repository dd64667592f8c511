//! The engine against llama.cpp on a real Gemma 3 (gemma-3-270m Q4_K_M, sha256 a5fd3b62…):
//! token ids of reference strings, teacher-forced log-probabilities over llama.cpp's greedy
//! continuations, free greedy runs equal to llama.cpp's (up to its first near-tie), and split
//! and batch invariance.
//!
//! Reference: tests/fixtures/gemma3-270m-q4_k_m-llamacpp.json, made by
//! examples/llamacpp_model_fixture.py (llama-cpp-python 0.3.36, flash attention on). The model
//! comes from `$POTLUCK_GEMMA3_MODEL`, else the coordinator's cache
//! (`coordinator fetch-model gemma3-270m`); a missing model is a failure, never a silent pass.

use std::path::PathBuf;

use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_engine::sampler::{argmax, log_softmax_at};
use potluck_engine::tokenizer::Tokenizer;
use serde_json::Value;

const MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// docs/benchmarks.md's yardstick: llama.cpp's own two attention paths on the reference
/// model (mean 0.0421, max 0.2176); this model's own figure is in the fixture (0.0413,
/// 0.2023).
const MEAN_ABS_DELTA_MAX: f64 = 0.042;
/// Above the yardstick's 0.22, and why: this file's Q4_K matrices (attn_output, most FFN
/// gate/up) are repacked by llama.cpp on AVX2 machines into its `q4_K_8x8` layout, whose dot
/// sums in another order than the engine's (Q8_0, Q5_0 and Q6_K below 8 rows match llama.cpp
/// bit for bit: engine/tests/arch_agreement.rs). Measured 0.2906 at one position (the
/// mean, 0.0404, is within the yardstick, and no clear top-1 differs).
const MAX_ABS_DELTA_MAX: f64 = 0.30;
const TOP1_MARGIN_MIN: f64 = 0.1;

fn model_path() -> PathBuf {
    let path = std::env::var_os("POTLUCK_GEMMA3_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("POTLUCK_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck"));
        cache.join("models").join(MODEL_FILE)
    });
    assert!(
        path.exists(),
        "Gemma 3 270M is missing at {}: run `cargo run -p potluck-coordinator -- fetch-model gemma3-270m` (or set POTLUCK_GEMMA3_MODEL)",
        path.display()
    );
    path
}

fn reference() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gemma3-270m-q4_k_m-llamacpp.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Logits after the prompt (one step) and after each of `forced` but the last (one token
/// per step), through `slices` in order.
fn teacher_forced(slices: &[ModelSlice], prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let n_embd = slices[0].profile().n_embd;
    let mut caches: Vec<_> = slices.iter().map(|s| s.new_cache(prompt.len() + forced.len())).collect();
    let mut out = Vec::new();
    let mut step: Vec<u32> = prompt.to_vec();
    for &next in forced {
        let mut hidden = slices[0].embed(&step).unwrap();
        for (slice, cache) in slices.iter().zip(caches.iter_mut()) {
            slice.forward_layers(&mut hidden, &[step.len()], &mut [cache]).unwrap();
        }
        out.push(slices.last().unwrap().head(&hidden[(step.len() - 1) * n_embd..]).unwrap());
        step = vec![next];
    }
    out
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let path = model_path();
    let (_, content) = ModelProfile::from_path(&path).unwrap();
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let reference = reference();
    let mut bad = Vec::new();
    for case in reference["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let plain = case["plain"].as_bool().unwrap_or(false);
        let mut ours: Vec<u32> = Vec::new();
        if !plain && tok.add_bos() {
            ours.extend(tok.bos_id());
        }
        ours.extend(tok.encode(text, !plain));
        let want = ids(&case["ids"]);
        if ours != want {
            bad.push(format!("{text:?} (special: {}): ours {ours:?}\n  llama.cpp {want:?}", !plain));
        }
        // And back: the plain ids decode to the text (SentencePiece keeps every byte).
        if plain {
            assert_eq!(tok.decode(&want, false), text, "decoding llama.cpp's ids of {text:?}");
        }
    }
    assert!(bad.is_empty(), "token ids differ from llama.cpp's:\n{}", bad.join("\n"));
}

#[test]
fn teacher_forced_logprobs_and_greedy_runs_match_llama_cpp() {
    let path = model_path();
    let reference = reference();
    let profile = ModelProfile::from_path(&path).unwrap().0;
    assert_eq!((profile.architecture.as_str(), profile.n_layers), ("gemma3", 18));
    let whole = [ModelSlice::load(&path, 0..18, Backend::cpu(2)).unwrap()];
    let (mut deltas, mut flips, mut excluded, mut greedy_bad, mut greedy_compared) = (Vec::new(), Vec::new(), 0, Vec::new(), 0);
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let generated = ids(&case["generated_ids"]);
        let logits = teacher_forced(&whole, &prompt, &generated);
        for (i, (row, top)) in logits.iter().zip(case["top_logprobs"].as_array().unwrap()).enumerate() {
            let pair = |k: usize| (top[k][0].as_u64().unwrap() as u32, top[k][1].as_f64().unwrap());
            let ((id, want), (_, second)) = (pair(0), pair(1));
            deltas.push((f64::from(log_softmax_at(row, &[id])[0]) - want).abs());
            if want - second >= TOP1_MARGIN_MIN {
                if argmax(row) != id {
                    flips.push(format!("{:?} position {i}: {} vs llama.cpp {id}", case["prompt"], argmax(row)));
                }
            } else {
                excluded += 1;
            }
        }
        // Free greedy: our own argmax fed back gives llama.cpp's continuation.
        let mut ours = Vec::new();
        let logits_free = {
            let mut caches = whole[0].new_cache(prompt.len() + generated.len());
            let n_embd = profile.n_embd;
            let mut step = prompt.clone();
            for _ in 0..generated.len() {
                let mut hidden = whole[0].embed(&step).unwrap();
                whole[0].forward_layers(&mut hidden, &[step.len()], &mut [&mut caches]).unwrap();
                let next = argmax(&whole[0].head(&hidden[(step.len() - 1) * n_embd..]).unwrap());
                ours.push(next);
                step = vec![next];
            }
            ours.clone()
        };
        // Equal up to llama.cpp's first near-tie (top-1 ahead by under the margin): there
        // either answer is numerical noise, and past it the two texts go their own ways.
        let margins: Vec<f64> = case["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|top| top[0][1].as_f64().unwrap() - top[1][1].as_f64().unwrap())
            .collect();
        let clear = margins.iter().position(|&m| m < TOP1_MARGIN_MIN).unwrap_or(generated.len());
        if logits_free[..clear] != generated[..clear] {
            greedy_bad.push(format!(
                "greedy continuation of {:?} (the {clear} tokens before llama.cpp's first near-tie): ours {logits_free:?}\n  llama.cpp {generated:?}",
                case["prompt"]
            ));
        }
        greedy_compared += clear;
    }
    let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
    let max = deltas.iter().cloned().fold(0.0, f64::max);
    let theirs = &reference["llamacpp_without_flash"];
    println!(
        "gemma-3-270m Q4_K_M, {} positions ({excluded} under the {TOP1_MARGIN_MIN} margin): potluck mean |Δ logprob| {mean:.4}, max {max:.4}, \
         {} top-1 flips; llama.cpp without flash attention: mean {:.4}, max {:.4}, {} flips; free greedy equal over {greedy_compared} tokens",
        deltas.len(),
        flips.len(),
        theirs["mean_abs_delta"].as_f64().unwrap(),
        theirs["max_abs_delta"].as_f64().unwrap(),
        theirs["top1_flips"]
    );
    assert!(flips.is_empty(), "top-1 differs where llama.cpp's margin is clear:\n{}", flips.join("\n"));
    assert!(greedy_bad.is_empty(), "{}", greedy_bad.join("\n"));
    assert!(mean <= MEAN_ABS_DELTA_MAX && max <= MAX_ABS_DELTA_MAX, "mean {mean}, max {max}");
}

/// Two and three stages (local and global layers on both sides of a split) give the
/// unsplit logits bit for bit; rows batched in one step give what each gives alone.
#[test]
fn split_and_batch_invariance() {
    let path = model_path();
    let backend = Backend::cpu(1);
    let prompt: Vec<u32> = vec![2, 818, 5279, 529, 7001, 563];
    let forced: Vec<u32> = vec![9079, 236761, 108, 651];
    let whole = teacher_forced(&[ModelSlice::load(&path, 0..18, backend.clone()).unwrap()], &prompt, &forced);
    for splits in [vec![0..5, 5..18], vec![0..6, 6..18], vec![0..3, 3..12, 12..18]] {
        let slices: Vec<ModelSlice> = splits.iter().map(|r| ModelSlice::load(&path, r.clone(), backend.clone()).unwrap()).collect();
        assert_eq!(teacher_forced(&slices, &prompt, &forced), whole, "split {splits:?}");
    }
    let slice = ModelSlice::load(&path, 0..18, backend.clone()).unwrap();
    let other: Vec<u32> = vec![2, 4521, 1902];
    let alone_other = teacher_forced(std::slice::from_ref(&slice), &other, &[0])[0].clone();
    let (mut a, mut b) = (slice.new_cache(64), slice.new_cache(64));
    let tokens: Vec<u32> = prompt.iter().chain(&other).copied().collect();
    let mut hidden = slice.embed(&tokens).unwrap();
    slice.forward_layers(&mut hidden, &[prompt.len(), other.len()], &mut [&mut a, &mut b]).unwrap();
    let n_embd = slice.profile().n_embd;
    let last_a = slice.head(&hidden[(prompt.len() - 1) * n_embd..prompt.len() * n_embd]).unwrap();
    let last_b = slice.head(&hidden[(tokens.len() - 1) * n_embd..]).unwrap();
    assert_eq!(last_a, whole[0], "a batched row differs from the sequence alone");
    assert_eq!(last_b, alone_other, "a batched row differs from the sequence alone");
}
