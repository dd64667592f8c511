//! Times `QMatrix::matmul` at SmolLM2-135M's shapes (Q4_1 layers, Q8_0 49152×576 head) against
//! candle's own `QMatMul::forward`, on one thread unless told otherwise.
//!
//! `cargo run --release -p potluck-engine --example qmatmul_bench [-- [THREADS] [--model-only]]`
//!
//! Two kinds of figures:
//! * per shape, the same matrix over and over: its weights stay in cache for the small
//!   shapes, so this measures the kernels rather than the memory;
//! * a whole decode / prefill token: the 210 layer matrices and the head of the real model,
//!   each a distinct ~96 MB in all (far more than any cache), in the model's order — the
//!   figure to hold against llama.cpp's ~11 ms per decoded token.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use potluck_engine::quant::{Isa, QMatrix};
use potluck_engine::threads::ComputePool;
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, FFN 1536, 30 layers,
/// vocabulary 49152.
const N_LAYERS: usize = 30;
const LAYER_SHAPES: [(&str, usize, usize); 7] = [
    ("attn_q", 576, 576),
    ("attn_k", 576, 192),
    ("attn_v", 576, 192),
    ("attn_output", 576, 576),
    ("ffn_gate", 576, 1536),
    ("ffn_up", 576, 1536),
    ("ffn_down", 1536, 576),
];
const HEAD: (usize, usize) = (576, 49152);
/// Activation rows of the prefill figures.
const PREFILL_ROWS: usize = 128;
/// Each timing repeats its call for at least this long (and at least `MIN_ITERS` times).
const MIN_TIME: Duration = Duration::from_millis(300);
const MIN_ITERS: usize = 5;

/// A deterministic byte stream (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Valid random blocks: random codes, small sane f16 scales (and Q4_1 minimums).
fn random_weights(dtype: GgmlDType, n_out: usize, n_in: usize, rng: &mut Rng) -> Vec<u8> {
    let n_blocks = n_out * n_in / 32;
    let mut bytes = Vec::with_capacity(n_blocks * dtype.type_size());
    let d = half::f16::from_f32(0.01).to_le_bytes();
    let m = half::f16::from_f32(-0.08).to_le_bytes();
    for _ in 0..n_blocks {
        bytes.extend_from_slice(&d);
        let n_codes = match dtype {
            GgmlDType::Q4_1 => {
                bytes.extend_from_slice(&m);
                16
            }
            GgmlDType::Q8_0 => 32,
            _ => unimplemented!("the benchmark builds Q4_1 and Q8_0 only"),
        };
        for _ in 0..n_codes / 8 {
            bytes.extend_from_slice(&rng.next().to_le_bytes());
        }
    }
    bytes
}

struct Weights {
    ours: QMatrix,
    candle: QMatMul,
}

fn weights(dtype: GgmlDType, n_in: usize, n_out: usize, rng: &mut Rng) -> Weights {
    let bytes = random_weights(dtype, n_out, n_in, rng);
    let storage = QStorage::from_data(Cow::Borrowed(&bytes), &Device::Cpu, dtype).unwrap();
    let candle = QMatMul::from_qtensor(QTensor::new(storage, (n_out, n_in)).unwrap()).unwrap();
    Weights {
        ours: QMatrix::new(dtype, n_out, n_in, bytes).unwrap(),
        candle,
    }
}

/// Median seconds per call of `f`.
fn time(mut f: impl FnMut()) -> f64 {
    f(); // warm up: scratch buffers, candle's lazy repacking, page faults
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < MIN_ITERS || start.elapsed() < MIN_TIME {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let n_threads: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map_or(1, |s| s.parse().expect("THREADS must be a number"));
    // candle sizes its pools from these; set before its first matmul.
    std::env::set_var("CANDLE_NUM_THREADS", n_threads.to_string());
    std::env::set_var("RAYON_NUM_THREADS", n_threads.to_string());
    let pool = ComputePool::new(n_threads);
    let isa = Isa::detect();
    println!("threads: {n_threads}, kernels: {isa:?}");
    let mut rng = Rng(0x5eed);

    // `--model-only` skips the per-shape table.
    if !std::env::args().any(|a| a == "--model-only") {
        println!("\n== per shape, same matrix repeated (cache-warm for the small ones) ==");
        println!(
            "{:<24} {:>5} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8}",
            "matrix",
            "rows",
            "ours µs",
            "GB/s",
            "GFLOP/s",
            "candle µs",
            "GB/s",
            "GFLOP/s",
            "speedup"
        );
        let mut shapes: Vec<(String, GgmlDType, usize, usize)> = LAYER_SHAPES
            .iter()
            .filter(|(name, ..)| *name != "attn_v" && *name != "attn_output" && *name != "ffn_up")
            .map(|&(name, n_in, n_out)| (format!("{name} Q4_1"), GgmlDType::Q4_1, n_in, n_out))
            .collect();
        shapes.push(("output Q8_0".into(), GgmlDType::Q8_0, HEAD.0, HEAD.1));
        for (name, dtype, n_in, n_out) in &shapes {
            let w = weights(*dtype, *n_in, *n_out, &mut rng);
            for n_rows in [1, PREFILL_ROWS] {
                let x: Vec<f32> = (0..n_rows * n_in).map(|_| rng.f32()).collect();
                let xt = Tensor::from_vec(x.clone(), (n_rows, *n_in), &Device::Cpu).unwrap();
                let mut out = vec![0.0; n_rows * n_out];
                let ours = time(|| w.ours.matmul(&x, n_rows, &mut out, &pool));
                let candle = time(|| {
                    w.candle.forward(&xt).unwrap();
                });
                let bytes = w.ours.size_in_bytes() as f64;
                let flops = 2.0 * (n_rows * n_in * n_out) as f64;
                println!(
                    "{:<24} {:>5} {:>10.1} {:>9.1} {:>9.1} {:>10.1} {:>9.1} {:>9.1} {:>7.2}x",
                    format!("{name} {n_in}→{n_out}"),
                    n_rows,
                    ours * 1e6,
                    bytes / ours / 1e9,
                    flops / ours / 1e9,
                    candle * 1e6,
                    bytes / candle / 1e9,
                    flops / candle / 1e9,
                    candle / ours,
                );
                if isa > Isa::Avx2 {
                    let avx2 = time(|| {
                        w.ours
                            .matmul_with_isa(&x, n_rows, &mut out, &pool, Isa::Avx2)
                    });
                    println!(
                        "{:<24} {:>5} {:>10.1} {:>9.1} {:>9.1}",
                        "  (ours, AVX2 only)",
                        n_rows,
                        avx2 * 1e6,
                        bytes / avx2 / 1e9,
                        flops / avx2 / 1e9
                    );
                }
            }
        }
    }
    println!("\n== whole model: 30 layers × 7 Q4_1 matrices + Q8_0 head, all distinct ==");
    let layers: Vec<Vec<Weights>> = (0..N_LAYERS)
        .map(|_| {
            LAYER_SHAPES
                .iter()
                .map(|&(_, n_in, n_out)| weights(GgmlDType::Q4_1, n_in, n_out, &mut rng))
                .collect()
        })
        .collect();
    let head = weights(GgmlDType::Q8_0, HEAD.0, HEAD.1, &mut rng);
    let total_bytes: usize = layers
        .iter()
        .flatten()
        .map(|w| w.ours.size_in_bytes())
        .sum::<usize>()
        + head.ours.size_in_bytes();
    println!("weights: {:.1} MB", total_bytes as f64 / 1e6);
    for (label, n_rows, with_head) in [
        ("decode, 1 row", 1, true),
        ("prefill, 128 rows (no head)", PREFILL_ROWS, false),
    ] {
        let x: Vec<f32> = (0..n_rows * 1536).map(|_| rng.f32()).collect();
        let mut out = vec![0.0; n_rows * HEAD.1];
        let ours = time(|| {
            for layer in &layers {
                for w in layer {
                    let (n_in, n_out) = (w.ours.n_in(), w.ours.n_out());
                    w.ours.matmul(
                        &x[..n_rows * n_in],
                        n_rows,
                        &mut out[..n_rows * n_out],
                        &pool,
                    );
                }
            }
            if with_head {
                head.ours.matmul(
                    &x[..n_rows * HEAD.0],
                    n_rows,
                    &mut out[..n_rows * HEAD.1],
                    &pool,
                );
            }
        });
        let inputs: Vec<Tensor> = [576, 1536]
            .iter()
            .map(|&n_in| {
                Tensor::from_vec(x[..n_rows * n_in].to_vec(), (n_rows, n_in), &Device::Cpu).unwrap()
            })
            .collect();
        let input = |n_in: usize| if n_in == 576 { &inputs[0] } else { &inputs[1] };
        let candle = time(|| {
            for layer in &layers {
                for w in layer {
                    w.candle.forward(input(w.ours.n_in())).unwrap();
                }
            }
            if with_head {
                head.candle.forward(input(HEAD.0)).unwrap();
            }
        });
        let bytes = (total_bytes
            - if with_head {
                0
            } else {
                head.ours.size_in_bytes()
            }) as f64;
        let per_token = |t: f64| t / n_rows as f64;
        println!(
            "{label:<28} ours {:>8.2} ms/token ({:>6.1} tokens/s, {:>5.1} GB/s of weights) | candle {:>8.2} ms/token ({:>6.1} tokens/s) | {:.2}x",
            per_token(ours) * 1e3,
            1.0 / per_token(ours),
            bytes / ours / 1e9,
            per_token(candle) * 1e3,
            1.0 / per_token(candle),
            candle / ours,
        );
    }
}
