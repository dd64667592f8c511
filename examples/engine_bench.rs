//! `engine-bench`: single-machine prefill and decode speed of the engine on a GGUF.
//!
//! Prefill: one forward step over `--prompt-tokens` tokens of one sequence (plus the head on
//! the last row). Decode: `--gen-tokens` steps of one token each, head included, greedy.
//! Prints one JSON line per repetition and the medians; `examples/bench_vs_llamacpp.sh`
//! runs it beside llama.cpp (llama-cpp-python) in the same run and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use potluck_engine::model::LlamaSlice;
use potluck_engine::sampler::argmax;
use potluck_engine::threads::ComputePool;

#[derive(Parser)]
#[command(about = "Measure the engine's single-machine prefill and decode tokens/s")]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let slice = LlamaSlice::load(&args.model, 0..u32::MAX.min(potluck_engine::profile::ModelProfile::from_path(&args.model)?.0.n_layers))?;
    let pool = ComputePool::new(args.threads);
    let vocab = slice.profile().vocab_size as u32;
    // A fixed, ordinary-looking prompt: token ids spread over the vocabulary.
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let n_embd = slice.profile().n_embd;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for rep in 0..args.reps + 1 {
        let mut cache = slice.new_cache(args.prompt_tokens + args.gen_tokens + 1);
        let t0 = Instant::now();
        let mut hidden = slice.embed(&prompt)?;
        slice.forward_layers(&mut hidden, &[prompt.len()], &mut [&mut cache], &pool)?;
        let logits = slice.head(&hidden[(prompt.len() - 1) * n_embd..], &pool)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut token = argmax(&logits);
        let t1 = Instant::now();
        for _ in 0..args.gen_tokens {
            let mut hidden = slice.embed(&[token])?;
            slice.forward_layers(&mut hidden, &[1], &mut [&mut cache], &pool)?;
            token = argmax(&slice.head(&hidden, &pool)?);
        }
        let decode_s = t1.elapsed().as_secs_f64();
        let (p, d) = (args.prompt_tokens as f64 / prefill_s, args.gen_tokens as f64 / decode_s);
        if rep == 0 {
            continue; // warm-up: page in the weights
        }
        println!("{{\"rep\":{rep},\"prefill_tok_s\":{p:.1},\"decode_tok_s\":{d:.1}}}");
        prefill.push(p);
        decode.push(d);
    }
    println!(
        "{{\"engine\":\"potluck\",\"threads\":{},\"prompt_tokens\":{},\"gen_tokens\":{},\"prefill_tok_s\":{:.1},\"decode_tok_s\":{:.1}}}",
        args.threads, args.prompt_tokens, args.gen_tokens, median(prefill), median(decode)
    );
    Ok(())
}
