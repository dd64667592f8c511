//! The element-wise and row-wise operations every architecture shares: norms, RoPE in both
//! of llama.cpp's layouts, activations, the residual add. Each matches the ggml kernel it
//! names bit for bit on the CPU (the reference-model test checks the llama path).

use half::f16;

use crate::profile::ModelProfile;
use crate::quant::Isa;

/// cos/sin pairs for every row's position: `[row][pair] = (cos, sin)` flattened, `n_rot`
/// floats per row. Computed as ggml's `ggml_rope_cache_init` does (theta advanced by
/// repeated multiplication in f32), so positions rotate bit-for-bit like llama.cpp's.
/// `freq_factors` are Llama-3's per-pair divisors (`rope_freqs.weight`), if the model has them.
pub fn rope_table(p: &ModelProfile, freq_factors: Option<&[f32]>, positions: &[usize]) -> Vec<f32> {
    rope_table_with(p.rope_freq_base, p.rope_scaling.freq_scale(), p.n_rot, freq_factors, positions)
}

/// [`rope_table`] for an explicit base and frequency scale (Gemma 3's local layers rotate
/// with their own base, unscaled).
pub fn rope_table_with(base: f32, freq_scale: f32, n_rot: usize, freq_factors: Option<&[f32]>, positions: &[usize]) -> Vec<f32> {
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut table = vec![0f32; positions.len() * n_rot];
    for (row, &pos) in table.chunks_exact_mut(n_rot).zip(positions) {
        let mut theta = pos as f32;
        for (pair, cs) in row.chunks_exact_mut(2).enumerate() {
            let ff = freq_factors.map_or(1.0, |f| f[pair]);
            let t = freq_scale * (theta / ff);
            cs[0] = t.cos();
            cs[1] = t.sin();
            theta *= theta_scale;
        }
    }
    table
}

/// RMSNorm of every row of `x` times `weight`, into `out`, as ggml's
/// `ggml_compute_forward_rms_norm_f32` then `ggml_mul`: squares in f32, summed in f64.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, out_row) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let scale = rms_scale(row, eps);
        for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// [`rms_norm`] in place (per-head Q/K norms: rows of `head_dim`), the same roundings.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let scale = rms_scale(row, eps);
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// 1/√(mean of squares + eps): squares in f32, summed in f64, as ggml.
#[inline(always)]
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// Rotates adjacent pairs (x[2i], x[2i+1]) of the first `n_rot` dims by the row's angles:
/// llama.cpp's `LLAMA_ROPE_TYPE_NORM` (llama, mistral: convert_hf_to_gguf.py permutes their
/// Q/K rows so that HF's halves become adjacent pairs).
pub fn apply_rope(head: &mut [f32], cos_sin: &[f32]) {
    for (pair, cs) in head.chunks_exact_mut(2).zip(cos_sin.chunks_exact(2)) {
        let (x0, x1) = (pair[0], pair[1]);
        // As GCC compiles ggml's `rotate_pairs` (C++, -ffp-contract=fast on an FMA target):
        // one fused multiply-add each, checked bit for bit against llama.cpp's tensors.
        pair[0] = x0.mul_add(cs[0], -(x1 * cs[1]));
        pair[1] = x0.mul_add(cs[1], x1 * cs[0]);
    }
}

/// gate ← silu(gate) · up, as ggml's `ggml_vec_swiglu_f32`. The polynomial's `mul_add`s are
/// a libm `fmaf` call each unless the code is compiled for FMA, so this runs in a function
/// that enables FMA when the CPU has it (an FMA is exact either way: same bits, ~10× faster).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // `Isa::Avx2` and above imply FMA; `POTLUCK_ISA=scalar` caps this kernel too.
        if Isa::detect() >= Isa::Avx2 {
            // SAFETY: the CPU has FMA (checked by `Isa::detect`).
            return unsafe { swiglu_fma(gate, up) };
        }
    }
    swiglu_portable(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu_portable(gate, up)
}

#[inline(always)]
fn swiglu_portable(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// SiLU as ggml's `ggml_v_silu` computes it in `ggml_vec_swiglu_f32` (x / (1 + e^-x) with
/// ggml's `ggml_v_expf` polynomial, not libm's expf), so the feed-forward matches llama.cpp
/// bit for bit. Every operation is element-wise, so this scalar form gives the SIMD result.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + ggml_expf(0.0 - x))
}

/// ggml's `ggml_v_expf` (AVX-512 form), one lane: range reduction by a shifter constant,
/// a degree-5 polynomial, then scaling by 2^n; ±inf/0 past |n| > 192.
#[inline(always)]
pub(crate) fn ggml_expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let shifter = c(0x4B40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3FB8_AA3B), shifter); // log2(e)
    let n = z - shifter;
    let b = (-n).mul_add(c(0x35BF_BE8E), (-n).mul_add(c(0x3F31_7200), x)); // ln2 hi/lo
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = c(0x3C07_2010)
        .mul_add(b, c(0x3D2B_9F17))
        .mul_add(u, c(0x3E2A_AF33).mul_add(b, c(0x3EFF_FEDB)))
        .mul_add(u, c(0x3F7F_FFF6).mul_add(b, 1.0));
    // _mm512_scalef_ps(j, n): j · 2^n, rounded once (exact while 2^n is a normal f32).
    let n = n as i32;
    if (-126..=127).contains(&n) {
        j * f32::from_bits(((n + 127) as u32) << 23)
    } else {
        (j as f64 * 2f64.powi(n)) as f32
    }
}

/// gate ← gelu(gate) · up, as ggml's `ggml_vec_geglu_f32` with `GGML_GELU_FP16` (its CPU
/// default): the gate is rounded to f16 and looked up in a table of GELU (tanh form) values
/// stored as f16; beyond ±10 it is 0 or the identity.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    let table = gelu_f16_table();
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32() * u
        };
    }
}

/// ggml's `ggml_table_gelu_f16`: for every f16 bit pattern, GELU of its value rounded to f16.
/// Built once (65,536 entries, 128 KiB), as `ggml_cpu_init` builds it.
fn gelu_f16_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|bits| f16::from_f32(gelu(f16::from_bits(bits).to_f32())).to_bits()).collect())
}

/// ggml's `ggml_gelu_f32`: 0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²))), with libm's tanhf.
/// `1 + a·x·x` is one fused multiply-add, as GCC contracts it in ggml-cpu.c's table init.
#[allow(clippy::excessive_precision)]
fn gelu(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    // ggml's literal, rounded to f32 by the compiler as there.
    const SQRT_2_OVER_PI: f32 = 0.797_884_560_802_865_355_879_892_119_868_76;
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh())
}

pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotates the pairs (x[i], x[i + n_rot/2]) of the first `n_rot` dims by the row's angles:
/// llama.cpp's `LLAMA_ROPE_TYPE_NEOX` (Qwen2/3, Gemma, Phi-3, GPT-NeoX: their Q/K rows are
/// not permuted, so RoPE rotates the two halves of the rotated dims against each other).
/// Pair `i` uses angle `i`, as in `rotate_pairs` with `n_offset = n_dims / 2`.
pub fn apply_rope_neox(head: &mut [f32], cos_sin: &[f32]) {
    let half = cos_sin.len() / 2;
    for (i, cs) in cos_sin.chunks_exact(2).enumerate() {
        let (x0, x1) = (head[i], head[i + half]);
        head[i] = x0.mul_add(cs[0], -(x1 * cs[1]));
        head[i + half] = x0.mul_add(cs[1], x1 * cs[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts rotate the same pairs of values by the same angles; only which dims form
    /// a pair differs. Permuting the input into the other layout must give the permuted
    /// output, bit for bit.
    #[test]
    fn neox_rope_is_adjacent_rope_on_permuted_dims() {
        let n_rot = 8;
        let cos_sin: Vec<f32> = (0..n_rot).map(|i| if i % 2 == 0 { (i as f32 * 0.3).cos() } else { (i as f32 * 0.3).sin() }).collect();
        let x: Vec<f32> = (0..n_rot).map(|i| i as f32 * 0.7 - 2.0).collect();
        let mut neox = x.clone();
        apply_rope_neox(&mut neox, &cos_sin);
        // adjacent layout: pair i = (x[i], x[i + half]) interleaved.
        let half = n_rot / 2;
        let mut adjacent: Vec<f32> = (0..half).flat_map(|i| [x[i], x[i + half]]).collect();
        apply_rope(&mut adjacent, &cos_sin);
        for i in 0..half {
            assert_eq!(neox[i].to_bits(), adjacent[2 * i].to_bits());
            assert_eq!(neox[i + half].to_bits(), adjacent[2 * i + 1].to_bits());
        }
        assert_ne!(neox, x, "it rotated something");
    }

    #[test]
    fn rms_norm_of_a_constant_row_is_the_weight() {
        let x = [3.0f32; 4];
        let w = [1.0, 2.0, 0.5, -1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        assert_eq!(out, w);
    }
}
