//! Writes the hidden state after every layer (raw little-endian f32, one file per layer) for
//! a token list, to compare with llama.cpp's `l_out-N` tensors dumped by
//! `examples/llamacpp_dump_layers.py` (see docs/benchmarks.md, "Agreement").
//!
//!     cargo run --release -p potluck-engine --example dump_hidden -- MODEL OUT_DIR 504,3575,282,4649,314
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args[2] == "--teacher" {
        // MODEL --teacher PROMPT_IDS FORCED_IDS: print the log-softmax row max and the logit of each forced token.
        let model = std::path::Path::new(&args[1]);
        let prompt: Vec<u32> = args[3].split(',').map(|t| t.parse().unwrap()).collect();
        let forced: Vec<u32> = args[4].split(',').map(|t| t.parse().unwrap()).collect();
        let slice = ModelSlice::load(model, 0..30, Backend::cpu(1)).unwrap();
        let mut cache = slice.new_cache(256);
        let mut step = prompt.clone();
        for &next in &forced {
            let mut hidden = slice.embed(&step).unwrap();
            slice.forward_layers(&mut hidden, &[step.len()], &mut [&mut cache]).unwrap();
            let n = slice.profile().n_embd;
            let logits = slice.head(&hidden[(step.len() - 1) * n..]).unwrap();
            println!("{}", potluck_engine::sampler::log_softmax_at(&logits, &[next])[0]);
            step = vec![next];
        }
        return;
    }
    let model = std::path::Path::new(&args[1]);
    let out = std::path::Path::new(&args[2]);
    let tokens: Vec<u32> = args[3].split(',').map(|t| t.parse().unwrap()).collect();
    let backend = Backend::cpu(1);
    let n_layers = potluck_engine::profile::ModelProfile::from_path(model).unwrap().0.n_layers;
    let decode: Option<u32> = args.get(4).map(|t| t.parse().unwrap());
    let mut hidden = Vec::new();
    let mut step_hidden = Vec::new();
    for k in 0..n_layers {
        let slice = ModelSlice::load(model, k..k + 1, backend.clone()).unwrap();
        if k == 0 {
            hidden = slice.embed(&tokens).unwrap();
            if let Some(t) = decode {
                step_hidden = slice.embed(&[t]).unwrap();
            }
        }
        let mut cache = slice.new_cache(64);
        slice.forward_layers(&mut hidden, &[tokens.len()], &mut [&mut cache]).unwrap();
        if decode.is_some() {
            // The decode step: one more row through this layer, after the prompt's.
            slice.forward_layers(&mut step_hidden, &[1], &mut [&mut cache]).unwrap();
            let bytes: Vec<u8> = step_hidden.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(out.join(format!("step_l_out-{k}.f32")), bytes).unwrap();
        }
        let bytes: Vec<u8> = hidden.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out.join(format!("l_out-{k}.f32")), bytes).unwrap();
        if k + 1 == n_layers {
            let n_embd = slice.profile().n_embd;
            let logits = slice.head(&hidden[(tokens.len() - 1) * n_embd..]).unwrap();
            let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(out.join("logits.f32"), bytes).unwrap();
        }
    }
}
