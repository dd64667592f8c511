//! The kernels against candle: weights quantized by candle (`QTensor::quantize`), a plain f32
//! matmul over candle's dequantized weights as the reference, for every supported dtype, odd
//! shapes, several batch sizes, pool sizes 1 and 2, and every kernel family this CPU has.

use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

/// Deterministic xorshift64* values in [-1, 1): no RNG dependency, reproducible failures.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

const ALL_DTYPES: [GgmlDType; 13] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

const ALL_ISAS: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

/// Random weights with a per-row offset and scale (so Q4_1's `m` and the block scales vary),
/// quantized by candle. Returns our matrix and candle's dequantized weights.
fn quantized(dtype: GgmlDType, n_out: usize, n_in: usize, seed: u64) -> (QMatrix, Vec<f32>) {
    let mut rng = Rng(seed);
    let mut w = rng.vec(n_out * n_in);
    for (o, row) in w.chunks_exact_mut(n_in).enumerate() {
        let (scale, offset) = (0.5 + (o % 5) as f32, 0.3 * ((o % 3) as f32 - 1.0));
        row.iter_mut().for_each(|v| *v = *v * scale + offset);
    }
    let tensor = Tensor::from_vec(w, (n_out, n_in), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&tensor, dtype).unwrap();
    let bytes = q.data().unwrap().into_owned();
    let dequantized = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
    let matrix = QMatrix::new(dtype, n_out, n_in, bytes).unwrap();
    (matrix, dequantized.to_vec1::<f32>().unwrap())
}

/// Activations with varied magnitudes, and one all-zero block (the `amax == 0` path).
fn activations(n_rows: usize, n_in: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut x = rng.vec(n_rows * n_in);
    for (r, row) in x.chunks_exact_mut(n_in).enumerate() {
        let scale = 0.1 + r as f32;
        row.iter_mut().for_each(|v| *v *= scale);
    }
    let zero_len = 32.min(n_in);
    x[..zero_len].fill(0.0);
    x
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

/// Checks `out` against `x · wᵀ` with an error bound relative to |x_r| |w_o|.
fn assert_close(out: &[f32], x: &[f32], w: &[f32], n_in: usize, tolerance: f64, what: &str) {
    let n_out = w.len() / n_in;
    for (r, x) in x.chunks_exact(n_in).enumerate() {
        for (o, w) in w.chunks_exact(n_in).enumerate() {
            let exact: f64 = x.iter().zip(w).map(|(&x, &w)| x as f64 * w as f64).sum();
            let bound = tolerance * norm(x) * norm(w) + 1e-30;
            let got = out[r * n_out + o] as f64;
            assert!(
                (got - exact).abs() <= bound,
                "{what}: row {r} col {o}: got {got}, expected {exact} (bound {bound})"
            );
        }
    }
}

/// Block sizes that make the shapes odd for every tile: n_in is 7 blocks (or 3 superblocks, or
/// 83 floats), n_out 37.
fn test_n_in(dtype: GgmlDType) -> usize {
    match dtype.block_size() {
        1 => 83,
        32 => 7 * 32,
        _ => 3 * 256,
    }
}

#[test]
fn matmul_matches_dequantized_reference() {
    let pools = [ComputePool::new(1), ComputePool::new(2)];
    for dtype in ALL_DTYPES {
        let n_in = test_n_in(dtype);
        let n_out = 37;
        let (matrix, w) = quantized(dtype, n_out, n_in, 7);
        // Float weights see the activations exactly; the rest quantize them to 8 bits.
        let tolerance = if dtype.block_size() == 1 { 1e-5 } else { 1e-2 };
        for n_rows in [1, 3, 8, 17] {
            let x = activations(n_rows, n_in, 11 + n_rows as u64);
            let mut scalar_out = vec![f32::NAN; n_rows * n_out];
            matrix.matmul_with_isa(&x, n_rows, &mut scalar_out, &pools[0], Isa::Scalar);
            for isa in ALL_ISAS {
                for pool in &pools {
                    let mut out = vec![f32::NAN; n_rows * n_out];
                    matrix.matmul_with_isa(&x, n_rows, &mut out, pool, isa);
                    let what = format!(
                        "{dtype:?} {isa:?} rows {n_rows} threads {}",
                        pool.n_threads()
                    );
                    assert_close(&out, &x, &w, n_in, tolerance, &what);
                    // Same quantized activations, same integer dots: only the f32 summation
                    // order may differ from the scalar kernels.
                    for (i, (&a, &b)) in out.iter().zip(&scalar_out).enumerate() {
                        let (r, o) = (i / n_out, i % n_out);
                        let bound = 1e-5
                            * norm(&x[r * n_in..(r + 1) * n_in])
                            * norm(&w[o * n_in..(o + 1) * n_in]);
                        assert!(
                            ((a - b) as f64).abs() <= bound,
                            "{what}: SIMD {a} vs scalar {b} at row {r} col {o}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_default_isa_matches_reference() {
    let pool = ComputePool::new(1);
    let (matrix, w) = quantized(GgmlDType::Q4_1, 64, 576, 3);
    let x = activations(5, 576, 5);
    let mut out = vec![0.0; 5 * 64];
    matrix.matmul(&x, 5, &mut out, &pool);
    assert_close(&out, &x, &w, 576, 1e-2, "Q4_1 default isa");
}

#[test]
fn dequantize_row_matches_candle() {
    for dtype in ALL_DTYPES {
        let n_in = test_n_in(dtype);
        let (matrix, w) = quantized(dtype, 5, n_in, 13);
        let mut row = vec![0.0; n_in];
        for r in 0..5 {
            matrix.dequantize_row(r, &mut row);
            assert_eq!(row, w[r * n_in..(r + 1) * n_in], "{dtype:?} row {r}");
        }
    }
}

/// The extremes the i16 intermediate of `vpmaddubsw` must survive: Q8_0 codes of -128 (legal
/// in a file, though candle's quantizer never writes them) against activations of ±127, and
/// the largest Q5_1 codes.
#[test]
fn extreme_codes_do_not_saturate() {
    let pool = ComputePool::new(1);
    let n_in = 64;
    let x: Vec<f32> = (0..n_in)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    // Q8_0: d = 1.0, every code -128.
    let mut bytes = Vec::new();
    for _ in 0..2 {
        bytes.extend_from_slice(&half::f16::ONE.to_le_bytes());
        bytes.extend_from_slice(&[0x80; 32]);
    }
    let q8 = QMatrix::new(GgmlDType::Q8_0, 1, n_in, bytes).unwrap();
    // Q5_1: d = 1, m = 0, every code 31.
    let mut bytes = Vec::new();
    for _ in 0..2 {
        bytes.extend_from_slice(&half::f16::ONE.to_le_bytes());
        bytes.extend_from_slice(&half::f16::ZERO.to_le_bytes());
        bytes.extend_from_slice(&[0xFF; 4 + 16]);
    }
    let q5 = QMatrix::new(GgmlDType::Q5_1, 1, n_in, bytes).unwrap();
    let exact: f32 = x.iter().sum();
    for isa in ALL_ISAS {
        let mut out = [0.0];
        q8.matmul_with_isa(&x, 1, &mut out, &pool, isa);
        assert!(
            // The activation scale 1/127 is held in f16 as ggml holds it: 2^-11 relative.
            (out[0] - -128.0 * exact).abs() < 1e-3 * (128.0 * exact).abs(),
            "Q8_0 {isa:?}: {}",
            out[0]
        );
        q5.matmul_with_isa(&x, 1, &mut out, &pool, isa);
        assert!(
            (out[0] - 31.0 * exact).abs() < 1e-3 * (31.0 * exact).abs(),
            "Q5_1 {isa:?}: {}",
            out[0]
        );
    }
}

#[test]
fn scalar_and_simd_activation_quantization_agree() {
    let x = activations(3, 7 * 32, 17);
    let mut scalar = activations::Q8Rows::default();
    scalar.quantize(&x, 3, 7 * 32, Isa::Scalar);
    for isa in [Isa::Avx2, Isa::Avx512Vnni] {
        let mut simd = activations::Q8Rows::default();
        simd.quantize(&x, 3, 7 * 32, isa.clamp());
        assert_eq!(simd.codes[..21], scalar.codes[..21]);
        assert_eq!(simd.scales[..21], scalar.scales[..21]);
    }
}

#[test]
fn new_rejects_bad_input() {
    let ok_len = 2 * 20; // 2 rows of one Q4_1 block
    assert!(QMatrix::new(GgmlDType::Q4_1, 2, 32, vec![0; ok_len]).is_ok());
    for len in [0, ok_len - 1, ok_len + 1, 2 * ok_len] {
        assert!(
            QMatrix::new(GgmlDType::Q4_1, 2, 32, vec![0; len]).is_err(),
            "length {len}"
        );
    }
    // n_in not a multiple of the block size.
    assert!(QMatrix::new(GgmlDType::Q4_1, 2, 48, vec![0; 2 * 30]).is_err());
    assert!(QMatrix::new(GgmlDType::Q4K, 1, 128, vec![0; 72]).is_err());
    // Activation-only types and zero sizes.
    assert!(QMatrix::new(GgmlDType::Q8K, 1, 256, vec![0; 292]).is_err());
    assert!(QMatrix::new(GgmlDType::Q8_1, 1, 32, vec![0; 36]).is_err());
    assert!(QMatrix::new(GgmlDType::F32, 0, 4, vec![]).is_err());
    assert!(QMatrix::new(GgmlDType::F32, 4, 0, vec![]).is_err());
    // A size whose byte count overflows.
    assert!(QMatrix::new(GgmlDType::F32, usize::MAX / 2, 4, vec![]).is_err());
}

#[test]
fn realigned_bytes_read_back_the_same() {
    let bytes: Vec<u8> = (0..=255).collect();
    let realigned = WeightBytes::realigned(&bytes[1..]);
    assert_eq!(realigned.as_slice(), &bytes[1..]);
    assert_eq!(realigned.as_slice().as_ptr() as usize % WEIGHT_ALIGN, 0);
}

#[test]
fn zero_rows_is_a_no_op() {
    let (matrix, _) = quantized(GgmlDType::Q8_0, 4, 32, 1);
    matrix.matmul(&[], 0, &mut [], &ComputePool::new(2));
}

/// A row's result must not depend on which other rows share the call: the generation loop
/// batches several sequences' rows into one step, and a greedy answer must be the same
/// whether the server is idle or busy.
#[test]
fn each_row_is_independent_of_the_batch() {
    let pool = ComputePool::new(1);
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::F16, GgmlDType::F32] {
        let n_in = test_n_in(dtype);
        let n_out = 40;
        let (matrix, _) = quantized(dtype, n_out, n_in, 5);
        for n_rows in [2, 3, 4, 5, 8, 9, 16, 17] {
            let x = activations(n_rows, n_in, 9);
            for isa in ALL_ISAS {
                let mut batched = vec![0f32; n_rows * n_out];
                matrix.matmul_with_isa(&x, n_rows, &mut batched, &pool, isa);
                for r in 0..n_rows {
                    let mut alone = vec![0f32; n_out];
                    matrix.matmul_with_isa(&x[r * n_in..(r + 1) * n_in], 1, &mut alone, &pool, isa);
                    assert_eq!(
                        &batched[r * n_out..(r + 1) * n_out],
                        &alone[..],
                        "{dtype:?} {isa:?}: row {r} of {n_rows} differs from the row alone"
                    );
                }
            }
        }
    }
}

/// Matrices that read one input (a layer's Q, K and V; its gate and up) multiplied together
/// give each matrix's own product bit for bit: block formats share one quantized input and
/// one pool loop, other formats fall back to one by one; whatever the rows and pool size.
#[test]
fn shared_input_matmul_is_bit_identical_to_one_by_one() {
    use GgmlDType::*;
    let pools = [ComputePool::new(1), ComputePool::new(2)];
    let n_in = 256; // a whole number of blocks for every format
    let groups: [&[GgmlDType]; 4] = [&[Q4_1, Q4_1, Q4_1], &[Q4_0, Q8_0, Q5_1], &[Q4_1, F16], &[Q4K, Q6K]];
    for group in groups {
        let mats: Vec<QMatrix> = group
            .iter()
            .enumerate()
            .map(|(i, &dtype)| quantized(dtype, [37, 13, 64][i % 3], n_in, 3 + i as u64).0)
            .collect();
        let refs: Vec<&QMatrix> = mats.iter().collect();
        for n_rows in [1, 3, 17] {
            let x = activations(n_rows, n_in, 5 + n_rows as u64);
            for pool in &pools {
                let mut together: Vec<Vec<f32>> = mats.iter().map(|m| vec![f32::NAN; n_rows * m.n_out]).collect();
                let mut outs: Vec<&mut [f32]> = together.iter_mut().map(|v| v.as_mut_slice()).collect();
                QMatrix::matmul_shared_input(&refs, &x, n_rows, &mut outs, pool);
                for (m, got) in mats.iter().zip(&together) {
                    let mut alone = vec![f32::NAN; n_rows * m.n_out];
                    m.matmul(&x, n_rows, &mut alone, pool);
                    let same = alone.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{group:?} rows {n_rows} threads {}: {:?} differs", pool.n_threads(), m.format);
                }
            }
        }
    }
}

/// ggml's AVX2 `ggml_vec_dot_q6_K_q8_K` written out lane by lane in scalar code: eight i32
/// lanes (lane `L`: codes `4L..4L+3` of every 32-code group, times activations and scales,
/// minus 32 · the scaled 16-code sums `2L` and `2L+1`), one f32 FMA per superblock and lane,
/// then `hsum_float_8`'s order.
fn q6k_dot_in_ggml_lane_order(w: &[u8], act: &[activations::Q8KBlock]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, x) in act.iter().enumerate() {
        let p = &w[b * 210..(b + 1) * 210];
        let (ql, qh, sc) = (&p[..128], &p[128..192], &p[192..208]);
        let d = x.d * half::f16::from_bits(u16::from_le_bytes([p[208], p[209]])).to_f32();
        let code = |e: usize| -> i32 {
            let (h, r) = (e / 128, e % 128);
            let (g, t) = (r / 32, r % 32);
            let low = match g {
                0 => ql[64 * h + t] & 0xF,
                1 => ql[64 * h + 32 + t] & 0xF,
                2 => ql[64 * h + t] >> 4,
                _ => ql[64 * h + 32 + t] >> 4,
            };
            let high = (qh[32 * h + t] >> (2 * g)) & 3;
            (low | (high << 4)) as i32
        };
        let mut lanes = [0i32; 8];
        for e in 0..256 {
            let lane = (e % 32) / 4;
            lanes[lane] += code(e) * x.qs[e] as i32 * sc[e / 16] as i8 as i32;
        }
        for (lane, sum) in lanes.iter_mut().enumerate() {
            *sum -= 32 * (x.bsums[2 * lane] as i32 * sc[2 * lane] as i8 as i32 + x.bsums[2 * lane + 1] as i32 * sc[2 * lane + 1] as i8 as i32);
        }
        for (a, &s) in acc.iter_mut().zip(&lanes) {
            *a = d.mul_add(s as f32, *a);
        }
    }
    let s = [acc[4] + acc[0], acc[5] + acc[1], acc[6] + acc[2], acc[7] + acc[3]];
    let s = [s[0] + s[2], s[1] + s[3]];
    s[0] + s[1]
}

#[cfg(target_arch = "x86_64")]
#[test]
fn q6k_dot_sums_in_llama_cpps_lane_order() {
    assert_k_dot_matches(GgmlDType::Q6K, 0x6b6b, x86::dot_q6k_q8k, q6k_dot_in_ggml_lane_order);
}

/// llama.cpp's AVX2 `ggml_gemv_q4_K_8x8_q8_K` for one output, in scalar code: per superblock
/// the exact integers `Σ_sub scale·Σ q·x` and `Σ_sub min·Σ x`, two FMA chains, then their
/// difference.
fn q4k_dot_in_ggml_gemv_order(w: &[u8], act: &[activations::Q8KBlock]) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (b, x) in act.iter().enumerate() {
        let p = &w[b * 144..(b + 1) * 144];
        let f16_at = |i: usize| half::f16::from_bits(u16::from_le_bytes([p[i], p[i + 1]])).to_f32();
        let (d, dmin, sc, qs) = (f16_at(0), f16_at(2), &p[4..16], &p[16..]);
        let scale_min = |j: usize| -> (i32, i32) {
            if j < 4 {
                ((sc[j] & 63) as i32, (sc[j + 4] & 63) as i32)
            } else {
                (((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)) as i32, ((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)) as i32)
            }
        };
        let (mut s, mut m) = (0i32, 0i32);
        for sub in 0..8 {
            let (scale, min) = scale_min(sub);
            let dot: i32 = (0..32)
                .map(|l| {
                    let byte = qs[32 * (sub / 2) + l];
                    let q = if sub % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    q as i32 * x.qs[32 * sub + l] as i32
                })
                .sum();
            s += scale * dot;
            m += min * (x.bsums[2 * sub] as i32 + x.bsums[2 * sub + 1] as i32);
        }
        acc = (s as f32).mul_add(d * x.d, acc);
        acc_min = (m as f32).mul_add(dmin * x.d, acc_min);
    }
    acc - acc_min
}

#[cfg(target_arch = "x86_64")]
#[test]
fn q4k_dot_sums_in_llama_cpps_gemv_order() {
    assert_k_dot_matches(GgmlDType::Q4K, 0x4b4b, x86::dot_q4k_q8k, q4k_dot_in_ggml_gemv_order);
}

/// Our AVX2 K-quant dot (`kernel`) against its scalar statement of llama.cpp's order
/// (`reference`), bit for bit, on four random rows of 1024 weights in `dtype`.
#[cfg(target_arch = "x86_64")]
fn assert_k_dot_matches(
    dtype: GgmlDType,
    seed: u64,
    kernel: unsafe fn(&[u8], &[activations::Q8KBlock]) -> f32,
    reference: fn(&[u8], &[activations::Q8KBlock]) -> f32,
) {
    if Isa::detect() < Isa::Avx2 {
        return;
    }
    let mut rng = Rng(seed);
    let n_in = 1024;
    let w = rng.vec(4 * n_in);
    let q = QTensor::quantize(&Tensor::from_vec(w, (4, n_in), &Device::Cpu).unwrap(), dtype).unwrap();
    let bytes = q.data().unwrap().to_vec();
    let row_bytes = bytes.len() / 4;
    let mut rows = activations::Q8KRows::default();
    let x: Vec<f32> = rng.vec(n_in).iter().map(|v| v * 3.0).collect();
    rows.quantize(&x, 1, n_in);
    for o in 0..4 {
        let row = &bytes[o * row_bytes..(o + 1) * row_bytes];
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); `row` holds `nb` blocks.
        let ours = unsafe { kernel(row, &rows.blocks[..rows.nb]) };
        let ggml = reference(row, &rows.blocks[..rows.nb]);
        assert_eq!(ours.to_bits(), ggml.to_bits(), "{dtype:?} row {o}: {ours} vs {ggml}");
    }
}
