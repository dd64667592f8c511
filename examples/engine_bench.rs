//! `engine-bench`: single-machine prefill and decode speed of the engine on a GGUF.
//!
//! Prefill: one forward step over `--prompt-tokens` tokens of one sequence (plus the head on
//! the last row). Decode: `--gen-tokens` steps of one token each, head included, greedy.
//! Prints one JSON line per repetition and the medians; `examples/bench_vs_llamacpp.sh`
//! runs it beside llama.cpp (llama-cpp-python) in the same run and prints the ratios.
//!
//! Before decode, the prefilled cache is forked (`SequenceCache::fork_prefix`, outside the
//! timed region); after it, the cache is truncated back to the prompt. The first decode step
//! repeated on each must pick the token the first decode picked, or the cache's fork and
//! rollback (what speculative decoding and prefix reuse stand on) are broken.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::sampler::argmax;

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
    let n_layers = potluck_engine::profile::ModelProfile::from_path(&args.model)?.0.n_layers;
    let slice = ModelSlice::load(&args.model, 0..n_layers, Backend::cpu(args.threads))?;
    let vocab = slice.profile().vocab_size as u32;
    // A fixed, ordinary-looking prompt: token ids spread over the vocabulary.
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let n_embd = slice.profile().n_embd;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for rep in 0..args.reps + 1 {
        let mut cache = slice.new_cache(args.prompt_tokens + args.gen_tokens + 1);
        let t0 = Instant::now();
        let mut hidden = slice.embed(&prompt)?;
        slice.forward_layers(&mut hidden, &[prompt.len()], &mut [&mut cache])?;
        let logits = slice.head(&hidden[(prompt.len() - 1) * n_embd..])?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let first_token = argmax(&logits);
        let mut token = first_token;
        let mut fork = cache.fork_prefix(prompt.len())?;
        let mut first_decoded = None;
        let t1 = Instant::now();
        for _ in 0..args.gen_tokens {
            let mut hidden = slice.embed(&[token])?;
            slice.forward_layers(&mut hidden, &[1], &mut [&mut cache])?;
            token = argmax(&slice.head(&hidden)?);
            first_decoded.get_or_insert(token);
        }
        let decode_s = t1.elapsed().as_secs_f64();
        if let Some(expected) = first_decoded {
            cache.truncate(prompt.len())?;
            for (what, cache) in [("truncated", &mut cache), ("forked", &mut fork)] {
                let mut hidden = slice.embed(&[first_token])?;
                slice.forward_layers(&mut hidden, &[1], &mut [cache])?;
                let again = argmax(&slice.head(&hidden)?);
                anyhow::ensure!(again == expected, "the {what} cache decoded {again} where the first decode gave {expected}");
            }
        }
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
