//! Writes the hidden state after every layer (raw little-endian f32, one file per layer) for
//! a token list, to compare with llama.cpp's `l_out-N` tensors dumped by
//! `examples/llamacpp_dump_layers.py` (see docs/benchmarks.md, "Agreement").
//!
//!     cargo run --release -p potluck-engine --example dump_hidden -- MODEL OUT_DIR 504,3575,282,4649,314
use potluck_engine::model::LlamaSlice;
use potluck_engine::threads::ComputePool;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = std::path::Path::new(&args[1]);
    let out = std::path::Path::new(&args[2]);
    let tokens: Vec<u32> = args[3].split(',').map(|t| t.parse().unwrap()).collect();
    let pool = ComputePool::new(1);
    let n_layers = potluck_engine::profile::ModelProfile::from_path(model).unwrap().0.n_layers;
    let mut hidden = Vec::new();
    for k in 0..n_layers {
        let slice = LlamaSlice::load(model, k..k + 1).unwrap();
        if k == 0 {
            hidden = slice.embed(&tokens).unwrap();
        }
        let mut cache = slice.new_cache(64);
        slice.forward_layers(&mut hidden, &[tokens.len()], &mut [&mut cache], &pool).unwrap();
        let bytes: Vec<u8> = hidden.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out.join(format!("l_out-{k}.f32")), bytes).unwrap();
    }
}
