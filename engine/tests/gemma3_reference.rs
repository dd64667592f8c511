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

mod common;

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
const MAX_ABS_DELTA_MAX: f64 = 0.22;
const TOP1_MARGIN_MIN: f64 = 0.1;
/// With the prompt in one step, llama.cpp multiplies the prompt's rows with its batched
/// kernels (repacked Q4_K in groups of 4 rows, K-quants tiled from 8 rows), which round in
/// other orders than its one-row kernels; the engine computes every row as llama.cpp's
/// one-row kernels do (fed one token per step, its logits are llama.cpp's bit for bit: see
/// below), so the prompt's KV cache differs by ulps and a near decision can go the other
/// way. Measured: 1 position where llama.cpp's top-1 leads by 0.153 (position 9 of the
/// second prompt); none where it leads by more than the yardstick's max.
const BATCHED_TOP1_MARGIN_MIN: f64 = MAX_ABS_DELTA_MAX;

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
    let bad = common::tokenizer_differences(&tok, &reference()["tokenizer"]);
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
                    flips.push((want - second, format!("{:?} position {i}: {} vs llama.cpp {id}", case["prompt"], argmax(row))));
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
         {} top-1 flips at margin ≥ {TOP1_MARGIN_MIN}; llama.cpp without flash attention: mean {:.4}, max {:.4}, {} flips; free greedy equal over {greedy_compared} tokens",
        deltas.len(),
        flips.len(),
        theirs["mean_abs_delta"].as_f64().unwrap(),
        theirs["max_abs_delta"].as_f64().unwrap(),
        theirs["top1_flips"]
    );
    let clear: Vec<&str> = flips.iter().filter(|(m, _)| *m >= BATCHED_TOP1_MARGIN_MIN).map(|(_, l)| l.as_str()).collect();
    assert!(clear.is_empty(), "top-1 differs where llama.cpp's margin is over {BATCHED_TOP1_MARGIN_MIN}:\n{}", clear.join("\n"));
    assert!(greedy_bad.is_empty(), "{}", greedy_bad.join("\n"));
    assert!(mean <= MEAN_ABS_DELTA_MAX && max <= MAX_ABS_DELTA_MAX, "mean {mean}, max {max}");
}

/// Fed one token per step (prompt included), llama.cpp runs its one-row kernels throughout,
/// whose summation orders the engine follows: its logits equal llama.cpp's bit for bit at
/// every position (checked on llama.cpp's top 5 of each), and its free greedy runs are
/// llama.cpp's, token for token.
#[test]
fn one_token_per_step_the_logits_are_llama_cpps_bit_for_bit() {
    let path = model_path();
    let reference = reference();
    let slice = ModelSlice::load(&path, 0..18, Backend::cpu(1)).unwrap();
    let n_embd = slice.profile().n_embd;
    let mut checked = 0;
    for case in reference["greedy_one_token_per_step"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let generated = ids(&case["generated_ids"]);
        let mut cache = slice.new_cache(prompt.len() + generated.len());
        let mut ours = Vec::new();
        let feed = |token: u32, cache: &mut potluck_engine::kv_cache::SequenceCache| -> Vec<f32> {
            let mut hidden = slice.embed(&[token]).unwrap();
            slice.forward_layers(&mut hidden, &[1], &mut [cache]).unwrap();
            slice.head(&hidden[..n_embd]).unwrap()
        };
        let mut logits = Vec::new();
        for &t in &prompt {
            logits = feed(t, &mut cache);
        }
        for (i, top) in case["top_logits"].as_array().unwrap().iter().enumerate() {
            for entry in top.as_array().unwrap() {
                let id = entry[0].as_u64().unwrap() as usize;
                let want = f64_from_hex(entry[1].as_str().unwrap()) as f32;
                assert_eq!(logits[id].to_bits(), want.to_bits(), "{:?} position {i}, token {id}: {} vs llama.cpp {want}", case["prompt"], logits[id]);
                checked += 1;
            }
            let next = argmax(&logits);
            ours.push(next);
            if i + 1 < generated.len() {
                logits = feed(next, &mut cache);
            }
        }
        assert_eq!(ours, generated, "free greedy continuation of {:?}", case["prompt"]);
    }
    println!("gemma-3-270m Q4_K_M one token per step: {checked} logits equal to llama.cpp's bit for bit");
}

/// Python's `float.hex()` form (`0x1.8p+3`, `-0x0.0p+0`) back to the value.
fn f64_from_hex(text: &str) -> f64 {
    let (negative, rest) = text.strip_prefix('-').map_or((false, text), |r| (true, r));
    let rest = rest.strip_prefix("0x").expect("0x");
    let (mantissa, exponent) = rest.split_once('p').expect("p");
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut value = u64::from_str_radix(int_part, 16).unwrap() as f64;
    for (k, digit) in frac_part.chars().enumerate() {
        value += digit.to_digit(16).unwrap() as f64 / 16f64.powi(k as i32 + 1);
    }
    let value = value * 2f64.powi(exponent.parse::<i32>().unwrap());
    if negative { -value } else { value }
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
